// The virtio 1.x PCI transport (virtio 1.2, 4.1) as a PCI function model: the common,
// notification, ISR and device-specific configuration structures in BAR 0, next to the MSI-X
// table and PBA, all plain state with pure transitions. A device type (entropy, block,
// console) brings its identity, features, queue count and configuration space; the
// transport does feature negotiation, device status, reset and queue setup the same way for
// all of them. What the driver's register writes mean for the host (a queue to serve, an
// MSI-X message to send, KVM routes to reprogram) leaves as effects.
import { Type } from '@sinclair/typebox';
import type { TSchema } from '@sinclair/typebox';
import { eventCreator } from '../../state/slice';
import { Count, Exact, IntIn, U16, U32, U8, checkSchema } from '../../state/state-schema';
import { allOnes } from '../bus';
import { type Effect, type IoAccess, type TransitionResult, data32 } from '../device';
import { PciCapId, PciConfigSchema, type PciCapabilitySpec, type PciFunctionLayout } from '../pci/config-space';
import { type PciFunctionModel, type PciFunctionState, definePciFunction } from '../pci/function';
import {
  type MsixLayout,
  type MsixResult,
  type MsixState,
  msixBarAccess,
  msixCapability,
  msixConfigChanged,
  msixInitialState,
  msixPbaSize,
  msixSignal,
  msixStateProblem,
  msixStateSchema,
  msixTableSize,
} from '../pci/msix';

/** The PCI vendor of virtio devices; a modern device's ID is 0x1040 + its virtio device ID. */
export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
export const VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040;

/** Device status bits (2.1). */
export const VirtioStatus = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Transport feature bits every Tern virtio device offers (6). */
export const VirtioFeature = {
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  VERSION_1: 32,
} as const;

/** "No MSI-X vector": a config or queue vector the driver has not set, or one the device refused. */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** ISR status bits: a used buffer, a configuration change. */
export const VirtioIsr = { QUEUE: 1, CONFIG: 2 } as const;

/** virtio_pci_cap cfg_type values (4.1.4). */
const CapType = { COMMON: 1, NOTIFY: 2, ISR: 3, DEVICE: 4 } as const;

/**
 * BAR 0 (64-bit, 32 KiB): each structure in its own page, so the host can map or trap them
 * apart. Queue i's doorbell is at NOTIFY + 4 * i (notify_off_multiplier 4, notify_off i).
 */
export const VirtioBar = {
  INDEX: 0,
  SIZE: 0x8000,
  COMMON: 0x0000,
  COMMON_SIZE: 0x38,
  ISR: 0x1000,
  ISR_SIZE: 1,
  DEVICE: 0x2000,
  DEVICE_SIZE: 0x1000,
  NOTIFY: 0x3000,
  NOTIFY_SIZE: 0x1000,
  NOTIFY_MULTIPLIER: 4,
  MSIX_TABLE: 0x4000,
  MSIX_PBA: 0x6000,
} as const;

/** Most queues a device can have: each needs its own doorbell in the notify page. */
export const VIRTIO_MAX_QUEUES = VirtioBar.NOTIFY_SIZE / VirtioBar.NOTIFY_MULTIPLIER;

/** Common configuration registers (4.1.4.3). */
export const CommonCfg = {
  DEVICE_FEATURE_SELECT: 0x00,
  DEVICE_FEATURE: 0x04,
  DRIVER_FEATURE_SELECT: 0x08,
  DRIVER_FEATURE: 0x0c,
  CONFIG_MSIX_VECTOR: 0x10,
  NUM_QUEUES: 0x12,
  DEVICE_STATUS: 0x14,
  CONFIG_GENERATION: 0x15,
  QUEUE_SELECT: 0x16,
  QUEUE_SIZE: 0x18,
  QUEUE_MSIX_VECTOR: 0x1a,
  QUEUE_ENABLE: 0x1c,
  QUEUE_NOTIFY_OFF: 0x1e,
  QUEUE_DESC: 0x20,
  QUEUE_DRIVER: 0x28,
  QUEUE_DEVICE: 0x30,
} as const;

/** One queue as the driver set it up, and the device's cursors in its rings. */
export interface VirtqueueSetup {
  /** the size the driver chose (a power of two up to maxSize) */
  size: number;
  /** the largest size the device offers */
  maxSize: number;
  /** MSI-X vector for used-buffer notifications, or VIRTIO_MSI_NO_VECTOR */
  vector: number;
  enabled: boolean;
  /** guest addresses of the descriptor table, driver (avail) and device (used) rings: [low, high] dwords */
  desc: number[];
  driver: number[];
  device: number[];
  /** next avail ring index the device will read; next used ring index it will write (16-bit) */
  nextAvail: number;
  nextUsed: number;
}

/** The transport's registers. Features are [low, high] dwords of the 64-bit feature words. */
export interface VirtioTransportState {
  deviceFeatures: number[];
  driverFeatures: number[];
  deviceFeatureSelect: number;
  driverFeatureSelect: number;
  status: number;
  configGeneration: number;
  configVector: number;
  queueSelect: number;
  /** ISR status, read-to-clear */
  isr: number;
  queues: VirtqueueSetup[];
}

/** A virtio PCI function: configuration space, MSI-X, transport, and the device type's own state. */
export interface VirtioFunctionState<D = unknown> extends PciFunctionState {
  /** the device's id (the `id=` of its option, the source of its events) */
  id: string;
  msix: MsixState;
  virtio: VirtioTransportState;
  device: D;
  /** what the host did for the device (vm.counters: read_bytes, write_ops, ...), since it was created */
  counters: Record<string, number>;
}

/** What a device type brings to the transport. */
export interface VirtioDeviceType<D> {
  kind: string;
  /** the virtio device ID (5): 2 block, 3 console, 4 entropy */
  virtioId: number;
  /** PCI class code 0xBBSSPP */
  classCode: number;
  /** MSI-X vectors: one for configuration changes plus one per queue it may have */
  vectors: number;
  /** the most queues an instance may have */
  maxQueues: number;
  deviceSchema: TSchema;
  /** device-specific feature bits offered (bits 0..23 and any above 32 it implements), as a bigint */
  features(device: D): bigint;
  /** the device-specific configuration structure's bytes (read as little-endian fields) */
  configBytes?(device: D): Uint8Array;
  /** a driver write to the configuration structure; most are read-only */
  configWrite?(device: D, offset: number, size: number, value: number): D;
  /** what the schema cannot say about `device` */
  checkDevice?(device: D): string | null;
  /** the device's own state after the driver resets it (default: unchanged) */
  resetDevice?(device: D): D;
}

export const TRANSPORT_FEATURES = (1n << BigInt(VirtioFeature.VERSION_1)) | (1n << BigInt(VirtioFeature.RING_EVENT_IDX)) | (1n << BigInt(VirtioFeature.RING_INDIRECT_DESC));

/** A 64-bit feature word as [low, high] dwords, and back. */
export const featureWords = (f: bigint): number[] => [Number(f & 0xffff_ffffn), Number((f >> 32n) & 0xffff_ffffn)];
export const featureBits = (w: readonly number[]): bigint => (BigInt(w[1] >>> 0) << 32n) | BigInt(w[0] >>> 0);
export const hasFeature = (w: readonly number[], bit: number): boolean => ((featureBits(w) >> BigInt(bit)) & 1n) === 1n;

/** A 64-bit ring address from its two dwords (null above 2^53: no guest RAM is there). */
export function ringAddress(w: readonly number[]): number | null {
  const v = w[1] * 2 ** 32 + w[0];
  return Number.isSafeInteger(v) ? v : null;
}

function initialQueue(maxSize: number): VirtqueueSetup {
  return { size: maxSize, maxSize, vector: VIRTIO_MSI_NO_VECTOR, enabled: false, desc: [0, 0], driver: [0, 0], device: [0, 0], nextAvail: 0, nextUsed: 0 };
}

/** Power-on (and after a reset): nothing negotiated, every queue disabled at its largest size. */
export function virtioTransportInitial(deviceFeatures: bigint, queueSizes: readonly number[]): VirtioTransportState {
  return {
    deviceFeatures: featureWords(deviceFeatures),
    driverFeatures: [0, 0],
    deviceFeatureSelect: 0,
    driverFeatureSelect: 0,
    status: 0,
    configGeneration: 0,
    configVector: VIRTIO_MSI_NO_VECTOR,
    queueSelect: 0,
    isr: 0,
    queues: queueSizes.map(initialQueue),
  };
}

function le(v: number, bytes: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < bytes; i++) out.push((v >>> (8 * i)) & 0xff);
  return out;
}

/** A vendor-specific capability pointing at a structure in BAR 0 (virtio_pci_cap, 16 bytes; notify adds 4). */
function virtioCap(offset: number, type: number, at: number, length: number, extra: number[] = []): PciCapabilitySpec {
  const body = [16 + extra.length, type, VirtioBar.INDEX, 0, 0, 0, ...le(at, 4), ...le(length, 4), ...extra];
  return { id: PciCapId.VENDOR_SPECIFIC, offset, body };
}

export function virtioMsixLayout(vectors: number): MsixLayout {
  return { capOffset: 0x40, vectors, bar: VirtioBar.INDEX, tableOffset: VirtioBar.MSIX_TABLE, pbaOffset: VirtioBar.MSIX_PBA };
}

/** The PCI layout of a modern virtio device of `type`. */
export function virtioPciLayout(type: { virtioId: number; classCode: number; vectors: number }): PciFunctionLayout {
  const msix = virtioMsixLayout(type.vectors);
  if (VirtioBar.MSIX_TABLE + msixTableSize(msix) > VirtioBar.MSIX_PBA || VirtioBar.MSIX_PBA + msixPbaSize(msix) > VirtioBar.SIZE) {
    throw new RangeError(`${type.vectors} MSI-X vectors do not fit the virtio BAR`);
  }
  return {
    vendorId: VIRTIO_PCI_VENDOR_ID,
    deviceId: VIRTIO_PCI_MODERN_DEVICE_BASE + type.virtioId,
    // Revision 1: a modern-only device (4.1.2.1); drivers must not use a legacy interface.
    revisionId: 1,
    classCode: type.classCode,
    subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
    subsystemId: 0x40 + type.virtioId,
    bars: [{ kind: 'mem64', size: VirtioBar.SIZE }, null, null, null, null, null],
    capabilities: [
      msixCapability(msix),
      virtioCap(0x50, CapType.COMMON, VirtioBar.COMMON, VirtioBar.COMMON_SIZE),
      virtioCap(0x60, CapType.ISR, VirtioBar.ISR, VirtioBar.ISR_SIZE),
      virtioCap(0x70, CapType.DEVICE, VirtioBar.DEVICE, VirtioBar.DEVICE_SIZE),
      virtioCap(0x80, CapType.NOTIFY, VirtioBar.NOTIFY, VirtioBar.NOTIFY_SIZE, le(VirtioBar.NOTIFY_MULTIPLIER, 4)),
    ],
    // No INTx: every virtio driver Tern runs uses MSI-X.
    interruptPin: 0,
  };
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

/** The common configuration structure's bytes for the current state. */
function commonBytes(v: VirtioTransportState): Uint8Array {
  const b = new Uint8Array(VirtioBar.COMMON_SIZE);
  const dv = new DataView(b.buffer);
  const sel = v.deviceFeatureSelect;
  dv.setUint32(CommonCfg.DEVICE_FEATURE_SELECT, sel, true);
  dv.setUint32(CommonCfg.DEVICE_FEATURE, sel < 2 ? v.deviceFeatures[sel] : 0, true);
  dv.setUint32(CommonCfg.DRIVER_FEATURE_SELECT, v.driverFeatureSelect, true);
  dv.setUint32(CommonCfg.DRIVER_FEATURE, v.driverFeatureSelect < 2 ? v.driverFeatures[v.driverFeatureSelect] : 0, true);
  dv.setUint16(CommonCfg.CONFIG_MSIX_VECTOR, v.configVector, true);
  dv.setUint16(CommonCfg.NUM_QUEUES, v.queues.length, true);
  dv.setUint8(CommonCfg.DEVICE_STATUS, v.status);
  dv.setUint8(CommonCfg.CONFIG_GENERATION, v.configGeneration);
  dv.setUint16(CommonCfg.QUEUE_SELECT, v.queueSelect, true);
  const q = v.queues[v.queueSelect];
  if (q) {
    dv.setUint16(CommonCfg.QUEUE_SIZE, q.size, true);
    dv.setUint16(CommonCfg.QUEUE_MSIX_VECTOR, q.vector, true);
    dv.setUint16(CommonCfg.QUEUE_ENABLE, q.enabled ? 1 : 0, true);
    dv.setUint16(CommonCfg.QUEUE_NOTIFY_OFF, v.queueSelect, true);
    for (const [at, w] of [
      [CommonCfg.QUEUE_DESC, q.desc],
      [CommonCfg.QUEUE_DRIVER, q.driver],
      [CommonCfg.QUEUE_DEVICE, q.device],
    ] as const) {
      dv.setUint32(at, w[0], true);
      dv.setUint32(at + 4, w[1], true);
    }
  }
  return b;
}

/** Little-endian read of `size` bytes at `offset` of `bytes` (0 past the end). */
function readLe(bytes: Uint8Array, offset: number, size: number): number | bigint {
  let v = 0n;
  for (let i = size - 1; i >= 0; i--) v = (v << 8n) | BigInt(bytes[offset + i] ?? 0);
  return size === 8 ? v : Number(v);
}

export interface VirtioTransition<D> {
  fn: VirtioFunctionState<D>;
  effects: Effect[];
}

/** The transport as a device type sees it, for the model and for tests. */
export interface VirtioFunctionModel<D> extends PciFunctionModel<VirtioFunctionState<D>> {
  type: VirtioDeviceType<D>;
  msixLayout: MsixLayout;
  /** a new function: power-on transport with `queueSizes`, the device's own state */
  create(id: string, device: D, queueSizes: readonly number[]): VirtioFunctionState<D>;
}

const withVirtio = <D>(fn: VirtioFunctionState<D>, virtio: VirtioTransportState): VirtioFunctionState<D> => ({ ...fn, virtio });

function withQueue<D>(fn: VirtioFunctionState<D>, index: number, q: VirtqueueSetup): VirtioFunctionState<D> {
  const queues = fn.virtio.queues.slice();
  queues[index] = q;
  return withVirtio(fn, { ...fn.virtio, queues });
}

/** The effects an MSI-X result carries: messages to send, routes to reprogram. */
export function msixEffects(device: string, r: MsixResult): Effect[] {
  const out: Effect[] = [];
  if (r.routesChanged.length) out.push({ type: 'msi.routes-changed', device });
  for (const m of r.messages) out.push({ type: 'msi.send', device, vector: m.vector });
  return out;
}

const isPow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;

/** Build a device type's PCI function model; its effects name the function by its device id. */
export function defineVirtioFunction<D>(type: VirtioDeviceType<D>): VirtioFunctionModel<D> {
  const layout = virtioPciLayout(type);
  const msix = virtioMsixLayout(type.vectors);
  const vectorOk = (v: number) => v < type.vectors;

  const reset = (fn: VirtioFunctionState<D>): VirtioFunctionState<D> =>
    withVirtio(type.resetDevice ? { ...fn, device: type.resetDevice(fn.device) } : fn, { ...virtioTransportInitial(type.features(fn.device) | TRANSPORT_FEATURES, fn.virtio.queues.map((q) => q.maxSize)), configGeneration: fn.virtio.configGeneration });

  function writeStatus(fn: VirtioFunctionState<D>, value: number): VirtioTransition<D> {
    const v = fn.virtio;
    // Linux resets every device before it first sets it up; as in Cloud Hypervisor, only the
    // reset of an activated device is one the VMM reports.
    if (value === 0) return { fn: reset(fn), effects: v.status & VirtioStatus.DRIVER_OK ? [{ type: 'virtio.reset', device: fn.id }] : NO_EFFECTS };
    // The driver only adds bits (3.1.1); one that would clear any is ignored, as is a
    // device-owned bit it tries to set.
    const wanted = (value & ~VirtioStatus.DEVICE_NEEDS_RESET) | (v.status & VirtioStatus.DEVICE_NEEDS_RESET);
    if ((wanted & v.status) !== v.status) return { fn, effects: NO_EFFECTS };
    let status = wanted;
    const added = status & ~v.status;
    if (added & VirtioStatus.FEATURES_OK) {
      // FEATURES_OK stays clear when the driver took a feature not offered, or not VERSION_1:
      // the driver reads the status back and gives up (3.1.1 step 6).
      const offered = featureBits(v.deviceFeatures);
      const taken = featureBits(v.driverFeatures);
      if ((taken & ~offered) !== 0n || !hasFeature(v.driverFeatures, VirtioFeature.VERSION_1)) status &= ~VirtioStatus.FEATURES_OK;
    }
    if (status & VirtioStatus.DRIVER_OK && !(status & VirtioStatus.FEATURES_OK)) status &= ~VirtioStatus.DRIVER_OK;
    const next = withVirtio(fn, { ...v, status });
    const effects: Effect[] = status & ~v.status & VirtioStatus.DRIVER_OK ? [{ type: 'virtio.activated', device: fn.id }] : [];
    return { fn: next, effects };
  }

  function writeQueueField(fn: VirtioFunctionState<D>, offset: number, size: number, value: number): VirtioFunctionState<D> {
    const index = fn.virtio.queueSelect;
    const q = fn.virtio.queues[index];
    // Queue registers of a queue that does not exist, or of one already enabled, do not change.
    if (!q || q.enabled) return fn;
    switch (offset) {
      case CommonCfg.QUEUE_SIZE:
        return size === 2 ? withQueue(fn, index, { ...q, size: value & 0xffff }) : fn;
      case CommonCfg.QUEUE_MSIX_VECTOR:
        return size === 2 ? withQueue(fn, index, { ...q, vector: vectorOk(value) ? value : VIRTIO_MSI_NO_VECTOR }) : fn;
      case CommonCfg.QUEUE_ENABLE:
        // Only 1 enables; a queue is disabled again only by a device reset.
        return size === 2 && value === 1 ? withQueue(fn, index, { ...q, enabled: true, nextAvail: 0, nextUsed: 0 }) : fn;
    }
    for (const [at, key] of [
      [CommonCfg.QUEUE_DESC, 'desc'],
      [CommonCfg.QUEUE_DRIVER, 'driver'],
      [CommonCfg.QUEUE_DEVICE, 'device'],
    ] as const) {
      if (size === 4 && (offset === at || offset === at + 4)) {
        const w = q[key].slice();
        w[(offset - at) / 4] = value >>> 0;
        return withQueue(fn, index, { ...q, [key]: w });
      }
    }
    return fn;
  }

  function commonWrite(fn: VirtioFunctionState<D>, offset: number, size: number, value: number): VirtioTransition<D> {
    const v = fn.virtio;
    const same = { fn, effects: NO_EFFECTS };
    switch (offset) {
      case CommonCfg.DEVICE_FEATURE_SELECT:
        return size === 4 ? { fn: withVirtio(fn, { ...v, deviceFeatureSelect: value >>> 0 }), effects: NO_EFFECTS } : same;
      case CommonCfg.DRIVER_FEATURE_SELECT:
        return size === 4 ? { fn: withVirtio(fn, { ...v, driverFeatureSelect: value >>> 0 }), effects: NO_EFFECTS } : same;
      case CommonCfg.DRIVER_FEATURE: {
        // Features are fixed once FEATURES_OK is set; words past the second do not exist.
        if (size !== 4 || v.driverFeatureSelect > 1 || v.status & VirtioStatus.FEATURES_OK) return same;
        const driverFeatures = v.driverFeatures.slice();
        driverFeatures[v.driverFeatureSelect] = value >>> 0;
        return { fn: withVirtio(fn, { ...v, driverFeatures }), effects: NO_EFFECTS };
      }
      case CommonCfg.CONFIG_MSIX_VECTOR:
        return size === 2 ? { fn: withVirtio(fn, { ...v, configVector: vectorOk(value) ? value : VIRTIO_MSI_NO_VECTOR }), effects: NO_EFFECTS } : same;
      case CommonCfg.DEVICE_STATUS:
        return size === 1 ? writeStatus(fn, value & 0xff) : same;
      case CommonCfg.QUEUE_SELECT:
        return size === 2 ? { fn: withVirtio(fn, { ...v, queueSelect: value & 0xffff }), effects: NO_EFFECTS } : same;
    }
    return { fn: writeQueueField(fn, offset, size, value), effects: NO_EFFECTS };
  }

  /** A 64-bit access to the common structure: the two dword halves in order (software may split them, 4.1.3.1). */
  function commonWrite64(fn: VirtioFunctionState<D>, offset: number, data: bigint): VirtioTransition<D> {
    const lo = commonWrite(fn, offset, 4, Number(data & 0xffff_ffffn));
    const hi = commonWrite(lo.fn, offset + 4, 4, Number((data >> 32n) & 0xffff_ffffn));
    return { fn: hi.fn, effects: [...lo.effects, ...hi.effects] };
  }

  function barAccess(fn: VirtioFunctionState<D>, bar: number, offset: number, access: IoAccess): TransitionResult<VirtioFunctionState<D>> {
    const read = access.direction === 'read';
    const floating = (): TransitionResult<VirtioFunctionState<D>> => (read ? { state: fn, effects: NO_EFFECTS, value: allOnes(access.size) } : { state: fn, effects: NO_EFFECTS });
    const zero = (): TransitionResult<VirtioFunctionState<D>> => (read ? { state: fn, effects: NO_EFFECTS, value: access.size === 8 ? 0n : 0 } : { state: fn, effects: NO_EFFECTS });
    if (bar !== VirtioBar.INDEX || offset % access.size !== 0) return floating();
    const done = (t: VirtioTransition<D>): TransitionResult<VirtioFunctionState<D>> => ({ state: t.fn, effects: t.effects });

    const m = msixBarAccess(fn.msix, fn.config, msix, offset, access);
    if (m) {
      const state = m.msix === fn.msix ? fn : { ...fn, msix: m.msix };
      const effects = msixEffects(fn.id, m);
      return m.value === undefined ? { state, effects } : { state, effects, value: m.value };
    }
    if (offset < VirtioBar.COMMON + VirtioBar.COMMON_SIZE) {
      if (read) return { state: fn, effects: NO_EFFECTS, value: readLe(commonBytes(fn.virtio), offset - VirtioBar.COMMON, access.size) };
      if (access.size === 8) return done(commonWrite64(fn, offset - VirtioBar.COMMON, access.data));
      return done(commonWrite(fn, offset - VirtioBar.COMMON, access.size, data32(access)));
    }
    if (offset >= VirtioBar.ISR && offset < VirtioBar.ISR + VirtioBar.ISR_SIZE) {
      if (!read || access.size !== 1) return zero();
      // Reading the ISR clears it (4.1.4.5).
      const state = fn.virtio.isr === 0 ? fn : withVirtio(fn, { ...fn.virtio, isr: 0 });
      return { state, effects: NO_EFFECTS, value: fn.virtio.isr };
    }
    if (offset >= VirtioBar.DEVICE && offset < VirtioBar.DEVICE + VirtioBar.DEVICE_SIZE) {
      const at = offset - VirtioBar.DEVICE;
      if (read) return { state: fn, effects: NO_EFFECTS, value: readLe(type.configBytes?.(fn.device) ?? new Uint8Array(0), at, access.size) };
      if (!type.configWrite || access.size === 8) return zero();
      const device = type.configWrite(fn.device, at, access.size, data32(access));
      return { state: device === fn.device ? fn : { ...fn, device }, effects: NO_EFFECTS };
    }
    if (offset >= VirtioBar.NOTIFY && offset < VirtioBar.NOTIFY + VirtioBar.NOTIFY_SIZE) {
      // A doorbell that reached the VMM as an exit (no ioeventfd there yet, or another width).
      const queue = (offset - VirtioBar.NOTIFY) / VirtioBar.NOTIFY_MULTIPLIER;
      if (read || !Number.isInteger(queue) || queue >= fn.virtio.queues.length) return zero();
      return { state: fn, effects: [{ type: 'virtio.notify', device: fn.id, queue }] };
    }
    return zero();
  }

  const model = definePciFunction<VirtioFunctionState<D>>({
    kind: type.kind,
    layout,
    initialFields: () => {
      throw new Error(`a ${type.kind} function is made with create(), from its options`);
    },
    stateSchema: Exact({
      kind: Type.Literal(type.kind),
      config: PciConfigSchema(),
      id: Type.String({ minLength: 1, maxLength: 256 }),
      msix: msixStateSchema(msix),
      virtio: virtioTransportSchema(type.maxQueues),
      device: type.deviceSchema,
      counters: Type.Record(Type.String({ pattern: '^[a-z_]{1,32}$' }), Count(), { maxProperties: 16, additionalProperties: false }),
    }),
    checkState: (fn) => msixStateProblem(fn.msix, msix) ?? virtioTransportProblem(fn.virtio, type, fn.device) ?? type.checkDevice?.(fn.device) ?? null,
    barAccess,
    configWritten: (before, after) => {
      const r = msixConfigChanged(after.msix, before.config, after.config, msix);
      const state = r.msix === after.msix ? after : { ...after, msix: r.msix };
      // Where BAR 0 decodes decides where the doorbells' ioeventfds belong.
      return { state, effects: [...msixEffects(after.id, r), { type: 'pci.bars-changed', device: after.id }] };
    },
  });
  const fullModel: VirtioFunctionModel<D> = {
    ...model,
    type,
    msixLayout: msix,
    inputs: {
      [VirtioEvents.QueueServed]: (fn: VirtioFunctionState<D>, p: VirtioQueueServed) => asResult(virtioQueueServed(fullModel, fn, p)),
      [VirtioEvents.NeedsReset]: (fn: VirtioFunctionState<D>) => asResult(virtioNeedsReset(fullModel, fn)),
    },
    create: (id, device, queueSizes) => {
      if (queueSizes.length < 1 || queueSizes.length > type.maxQueues) throw new RangeError(`${type.kind}: ${queueSizes.length} queues (1..${type.maxQueues})`);
      for (const s of queueSizes) if (!isPow2(s) || s > 32768) throw new RangeError(`${type.kind}: queue size ${s} is not a power of two up to 32768`);
      return {
        kind: type.kind,
        config: [...model.initialConfig],
        id,
        msix: msixInitialState(msix),
        virtio: virtioTransportInitial(type.features(device) | TRANSPORT_FEATURES, queueSizes),
        device,
        counters: {},
      };
    },
  };
  return fullModel;
}

const asResult = <D>(t: VirtioTransition<D>): TransitionResult<VirtioFunctionState<D>> => ({ state: t.fn, effects: t.effects });

/** Host-side events of virtio devices; the PCI segment routes each to the device its payload names. */
export const VirtioEvents = {
  QueueServed: '[Virtio] Queue Served',
  NeedsReset: '[Virtio] Device Needs Reset',
  /** the driver set DRIVER_OK: the host serves the device from now on (the event monitor's "activated") */
  Activated: '[Virtio] Device Activated',
  /** the driver reset an activated device (the event monitor's "reset") */
  Reset: '[Virtio] Device Reset',
} as const;

/** Payload of Activated and Reset: the device's id. */
export interface VirtioDevicePayload {
  device: string;
}

const queueServed = eventCreator<VirtioQueueServed & { device: string }>(VirtioEvents.QueueServed);
const needsReset = eventCreator<{ device: string; reason: string }>(VirtioEvents.NeedsReset);
const activated = eventCreator<VirtioDevicePayload>(VirtioEvents.Activated);
const wasReset = eventCreator<VirtioDevicePayload>(VirtioEvents.Reset);

export const virtioEvents = {
  /** `device` on segment `segment` served a queue up to these cursors */
  queueServed: (segment: string, device: string, served: VirtioQueueServed) => queueServed({ device, ...served }, segment),
  /** the driver of `device` broke it; `reason` says how (for the event stream and the log) */
  needsReset: (segment: string, device: string, reason: string) => needsReset({ device, reason: reason.slice(0, 256) }, segment),
  /** a record that `device` was activated (no state changes: the transport's status already says so) */
  activated: (segment: string, device: string) => activated({ device }, segment),
  /** a record that the driver reset the activated `device` */
  reset: (segment: string, device: string) => wasReset({ device }, segment),
};

function virtioTransportSchema(maxQueues: number): TSchema {
  const Words = () => Type.Array(U32(), { minItems: 2, maxItems: 2 });
  return Exact({
    deviceFeatures: Words(),
    driverFeatures: Words(),
    deviceFeatureSelect: U32(),
    driverFeatureSelect: U32(),
    status: U8(),
    configGeneration: U8(),
    configVector: U16(),
    queueSelect: U16(),
    isr: IntIn(0, 3),
    queues: Type.Array(
      Exact({
        size: U16(),
        maxSize: IntIn(1, 32768),
        vector: U16(),
        enabled: Type.Boolean(),
        desc: Words(),
        driver: Words(),
        device: Words(),
        nextAvail: U16(),
        nextUsed: U16(),
      }),
      { minItems: 1, maxItems: maxQueues },
    ),
  });
}

/** What the transport schema cannot say: features the device never offered, vectors it lacks, sizes it never had. */
function virtioTransportProblem<D>(v: VirtioTransportState, type: VirtioDeviceType<D>, device: D): string | null {
  const offered = type.features(device) | TRANSPORT_FEATURES;
  if (featureBits(v.deviceFeatures) !== offered) return '/virtio/deviceFeatures: not what this device offers';
  if ((featureBits(v.driverFeatures) & ~offered) !== 0n && v.status & VirtioStatus.FEATURES_OK) return '/virtio/driverFeatures: a feature that was not offered';
  if (v.configVector !== VIRTIO_MSI_NO_VECTOR && v.configVector >= type.vectors) return '/virtio/configVector: no such MSI-X vector';
  for (const [i, q] of v.queues.entries()) {
    if (!isPow2(q.maxSize)) return `/virtio/queues/${i}/maxSize: not a power of two`;
    if (q.vector !== VIRTIO_MSI_NO_VECTOR && q.vector >= type.vectors) return `/virtio/queues/${i}/vector: no such MSI-X vector`;
  }
  return null;
}

/** The device raises `vector` (a queue's or the configuration's): an MSI-X message now, or a pending bit. */
export function virtioSignal<D>(model: VirtioFunctionModel<D>, fn: VirtioFunctionState<D>, vector: number, isrBit: number): VirtioTransition<D> {
  const isr = fn.virtio.isr | isrBit;
  let next = isr === fn.virtio.isr ? fn : withVirtio(fn, { ...fn.virtio, isr });
  if (vector === VIRTIO_MSI_NO_VECTOR || vector >= model.msixLayout.vectors) return { fn: next, effects: NO_EFFECTS };
  const r = msixSignal(next.msix, next.config, model.msixLayout, vector);
  if (r.msix !== next.msix) next = { ...next, msix: r.msix };
  return { fn: next, effects: msixEffects(fn.id, r) };
}

/** The host served queue `queue` up to these cursors; `interrupt` when the driver asked to hear of it. */
export interface VirtioQueueServed {
  queue: number;
  nextAvail: number;
  nextUsed: number;
  interrupt: boolean;
  /** what the requests served add to the device's counters */
  counters?: Record<string, number>;
  /** the device's own state after these requests, when they changed it (a net card's control commands) */
  deviceState?: unknown;
}

function addCounters(current: Record<string, number>, add: Record<string, number> | undefined): Record<string, number> {
  if (!add) return current;
  const out = { ...current };
  for (const [k, v] of Object.entries(add)) {
    if (!/^[a-z_]{1,32}$/.test(k) || !Number.isSafeInteger(v) || v < 0) throw new RangeError(`counter ${k.slice(0, 32)}: ${v}`);
    out[k] = (out[k] ?? 0) + v;
  }
  return out;
}

export function virtioQueueServed<D>(model: VirtioFunctionModel<D>, fn: VirtioFunctionState<D>, p: VirtioQueueServed): VirtioTransition<D> {
  const q = Number.isInteger(p?.queue) ? fn.virtio.queues[p.queue] : undefined;
  if (!q) throw new RangeError(`${fn.id}: no queue ${String(p?.queue)}`);
  if (!Number.isInteger(p.nextAvail) || !Number.isInteger(p.nextUsed)) throw new TypeError(`${fn.id}: queue cursors must be integers`);
  let moved = q.nextAvail !== p.nextAvail || q.nextUsed !== p.nextUsed ? withQueue(fn, p.queue, { ...q, nextAvail: p.nextAvail & 0xffff, nextUsed: p.nextUsed & 0xffff }) : fn;
  if (p.counters && Object.keys(p.counters).length) moved = { ...moved, counters: addCounters(moved.counters, p.counters) };
  if (p.deviceState !== undefined) {
    checkSchema(model.type.deviceSchema, p.deviceState, `${fn.id}: device state`);
    const problem = model.type.checkDevice?.(p.deviceState as D);
    if (problem) throw new RangeError(`${fn.id}: ${problem}`);
    moved = { ...moved, device: p.deviceState as D };
  }
  return p.interrupt ? virtioSignal(model, moved, q.vector, VirtioIsr.QUEUE) : { fn: moved, effects: NO_EFFECTS };
}

/**
 * The driver broke a queue (a descriptor outside RAM, a loop, ...): the device sets
 * DEVICE_NEEDS_RESET and tells the driver with a configuration change (2.1.2), and serves
 * nothing until the driver resets it.
 */
export function virtioNeedsReset<D>(model: VirtioFunctionModel<D>, fn: VirtioFunctionState<D>): VirtioTransition<D> {
  if (fn.virtio.status & VirtioStatus.DEVICE_NEEDS_RESET) return { fn, effects: NO_EFFECTS };
  const marked = withVirtio(fn, { ...fn.virtio, status: fn.virtio.status | VirtioStatus.DEVICE_NEEDS_RESET, configGeneration: (fn.virtio.configGeneration + 1) & 0xff });
  return virtioSignal(model, marked, fn.virtio.configVector, VirtioIsr.CONFIG);
}

/** Whether the host serves the device's queues now: the driver finished setting up, and nothing broke since. */
export function virtioLive(v: VirtioTransportState): boolean {
  return (v.status & (VirtioStatus.DRIVER_OK | VirtioStatus.DEVICE_NEEDS_RESET | VirtioStatus.FAILED)) === VirtioStatus.DRIVER_OK;
}
