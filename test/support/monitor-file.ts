// Reading an event-monitor file the way a user's tooling would: pretty-printed JSON events,
// each followed by a blank line, timestamps since VMM start.
import fs from 'node:fs';

export interface MonitorRecord {
  timestamp: { secs: number; nanos: number };
  source: string;
  event: string;
  /** string properties ("id" of a device or a memory round), or null */
  properties: Record<string, string> | null;
}

/** Every complete event in the file; the last one may be half written while the VMM runs. */
export function readMonitorFile(file: string): MonitorRecord[] {
  const events: MonitorRecord[] = [];
  for (const block of fs.readFileSync(file, 'utf8').split('\n\n').filter((b) => b.trim())) {
    try {
      events.push(JSON.parse(block) as MonitorRecord);
    } catch {
      break;
    }
  }
  return events;
}

export const monitorSeconds = (e: MonitorRecord): number => e.timestamp.secs + e.timestamp.nanos / 1e9;

/** ms from the VMM's start to its first `name` event in the file. */
export function monitorEventMs(file: string, name: string, events = readMonitorFile(file)): number {
  const e = events.find((x) => x.event === name);
  if (!e) throw new Error(`no ${name} event in ${file}`);
  return monitorSeconds(e) * 1000;
}

/** ms from the first `from` event to the first `to` event in the file. */
export function monitorSpanMs(file: string, from: string, to: string): number {
  const events = readMonitorFile(file);
  return monitorEventMs(file, to, events) - monitorEventMs(file, from, events);
}
