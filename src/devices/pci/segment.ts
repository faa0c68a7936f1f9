// PCI segment 0 (one bus, bus 0) as one device in the store: the functions' configuration
// spaces, the legacy configuration mechanism's address latch, and the routing of guest
// accesses. The segment owns on the buses:
//   pio  0xcf8..0xcff             CONFIG_ADDRESS (0xcf8, dword only) and CONFIG_DATA (0xcfc..0xcff)
//   pio  PCI_IO_WINDOW            I/O BARs
//   mmio PCI_ECAM_START, 1 MiB    ECAM: 4 KiB of configuration space per function
//   mmio the 32-bit and 64-bit BAR windows
// A BAR access reaches the function whose BAR holds the address, while its command register
// enables that space, as a pure transition of the function's own model; an access nothing
// decodes reads all ones and is dropped, as a master abort would be.
import { Type } from '@sinclair/typebox';
import * as aml from '../../boot/aml';
import { buildMcfg } from '../../boot/acpi';
import {
  PCI_ECAM_BUSES,
  PCI_ECAM_SIZE,
  PCI_ECAM_START,
  PCI_MMIO32_SIZE,
  PCI_MMIO32_START,
  pciMmio64Window,
} from '../../boot/layout';
import { DeviceId, Exact, IntIn, U32, checkSchema } from '../../state/state-schema';
import { allOnes } from '../bus';
import { type Effect, type IoAccess, type TransitionResult, data32 } from '../device';
import {
  type BusRangeSpec,
  type DeviceAcpi,
  type DeviceInstance,
  type DeviceModel,
  type DeviceStateBase,
  deviceAccessEventTypes,
} from '../model';
import { PCI_ECAM_FUNCTION_SIZE, configAccessValid, pciBarRegions, pciConfigRead, pciConfigWrite } from './config-space';
import type { PciFunctionModel, PciFunctionRegistry, PciFunctionState } from './function';
import { PCI_HOST_BRIDGE_KIND, pciHostBridgeModel } from './host-bridge';
import { virtioBlockModel } from '../virtio/block';
import { virtioConsoleModel } from '../virtio/console';
import { virtioNetModel } from '../virtio/net';
import { virtioRngModel } from '../virtio/rng';

export const PCI_SEGMENT_KIND = 'pci-segment' as const;
export const PCI_SEGMENT_SCHEMA_VERSION = 1;
export const PCI_SEGMENT_LABEL = 'PCI Segment';
export const PCI_SEGMENT_ID = 'pci0';

/** The legacy configuration mechanism #1 ports. */
export const PCI_CONFIG_ADDRESS_PORT = 0xcf8;
export const PCI_CONFIG_DATA_PORT = 0xcfc;
/** Ports left to I/O BARs: the top 16 KiB of the port space, clear of every legacy device. */
export const PCI_IO_WINDOW = { base: 0xc000, length: 0x4000 } as const;

/** CONFIG_ADDRESS bits: enable, bus, device, function, dword register. Bits 30:24 and 1:0 read 0. */
const CONFIG_ADDRESS_ENABLE = 0x8000_0000;
const CONFIG_ADDRESS_MASK = 0x80ff_fffc;

/** Function models a segment may hold. Virtio functions join here. */
export const pciFunctionModels: PciFunctionRegistry = Object.freeze({
  [PCI_HOST_BRIDGE_KIND]: pciHostBridgeModel,
  [virtioRngModel.kind]: virtioRngModel,
  [virtioBlockModel.kind]: virtioBlockModel,
  [virtioConsoleModel.kind]: virtioConsoleModel,
  [virtioNetModel.kind]: virtioNetModel,
});

export interface PciSegmentState extends DeviceStateBase {
  kind: typeof PCI_SEGMENT_KIND;
  /** the last dword written to CONFIG_ADDRESS */
  configAddress: number;
  /** functions on bus 0 by slot, "dd.f" in hex (the host bridge is "00.0") */
  functions: Record<string, PciFunctionState>;
}

/** The key of device `dev`, function `fn` on bus 0. */
export function pciSlot(dev: number, fn: number): string {
  if (!Number.isInteger(dev) || dev < 0 || dev > 31 || !Number.isInteger(fn) || fn < 0 || fn > 7) throw new RangeError(`no PCI function ${dev}.${fn}`);
  return `${dev.toString(16).padStart(2, '0')}.${fn}`;
}
const SLOT_PATTERN = '^[01][0-9a-f]\\.[0-7]$';

function slotOfDevfn(devfn: number): string {
  return pciSlot(devfn >> 3, devfn & 7);
}

export interface PciSegmentOptions {
  id?: string;
  /** guest RAM size: the 64-bit BAR window starts above it */
  memorySize: number;
  /** functions besides the host bridge, by slot */
  functions?: Record<string, PciFunctionState>;
}

export function pciSegmentInitialState(opts: { id?: string; functions?: Record<string, PciFunctionState> } = {}): PciSegmentState {
  return {
    kind: PCI_SEGMENT_KIND,
    id: opts.id ?? PCI_SEGMENT_ID,
    schemaVersion: PCI_SEGMENT_SCHEMA_VERSION,
    configAddress: 0,
    functions: { [pciSlot(0, 0)]: pciHostBridgeModel.initialState(), ...(opts.functions ?? {}) },
  };
}

/** The segment's bus ranges: device offsets are guest addresses, so one transition decodes all. */
export function pciSegmentRanges(memorySize: number): BusRangeSpec[] {
  const w64 = pciMmio64Window(memorySize);
  const at = (space: 'pio' | 'mmio', base: number, length: number): BusRangeSpec => ({ space, base, length, deviceOffset: base });
  return [
    at('pio', PCI_CONFIG_ADDRESS_PORT, 8),
    at('pio', PCI_IO_WINDOW.base, PCI_IO_WINDOW.length),
    at('mmio', PCI_ECAM_START, PCI_ECAM_SIZE),
    at('mmio', PCI_MMIO32_START, PCI_MMIO32_SIZE),
    at('mmio', w64.start, w64.size),
  ];
}

export function pciSegmentDevice(opts: PciSegmentOptions): DeviceInstance<PciSegmentState> {
  return { state: pciSegmentInitialState(opts), ranges: pciSegmentRanges(opts.memorySize) };
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

function floating(state: PciSegmentState, access: IoAccess): TransitionResult<PciSegmentState> {
  return access.direction === 'read' ? { state, effects: NO_EFFECTS, value: allOnes(access.size) } : { state, effects: NO_EFFECTS };
}

function withFunction(state: PciSegmentState, slot: string, fn: PciFunctionState): PciSegmentState {
  return { ...state, functions: { ...state.functions, [slot]: fn } };
}

/** A configuration cycle to bus `bus`, function `devfn`, register `reg` (a valid access). */
function configCycle(
  state: PciSegmentState,
  registry: PciFunctionRegistry,
  bus: number,
  devfn: number,
  reg: number,
  access: IoAccess,
): TransitionResult<PciSegmentState> {
  const slot = slotOfDevfn(devfn);
  const fn = bus === 0 && Object.hasOwn(state.functions, slot) ? state.functions[slot] : undefined;
  const model = fn && registry[fn.kind];
  // No function there: the cycle ends in a master abort, reads all ones (vendor ID 0xffff).
  if (!fn || !model) return floating(state, access);
  if (access.direction === 'read') return { state, effects: NO_EFFECTS, value: pciConfigRead(fn.config, reg, access.size) };
  const config = pciConfigWrite(fn.config, model.masks, reg, access.size, data32(access));
  if (config === fn.config) return { state, effects: NO_EFFECTS };
  const after = { ...fn, config: config as number[] };
  if (!model.configWritten) return { state: withFunction(state, slot, after), effects: NO_EFFECTS };
  const r = model.configWritten(fn, after);
  return { state: withFunction(state, slot, r.state), effects: r.effects };
}

function legacyConfigAccess(state: PciSegmentState, registry: PciFunctionRegistry, port: number, access: IoAccess): TransitionResult<PciSegmentState> {
  if (port < PCI_CONFIG_DATA_PORT) {
    // CONFIG_ADDRESS answers whole dwords only: byte and word cycles at 0xcf8..0xcfb are not
    // configuration cycles (on a PC they belong to other registers, like 0xcf9 reset control).
    if (port !== PCI_CONFIG_ADDRESS_PORT || access.size !== 4) return floating(state, access);
    if (access.direction === 'read') return { state, effects: NO_EFFECTS, value: state.configAddress };
    const configAddress = (data32(access) & CONFIG_ADDRESS_MASK) >>> 0;
    return configAddress === state.configAddress ? { state, effects: NO_EFFECTS } : { state: { ...state, configAddress }, effects: NO_EFFECTS };
  }
  const lane = port - PCI_CONFIG_DATA_PORT;
  const ca = state.configAddress;
  if (!(ca & CONFIG_ADDRESS_ENABLE) || access.size === 8 || lane % access.size !== 0) return floating(state, access);
  return configCycle(state, registry, (ca >>> 16) & 0xff, (ca >>> 8) & 0xff, (ca & 0xfc) + lane, access);
}

function ecamAccess(state: PciSegmentState, registry: PciFunctionRegistry, offset: number, access: IoAccess): TransitionResult<PciSegmentState> {
  const reg = offset % PCI_ECAM_FUNCTION_SIZE;
  // ECAM takes 1-, 2- and 4-byte naturally aligned accesses; an 8-byte one is not a config cycle.
  if (access.size === 8 || !configAccessValid(reg, access.size)) return floating(state, access);
  return configCycle(state, registry, offset >>> 20, (offset >>> 12) & 0xff, reg, access);
}

/** The function and BAR decoding `address` in `space` for a whole access, if any. */
export function pciBarTarget(
  state: PciSegmentState,
  registry: PciFunctionRegistry,
  space: 'pio' | 'mmio',
  address: number,
  size: number,
): { slot: string; model: PciFunctionModel; bar: number; offset: number } | undefined {
  for (const [slot, fn] of Object.entries(state.functions)) {
    const model = registry[fn.kind];
    if (!model?.barAccess) continue;
    for (const r of pciBarRegions(fn.config, model.layout)) {
      if (r.space === space && address >= r.base && address + size <= r.base + r.size) return { slot, model, bar: r.bar, offset: address - r.base };
    }
  }
  return undefined;
}

function barAccess(state: PciSegmentState, registry: PciFunctionRegistry, address: number, access: IoAccess): TransitionResult<PciSegmentState> {
  const target = pciBarTarget(state, registry, access.space, address, access.size);
  if (!target) return floating(state, access);
  const fn = state.functions[target.slot];
  const r = target.model.barAccess!(fn, target.bar, target.offset, { ...access, offset: target.offset } as IoAccess);
  const next = r.state === fn ? state : withFunction(state, target.slot, r.state);
  return r.value === undefined ? { state: next, effects: r.effects } : { state: next, effects: r.effects, value: r.value };
}

/** The segment's transition over the functions of `registry` (the tests bring their own). */
export function pciSegmentTransitionWith(registry: PciFunctionRegistry) {
  return (state: PciSegmentState, access: IoAccess): TransitionResult<PciSegmentState> => {
    const address = access.offset;
    if (access.space === 'pio') {
      if (address >= PCI_CONFIG_ADDRESS_PORT && address < PCI_CONFIG_ADDRESS_PORT + 8) {
        // An access must stay inside one register: 0xcfb..0xcfe as a dword is no cycle.
        if (address + access.size > (address < PCI_CONFIG_DATA_PORT ? PCI_CONFIG_DATA_PORT : PCI_CONFIG_ADDRESS_PORT + 8)) return floating(state, access);
        return legacyConfigAccess(state, registry, address, access);
      }
      return barAccess(state, registry, address, access);
    }
    if (address >= PCI_ECAM_START && address < PCI_ECAM_START + PCI_ECAM_SIZE) {
      if (address + access.size > PCI_ECAM_START + PCI_ECAM_SIZE) return floating(state, access);
      return ecamAccess(state, registry, address - PCI_ECAM_START, access);
    }
    return barAccess(state, registry, address, access);
  };
}

export const pciSegmentTransition = pciSegmentTransitionWith(pciFunctionModels);

/** The slot of the function whose device id is `id` (a virtio device's `id=`), if any. */
export function pciSlotOfDevice(state: PciSegmentState, id: string): string | undefined {
  for (const [slot, fn] of Object.entries(state.functions)) if ((fn as { id?: unknown }).id === id) return slot;
  return undefined;
}

/**
 * The segment's host-side inputs: every function model's, each routed to the function the
 * payload's `device` names. An input for a device the segment does not hold, or of another
 * kind, is refused (the event is not recorded).
 */
export function pciSegmentInputsWith(registry: PciFunctionRegistry): Record<string, (state: PciSegmentState, payload: { device: string }) => TransitionResult<PciSegmentState>> {
  const out: Record<string, (state: PciSegmentState, payload: { device: string }) => TransitionResult<PciSegmentState>> = {};
  for (const model of Object.values(registry)) {
    for (const type of Object.keys(model.inputs ?? {})) {
      out[type] = (state, payload) => {
        const slot = typeof payload?.device === 'string' ? pciSlotOfDevice(state, payload.device) : undefined;
        const fn = slot === undefined ? undefined : state.functions[slot];
        const input = fn && Object.hasOwn(registry, fn.kind) ? registry[fn.kind].inputs?.[type] : undefined;
        if (!fn || !input) throw new RangeError(`no PCI device '${String(payload?.device).slice(0, 64)}' takes ${type}`);
        const r = input(fn, payload);
        return { state: r.state === fn ? state : withFunction(state, slot!, r.state), effects: r.effects };
      };
    }
  }
  return out;
}

export const PciSegmentStateSchema = Exact({
  kind: Type.Literal(PCI_SEGMENT_KIND),
  id: DeviceId(),
  schemaVersion: IntIn(PCI_SEGMENT_SCHEMA_VERSION, PCI_SEGMENT_SCHEMA_VERSION),
  configAddress: U32(),
  // Each function is then checked against its own model's schema (checkState).
  // additionalProperties false: a key the slot pattern does not match is refused, not ignored.
  functions: Type.Record(Type.String({ pattern: SLOT_PATTERN }), Type.Object({ kind: Type.String(), config: Type.Array(U32()) }), {
    maxProperties: 256,
    additionalProperties: false,
  }),
});

/** Relations the schema cannot state, against the functions of `registry`. */
export function pciSegmentCheckWith(registry: PciFunctionRegistry) {
  return (state: PciSegmentState): string | null => {
    if ((state.configAddress & ~CONFIG_ADDRESS_MASK) !== 0) return '/configAddress: reserved bits set';
    const bridge = state.functions[pciSlot(0, 0)];
    if (bridge?.kind !== PCI_HOST_BRIDGE_KIND) return '/functions/00.0: the host bridge must be function 00.0';
    for (const [slot, fn] of Object.entries(state.functions)) {
      const model = Object.hasOwn(registry, fn.kind) ? registry[fn.kind] : undefined;
      if (!model) return `/functions/${slot}: unknown PCI function kind '${String(fn.kind).slice(0, 64)}'`;
      try {
        checkSchema(model.stateSchema, fn, fn.kind);
      } catch (e) {
        return `/functions/${slot}: ${(e as Error).message}`;
      }
      const problem = model.checkState?.(fn);
      if (problem) return `/functions/${slot}${problem}`;
    }
    return null;
  };
}

/**
 * The ACPI description: the root bridge PCI0 with its resources (bus 0, the configuration
 * ports it consumes, the I/O and memory windows it forwards), the ECAM window reserved as a
 * motherboard resource (Linux uses MMCONFIG only where firmware reserves it), and the MCFG.
 */
export function pciSegmentAcpi(device: DeviceInstance<PciSegmentState>): DeviceAcpi {
  const find = (space: 'pio' | 'mmio', base?: number) => device.ranges.find((r) => r.space === space && (base === undefined || r.base === base));
  const io = find('pio', PCI_IO_WINDOW.base);
  const ecam = find('mmio', PCI_ECAM_START);
  const mmio32 = find('mmio', PCI_MMIO32_START);
  const mmio64 = device.ranges.find((r) => r.space === 'mmio' && r.base >= 2 ** 32);
  if (!io || !ecam || !mmio32 || !mmio64) throw new Error('a PCI segment needs its I/O, ECAM and BAR windows');
  const crs = aml.resourceTemplate([
    aml.AddressResource.wordBusNumber(0, PCI_ECAM_BUSES),
    aml.Resource.io(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8),
    aml.AddressResource.wordIo(io.base, io.length),
    aml.AddressResource.dwordMemory(mmio32.base, mmio32.length),
    aml.AddressResource.qwordMemory(mmio64.base, mmio64.length),
  ]);
  return {
    sb: [
      aml.device('PCI0', [
        aml.name('_HID', aml.eisaId('PNP0A08')),
        aml.name('_CID', aml.eisaId('PNP0A03')),
        aml.name('_ADR', 0),
        aml.name('_SEG', 0),
        aml.name('_UID', 0),
        aml.name('_BBN', 0),
        aml.name('_CRS', crs),
      ]),
      aml.device('MRES', [
        aml.name('_HID', aml.eisaId('PNP0C02')),
        aml.name('_UID', 0),
        aml.name('_CRS', aml.resourceTemplate([aml.Resource.memory32Fixed(ecam.base, ecam.length, false)])),
      ]),
    ],
    tables: [buildMcfg([{ base: ecam.base, segment: 0, startBus: 0, endBus: PCI_ECAM_BUSES - 1 }])],
  };
}

export const pciSegmentModel: DeviceModel<PciSegmentState> = {
  kind: PCI_SEGMENT_KIND,
  label: PCI_SEGMENT_LABEL,
  schemaVersion: PCI_SEGMENT_SCHEMA_VERSION,
  events: deviceAccessEventTypes(PCI_SEGMENT_LABEL),
  transition: pciSegmentTransition,
  stateSchema: PciSegmentStateSchema,
  inputs: pciSegmentInputsWith(pciFunctionModels),
  acpi: pciSegmentAcpi,
  checkState: pciSegmentCheckWith(pciFunctionModels),
};
