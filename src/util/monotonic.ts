// The monotonic clock in microseconds: the clock V8's CPU profiles use, so a log line that
// carries it can be placed among a profile's samples (the migration bench does, for the pause).
export function monotonicMicros(): number {
  return Number(process.hrtime.bigint() / 1000n);
}
