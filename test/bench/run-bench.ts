// `npm run bench`: benchmarks that compare tern with QEMU side by side in one lab run
// (absolute timings in the emulated lab are meaningless; the ratios are the result).
import path from 'node:path';
import { runInLab } from '../lab/lab';

const REPO = path.resolve(__dirname, '..', '..', '..');

async function main(): Promise<void> {
  const r = await runInLab({
    script: 'node dist/test/bench/boot-bench.js',
    timeoutMs: 40 * 60_000,
    cwd: REPO,
    env: { TERN_FIXTURES: process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures', TERN_BENCH_RUNS: process.env.TERN_BENCH_RUNS ?? '5' },
    onOutput: (c) => process.stdout.write(c),
  });
  process.stdout.write(`\nbench (${r.mode}): ${new Date().toISOString().slice(0, 10)}, exit ${r.exitCode}\n`);
  process.exit(r.exitCode);
}

main().catch((e) => {
  process.stderr.write(`bench: ${(e as Error).message}\n`);
  process.exit(1);
});
