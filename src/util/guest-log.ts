// Log lines a guest can trigger go through one rate limiter. A guest can cause a line per VM
// exit (a sleep request in a loop is millions a second), and a log growing at that rate costs
// the host its disk and the VMM its event loop. Each kind of line (its key) has a token
// bucket: a burst goes out as it comes, then one line per refill interval; the first line let
// through after a gap says how many were suppressed meanwhile ({ suppressed: N }).
import type { Logger } from 'pino';

export interface RateLimitOptions {
  /** lines a key may log back to back (default 10) */
  burst?: number;
  /** lines a key earns per second once its burst is spent (default 1) */
  perSecond?: number;
  /** milliseconds clock (tests) */
  now?: () => number;
}

interface Bucket {
  tokens: number;
  last: number;
  suppressed: number;
}

/** Keys are chosen by the VMM, but the map is bounded all the same. */
const MAX_KEYS = 1024;

export class LogRateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private readonly burst: number;
  private readonly perMs: number;
  private readonly now: () => number;

  constructor(opts: RateLimitOptions = {}) {
    this.burst = opts.burst ?? 10;
    this.perMs = (opts.perSecond ?? 1) / 1000;
    this.now = opts.now ?? Date.now;
  }

  /**
   * May a line for `key` be written now? Returns null if not (and counts it as suppressed),
   * otherwise how many lines of that key were suppressed since the last one written.
   */
  take(key: string): number | null {
    const now = this.now();
    let b = this.buckets.get(key);
    if (!b) {
      if (this.buckets.size >= MAX_KEYS) this.buckets.delete(this.buckets.keys().next().value as string);
      b = { tokens: this.burst, last: now, suppressed: 0 };
      this.buckets.set(key, b);
    } else {
      b.tokens = Math.min(this.burst, b.tokens + (now - b.last) * this.perMs);
      b.last = now;
    }
    if (b.tokens < 1) {
      b.suppressed++;
      return null;
    }
    b.tokens -= 1;
    const suppressed = b.suppressed;
    b.suppressed = 0;
    return suppressed;
  }
}

type Level = 'error' | 'warn' | 'info' | 'debug';

/** A logger for lines a guest can trigger: every call names the line's rate-limit key. */
export interface GuestLog {
  error(key: string, obj: object, msg: string): void;
  warn(key: string, obj: object, msg: string): void;
  info(key: string, obj: object, msg: string): void;
  debug(key: string, obj: object, msg: string): void;
}

export function guestLog(log: Logger, opts: RateLimitOptions = {}): GuestLog {
  const limiter = new LogRateLimiter(opts);
  const at = (level: Level) => (key: string, obj: object, msg: string) => {
    // A line the level filters out costs no token.
    if (!log.isLevelEnabled(level)) return;
    const suppressed = limiter.take(key);
    if (suppressed === null) return;
    if (suppressed > 0) log[level]({ ...obj, suppressed }, `${msg} (${suppressed} more suppressed)`);
    else log[level](obj, msg);
  };
  return { error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug') };
}
