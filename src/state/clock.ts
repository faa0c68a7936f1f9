// Event timestamps: monotonic time since the VMM process loaded this module, from
// process.hrtime, split the way Cloud Hypervisor's event monitor reports it.

export interface EventTimestamp {
  secs: number;
  nanos: number;
}

export type EventClock = () => EventTimestamp;

const VMM_START_NS = process.hrtime.bigint();

/** Time since VMM start. */
export const vmmClock: EventClock = () => {
  const d = process.hrtime.bigint() - VMM_START_NS;
  return { secs: Number(d / 1_000_000_000n), nanos: Number(d % 1_000_000_000n) };
};

/** Order two timestamps (negative, zero, positive). */
export function compareTimestamps(a: EventTimestamp, b: EventTimestamp): number {
  return a.secs - b.secs || a.nanos - b.nanos;
}
