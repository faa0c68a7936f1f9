// `npm run bench`: benchmarks that compare tern with QEMU side by side in one lab run
// (absolute timings in the emulated lab are meaningless; the ratios are the result).
import path from 'node:path';
import { runInLab } from '../lab/lab';

const REPO = path.resolve(__dirname, '..', '..', '..');

const BENCHES: Record<string, string> = {
  boot: 'dist/test/bench/boot-bench.js',
  snapshot: 'dist/test/bench/snapshot-bench.js',
  migration: 'dist/test/bench/migration-bench.js',
  'migration-tiny': 'dist/test/bench/migration-tiny-bench.js',
  block: 'dist/test/bench/block-bench.js',
  net: 'dist/test/bench/net-bench.js',
  startup: 'dist/test/bench/startup-bench.js',
  'idle-memory': 'dist/test/bench/idle-memory-bench.js',
};

async function main(): Promise<void> {
  // `npm run bench -- snapshot` runs one benchmark; no argument runs them all in one lab boot.
  const names = process.argv.slice(2);
  for (const n of names) if (!BENCHES[n]) throw new Error(`unknown benchmark '${n}' (have: ${Object.keys(BENCHES).join(', ')})`);
  const scripts = (names.length ? names : Object.keys(BENCHES)).map((n) => `node ${BENCHES[n]}`);
  // tern starts as it would on a machine of the lab's kind with tern installed: from a startup
  // snapshot built for its CPU (the host's build, mounted read-only, holds only the host's).
  const startupSnapshot = 'export TERN_STARTUP_SNAPSHOT_DIR=/tmp/tern-startup-snapshot\nnode scripts/bundle.js --startup-snapshot';
  const r = await runInLab({
    // (debugfs: KVM's per-VM exit counters, which benches read beside their figures)
    script: `set -e\nmount -t debugfs none /sys/kernel/debug 2>/dev/null || true\n${startupSnapshot}\n${scripts.join('\n')}`,
    timeoutMs: 90 * 60_000,
    // A 2 GiB guest and its snapshot both live in the lab's RAM (its only writable file
    // systems are tmpfs).
    memMiB: Number(process.env.TERN_BENCH_LAB_MEM_MIB ?? 6144),
    preallocRam: true,
    cwd: REPO,
    // The lab starts from a clean environment: pass the fixtures and every TERN_BENCH_* knob.
    env: {
      TERN_FIXTURES: process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures',
      TERN_BENCH_RUNS: process.env.TERN_BENCH_RUNS ?? '5',
      ...Object.fromEntries(Object.entries(process.env).filter(([k, v]) => k.startsWith('TERN_BENCH_') && v !== undefined)) as Record<string, string>,
    },
    onOutput: (c) => process.stdout.write(c),
  });
  process.stdout.write(`\nbench (${r.mode}): ${new Date().toISOString().slice(0, 10)}, exit ${r.exitCode}\n`);
  process.exit(r.exitCode);
}

main().catch((e) => {
  process.stderr.write(`bench: ${(e as Error).message}\n`);
  process.exit(1);
});
