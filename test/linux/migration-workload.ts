// The migration workload's side on the host: its kernel command line, and reading what the
// guest printed (scripts/guest/migration-workload describes the lines). A migration moves the
// console from one VMM process to another, so a guest's transcript is the concatenation of every
// process's console output in order; a line cut by the migration is completed by the next one.
import { guestCmdline } from '../lab/qemu-peer';
import type { GuestProcess } from './guest-process';

/** The chunk size the workload writes and checksums (its default). */
export const WORKLOAD_CHUNK_MIB = 4;

/** Kernel command line running the workload with a tmpfs file of sizeMiB (0: an idle guest). */
export function workloadCmdline(sizeMiB: number): string {
  return guestCmdline({ cmd: `migration-workload ${sizeMiB}` });
}

export interface Tick {
  count: number;
  uptime: number;
}

/** Every complete TICK line. */
export function ticksIn(text: string): Tick[] {
  return [...text.matchAll(/^TICK (\d+) (\d+\.\d+)\r?\n/gm)].map((m) => ({ count: Number(m[1]), uptime: Number(m[2]) }));
}

/** The largest interval (ms) the guest's 10 ms ticker saw, per GAP line. */
export function gapsIn(text: string): number[] {
  return [...text.matchAll(/^GAP (\d+) \d+\.\d+\r?\n/gm)].map((m) => Number(m[1]));
}

/** Chunk -> md5 of its last W line: what the file must hold once the writer has stopped. */
export function lastWrites(text: string): Map<number, string> {
  const last = new Map<number, string>();
  for (const m of text.matchAll(/^W (\d+) ([0-9a-f]{32})\r?\n/gm)) last.set(Number(m[1]), m[2]);
  return last;
}

/** Chunk -> md5 from a `sum` answer (the S lines before SUMDONE). */
export function sumsIn(text: string): Map<number, string> {
  const sums = new Map<number, string>();
  for (const m of text.matchAll(/^S (\d+) ([0-9a-f]{32})\r?\n/gm)) sums.set(Number(m[1]), m[2]);
  return sums;
}

/** What is wrong with a transcript's counter: numbers skipped or repeated, uptime running backwards. */
export function counterFaults(ticks: Tick[]): string[] {
  const faults: string[] = [];
  if (ticks.length === 0) return ['no TICK lines'];
  if (ticks[0].count !== 1) faults.push(`the first TICK is ${ticks[0].count}, not 1`);
  for (let i = 1; i < ticks.length; i++) {
    const [a, b] = [ticks[i - 1], ticks[i]];
    if (b.count !== a.count + 1) faults.push(`TICK ${a.count} is followed by TICK ${b.count}`);
    if (b.uptime < a.uptime) faults.push(`uptime runs backwards from ${a.uptime} (TICK ${a.count}) to ${b.uptime} (TICK ${b.count})`);
  }
  return faults;
}

/** The lines around the first occurrence of `needle`, to show with a failure. */
export function around(text: string, needle: string, lines = 6): string {
  const at = text.indexOf(needle);
  if (at < 0) return text.slice(-600);
  const all = text.split('\n');
  const row = text.slice(0, at).split('\n').length - 1;
  return all.slice(Math.max(0, row - lines), row + lines).join('\n');
}

/**
 * Host arrival time (ms, Date.now()) of each TICK line of a VMM's console; listening from the
 * process's start catches every line. Lines from several processes share one map. `before` gives
 * the transcript the process continues (read at its first output, when the previous VMM has
 * printed everything), whose cut line this process completes. `line` matches a counter line, its
 * count the first group (another guest's counter: the tiny kernel's COUNT lines).
 */
export function recordTickArrivals(vm: GuestProcess, arrivals: Map<number, number>, before: () => string = () => '', line = /^TICK (\d+) /): void {
  let pending: string | undefined;
  vm.child.stdout.on('data', (d: Buffer) => {
    const now = Date.now();
    if (pending === undefined) {
      const text = before();
      pending = text.slice(text.lastIndexOf('\n') + 1);
    }
    pending += d.toString('latin1');
    const lines = pending.split('\n');
    pending = lines.pop()!;
    for (const l of lines) {
      const m = line.exec(l);
      if (m && !arrivals.has(Number(m[1]))) arrivals.set(Number(m[1]), now);
    }
  });
}

/** The largest interval (ms) between consecutive TICKs arriving at the host that began within [from, to]. */
export function largestArrivalGapMs(arrivals: Map<number, number>, from: number, to: number): number {
  return largestArrivalGap(arrivals, from, to)?.ms ?? 0;
}

/** That interval, with the counts and host times (Date.now()) of the two TICKs around it. */
export function largestArrivalGap(arrivals: Map<number, number>, from: number, to: number): { ms: number; before: { count: number; at: number }; after: { count: number; at: number } } | undefined {
  const counts = [...arrivals.keys()].sort((a, b) => a - b);
  let largest: ReturnType<typeof largestArrivalGap>;
  for (let i = 1; i < counts.length; i++) {
    const [a, b] = [arrivals.get(counts[i - 1])!, arrivals.get(counts[i])!];
    if (a >= from && a <= to && b - a > (largest?.ms ?? 0)) largest = { ms: b - a, before: { count: counts[i - 1], at: a }, after: { count: counts[i], at: b } };
  }
  return largest;
}
