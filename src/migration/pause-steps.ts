// Where a migration's pause (or a restore) goes, step by step, on either side. The steps are
// only collected while it runs and logged in one line once it is over: writing log lines
// inside it made the pause it measured longer.
import type { Logger } from 'pino';

export class PauseSteps {
  private readonly start = performance.now();
  /** the monotonic clock at the start, the clock of V8's CPU profiles (the bench lines them up) */
  private readonly fromUs = monotonicMicros();
  private readonly steps: { step: string; ms: number }[] = [];
  private readonly extra: Record<string, unknown> = {};

  /** `step` is done now. */
  mark(step: string): void {
    this.steps.push({ step, ms: Math.round((performance.now() - this.start) * 10) / 10 });
  }

  /** More to report with the steps (the vCPUs' own timing). */
  note(fields: Record<string, unknown>): void {
    Object.assign(this.extra, fields);
  }

  /** Log the steps (debug) under another message: the same timing for another stretch. */
  logAs(log: Logger, msg: string): void {
    log.debug({ steps: this.steps.splice(0), ...this.extra }, msg);
  }

  /** Log the steps (debug), once. */
  log(log: Logger, side: 'source' | 'destination'): void {
    if (!this.steps.length) return;
    log.debug({ side, steps: this.steps.splice(0), ...this.extra, from_us: this.fromUs, to_us: monotonicMicros() }, 'migration: pause steps');
  }
}

/** The monotonic clock in microseconds, the clock V8's CPU profiles use. */
function monotonicMicros(): number {
  return Number(process.hrtime.bigint() / 1000n);
}
