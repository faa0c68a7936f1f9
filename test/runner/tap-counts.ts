// Counts what one ava run reported in TAP (`ava --tap`): the closing `# pass/# fail/# skip`
// lines when the run got that far, the individual `ok`/`not ok` lines otherwise.

export interface Counts {
  passed: number;
  failed: number;
  skipped: number;
}

export const zeroCounts = (): Counts => ({ passed: 0, failed: 0, skipped: 0 });

export function addCounts(a: Counts, b: Counts): Counts {
  return { passed: a.passed + b.passed, failed: a.failed + b.failed, skipped: a.skipped + b.skipped };
}

/**
 * The counts of one ava process from its TAP output and exit status. A run that exited non-zero
 * without reporting a failure (a crash, a file that did not load, a kill) counts as one failure,
 * and so does a run that reported no test at all: a file that runs nothing has not passed.
 */
export function countTap(tap: string, exitCode: number | null): Counts {
  const summary = (name: string): number | undefined => {
    const m = new RegExp(`^# ${name} (\\d+)$`, 'm').exec(tap);
    return m ? Number(m[1]) : undefined;
  };
  let counts: Counts;
  const pass = summary('pass');
  if (pass !== undefined) {
    // ava's TAP reporter counts a todo test ("not ok N - name # TODO") under "# fail"; it is
    // not a failure but a test that did not run.
    const todo = tap.split('\n').filter((l) => /^not ok\b.*# TODO\b/.test(l)).length;
    counts = { passed: pass, failed: Math.max(0, (summary('fail') ?? 0) - todo), skipped: (summary('skip') ?? 0) + todo };
  } else {
    counts = zeroCounts();
    for (const line of tap.split('\n')) {
      if (/^(not )?ok\b.*# (SKIP|TODO)\b/i.test(line)) counts.skipped++;
      else if (/^not ok\b/.test(line)) counts.failed++;
      else if (/^ok\b/.test(line)) counts.passed++;
    }
  }
  if (exitCode !== 0 && counts.failed === 0) counts.failed = 1;
  if (counts.passed + counts.failed + counts.skipped === 0) counts.failed = 1;
  return counts;
}

/** The names of the tests a TAP stream reports as failed, for the summary. */
export function failedTests(tap: string): string[] {
  return tap
    .split('\n')
    .filter((l) => /^not ok\b/.test(l) && !/# TODO\b/.test(l))
    .map((l) => l.replace(/^not ok \d* ?-? ?/, '').trim());
}

/** The names of the tests a TAP stream reports as passed (not skipped). */
export function passedTests(tap: string): string[] {
  return tap
    .split('\n')
    .filter((l) => /^ok\b/.test(l) && !/# (SKIP|TODO)\b/i.test(l))
    .map((l) => l.replace(/^ok \d* ?-? ?/, '').trim());
}

/**
 * One file's result once its failed tests ran again (`retry`, when they did): a test that
 * passed then counts as passed and is named as flaky; one that failed again stays failed.
 */
export function settleRetry(tap: string, counts: Counts, retry?: { tap: string }): { counts: Counts; failures: string[]; flaky: string[] } {
  const failures = failedTests(tap);
  if (!retry) return { counts, failures, flaky: [] };
  const passedAgain = new Set(passedTests(retry.tap));
  const flaky = failures.filter((f) => passedAgain.has(f));
  return {
    counts: { ...counts, passed: counts.passed + flaky.length, failed: Math.max(0, counts.failed - flaky.length) },
    failures: failures.filter((f) => !passedAgain.has(f)).map((f) => `${f} (failed again when run once more)`),
    flaky,
  };
}

/** The plain closing line CI and people read: "N passed, N failed, N skipped". */
export function countsLine(c: Counts): string {
  return `${c.passed} passed, ${c.failed} failed, ${c.skipped} skipped`;
}
