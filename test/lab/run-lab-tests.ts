// The lab tier of `npm test`: every test/linux/*.test.js (real Debian kernels under tern and
// the QEMU peer) runs with ava in ONE lab boot, because booting the lab is the expensive part.
// Where the CPU has vmx/svm the same files run directly on the host.
import path from 'node:path';
import { labMode, runInLab } from './lab';

const REPO = path.resolve(__dirname, '..', '..', '..');
// Lab boot plus every Linux test, with a generous margin: TCG is slow but steady. A test may
// retry a stalled 2-vCPU guest once, hence ava's 15 minutes per test.
const LAB_TIMEOUT_MS = 25 * 60_000;

async function main(): Promise<void> {
  const files = process.argv.slice(2);
  const targets = files.length ? files.join(' ') : "'dist/test/linux/**/*.test.js'";
  process.stdout.write(`lab tier: running ${targets} (${labMode()} mode)\n`);
  const result = await runInLab({
    script: `export TERN_FIXTURES=${process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures'}\n` +
      `node node_modules/ava/entrypoints/cli.mjs --serial --concurrency=1 --verbose --timeout=15m ${targets}`,
    timeoutMs: LAB_TIMEOUT_MS,
    cwd: REPO,
    onOutput: (chunk) => process.stdout.write(chunk),
  });
  process.stdout.write(`\nlab tier: exit ${result.exitCode} after ${(result.durationMs / 1000).toFixed(1)} s` +
    (result.mode === 'lab' ? ` (lab boot ${(result.bootMs / 1000).toFixed(1)} s)` : '') + '\n');
  process.exit(result.exitCode);
}

main().catch((e) => {
  process.stderr.write(`lab tier: ${(e as Error).message}\n`);
  process.exit(1);
});
