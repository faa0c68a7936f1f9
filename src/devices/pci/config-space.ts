// The configuration space of one PCI function with a type-0 header (PCI Local Bus 3.0,
// chapter 6): 256 bytes held in the store as 64 little-endian dwords. What a guest may change
// is not in the state but derived from the function's layout (its BARs and capabilities),
// so a restored state cannot make a read-only register writable: every write goes through
// the writable and write-1-to-clear masks, per byte lane.
import { Type } from '@sinclair/typebox';
import type { TSchema } from '@sinclair/typebox';
import { U32 } from '../../state/state-schema';

/** Conventional configuration space (what the state holds); ECAM offsets 256..4095 read as 0. */
export const PCI_CONFIG_SIZE = 256;
export const PCI_CONFIG_DWORDS = PCI_CONFIG_SIZE / 4;
/** ECAM gives every function 4 KiB (PCIe extended configuration space). */
export const PCI_ECAM_FUNCTION_SIZE = 4096;
export const PCI_BAR_COUNT = 6;

/** Register offsets of the type-0 header. */
export const PciReg = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION_ID: 0x08,
  CLASS_CODE: 0x09,
  CACHE_LINE_SIZE: 0x0c,
  LATENCY_TIMER: 0x0d,
  HEADER_TYPE: 0x0e,
  BAR0: 0x10,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  EXPANSION_ROM: 0x30,
  CAPABILITIES_POINTER: 0x34,
  INTERRUPT_LINE: 0x3c,
  INTERRUPT_PIN: 0x3d,
} as const;

/** Command register bits a guest may set (the others are hardwired to 0 here). */
export const PciCommand = {
  IO_SPACE: 1 << 0,
  MEMORY_SPACE: 1 << 1,
  BUS_MASTER: 1 << 2,
  PARITY_ERROR_RESPONSE: 1 << 6,
  SERR: 1 << 8,
  INTX_DISABLE: 1 << 10,
} as const;
const COMMAND_WRITABLE = Object.values(PciCommand).reduce((a, b) => a | b, 0);

/** Status register bits. */
export const PciStatus = {
  INTERRUPT: 1 << 3,
  CAPABILITIES_LIST: 1 << 4,
  MASTER_DATA_PARITY_ERROR: 1 << 8,
  SIGNALED_TARGET_ABORT: 1 << 11,
  RECEIVED_TARGET_ABORT: 1 << 12,
  RECEIVED_MASTER_ABORT: 1 << 13,
  SIGNALED_SYSTEM_ERROR: 1 << 14,
  DETECTED_PARITY_ERROR: 1 << 15,
} as const;
/** The error bits software clears by writing 1. */
const STATUS_W1C =
  PciStatus.MASTER_DATA_PARITY_ERROR |
  PciStatus.SIGNALED_TARGET_ABORT |
  PciStatus.RECEIVED_TARGET_ABORT |
  PciStatus.RECEIVED_MASTER_ABORT |
  PciStatus.SIGNALED_SYSTEM_ERROR |
  PciStatus.DETECTED_PARITY_ERROR;

/** Low bits of a BAR that say what it is. */
export const PciBarBits = {
  IO: 0x1,
  MEM_TYPE_64: 0x4,
  PREFETCHABLE: 0x8,
} as const;

/** Capability IDs used here. */
export const PciCapId = {
  MSIX: 0x11,
  VENDOR_SPECIFIC: 0x09,
} as const;

/** A BAR: its kind and its size in bytes (a power of two); a 64-bit BAR takes the next slot too. */
export interface PciBarSpec {
  kind: 'mem32' | 'mem64' | 'io';
  size: number;
  prefetchable?: boolean;
}

/** A capability in the list: its ID, its bytes after the ID/next pair, and where it sits. */
export interface PciCapabilitySpec {
  id: number;
  /** dword-aligned, in 0x40..0xfc */
  offset: number;
  /** bytes from offset + 2 on */
  body: readonly number[];
  /** bits of the capability the guest may write, as (offset, size, mask) registers */
  writable?: readonly { offset: number; size: 1 | 2 | 4; mask: number }[];
}

/** What a function is: its identity registers, BARs, capabilities and interrupt pin. */
export interface PciFunctionLayout {
  vendorId: number;
  deviceId: number;
  revisionId: number;
  /** base class, subclass, programming interface as 0xBBSSPP */
  classCode: number;
  subsystemVendorId: number;
  subsystemId: number;
  /** six slots; a mem64 BAR's upper half is the following null slot */
  bars: readonly (PciBarSpec | null)[];
  capabilities: readonly PciCapabilitySpec[];
  /** 0 none, 1..4 INTA#..INTD# */
  interruptPin: number;
}

/** The masks that decide what guest writes do, one per dword. */
export interface PciConfigMasks {
  writable: Uint32Array;
  writeOneToClear: Uint32Array;
}

export class PciLayoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PciLayoutError';
  }
}

const isPow2 = (v: number) => Number.isSafeInteger(v) && v > 0 && 2 ** Math.round(Math.log2(v)) === v;

/** A layout's BARs and capabilities, checked once when a function model is defined. */
export function checkLayout(layout: PciFunctionLayout): void {
  if (layout.bars.length !== PCI_BAR_COUNT) throw new PciLayoutError(`a type-0 header has ${PCI_BAR_COUNT} BAR slots`);
  layout.bars.forEach((bar, i) => {
    if (!bar) return;
    if (bar.kind === 'io' && (!isPow2(bar.size) || bar.size < 4 || bar.size > 256)) throw new PciLayoutError(`BAR${i}: I/O size ${bar.size}`);
    if (bar.kind !== 'io' && (!isPow2(bar.size) || bar.size < 16)) throw new PciLayoutError(`BAR${i}: memory size ${bar.size}`);
    if (bar.kind === 'mem32' && bar.size > 2 ** 31) throw new PciLayoutError(`BAR${i}: too large for 32 bits`);
    if (bar.kind === 'mem64' && (i === PCI_BAR_COUNT - 1 || layout.bars[i + 1] !== null)) {
      throw new PciLayoutError(`BAR${i}: a 64-bit BAR needs the next slot free`);
    }
  });
  const used = new Set<number>();
  for (const cap of layout.capabilities) {
    const end = cap.offset + 2 + cap.body.length;
    if (cap.offset % 4 !== 0 || cap.offset < 0x40 || end > PCI_CONFIG_SIZE) throw new PciLayoutError(`capability 0x${cap.id.toString(16)} at 0x${cap.offset.toString(16)}`);
    for (let b = cap.offset; b < end; b++) {
      if (used.has(b)) throw new PciLayoutError(`capabilities overlap at 0x${b.toString(16)}`);
      used.add(b);
    }
  }
}

function orBytes(dwords: Uint32Array | number[], offset: number, size: number, value: number): void {
  for (let i = 0; i < size; i++) {
    const at = offset + i;
    const shift = 8 * (at & 3);
    dwords[at >> 2] = ((dwords[at >> 2] | (((value >>> (8 * i)) & 0xff) << shift)) >>> 0);
  }
}

/** The power-on configuration space of a function with `layout`. */
export function pciInitialConfig(layout: PciFunctionLayout): number[] {
  checkLayout(layout);
  const c = new Array<number>(PCI_CONFIG_DWORDS).fill(0);
  c[0] = (layout.vendorId | (layout.deviceId << 16)) >>> 0;
  const caps = [...layout.capabilities].sort((a, b) => a.offset - b.offset);
  c[1] = caps.length > 0 ? (PciStatus.CAPABILITIES_LIST << 16) >>> 0 : 0;
  c[2] = (layout.revisionId | (layout.classCode << 8)) >>> 0;
  layout.bars.forEach((bar, i) => {
    if (!bar) return;
    c[4 + i] = bar.kind === 'io' ? PciBarBits.IO : (bar.kind === 'mem64' ? PciBarBits.MEM_TYPE_64 : 0) | (bar.prefetchable ? PciBarBits.PREFETCHABLE : 0);
  });
  c[11] = (layout.subsystemVendorId | (layout.subsystemId << 16)) >>> 0;
  c[13] = caps[0]?.offset ?? 0;
  c[15] = layout.interruptPin << 8;
  caps.forEach((cap, i) => {
    orBytes(c, cap.offset, 1, cap.id);
    orBytes(c, cap.offset + 1, 1, caps[i + 1]?.offset ?? 0);
    cap.body.forEach((b, j) => orBytes(c, cap.offset + 2 + j, 1, b));
  });
  return c;
}

/** The writable and write-1-to-clear masks of a function with `layout`. */
export function pciConfigMasks(layout: PciFunctionLayout): PciConfigMasks {
  checkLayout(layout);
  const writable = new Uint32Array(PCI_CONFIG_DWORDS);
  const writeOneToClear = new Uint32Array(PCI_CONFIG_DWORDS);
  writable[1] = COMMAND_WRITABLE;
  writeOneToClear[1] = (STATUS_W1C << 16) >>> 0;
  writable[3] = 0xff; // cache line size: plain storage for software
  layout.bars.forEach((bar, i) => {
    if (!bar) return;
    // The bits below the size read back as zero: that is how software learns the size.
    if (bar.kind === 'io') writable[4 + i] = ~(bar.size - 1) & 0xffff_fffc;
    else if (bar.kind === 'mem32') writable[4 + i] = ~(bar.size - 1) & 0xffff_fff0;
    else {
      const high = Math.floor(bar.size / 2 ** 32);
      writable[4 + i] = high > 0 ? 0 : ~(bar.size - 1) & 0xffff_fff0;
      writable[5 + i] = high > 0 ? ~(high - 1) : 0xffff_ffff;
    }
  });
  writable[15] = 0xff; // interrupt line: what the OS routed the pin to
  for (const cap of layout.capabilities) for (const w of cap.writable ?? []) orBytes(writable, cap.offset + w.offset, w.size, w.mask);
  return { writable, writeOneToClear };
}

/** A configuration access is whole, naturally aligned and inside the function's space. */
export function configAccessValid(offset: number, size: number): boolean {
  return (size === 1 || size === 2 || size === 4) && Number.isInteger(offset) && offset >= 0 && offset + size <= PCI_ECAM_FUNCTION_SIZE && offset % size === 0;
}

function sizeMask(size: number): number {
  return size === 4 ? 0xffff_ffff : (1 << (8 * size)) - 1;
}

/** Read `size` bytes at `offset` (a valid access); extended space beyond 256 bytes reads 0 (none implemented). */
export function pciConfigRead(config: readonly number[], offset: number, size: number): number {
  if (offset >= PCI_CONFIG_SIZE) return 0;
  return ((config[offset >> 2] >>> (8 * (offset & 3))) & sizeMask(size)) >>> 0;
}

/**
 * Write `size` bytes at `offset` (a valid access) through the masks: writable bits take the
 * value, write-1-to-clear bits clear where the value has a 1, the rest keep their value.
 * Returns `config` itself when nothing changed.
 */
export function pciConfigWrite(config: readonly number[], masks: PciConfigMasks, offset: number, size: number, value: number): readonly number[] {
  if (offset >= PCI_CONFIG_SIZE) return config;
  const d = offset >> 2;
  const shift = 8 * (offset & 3);
  const lanes = (sizeMask(size) << shift) >>> 0;
  const v = ((value & sizeMask(size)) << shift) >>> 0;
  const old = config[d];
  const wm = masks.writable[d] & lanes;
  const cm = masks.writeOneToClear[d] & lanes;
  const next = (((old & ~wm) | (v & wm)) & ~(v & cm)) >>> 0;
  if (next === old) return config;
  const out = config.slice();
  out[d] = next;
  return out;
}

/** Where a BAR currently decodes, from the header (enabled or not). */
export interface PciBarRegion {
  bar: number;
  space: 'pio' | 'mmio';
  base: number;
  size: number;
}

/**
 * The BAR regions a function decodes now: only while its command register enables the space,
 * and not at address 0 (not yet assigned) or while a BAR reads back its size (mid-sizing).
 */
export function pciBarRegions(config: readonly number[], layout: PciFunctionLayout): PciBarRegion[] {
  const command = config[1] & 0xffff;
  const out: PciBarRegion[] = [];
  layout.bars.forEach((bar, i) => {
    if (!bar) return;
    const low = config[4 + i];
    if (bar.kind === 'io') {
      if (!(command & PciCommand.IO_SPACE)) return;
      const base = low & 0xffff_fffc;
      if (base !== 0 && base + bar.size <= 0x1_0000) out.push({ bar: i, space: 'pio', base, size: bar.size });
      return;
    }
    if (!(command & PciCommand.MEMORY_SPACE)) return;
    const high = bar.kind === 'mem64' ? config[5 + i] : 0;
    const base = high * 2 ** 32 + ((low & 0xffff_fff0) >>> 0);
    if (base !== 0 && Number.isSafeInteger(base + bar.size)) out.push({ bar: i, space: 'mmio', base, size: bar.size });
  });
  return out;
}

/** A capability found by walking the list from the capabilities pointer. */
export interface PciCapabilityFound {
  id: number;
  offset: number;
}

/** Walk the capability list as a driver does, stopping at a loop or a pointer outside the space. */
export function pciCapabilities(config: readonly number[]): PciCapabilityFound[] {
  const out: PciCapabilityFound[] = [];
  if (!((config[1] >>> 16) & PciStatus.CAPABILITIES_LIST)) return out;
  let at = pciConfigRead(config, PciReg.CAPABILITIES_POINTER, 1) & 0xfc;
  const seen = new Set<number>();
  while (at >= 0x40 && !seen.has(at)) {
    seen.add(at);
    out.push({ id: pciConfigRead(config, at, 1), offset: at });
    at = pciConfigRead(config, at + 1, 1) & 0xfc;
  }
  return out;
}

/** A configuration space in the state: exactly 64 dwords. */
export const PciConfigSchema = (): TSchema => Type.Array(U32(), { minItems: PCI_CONFIG_DWORDS, maxItems: PCI_CONFIG_DWORDS });

/**
 * The bits of `config` a guest can never change (identity, BAR type bits, capability
 * structure) against the power-on values: what a restored state must agree with.
 */
export function pciReadOnlyMismatch(config: readonly number[], initial: readonly number[], masks: PciConfigMasks): string | null {
  for (let d = 0; d < PCI_CONFIG_DWORDS; d++) {
    // Status bits the device itself sets (interrupt, errors) may differ; the rest are fixed.
    const deviceOwned = d === 1 ? ((PciStatus.INTERRUPT | STATUS_W1C) << 16) >>> 0 : 0;
    const fixed = ~(masks.writable[d] | masks.writeOneToClear[d] | deviceOwned) >>> 0;
    if (((config[d] ^ initial[d]) & fixed) >>> 0 !== 0) return `/config/${d}: read-only bits differ from the function's (offset 0x${(4 * d).toString(16)})`;
  }
  return null;
}
