// The columns a benchmark compares, from a comma list such as `tern,tern+MALLOC_ARENA_MAX=2,qemu`:
// `tern+NAME=VALUE` (repeatable) is a column of tern processes with NAME=VALUE in their
// environment, so two settings of one build compare in one lab boot; `tern@DIR` (before any
// `+`) runs the build in the checkout DIR (its `dist/bin/tern.js`), so two builds do.
import path from 'node:path';

/** NAME=VALUE strings as an environment (strings without a NAME= are left out). */
function envOfPairs(pairs: string[]): Record<string, string> {
  return Object.fromEntries(pairs.filter((kv) => kv.indexOf('=') > 0).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
}

/** The environment a column's `+NAME=VALUE` parts give its processes. */
export function columnEnv(column: string): Record<string, string> {
  return envOfPairs(column.split('+').slice(1));
}

/** `tern@DIR`: the CLI of the build in DIR; undefined for this checkout's. */
export function columnCli(column: string): string | undefined {
  const dir = /^[a-z]+(?::\d+)?@([^+]+)/.exec(column)?.[1];
  return dir === undefined ? undefined : path.join(dir, 'dist', 'bin', 'tern.js');
}

/** The VMM a column runs: `tern` or `qemu`, whatever follows (`:N`, `+NAME=VALUE`). */
export function columnVmm(column: string): string {
  return /^[a-z]+/.exec(column)?.[0] ?? column;
}

/**
 * TERN_BENCH_TERN_ENV=NAME=VALUE[,NAME=VALUE...]: added to the environment of the tern processes
 * of the benchmarks that have one tern column (block, net), to measure a setting's cost there.
 */
export function benchTernEnv(): Record<string, string> {
  return envOfPairs((process.env.TERN_BENCH_TERN_ENV ?? '').split(','));
}
