// How often the lab freezes: runs one test file N times in the lab, through the same session
// runner as `npm test` (one lab boot, a fresh boot after a freeze), and counts runs, freezes
// and failures. The lab kernel's messages (a stuck CPU's backtrace) are printed as they come.
//
//   node dist/test/lab/freeze-rate.js [--runs 20] [--smp 2] [FILE]
//
// TERN_LAB_ACCEL (e.g. tcg,thread=single) and TERN_LAB_CPU choose the lab's TCG mode and CPU;
// TERN_LAB_KEEPER=0 runs without kvm-keeper.ts.
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { runInLabSession, type TestFile } from '../runner/lab-session';
import { fixturesDir } from './fixtures';
import { runInLab } from './lab';

const REPO = path.resolve(__dirname, '..', '..', '..');

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    options: { runs: { type: 'string', default: '20' }, smp: { type: 'string', default: '2' } },
    allowPositionals: true,
  });
  const file = positionals[0] ?? 'dist/test/linux/boot.test.js';
  const runs = Number(values.runs);
  const smp = Number(values.smp);
  let done = 0;
  let freezes = 0;
  let failed = 0;
  const started = Date.now();
  while (done < runs) {
    const files: TestFile[] = Array.from({ length: runs - done }, () => ({ tier: 'linux', file }));
    const session = await runInLabSession(
      files,
      {
        cwd: REPO,
        timeoutMs: 90 * 60_000,
        avaTimeout: '15m',
        env: { TERN_FIXTURES: fixturesDir() },
        onConsole: (l) => process.stdout.write(`lab console: ${l}\n`),
        onFileEnd: (r) => process.stdout.write(`${r.file}: ${r.counts.passed} passed, ${r.counts.failed} failed\n`),
        onFreezeEvidence: (cpus) => process.stdout.write(`lab: the frozen lab's CPUs, from QEMU's monitor:\n${cpus}\n`),
        onBootFailed: (why) => process.stdout.write(`lab: ${why}\n`),
        runLab: (o) => runInLab({ ...o, smp }),
      },
      () => randomBytes(8).toString('hex'),
    );
    for (const b of session.boots) process.stdout.write(`${b}\n`);
    // Every boot that did not finish its list stopped early: a freeze (or a lab that died).
    freezes += session.boots.filter((b) => !/: \d+ files in \d+ s$/.test(b)).length;
    const finished = session.results.filter((r) => !r.note);
    failed += finished.filter((r) => r.counts.failed > 0).length;
    // A run that froze the lab is a run: count it, so that the loop ends.
    done += finished.length + session.results.filter((r) => r.note?.startsWith('interrupted')).length;
    done += session.boots.length > 1 ? 1 : 0;
  }
  const minutes = (Date.now() - started) / 60_000;
  process.stdout.write(
    `freeze-rate: ${file}, ${runs} runs, lab smp=${smp} accel=${process.env.TERN_LAB_ACCEL ?? 'tcg'} cpu=${process.env.TERN_LAB_CPU ?? 'EPYC,+svm'} keeper=${process.env.TERN_LAB_KEEPER ?? '1'}: ` +
      `${freezes} freezes, ${failed} failed runs, ${minutes.toFixed(1)} min\n`,
  );
}

main().catch((e) => {
  process.stderr.write(`freeze-rate: ${(e as Error).stack}\n`);
  process.exit(1);
});
