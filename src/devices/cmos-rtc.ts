// CMOS RAM and real-time clock (MC146818-style) at ports 0x70 (index) / 0x71 (data).
//
// Guest time = access.nowNs + state.offsetNs, so the transition is pure, a guest that sets
// the clock keeps its offset, and a migrated VM keeps its time. While status B's SET bit is on,
// the time registers are plain bytes in `cmos` (the guest writes a full date one register at
// a time); clearing SET turns those bytes back into an offset.
// No RTC interrupts (IRQ 8) are generated: the periodic, alarm and update-ended flags in
// status C stay clear.
import { Type } from '@sinclair/typebox';
import * as aml from '../boot/aml';
import { DeviceId, Exact, IntIn, U8 } from '../state/state-schema';
import { type Effect, type IoAccess, type TransitionResult, data32 } from './device';
import {
  type DeviceAcpi,
  type DeviceInstance,
  type DeviceModel,
  type DeviceStateBase,
  deviceAccessEventTypes,
} from './model';

export const CMOS_KIND = 'cmos-rtc' as const;
export const CMOS_SCHEMA_VERSION = 1;
export const CMOS_LABEL = 'RTC';
export const CMOS_BASE = 0x70;
export const CMOS_PORT_LENGTH = 2;
export const CMOS_SIZE = 128;

export const CmosEvents = {
  RegisterRead: '[RTC] Register Read',
  RegisterWritten: '[RTC] Register Written',
} as const;

// Register indices
export const RTC_SECONDS = 0x00;
export const RTC_SECONDS_ALARM = 0x01;
export const RTC_MINUTES = 0x02;
export const RTC_MINUTES_ALARM = 0x03;
export const RTC_HOURS = 0x04;
export const RTC_HOURS_ALARM = 0x05;
export const RTC_WEEKDAY = 0x06;
export const RTC_DAY = 0x07;
export const RTC_MONTH = 0x08;
export const RTC_YEAR = 0x09;
export const RTC_STATUS_A = 0x0a;
export const RTC_STATUS_B = 0x0b;
export const RTC_STATUS_C = 0x0c;
export const RTC_STATUS_D = 0x0d;
export const RTC_CENTURY = 0x32;

export const CMOS_BASE_MEM_LO = 0x15;
export const CMOS_BASE_MEM_HI = 0x16;
export const CMOS_EXT_MEM_LO = 0x17;
export const CMOS_EXT_MEM_HI = 0x18;
export const CMOS_EXT_MEM2_LO = 0x30;
export const CMOS_EXT_MEM2_HI = 0x31;
export const CMOS_MEM_ABOVE_16M_LO = 0x34;
export const CMOS_MEM_ABOVE_16M_HI = 0x35;
export const CMOS_MEM_ABOVE_4G_LO = 0x5b;
export const CMOS_MEM_ABOVE_4G_MID = 0x5c;
export const CMOS_MEM_ABOVE_4G_HI = 0x5d;

export const STATUS_A_UIP = 0x80;
/** 32.768 kHz time base, 1024 Hz periodic rate */
export const STATUS_A_DEFAULT = 0x26;
export const STATUS_B_SET = 0x80;
export const STATUS_B_BINARY = 0x04;
export const STATUS_B_24H = 0x02;
export const STATUS_D_VRT = 0x80;
const HOUR_PM = 0x80;

/** Update-in-progress is reported this long before each second boundary. */
const UIP_WINDOW_NS = 244_000;
const NS_PER_SEC = 1e9;
const KIB = 1024;
const MIB = 1024 * KIB;
export const DEFAULT_PCI_HOLE_START = 3 * 1024 * MIB;

const TIME_REGISTERS = [RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_WEEKDAY, RTC_DAY, RTC_MONTH, RTC_YEAR, RTC_CENTURY];
const IS_TIME_REGISTER: boolean[] = Array.from({ length: CMOS_SIZE }, (_, i) => TIME_REGISTERS.includes(i));

export interface CmosRtcState extends DeviceStateBase {
  kind: typeof CMOS_KIND;
  /** selected register (bits 0..6 of the last index write) */
  index: number;
  /** bit 7 of the last index write */
  nmiMasked: boolean;
  /** 128 bytes; time registers are only meaningful here while SET is on */
  cmos: number[];
  /** guest time minus host time, in ns */
  offsetNs: number;
}

export interface CmosOptions {
  id?: string;
  /** guest RAM in bytes */
  memorySize: number;
  /** where the 32-bit PCI hole starts; RAM above it is placed at 4 GiB */
  pciHoleStart?: number;
  /** initial guest-minus-host time offset (ns), e.g. to boot with a fixed clock */
  offsetNs?: number;
}

function setWord(cmos: number[], lo: number, hi: number, value: number): void {
  cmos[lo] = value & 0xff;
  cmos[hi] = (value >>> 8) & 0xff;
}

export function cmosInitialState(opts: CmosOptions): CmosRtcState {
  const holeStart = opts.pciHoleStart ?? DEFAULT_PCI_HOLE_START;
  const size = opts.memorySize;
  const low = Math.min(size, holeStart);
  const high = size - low;
  const cmos = new Array<number>(CMOS_SIZE).fill(0);
  cmos[RTC_STATUS_A] = STATUS_A_DEFAULT;
  cmos[RTC_STATUS_B] = STATUS_B_24H;
  cmos[RTC_STATUS_D] = STATUS_D_VRT;
  setWord(cmos, CMOS_BASE_MEM_LO, CMOS_BASE_MEM_HI, 640);
  const extKib = Math.min(Math.max(0, Math.floor((low - MIB) / KIB)), 0xffff);
  setWord(cmos, CMOS_EXT_MEM_LO, CMOS_EXT_MEM_HI, extKib);
  setWord(cmos, CMOS_EXT_MEM2_LO, CMOS_EXT_MEM2_HI, extKib);
  const above16m = Math.min(Math.max(0, Math.floor((low - 16 * MIB) / (64 * KIB))), 0xffff);
  setWord(cmos, CMOS_MEM_ABOVE_16M_LO, CMOS_MEM_ABOVE_16M_HI, above16m);
  const above4g = Math.min(Math.floor(high / (64 * KIB)), 0xffffff);
  cmos[CMOS_MEM_ABOVE_4G_LO] = above4g & 0xff;
  cmos[CMOS_MEM_ABOVE_4G_MID] = (above4g >>> 8) & 0xff;
  cmos[CMOS_MEM_ABOVE_4G_HI] = (above4g >>> 16) & 0xff;
  return {
    kind: CMOS_KIND,
    id: opts.id ?? 'rtc',
    schemaVersion: CMOS_SCHEMA_VERSION,
    index: 0,
    nmiMasked: false,
    cmos,
    offsetNs: opts.offsetNs ?? 0,
  };
}

export function cmosDevice(opts: CmosOptions): DeviceInstance<CmosRtcState> {
  return { state: cmosInitialState(opts), ranges: [{ space: 'pio', base: CMOS_BASE, length: CMOS_PORT_LENGTH }] };
}

const toBcd = (v: number): number => ((Math.floor(v / 10) % 10) << 4) | v % 10;
const fromBcd = (v: number): number => (v >> 4) * 10 + (v & 0x0f);

/** Guest wall-clock time in ns since the epoch. */
export function cmosGuestTimeNs(s: CmosRtcState, nowNs: number): number {
  return nowNs + s.offsetNs;
}

/** Encode the calendar fields of `secs` into register values, in the mode set in status B. */
function encodeTime(secs: number, statusB: number): Record<number, number> {
  const d = new Date(secs * 1000);
  const binary = (statusB & STATUS_B_BINARY) !== 0;
  const enc = binary ? (v: number) => v : toBcd;
  const hour = d.getUTCHours();
  let hourReg: number;
  if (statusB & STATUS_B_24H) hourReg = enc(hour);
  else hourReg = enc(hour % 12 === 0 ? 12 : hour % 12) | (hour >= 12 ? HOUR_PM : 0);
  const year = d.getUTCFullYear();
  return {
    [RTC_SECONDS]: enc(d.getUTCSeconds()),
    [RTC_MINUTES]: enc(d.getUTCMinutes()),
    [RTC_HOURS]: hourReg,
    [RTC_WEEKDAY]: enc(d.getUTCDay() + 1),
    [RTC_DAY]: enc(d.getUTCDate()),
    [RTC_MONTH]: enc(d.getUTCMonth() + 1),
    [RTC_YEAR]: enc(year % 100),
    [RTC_CENTURY]: enc(Math.floor(year / 100)),
  };
}

const isBcd = (v: number): boolean => (v & 0x0f) <= 9 && v >> 4 <= 9;

/** Days in `month` (1..12) of `year`: day 0 of the next month is this month's last. */
function daysInMonth(year: number, month: number): number {
  const d = new Date(0);
  d.setUTCFullYear(year, month, 0);
  return d.getUTCDate();
}

/**
 * Seconds since the epoch from time register bytes (weekday is ignored, as by the chip), or
 * null when the bytes are not a calendar date in the mode status B selects (a BCD digit
 * above 9, month 13, February 30, ...). The chip's datasheet leaves such a time undefined;
 * here it is refused, so the clock keeps the time it had and the offset stays a finite number.
 */
function decodeTime(regs: (i: number) => number, statusB: number): number | null {
  const binary = (statusB & STATUS_B_BINARY) !== 0;
  const h24 = (statusB & STATUS_B_24H) !== 0;
  const hourReg = regs(RTC_HOURS);
  const hourValue = h24 ? hourReg : hourReg & ~HOUR_PM;
  const fields = [regs(RTC_SECONDS), regs(RTC_MINUTES), hourValue, regs(RTC_DAY), regs(RTC_MONTH), regs(RTC_YEAR), regs(RTC_CENTURY)];
  if (!binary && !fields.every(isBcd)) return null;
  const [sec, min, hourField, day, month, yy, cc] = fields.map(binary ? (v: number) => v : fromBcd);
  let hour: number;
  if (h24) {
    if (hourField > 23) return null;
    hour = hourField;
  } else {
    if (hourField < 1 || hourField > 12) return null;
    hour = (hourField % 12) + (hourReg & HOUR_PM ? 12 : 0);
  }
  if (sec > 59 || min > 59 || yy > 99 || cc > 99 || month < 1 || month > 12) return null;
  const year = cc * 100 + yy;
  if (day < 1 || day > daysInMonth(year, month)) return null;
  // setUTCFullYear, not Date.UTC: the latter reads years 0..99 as 1900..1999.
  const d = new Date(0);
  d.setUTCFullYear(year, month - 1, day);
  d.setUTCHours(hour, min, sec, 0);
  return Math.floor(d.getTime() / 1000);
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

/** A fresh copy to modify and return (a field-by-field literal is faster than spread). */
export function copyCmosState(s: CmosRtcState): CmosRtcState {
  return {
    kind: s.kind,
    id: s.id,
    schemaVersion: s.schemaVersion,
    index: s.index,
    nmiMasked: s.nmiMasked,
    cmos: s.cmos,
    offsetNs: s.offsetNs,
  };
}

function withCmos(s: CmosRtcState, cmos: number[], offsetNs = s.offsetNs): CmosRtcState {
  const n = copyCmosState(s);
  n.cmos = cmos;
  n.offsetNs = offsetNs;
  return n;
}

function readRegister(s: CmosRtcState, index: number, nowNs: number): number {
  const statusB = s.cmos[RTC_STATUS_B];
  const setMode = (statusB & STATUS_B_SET) !== 0;
  if (IS_TIME_REGISTER[index] && !setMode) {
    const secs = Math.floor(cmosGuestTimeNs(s, nowNs) / NS_PER_SEC);
    return encodeTime(secs, statusB)[index];
  }
  switch (index) {
    case RTC_STATUS_A: {
      const ns = cmosGuestTimeNs(s, nowNs);
      const intoSecond = ns - Math.floor(ns / NS_PER_SEC) * NS_PER_SEC;
      const uip = !setMode && intoSecond >= NS_PER_SEC - UIP_WINDOW_NS;
      return (s.cmos[RTC_STATUS_A] & 0x7f) | (uip ? STATUS_A_UIP : 0);
    }
    case RTC_STATUS_C:
      return 0;
    case RTC_STATUS_D:
      return STATUS_D_VRT;
    default:
      return s.cmos[index];
  }
}

function writeRegister(s: CmosRtcState, index: number, value: number, nowNs: number): CmosRtcState {
  const statusB = s.cmos[RTC_STATUS_B];
  const setMode = (statusB & STATUS_B_SET) !== 0;
  if (index === RTC_STATUS_C || index === RTC_STATUS_D) return s; // read-only
  if (IS_TIME_REGISTER[index] && !setMode) {
    // A live clock: rebuild the time with one field replaced, keep the sub-second phase.
    const ns = cmosGuestTimeNs(s, nowNs);
    const secs = Math.floor(ns / NS_PER_SEC);
    const regs = encodeTime(secs, statusB);
    regs[index] = value;
    const newSecs = decodeTime((i) => regs[i], statusB);
    if (newSecs === null) return s;
    return withCmos(s, s.cmos, newSecs * NS_PER_SEC + (ns - secs * NS_PER_SEC) - nowNs);
  }
  const cmos = s.cmos.slice();
  if (index === RTC_STATUS_A) {
    cmos[index] = value & 0x7f;
    return withCmos(s, cmos);
  }
  if (index === RTC_STATUS_B) {
    const setting = (value & STATUS_B_SET) !== 0;
    if (setting && !setMode) {
      // Freeze: materialize the current time into the registers the guest will now edit.
      const regs = encodeTime(Math.floor(cmosGuestTimeNs(s, nowNs) / NS_PER_SEC), statusB);
      for (const r of TIME_REGISTERS) cmos[r] = regs[r];
      cmos[index] = value;
      return withCmos(s, cmos);
    }
    cmos[index] = value;
    if (!setting && setMode) {
      // Unfreeze: the edited registers become the time at this instant, in the old mode.
      const secs = decodeTime((i) => cmos[i], statusB);
      return withCmos(s, cmos, secs === null ? s.offsetNs : secs * NS_PER_SEC - nowNs);
    }
    return withCmos(s, cmos);
  }
  cmos[index] = value;
  return withCmos(s, cmos);
}

export function cmosTransition(state: CmosRtcState, access: IoAccess): TransitionResult<CmosRtcState> {
  if (access.offset === 0) {
    if (access.direction === 'read') return { state, effects: NO_EFFECTS, value: 0xff };
    const index = data32(access) & 0x7f;
    const nmiMasked = (data32(access) & 0x80) !== 0;
    if (index === state.index && nmiMasked === state.nmiMasked) return { state, effects: NO_EFFECTS };
    const n = copyCmosState(state);
    n.index = index;
    n.nmiMasked = nmiMasked;
    return { state: n, effects: NO_EFFECTS };
  }
  if (access.offset === 1) {
    if (access.direction === 'read') {
      return { state, effects: NO_EFFECTS, value: readRegister(state, state.index, access.nowNs) };
    }
    return { state: writeRegister(state, state.index, data32(access) & 0xff, access.nowNs), effects: NO_EFFECTS };
  }
  return access.direction === 'read' ? { state, effects: NO_EFFECTS, value: 0xff } : { state, effects: NO_EFFECTS };
}

/**
 * The largest guest-minus-host offset: a date the registers can hold is within years
 * 0..9999, about 3.2e20 ns from the epoch either way.
 */
export const CMOS_MAX_OFFSET_NS = 3.2e20;

/** The state's shape, checked when a state comes from outside (restore). */
export const CmosRtcStateSchema = Exact({ kind: Type.Literal(CMOS_KIND), id: DeviceId(), schemaVersion: IntIn(CMOS_SCHEMA_VERSION, CMOS_SCHEMA_VERSION), index: IntIn(0, 0x7f), nmiMasked: Type.Boolean(), cmos: Type.Array(U8(), { minItems: 128, maxItems: 128 }), offsetNs: Type.Number({ minimum: -CMOS_MAX_OFFSET_NS, maximum: CMOS_MAX_OFFSET_NS }) });

/** The RTC in the DSDT (PNP0B00): its ports and no interrupt, as it raises none. */
export function cmosAcpi(device: DeviceInstance<CmosRtcState>): DeviceAcpi {
  const { base, length } = device.ranges[0];
  return {
    legacy: 'rtc',
    sb: [aml.device('RTC', [aml.name('_HID', aml.eisaId('PNP0B00')), aml.name('_CRS', aml.resourceTemplate([aml.Resource.io(base, base, 1, length)]))])],
  };
}

export const cmosModel: DeviceModel<CmosRtcState> = {
  kind: CMOS_KIND,
  label: CMOS_LABEL,
  schemaVersion: CMOS_SCHEMA_VERSION,
  events: deviceAccessEventTypes(CMOS_LABEL),
  transition: cmosTransition,
  stateSchema: CmosRtcStateSchema,
  inputs: {},
  acpi: cmosAcpi,
};
