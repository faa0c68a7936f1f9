// The test runner's own logic: counting ava's TAP, and the lab session that reruns what a
// frozen lab left unfinished in a fresh boot (played here by a scripted lab), and the second run
// of a lab file's failed tests.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LabFrozenError, LabOptions, LabResult } from '../lab/lab';
import { TestFile, runInLabSession } from '../runner/lab-session';
import { countTap, countsLine, failedTests, settleRetry } from '../runner/tap-counts';

const REPO = path.resolve(__dirname, '..', '..', '..');

const TAP_MIXED = `TAP version 13
ok 1 - b # SKIP
not ok 2 - c # TODO
ok 3 - a
not ok 4 - d
  ---
    name: AssertionError
  ...

1..4
# tests 3
# pass 1
# skip 1
# fail 2
`;

test('TAP counts: passed, failed, and skipped with todo tests as skipped, not failed', (t) => {
  t.deepEqual(countTap(TAP_MIXED, 1), { passed: 1, failed: 1, skipped: 2 });
  t.deepEqual(failedTests(TAP_MIXED), ['d']);
  t.is(countsLine({ passed: 1, failed: 1, skipped: 2 }), '1 passed, 1 failed, 2 skipped');
});

test('TAP counts: a run cut off before its summary counts its ok lines, and the cut as a failure', (t) => {
  t.deepEqual(countTap('TAP version 13\nok 1 - a\nok 2 - b\n', null), { passed: 2, failed: 1, skipped: 0 });
});

test('TAP counts: a run that reported nothing, or exited non-zero with no failure, has failed', (t) => {
  t.deepEqual(countTap('', 0), { passed: 0, failed: 1, skipped: 0 });
  t.deepEqual(countTap('1..2\n# tests 2\n# pass 2\n# fail 0\n', 1), { passed: 2, failed: 1, skipped: 0 });
});

/** A lab that runs the job's files by printing their markers; `freezeOn` files freeze it. */
function scriptedLab(freezeOn: Map<string, number>, boots: string[][]) {
  return async (o: LabOptions): Promise<LabResult> => {
    const calls = [...o.script.matchAll(/^run_file (\d+) '([^']+)'$/gm)].map((m) => ({ k: m[1], file: m[2] }));
    const nonce = /TERN-TEST-BEGIN (\w+)/.exec(o.script)![1];
    boots.push(calls.map((c) => c.file));
    for (const c of calls) {
      o.onOutput?.(`TERN-TEST-BEGIN ${nonce} ${c.k} ${c.file}\nTAP version 13\n`);
      const left = freezeOn.get(c.file) ?? 0;
      if (left > 0) {
        freezeOn.set(c.file, left - 1);
        throw new LabFrozenError('no heartbeat for 120 s', '');
      }
      o.onOutput?.(`ok 1 - ${c.file} works\n1..1\n# tests 1\n# pass 1\n# fail 0\nTERN-TEST-END ${nonce} ${c.k} 0 ${c.file}\n`);
    }
    return { exitCode: 0, output: '', durationMs: 1, bootMs: 1, queuedMs: 0, mode: 'lab' };
  };
}

const FILES: TestFile[] = ['a', 'b', 'c', 'd'].map((n) => ({ tier: 'kvm', file: `dist/test/host/${n}.test.js` }));
let n = 0;
const nonce = () => `n${++n}`;

test('lab session: a freeze reruns the interrupted file and the ones after it in one fresh boot', async (t) => {
  const boots: string[][] = [];
  const failed: string[] = [];
  const r = await runInLabSession(FILES, {
    cwd: '/', timeoutMs: 1000, avaTimeout: '1m',
    runLab: scriptedLab(new Map([[FILES[1].file, 1]]), boots),
    onBootFailed: (why) => failed.push(why),
  }, nonce);
  t.deepEqual(boots, [FILES.map((f) => f.file), FILES.slice(1).map((f) => f.file)]);
  t.deepEqual(r.results.map((x) => [x.file, x.counts.passed, x.counts.failed]), FILES.map((f) => [f.file, 1, 0]));
  t.is(failed.length, 1);
  t.regex(failed[0], /the lab froze: no heartbeat for 120 s during dist\/test\/host\/b\.test\.js/);
  t.is(r.boots.length, 2);
  t.regex(r.boots[0], /after 1 of 4 files/);
});

test('lab session: a file that freezes the lab twice fails, the files after it are reported as never run', async (t) => {
  const boots: string[][] = [];
  const r = await runInLabSession(FILES, {
    cwd: '/', timeoutMs: 1000, avaTimeout: '1m',
    runLab: scriptedLab(new Map([[FILES[2].file, 2]]), boots),
  }, nonce);
  t.is(boots.length, 2, 'one fresh boot, not more');
  const byFile = new Map(r.results.map((x) => [x.file, x]));
  t.is(byFile.get(FILES[0].file)!.counts.passed, 1);
  t.is(byFile.get(FILES[1].file)!.counts.passed, 1);
  t.deepEqual(byFile.get(FILES[2].file)!.counts, { passed: 0, failed: 1, skipped: 0 });
  t.regex(byFile.get(FILES[2].file)!.note!, /interrupted twice/);
  t.regex(byFile.get(FILES[3].file)!.note!, /never ran/);
});

test('lab session: the real job script runs files two at a time and then one at a time, each counted whole, repeats included', async (t) => {
  // The job script is bash; run it directly on this host (the lab runs the same script).
  process.env.TERN_LAB_MODE = 'direct';
  const files: TestFile[] = [
    { tier: 'kvm', file: 'dist/test/unit/bus.test.js' },
    { tier: 'kvm', file: 'dist/test/unit/debug-port.test.js' },
    { tier: 'kvm', file: 'dist/test/unit/acpi-pm.test.js' },
    { tier: 'kvm', file: 'dist/test/unit/bus.test.js' },
    { tier: 'linux', file: 'dist/test/unit/i8042.test.js' },
  ];
  const started: string[] = [];
  const output: string[] = [];
  const r = await runInLabSession(files, {
    cwd: REPO, timeoutMs: 120_000, avaTimeout: '1m', parallelTiers: ['kvm'],
    onFileStart: (f) => started.push(f.file),
    onFileOutput: (f) => output.push(f.file),
  }, nonce);
  t.is(r.results.length, 5);
  t.deepEqual(started.slice().sort(), files.map((f) => f.file).sort());
  t.is(started[4], files[4].file, 'the serial tier starts after the parallel lanes');
  // Each parallel file's output is announced when it comes (after the other lane's start line).
  t.deepEqual(output.slice().sort(), files.slice(0, 4).map((f) => f.file).sort());
  for (const f of r.results) {
    t.is(f.counts.failed, 0, f.tap);
    t.true(f.counts.passed > 0, f.file);
    t.regex(f.tap, /^# pass \d+$/m);
    t.notRegex(f.tap, /TERN-TEST-/, 'no marker inside a file\'s TAP');
  }
  t.regex(r.boots[0], /5 files/);
});

test('lab session: a file\'s failed tests run once more, a serial file\'s or a parallel one\'s; a pass then is flaky, a second failure fails', async (t) => {
  process.env.TERN_LAB_MODE = 'direct';
  const mark = path.join(os.tmpdir(), `tern-flaky-${process.pid}-${Date.now()}`);
  const file: TestFile = { tier: 'linux', file: 'dist/test/runner/fixtures/flaky.test.js' };
  const retried: string[] = [];
  try {
    // Retried: the test that fails once passes on its second run.
    const once = await runInLabSession([file], {
      cwd: REPO, timeoutMs: 120_000, avaTimeout: '1m', retryTiers: ['linux'], env: { TERN_FLAKY_MARK: mark },
      onRetry: (r) => retried.push(r.file),
    }, nonce);
    const r = once.results[0];
    t.deepEqual(r.counts, { passed: 2, failed: 1, skipped: 0 }, 'the first run is recorded as it was');
    t.deepEqual(retried, [file.file]);
    t.regex(r.retry!.tap, /^ok \d+ - fails the first time only$/m);
    t.notRegex(r.retry!.tap, /passes every time/, 'only the failed test runs again');
    t.deepEqual(settleRetry(r.tap, r.counts, r.retry), { counts: { passed: 3, failed: 0, skipped: 0 }, failures: [], flaky: ['fails the first time only'] });

    // A test that fails again stays failed; the flaky one beside it still counts as flaky.
    fs.rmSync(mark, { force: true });
    const twice = await runInLabSession([file], {
      cwd: REPO, timeoutMs: 120_000, avaTimeout: '1m', retryTiers: ['linux'], env: { TERN_FLAKY_MARK: mark, TERN_FLAKY_ALWAYS: '1' },
    }, nonce);
    const r2 = twice.results[0];
    const settled = settleRetry(r2.tap, r2.counts, r2.retry);
    t.deepEqual(settled.counts, { passed: 2, failed: 1, skipped: 0 });
    t.deepEqual(settled.flaky, ['fails the first time only']);
    t.deepEqual(settled.failures, ['fails every time when asked (failed again when run once more)']);

    // A file of a parallel tier is retried too, after the lanes.
    fs.rmSync(mark, { force: true });
    const parallelFile: TestFile = { tier: 'kvm', file: file.file };
    const lanes = await runInLabSession([parallelFile, { tier: 'kvm', file: 'dist/test/unit/bus.test.js' }], {
      cwd: REPO, timeoutMs: 120_000, avaTimeout: '1m', parallelTiers: ['kvm'], retryTiers: ['kvm'], env: { TERN_FLAKY_MARK: mark },
    }, nonce);
    const p = lanes.results.find((x) => x.file === file.file)!;
    t.deepEqual(p.counts, { passed: 2, failed: 1, skipped: 0 });
    t.deepEqual(settleRetry(p.tap, p.counts, p.retry).flaky, ['fails the first time only']);
    t.is(lanes.results.find((x) => x.file !== file.file)!.retry, undefined, 'a file that passed is not run again');

    // A tier that does not ask for retries gets none.
    fs.rmSync(mark, { force: true });
    const none = await runInLabSession([file], { cwd: REPO, timeoutMs: 120_000, avaTimeout: '1m', env: { TERN_FLAKY_MARK: mark } }, nonce);
    t.is(none.results[0].retry, undefined);
    t.deepEqual(settleRetry(none.results[0].tap, none.results[0].counts).failures, ['fails the first time only']);
  } finally {
    fs.rmSync(mark, { force: true });
  }
});
