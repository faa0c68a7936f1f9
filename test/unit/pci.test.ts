// PCI segment 0 as a guest drives it: configuration cycles through 0xcf8/0xcfc and ECAM, the
// header's masks, BAR sizing and decoding, the capability list, and MSI-X on a test function
// (no device has MSI-X yet) with every kind of BAR.
import test from 'ava';
import { Type } from '@sinclair/typebox';
import type { IoAccess, TransitionResult } from '../../src/devices/device';
import {
  MSIX_VECTOR_MASKED,
  PCI_SEGMENT_ID,
  PCI_CONFIG_ADDRESS_PORT,
  PCI_CONFIG_DATA_PORT,
  PCI_IO_WINDOW,
  PciCapId,
  PciCommand,
  PciStatus,
  type MsixLayout,
  type MsixState,
  type PciFunctionModelSpec,
  type PciFunctionRegistry,
  type PciFunctionState,
  type PciSegmentState,
  definePciFunction,
  msixBarAccess,
  msixCapability,
  msixConfigChanged,
  msixInitialState,
  msixRoutes,
  msixSignal,
  msixStateProblem,
  msixStateSchema,
  pciCapabilities,
  pciFunctionModels,
  pciSegmentCheckWith,
  pciSegmentInitialState,
  pciSegmentModel,
  pciSegmentTransitionWith,
  pciSlot,
} from '../../src/devices/pci';
import { platformDevices } from '../../src/devices';
import { PCI_ECAM_START, PCI_MMIO32_START, pciMmio64Window } from '../../src/boot/layout';
import { deepFreeze } from '../../src/state/json';
import { createStore, deviceEvents, validateState, vmEvents } from '../../src/state';
import { Exact, U32 } from '../../src/state/state-schema';

const MSIX: MsixLayout = { capOffset: 0x50, vectors: 3, bar: 0, tableOffset: 0, pbaOffset: 0x800 };

interface TestFnState extends PciFunctionState {
  kind: 'test-fn';
  msix: MsixState;
  /** a register in BAR2 at offset 0 */
  scratch: number;
}

/** A function with every BAR kind: BAR0 mem32 (MSI-X), BAR1 I/O, BAR2 mem64, BAR4 mem64 prefetchable 8 GiB. */
const testFnSpec: PciFunctionModelSpec<TestFnState> = {
  kind: 'test-fn',
  layout: {
    vendorId: 0x1af4,
    deviceId: 0x1042,
    revisionId: 1,
    classCode: 0x01_80_00,
    subsystemVendorId: 0x1af4,
    subsystemId: 2,
    bars: [
      { kind: 'mem32', size: 0x1000 },
      { kind: 'io', size: 0x20 },
      { kind: 'mem64', size: 0x4000 },
      null,
      { kind: 'mem64', size: 8 * 2 ** 30, prefetchable: true },
      null,
    ],
    capabilities: [{ id: PciCapId.VENDOR_SPECIFIC, offset: 0x40, body: [4, 0xaa] }, msixCapability(MSIX)],
    interruptPin: 1,
  },
  initialFields: () => ({ msix: msixInitialState(MSIX), scratch: 0 }),
  checkState: (fn) => msixStateProblem(fn.msix, MSIX),
  stateSchema: Exact({ kind: Type.Literal('test-fn'), config: Type.Array(U32()), msix: msixStateSchema(MSIX), scratch: U32() }),
  barAccess(fn, bar, offset, access): TransitionResult<TestFnState> {
    if (bar === 0) {
      const r = msixBarAccess(fn.msix, fn.config, MSIX, offset, access);
      if (r) return { state: r.msix === fn.msix ? fn : { ...fn, msix: r.msix }, effects: [], value: r.value };
    }
    if (bar === 2 && offset === 0 && access.size === 4) {
      return access.direction === 'read' ? { state: fn, effects: [], value: fn.scratch } : { state: { ...fn, scratch: access.data as number }, effects: [] };
    }
    return access.direction === 'read' ? { state: fn, effects: [], value: 0 } : { state: fn, effects: [] };
  },
  configWritten(before, after) {
    const r = msixConfigChanged(after.msix, before.config, after.config, MSIX);
    return { state: r.msix === after.msix ? after : { ...after, msix: r.msix }, effects: [] };
  },
};
const testFn = definePciFunction(testFnSpec);

const REGISTRY: PciFunctionRegistry = { ...pciFunctionModels, [testFn.kind]: testFn };
const TEST_SLOT = pciSlot(3, 0);
const transition = pciSegmentTransitionWith(REGISTRY);

/** A segment driven by guest accesses; the state is frozen before each one. */
class Guest {
  state: PciSegmentState;
  constructor(withTestFn = true) {
    this.state = pciSegmentInitialState(withTestFn ? { functions: { [TEST_SLOT]: testFn.initialState() } } : {});
  }
  access(space: 'pio' | 'mmio', direction: 'read' | 'write', address: number, size: 1 | 2 | 4 | 8, data: number | bigint = 0): number | bigint | undefined {
    deepFreeze(this.state);
    const a = (size === 8 ? { space, direction, offset: address, size, data: BigInt(data), nowNs: 0 } : { space, direction, offset: address, size, data: Number(data), nowNs: 0 }) as IoAccess;
    const r = transition(this.state, a);
    this.state = r.state;
    return r.value;
  }
  in(port: number, size: 1 | 2 | 4): number {
    return this.access('pio', 'read', port, size) as number;
  }
  out(port: number, value: number, size: 1 | 2 | 4): void {
    this.access('pio', 'write', port, size, value);
  }
  read(address: number, size: 1 | 2 | 4 | 8): number | bigint {
    return this.access('mmio', 'read', address, size)!;
  }
  write(address: number, value: number | bigint, size: 1 | 2 | 4 | 8): void {
    this.access('mmio', 'write', address, size, value);
  }
  /** configuration read through 0xcf8/0xcfc */
  cfg(dev: number, fn: number, reg: number, size: 1 | 2 | 4 = 4, bus = 0): number {
    this.out(PCI_CONFIG_ADDRESS_PORT, (0x8000_0000 | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xfc)) >>> 0, 4);
    return this.in(PCI_CONFIG_DATA_PORT + (reg & 3), size);
  }
  cfgWrite(dev: number, fn: number, reg: number, value: number, size: 1 | 2 | 4 = 4): void {
    this.out(PCI_CONFIG_ADDRESS_PORT, (0x8000_0000 | (dev << 11) | (fn << 8) | (reg & 0xfc)) >>> 0, 4);
    this.out(PCI_CONFIG_DATA_PORT + (reg & 3), value, size);
  }
  ecam(dev: number, fn: number, reg: number): number {
    return Number(this.read(PCI_ECAM_START + (dev << 15) + (fn << 12) + reg, 4));
  }
  get fn(): TestFnState {
    return this.state.functions[TEST_SLOT] as TestFnState;
  }
}

test('00:00.0 is the host bridge: Cloud Hypervisor\'s IDs and class 06/00 through 0xcf8/0xcfc, in every access size', (t) => {
  const g = new Guest(false);
  t.is(g.cfg(0, 0, 0), 0x0d57_8086);
  t.is(g.cfg(0, 0, 0, 2), 0x8086);
  t.is(g.cfg(0, 0, 2, 2), 0x0d57);
  t.is(g.cfg(0, 0, 1, 1), 0x80);
  t.is(g.cfg(0, 0, 3, 1), 0x0d);
  t.is(g.cfg(0, 0, 8) >>> 8, 0x06_00_00, 'class: host bridge');
  t.is(g.cfg(0, 0, 0x0e, 1), 0, 'header type 0, single function');
  t.is(g.cfg(0, 0, 0x34, 1), 0, 'no capabilities');
  t.is(g.cfg(0, 0, 4) >>> 16 & PciStatus.CAPABILITIES_LIST, 0);
});

test('CONFIG_ADDRESS takes dwords only and keeps reserved bits zero; no function, another bus or the enable bit off reads all ones', (t) => {
  const g = new Guest();
  g.out(PCI_CONFIG_ADDRESS_PORT, 0xffff_ffff, 4);
  t.is(g.in(PCI_CONFIG_ADDRESS_PORT, 4), 0x80ff_fffc);
  g.out(PCI_CONFIG_ADDRESS_PORT, 0x8000_0000, 4);
  g.out(PCI_CONFIG_ADDRESS_PORT, 0x12, 1);
  g.out(PCI_CONFIG_ADDRESS_PORT + 2, 0x1234, 2);
  t.is(g.in(PCI_CONFIG_ADDRESS_PORT, 4), 0x8000_0000, 'byte and word writes are not CONFIG_ADDRESS');
  t.is(g.in(PCI_CONFIG_ADDRESS_PORT + 1, 1), 0xff);
  t.is(g.in(PCI_CONFIG_ADDRESS_PORT + 1, 4), 0xffff_ffff, 'a dword straddling into CONFIG_DATA is no cycle');
  t.is(g.cfg(1, 0, 0), 0xffff_ffff, 'empty slot');
  t.is(g.cfg(0, 1, 0), 0xffff_ffff, 'no function 1');
  t.is(g.cfg(0, 0, 0, 4, 1), 0xffff_ffff, 'bus 1 does not exist');
  g.out(PCI_CONFIG_ADDRESS_PORT, 0x0000_0000, 4);
  t.is(g.in(PCI_CONFIG_DATA_PORT, 4), 0xffff_ffff, 'enable bit off');
  // A write to an empty slot, or with the enable bit off, changes nothing.
  const before = g.state;
  g.cfgWrite(1, 0, 4, 0xffff);
  g.out(PCI_CONFIG_ADDRESS_PORT, 3 << 11 | 4, 4);
  g.out(PCI_CONFIG_DATA_PORT, 0x7, 4);
  t.deepEqual(g.state.functions, before.functions);
  // Unaligned data-port accesses are no cycles either.
  g.out(PCI_CONFIG_ADDRESS_PORT, 0x8000_0000, 4);
  t.is(g.in(PCI_CONFIG_DATA_PORT + 1, 2), 0xffff);
  t.is(g.in(PCI_CONFIG_DATA_PORT + 2, 4), 0xffff_ffff);
});

test('ECAM and 0xcf8/0xcfc see the same configuration space, and a write through one shows through the other', (t) => {
  const g = new Guest();
  for (const [dev, fn] of [[0, 0], [3, 0], [5, 0]]) {
    for (let reg = 0; reg < 256; reg += 4) t.is(g.ecam(dev, fn, reg), g.cfg(dev, fn, reg), `${dev}.${fn} reg 0x${reg.toString(16)}`);
  }
  g.write(PCI_ECAM_START + (3 << 15) + 0x3c, 0x0b, 1);
  t.is(g.cfg(3, 0, 0x3c, 1), 0x0b);
  g.cfgWrite(3, 0, 0x0c, 0x10, 1);
  t.is(Number(g.read(PCI_ECAM_START + (3 << 15) + 0x0c, 1)), 0x10);
  t.is(Number(g.read(PCI_ECAM_START + (3 << 15) + 0x0e, 2)), 0, 'word at 0x0e');
  t.is(g.ecam(3, 0, 0x100), 0, 'no extended capabilities');
  t.is(g.ecam(3, 0, 0xffc), 0);
});

test('bad ECAM accesses: 8-byte and unaligned ones are no configuration cycles', (t) => {
  const g = new Guest();
  const base = PCI_ECAM_START + (3 << 15);
  t.is(g.read(base, 8), 0xffff_ffff_ffff_ffffn);
  t.is(Number(g.read(base + 1, 2)), 0xffff);
  t.is(Number(g.read(base + 2, 4)), 0xffff_ffff);
  const before = g.state;
  g.write(base + 4, 0xffff_ffff_ffff_ffffn, 8);
  g.write(base + 0x3d, 0xffff, 2);
  g.write(base + 0x3e, 0xffff_ffff, 4);
  t.is(g.state, before, 'nothing written');
});

test('header masks: identity read-only, command writable bits only, status errors write-1-to-clear, line writable, pin fixed', (t) => {
  const g = new Guest();
  g.cfgWrite(3, 0, 0, 0xffff_ffff);
  g.cfgWrite(3, 0, 8, 0xffff_ffff);
  g.cfgWrite(3, 0, 0x2c, 0xffff_ffff);
  g.cfgWrite(3, 0, 0x34, 0xff, 1);
  t.is(g.cfg(3, 0, 0), 0x1042_1af4);
  t.is(g.cfg(3, 0, 8), 0x0180_0001);
  t.is(g.cfg(3, 0, 0x2c), 0x0002_1af4);
  t.is(g.cfg(3, 0, 0x34, 1), 0x40);
  g.cfgWrite(3, 0, 4, 0xffff, 2);
  t.is(g.cfg(3, 0, 4, 2), 0x0547, 'I/O, memory, bus master, parity, SERR, INTx disable');
  // A device latched errors; software clears one by writing 1, and 0s leave the others.
  const latched = { ...g.fn, config: g.fn.config.map((d, i) => (i === 1 ? (d | ((PciStatus.RECEIVED_MASTER_ABORT | PciStatus.DETECTED_PARITY_ERROR) << 16)) >>> 0 : d)) };
  g.state = { ...g.state, functions: { ...g.state.functions, [TEST_SLOT]: latched } };
  g.cfgWrite(3, 0, 6, PciStatus.RECEIVED_MASTER_ABORT | PciStatus.CAPABILITIES_LIST, 2);
  t.is(g.cfg(3, 0, 6, 2), PciStatus.DETECTED_PARITY_ERROR | PciStatus.CAPABILITIES_LIST, 'capability bit is read-only');
  t.is(g.cfg(3, 0, 4, 2), 0x0547, 'writing status left command alone');
  g.cfgWrite(3, 0, 0x3c, 0xffff_ffff);
  t.is(g.cfg(3, 0, 0x3c), 0x0000_01ff, 'interrupt line 0xff, pin INTA#, min_gnt/max_lat 0');
  g.cfgWrite(3, 0, 0x0c, 0xffff_ffff);
  t.is(g.cfg(3, 0, 0x0c), 0xff, 'cache line size only');
  g.cfgWrite(3, 0, 0x30, 0xffff_ffff);
  t.is(g.cfg(3, 0, 0x30), 0, 'no expansion ROM');
});

test('BAR sizing: all ones read back the size mask with the type bits, for 32-bit, 64-bit and I/O BARs', (t) => {
  const g = new Guest();
  t.is(g.cfg(3, 0, 0x10), 0, 'mem32 at power-on');
  t.is(g.cfg(3, 0, 0x18), 0x4, 'mem64 type bits');
  t.is(g.cfg(3, 0, 0x20), 0xc, 'mem64 prefetchable');
  for (let bar = 0; bar < 6; bar++) g.cfgWrite(3, 0, 0x10 + 4 * bar, 0xffff_ffff);
  t.is(g.cfg(3, 0, 0x10), 0xffff_f000, '4 KiB memory');
  t.is(g.cfg(3, 0, 0x14), 0xffff_ffe1, '32 ports, I/O');
  t.is(g.cfg(3, 0, 0x18), 0xffff_c004, '16 KiB, 64-bit');
  t.is(g.cfg(3, 0, 0x1c), 0xffff_ffff, 'its upper half');
  t.is(g.cfg(3, 0, 0x20), 0x0000_000c, '8 GiB: no low address bits');
  t.is(g.cfg(3, 0, 0x24), 0xffff_fffe, '8 GiB upper half');
  // Software computes size = ~(mask & ~0xf) + 1 over the 64 bits.
  const mask64 = (BigInt(g.cfg(3, 0, 0x24)) << 32n) | BigInt(g.cfg(3, 0, 0x20) & ~0xf);
  t.is(BigInt.asUintN(64, ~mask64) + 1n, 8n << 30n);
  const host = new Guest(false);
  for (let bar = 0; bar < 6; bar++) host.cfgWrite(0, 0, 0x10 + 4 * bar, 0xffff_ffff);
  for (let bar = 0; bar < 6; bar++) t.is(host.cfg(0, 0, 0x10 + 4 * bar), 0, `host bridge BAR${bar} unimplemented`);
  // Low address bits below the size are not kept.
  g.cfgWrite(3, 0, 0x10, 0xc000_0123);
  t.is(g.cfg(3, 0, 0x10), 0xc000_0000);
});

test('the capability list walks from the pointer: vendor-specific, then MSI-X with its table and PBA in BAR0', (t) => {
  const g = new Guest();
  t.truthy((g.cfg(3, 0, 6, 2) & PciStatus.CAPABILITIES_LIST) !== 0);
  const walked: number[][] = [];
  for (let at = g.cfg(3, 0, 0x34, 1); at !== 0; at = g.cfg(3, 0, at + 1, 1)) walked.push([g.cfg(3, 0, at, 1), at]);
  t.deepEqual(walked, [[PciCapId.VENDOR_SPECIFIC, 0x40], [PciCapId.MSIX, 0x50]]);
  t.deepEqual(pciCapabilities(g.fn.config), [{ id: 9, offset: 0x40 }, { id: 0x11, offset: 0x50 }]);
  t.is(g.cfg(3, 0, 0x52, 2), 2, 'table size N-1, disabled, not masked');
  t.is(g.cfg(3, 0, 0x54), 0x0000_0000, 'table at BAR0 + 0');
  t.is(g.cfg(3, 0, 0x58), 0x0000_0800, 'PBA at BAR0 + 0x800');
  g.cfgWrite(3, 0, 0x52, 0xffff, 2);
  t.is(g.cfg(3, 0, 0x52, 2), 0xc002, 'only enable and function mask are writable');
  g.cfgWrite(3, 0, 0x54, 0xffff_ffff);
  t.is(g.cfg(3, 0, 0x54), 0, 'table offset is read-only');
});

test('BAR accesses reach the owning function only while its command register enables the space', (t) => {
  const g = new Guest();
  const bar2 = PCI_MMIO32_START + 0x10_0000;
  g.cfgWrite(3, 0, 0x18, bar2);
  g.cfgWrite(3, 0, 0x1c, 0);
  g.write(bar2, 0x1234_5678, 4);
  t.is(Number(g.read(bar2, 4)), 0xffff_ffff, 'memory decoding off: master abort');
  t.is(g.fn.scratch, 0);
  g.cfgWrite(3, 0, 4, PciCommand.MEMORY_SPACE, 2);
  g.write(bar2, 0x1234_5678, 4);
  t.is(g.fn.scratch, 0x1234_5678);
  t.is(Number(g.read(bar2, 4)), 0x1234_5678);
  t.is(Number(g.read(bar2 + 0x4000, 4)), 0xffff_ffff, 'past the BAR');
  t.is(Number(g.read(bar2 + 0x3ffe, 4)), 0xffff_ffff, 'an access crossing the BAR end');
  // Moved to the 64-bit window: the old address no longer decodes.
  const w64 = pciMmio64Window(64 * 2 ** 20).start;
  g.cfgWrite(3, 0, 0x18, (w64 % 2 ** 32) >>> 0 | 4);
  g.cfgWrite(3, 0, 0x1c, Math.floor(w64 / 2 ** 32));
  t.is(Number(g.read(bar2, 4)), 0xffff_ffff);
  t.is(Number(g.read(w64, 4)), 0x1234_5678);
  // I/O BARs need the I/O space bit.
  const port = PCI_IO_WINDOW.base + 0x40;
  g.cfgWrite(3, 0, 0x14, port);
  t.is(g.in(port, 4), 0xffff_ffff);
  g.cfgWrite(3, 0, 4, PciCommand.MEMORY_SPACE | PciCommand.IO_SPACE, 2);
  t.is(g.in(port, 4), 0, 'the function answers');
  g.cfgWrite(3, 0, 4, 0, 2);
  t.is(Number(g.read(w64, 4)), 0xffff_ffff, 'decoding off again');
});

/** A test function with BAR0 at `base`, memory decoding on. */
function withMsixBar(base: number): Guest {
  const g = new Guest();
  g.cfgWrite(3, 0, 0x10, base);
  g.cfgWrite(3, 0, 4, PciCommand.MEMORY_SPACE, 2);
  return g;
}

test('MSI-X table: vectors start masked; qword and dword accesses; reserved bits stay zero; other sizes are dropped', (t) => {
  const base = PCI_MMIO32_START;
  const g = withMsixBar(base);
  for (let v = 0; v < MSIX.vectors; v++) t.is(Number(g.read(base + 16 * v + 12, 4)), MSIX_VECTOR_MASKED, `vector ${v} masked`);
  g.write(base + 16, 0x0000_0001_fee0_1003n, 8);
  g.write(base + 24, 0xffff_fffe_0000_0041n, 8);
  t.is(g.read(base + 16, 8), 0x0000_0001_fee0_1000n, 'address bits 1:0 are reserved');
  t.is(Number(g.read(base + 24, 4)), 0x41);
  t.is(Number(g.read(base + 28, 4)), 0, 'vector control: only the mask bit, now clear');
  t.is(Number(g.read(base + 16, 2)), 0xffff, 'word read');
  t.is(g.read(base + 20, 8), 0xffff_ffff_ffff_ffffn, 'unaligned qword');
  const before = g.fn.msix;
  g.write(base + 16, 0xff, 1);
  g.write(base + 0x800, 0xffff_ffff, 4);
  t.is(g.fn.msix, before, 'byte writes and PBA writes change nothing');
});

test('MSI-X: a masked vector latches its pending bit, unmasking sends the message once; routes follow the masks', (t) => {
  const base = PCI_MMIO32_START;
  const g = withMsixBar(base);
  g.write(base + 32, 0xfee0_0000, 4);
  g.write(base + 40, 0x31, 4);
  let s = g.fn.msix;
  t.deepEqual(msixSignal(s, g.fn.config, MSIX, 2), { msix: s, messages: [], routesChanged: [] }, 'MSI-X disabled: nothing');
  // Enable with the function masked, then unmask vector 2 in the table.
  const before = g.fn.config;
  g.cfgWrite(3, 0, 0x52, 0xc000, 2);
  t.deepEqual(msixConfigChanged(s, before, g.fn.config, MSIX).routesChanged, [0, 1, 2]);
  g.write(base + 44, 0, 4);
  t.true(msixRoutes(g.fn.msix, g.fn.config, MSIX).every((r) => r.masked), 'function mask masks every vector');
  const r1 = msixSignal(g.fn.msix, g.fn.config, MSIX, 2);
  t.deepEqual(r1.messages, []);
  s = r1.msix;
  g.state = { ...g.state, functions: { ...g.state.functions, [TEST_SLOT]: { ...g.fn, msix: s } as PciFunctionState } };
  t.is(g.read(base + 0x800, 8), 4n, 'PBA bit 2');
  // Clearing the function mask sends the pending message and clears its bit.
  const masked = g.fn.config;
  g.cfgWrite(3, 0, 0x52, 0x8000, 2);
  const r2 = msixConfigChanged(s, masked, g.fn.config, MSIX);
  t.deepEqual(r2.messages, [{ vector: 2, addressLow: 0xfee0_0000, addressHigh: 0, data: 0x31 }]);
  t.is(Number(g.read(base + 0x800, 4)), 0, 'the segment ran the same transition: PBA clear');
  const routes = msixRoutes(g.fn.msix, g.fn.config, MSIX);
  t.deepEqual(routes[2], { vector: 2, addressLow: 0xfee0_0000, addressHigh: 0, data: 0x31, masked: false });
  t.true(routes[0].masked && routes[1].masked, 'vectors 0 and 1 still masked in the table');
  // A live vector sends at once; masking it in the table latches the next signal again.
  t.deepEqual(msixSignal(g.fn.msix, g.fn.config, MSIX, 2).messages.length, 1);
  const mask = msixBarAccess(g.fn.msix, g.fn.config, MSIX, 44, { space: 'mmio', direction: 'write', offset: 44, size: 4, data: 1, nowNs: 0 })!;
  t.deepEqual(mask.routesChanged, [2]);
  const r3 = msixSignal(mask.msix, g.fn.config, MSIX, 2);
  t.deepEqual(r3.messages, []);
  const unmask = msixBarAccess(r3.msix, g.fn.config, MSIX, 44, { space: 'mmio', direction: 'write', offset: 44, size: 4, data: 0, nowNs: 0 })!;
  t.deepEqual(unmask.messages.map((m) => m.vector), [2], 'unmasking a pending vector sends it');
  t.is(unmask.msix.pending[0], 0);
  t.throws(() => msixSignal(s, g.fn.config, MSIX, 3), { instanceOf: RangeError });
});

test('restore checks: read-only bits, function kinds, the host bridge and the latch must be what this build makes', (t) => {
  const check = pciSegmentCheckWith(REGISTRY);
  const good = new Guest().state;
  t.is(check(good), null);
  t.is(pciSegmentModel.checkState!(pciSegmentInitialState()), null);
  t.regex(pciSegmentModel.checkState!(good)!, /unknown PCI function kind 'test-fn'/, 'the platform registry has no test function');
  const setFn = (slot: string, fn: PciFunctionState): PciSegmentState => ({ ...good, functions: { ...good.functions, [slot]: fn } });
  const bridge = good.functions['00.0'];
  t.regex(check(setFn('00.0', { ...bridge, config: bridge.config.map((d, i) => (i === 0 ? 0x1234_8086 : d)) }))!, /\/functions\/00\.0\/config\/0: read-only/);
  t.regex(check(setFn(TEST_SLOT, { ...good.functions[TEST_SLOT], config: good.functions[TEST_SLOT].config.map((d, i) => (i === 0x14 ? d | 0x0004_0000 : d)) }))!, /config\/20/, 'MSI-X table size');
  t.regex(check(setFn('00.0', good.functions[TEST_SLOT]))!, /host bridge must be function 00\.0/);
  t.regex(check({ ...good, configAddress: 0x8000_0001 })!, /configAddress/);
  t.regex(check(setFn(TEST_SLOT, { ...good.functions[TEST_SLOT], scratch: -1 } as PciFunctionState))!, /functions\/03\.0/);
  const msix = (good.functions[TEST_SLOT] as TestFnState).msix;
  t.regex(check(setFn(TEST_SLOT, { ...good.functions[TEST_SLOT], msix: { ...msix, table: [...msix.table.slice(0, 4), 2, ...msix.table.slice(5)] } } as PciFunctionState))!, /msix\/table\/4: address bits/);
});

test('every VM\'s platform has the PCI segment with the host bridge, owning the config ports, ECAM and BAR windows', (t) => {
  const seg = platformDevices({ memorySize: 6 * 2 ** 30, serial: false }).find((d) => d.state.kind === 'pci-segment')!;
  t.truthy(seg);
  t.deepEqual(Object.keys((seg.state as PciSegmentState).functions), ['00.0']);
  t.deepEqual(
    seg.ranges.map((r) => [r.space, r.base, r.length]),
    [
      ['pio', 0xcf8, 8],
      ['pio', 0xc000, 0x4000],
      ['mmio', 0xe800_0000, 0x10_0000],
      ['mmio', 0xc000_0000, 0x2800_0000],
      ['mmio', 0x1_c000_0000, 64 * 2 ** 30],
    ],
  );
});

test('layouts a function model cannot have are refused when it is defined', (t) => {
  const base = testFn.layout;
  const bars = (b: typeof base.bars) => () => definePciFunction({ ...testFnSpec, layout: { ...base, bars: b } });
  t.throws(bars([{ kind: 'mem64', size: 0x1000 }, { kind: 'io', size: 4 }, null, null, null, null]), { message: /next slot free/ });
  t.throws(bars([{ kind: 'mem32', size: 0x1800 }, null, null, null, null, null]), { message: /memory size/ });
  t.throws(bars([{ kind: 'io', size: 512 }, null, null, null, null, null]), { message: /I\/O size/ });
  t.throws(bars([null, null, null, null, null]), { message: /6 BAR slots/ });
  t.throws(() => definePciFunction({ ...testFnSpec, layout: { ...base, capabilities: [{ id: 9, offset: 0x50, body: [4, 0] }, msixCapability(MSIX)] } }), { message: /overlap/ });
  t.throws(() => msixCapability({ ...MSIX, pbaOffset: 0x20 }), { message: /overlap/ });
  t.throws(() => msixCapability({ ...MSIX, vectors: 0 }), { instanceOf: RangeError });
});

test('restore refuses a saved segment whose host bridge claims another identity or whose config space is cut short', (t) => {
  const store = createStore();
  store.dispatch(vmEvents.created({ payload: { kernel: '/k' }, memory: { size: 64 << 20 } } as never));
  for (const d of platformDevices({ memorySize: 64 << 20, serial: false })) store.dispatch(deviceEvents.added(d));
  const saved = JSON.parse(JSON.stringify(store.getState()));
  t.notThrows(() => validateState(saved));
  const bridge = saved.devices.instances[PCI_SEGMENT_ID].functions['00.0'];
  const tampered = (fn: unknown, slot = '00.0') => {
    const s = JSON.parse(JSON.stringify(saved));
    s.devices.instances[PCI_SEGMENT_ID].functions[slot] = fn;
    return s;
  };
  t.throws(() => validateState(tampered({ ...bridge, config: [0x1111_8086, ...bridge.config.slice(1)] })), { message: /00\.0\/config\/0: read-only bits/ });
  t.throws(() => validateState(tampered({ ...bridge, config: bridge.config.slice(1) })), { message: /functions\/00\.0/ });
  t.throws(() => validateState(tampered({ ...bridge, kind: 'sound-card' }, '05.0')), { message: /05\.0: unknown PCI function kind 'sound-card'/ });
  // A known kind whose fields are not that kind's is refused by its own schema.
  t.throws(() => validateState(tampered({ ...bridge, kind: 'virtio-blk' }, '05.0')), { message: /05\.0: virtio-blk field / });
  t.throws(() => validateState(tampered(bridge, '20.0')), { message: /functions/ }, 'no device 0x20 on a bus');
});
