// The I/O buses as plain data: which device owns which port or MMIO range, plus counters for
// accesses nobody owns. Lookups are binary searches over sorted, non-overlapping ranges,
// since they run on every guest I/O exit.
import { DeviceConflictError } from '../state/errors';
import type { BusRangeSpec } from './model';

export const BUS_SCHEMA_VERSION = 1;

export type BusSpace = 'pio' | 'mmio';

export interface BusRange {
  base: number;
  length: number;
  device: string;
  /** device-relative offset of `base` */
  deviceOffset: number;
}

export interface AccessCounters {
  reads: number;
  writes: number;
}

export interface UnhandledAccessRecord {
  space: BusSpace;
  direction: 'read' | 'write';
  address: number;
  size: number;
}

export interface BusState {
  schemaVersion: number;
  pio: BusRange[];
  mmio: BusRange[];
  unhandled: { pio: AccessCounters; mmio: AccessCounters };
  /** the most recent unhandled access, for diagnostics */
  lastUnhandled: UnhandledAccessRecord | null;
}

interface BusAccessCommon {
  space: BusSpace;
  direction: 'read' | 'write';
  address: number;
  nowNs: number;
}

/**
 * A guest access in absolute bus terms (what a vCPU exit reports). As in IoAccess, the value
 * written is a number for accesses of up to 4 bytes and a bigint for 8-byte MMIO ones.
 */
export type BusAccess = (BusAccessCommon & { size: 1 | 2 | 4; data: number }) | (BusAccessCommon & { size: 8; data: bigint });

export function busInitialState(): BusState {
  return {
    schemaVersion: BUS_SCHEMA_VERSION,
    pio: [],
    mmio: [],
    unhandled: { pio: { reads: 0, writes: 0 }, mmio: { reads: 0, writes: 0 } },
    lastUnhandled: null,
  };
}

/** Index of the range containing `address`, or -1. */
function indexOf(ranges: BusRange[], address: number): number {
  let lo = 0;
  let hi = ranges.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const r = ranges[mid];
    if (address < r.base) hi = mid - 1;
    else if (address >= r.base + r.length) lo = mid + 1;
    else return mid;
  }
  return -1;
}

export interface BusTarget {
  device: string;
  /** device-relative offset */
  offset: number;
}

export function findDevice(bus: BusState, space: BusSpace, address: number): BusTarget | undefined {
  const ranges = space === 'pio' ? bus.pio : bus.mmio;
  const i = indexOf(ranges, address);
  if (i < 0) return undefined;
  const r = ranges[i];
  return { device: r.device, offset: r.deviceOffset + (address - r.base) };
}

export function registerRange(bus: BusState, spec: BusRangeSpec, device: string): BusState {
  if (!(spec.length > 0) || !Number.isSafeInteger(spec.base) || !Number.isSafeInteger(spec.length) || spec.base < 0) {
    throw new DeviceConflictError(`invalid ${spec.space} range 0x${spec.base.toString(16)}+${spec.length} for '${device}'`);
  }
  if (spec.space === 'pio' && spec.base + spec.length > 0x10000) {
    throw new DeviceConflictError(`pio range for '${device}' exceeds the 64 KiB port space`);
  }
  const ranges = spec.space === 'pio' ? bus.pio : bus.mmio;
  const end = spec.base + spec.length;
  for (const r of ranges) {
    if (spec.base < r.base + r.length && r.base < end) {
      throw new DeviceConflictError(
        `${spec.space} range 0x${spec.base.toString(16)}+${spec.length} for '${device}' overlaps '${r.device}' at 0x${r.base.toString(16)}+${r.length}`,
      );
    }
  }
  const range: BusRange = { base: spec.base, length: spec.length, device, deviceOffset: spec.deviceOffset ?? 0 };
  const next = [...ranges, range].sort((a, b) => a.base - b.base);
  return spec.space === 'pio' ? { ...bus, pio: next } : { ...bus, mmio: next };
}

export function unregisterDevice(bus: BusState, device: string): BusState {
  const pio = bus.pio.filter((r) => r.device !== device);
  const mmio = bus.mmio.filter((r) => r.device !== device);
  if (pio.length === bus.pio.length && mmio.length === bus.mmio.length) return bus;
  return { ...bus, pio, mmio };
}

/** What an unowned read returns: all ones of the access size, as the floating bus would. */
export function allOnes(size: number): number | bigint {
  switch (size) {
    case 1:
      return 0xff;
    case 2:
      return 0xffff;
    case 4:
      return 0xffffffff;
    default:
      return 0xffff_ffff_ffff_ffffn;
  }
}

/** Policy for an access no device owns: reads float high, writes are dropped; both counted. */
export function unhandledAccess(bus: BusState, access: BusAccess): { state: BusState; value?: number | bigint } {
  const c = bus.unhandled[access.space];
  const isRead = access.direction === 'read';
  const counters: AccessCounters = isRead ? { reads: c.reads + 1, writes: c.writes } : { reads: c.reads, writes: c.writes + 1 };
  // Literals rather than spreads: this runs for every access nobody owns.
  const state: BusState = {
    schemaVersion: bus.schemaVersion,
    pio: bus.pio,
    mmio: bus.mmio,
    unhandled:
      access.space === 'pio' ? { pio: counters, mmio: bus.unhandled.mmio } : { pio: bus.unhandled.pio, mmio: counters },
    lastUnhandled: { space: access.space, direction: access.direction, address: access.address, size: access.size },
  };
  return isRead ? { state, value: allOnes(access.size) } : { state };
}
