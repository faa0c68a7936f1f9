// Event timestamps: monotonic time since the VMM process started, split the way Cloud
// Hypervisor's event monitor reports it. Taken from process.uptime(), not from a time this
// module noted when it loaded: a VMM started from its V8 startup snapshot loaded its modules
// when the snapshot was built, maybe hours before, in another process.

export interface EventTimestamp {
  secs: number;
  nanos: number;
}

export type EventClock = () => EventTimestamp;

/** Time since VMM start. */
export const vmmClock: EventClock = () => {
  const ns = Math.round(process.uptime() * 1e9);
  return { secs: Math.floor(ns / 1e9), nanos: ns % 1e9 };
};

/** Order two timestamps (negative, zero, positive). */
export function compareTimestamps(a: EventTimestamp, b: EventTimestamp): number {
  return a.secs - b.secs || a.nanos - b.nanos;
}
