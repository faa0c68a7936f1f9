// The virtio PCI transport driven through PCI segment 0 the way Linux's virtio_pci driver
// drives it: find the capabilities, negotiate features, set up a queue, set DRIVER_OK, program
// MSI-X; and what a driver must not be able to do (take a feature never offered, change an
// enabled queue, clear status bits, name vectors the device lacks).
import test from 'ava';
import type { Effect, IoAccess } from '../../src/devices/device';
import {
  PCI_SEGMENT_ID,
  PciCommand,
  PciReg,
  pciCapabilities,
  pciConfigRead,
  pciSegmentCheckWith,
  pciSegmentInitialState,
  pciSegmentModel,
  pciSegmentTransition,
  pciFunctionModels,
  type PciSegmentState,
} from '../../src/devices/pci';
import { PCI_ECAM_START } from '../../src/boot/layout';
import { VIRTIO_RNG_KIND, virtioRngModel } from '../../src/devices/virtio/rng';
import {
  CommonCfg,
  VIRTIO_MSI_NO_VECTOR,
  VirtioBar,
  VirtioEvents,
  VirtioFeature,
  VirtioStatus,
  virtioLive,
  type VirtioFunctionState,
} from '../../src/devices/virtio/transport';
import { placeVirtioFunctions, virtioFunctionsOf } from '../../src/devices/virtio/vm-devices';
import { deepFreeze } from '../../src/state/json';

const SLOT = '01.0';

class Driver {
  state: PciSegmentState;
  effects: Effect[] = [];
  readonly bar: number;
  constructor() {
    const functions = placeVirtioFunctions(virtioFunctionsOf({ payload: {}, rng: { src: '/dev/urandom' } } as never));
    this.state = pciSegmentInitialState({ functions });
    this.bar = (this.cfg(PciReg.BAR0) & ~0xf) >>> 0;
  }
  private run(a: IoAccess): number | bigint | undefined {
    deepFreeze(this.state);
    const r = pciSegmentTransition(this.state, a);
    this.state = r.state;
    this.effects.push(...r.effects);
    return r.value;
  }
  cfg(reg: number, size: 1 | 2 | 4 = 4): number {
    return Number(this.run({ space: 'mmio', direction: 'read', offset: PCI_ECAM_START + (1 << 15) + reg, size, data: 0, nowNs: 0 }));
  }
  cfgWrite(reg: number, value: number, size: 1 | 2 | 4 = 4): void {
    this.run({ space: 'mmio', direction: 'write', offset: PCI_ECAM_START + (1 << 15) + reg, size, data: value, nowNs: 0 });
  }
  read(off: number, size: 1 | 2 | 4 | 8): number | bigint {
    const a = size === 8 ? { size, data: 0n } : { size, data: 0 };
    return this.run({ space: 'mmio', direction: 'read', offset: this.bar + off, nowNs: 0, ...a } as IoAccess)!;
  }
  write(off: number, value: number | bigint, size: 1 | 2 | 4 | 8): void {
    const a = size === 8 ? { size, data: BigInt(value) } : { size, data: Number(value) };
    this.run({ space: 'mmio', direction: 'write', offset: this.bar + off, nowNs: 0, ...a } as IoAccess);
  }
  common(reg: number, size: 1 | 2 | 4): number {
    return Number(this.read(VirtioBar.COMMON + reg, size));
  }
  setCommon(reg: number, value: number, size: 1 | 2 | 4): void {
    this.write(VirtioBar.COMMON + reg, value, size);
  }
  get fn(): VirtioFunctionState {
    return this.state.functions[SLOT] as VirtioFunctionState;
  }
  take(): Effect[] {
    const e = this.effects;
    this.effects = [];
    return e;
  }
  enableMemory(): void {
    this.cfgWrite(PciReg.COMMAND, PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER, 2);
  }
  /** Linux's virtio_pci probe and virtio core up to DRIVER_OK, with one queue and MSI-X vectors 0 (config) and 1 (queue 0). */
  bringUp(features: bigint): void {
    this.enableMemory();
    this.msixEnable();
    this.setCommon(CommonCfg.DEVICE_STATUS, 0, 1);
    this.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE, 1);
    this.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER, 1);
    this.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 0, 4);
    this.setCommon(CommonCfg.DRIVER_FEATURE, Number(features & 0xffff_ffffn), 4);
    this.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 1, 4);
    this.setCommon(CommonCfg.DRIVER_FEATURE, Number(features >> 32n), 4);
    this.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.FEATURES_OK, 1);
    this.setCommon(CommonCfg.CONFIG_MSIX_VECTOR, 0, 2);
    this.setCommon(CommonCfg.QUEUE_SELECT, 0, 2);
    this.setCommon(CommonCfg.QUEUE_SIZE, 128, 2);
    this.setCommon(CommonCfg.QUEUE_MSIX_VECTOR, 1, 2);
    this.write(VirtioBar.COMMON + CommonCfg.QUEUE_DESC, 0x10000n, 8);
    this.setCommon(CommonCfg.QUEUE_DRIVER, 0x11000, 4);
    this.setCommon(CommonCfg.QUEUE_DRIVER + 4, 0, 4);
    this.setCommon(CommonCfg.QUEUE_DEVICE, 0x12000, 4);
    this.setCommon(CommonCfg.QUEUE_DEVICE + 4, 0, 4);
    this.setCommon(CommonCfg.QUEUE_ENABLE, 1, 2);
    this.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.FEATURES_OK | VirtioStatus.DRIVER_OK, 1);
  }
  /** MSI-X on, vectors 0 and 1 programmed and unmasked. */
  msixEnable(): void {
    const cap = pciCapabilities(this.fn.config).find((c) => c.id === 0x11)!;
    this.cfgWrite(cap.offset + 2, 0x8000, 2);
    for (const v of [0, 1]) {
      const e = VirtioBar.MSIX_TABLE + 16 * v;
      this.write(e, 0xfee0_0000, 4);
      this.write(e + 4, 0, 4);
      this.write(e + 8, 0x40 + v, 4);
      this.write(e + 12, 0, 4);
    }
  }
}

const VERSION_1 = 1n << BigInt(VirtioFeature.VERSION_1);
const EVENT_IDX = 1n << BigInt(VirtioFeature.RING_EVENT_IDX);

test('a virtio-rng function answers as a modern virtio PCI device at 01.0 with its BAR placed in the 32-bit window', (t) => {
  const d = new Driver();
  t.is(d.cfg(0) & 0xffff, 0x1af4, 'vendor');
  t.is(d.cfg(0) >>> 16, 0x1044, 'device 0x1040 + 4 (entropy)');
  t.is(d.cfg(PciReg.REVISION_ID, 1), 1, 'revision 1: modern only');
  t.is(d.bar % VirtioBar.SIZE, 0, 'BAR 0 aligned to its size');
  t.true(d.bar >= 0xc000_0000 && d.bar < 0xe800_0000, 'inside the 32-bit BAR window');
  // The vendor capabilities say where each structure is, as virtio_pci_modern reads them.
  const vendor = pciCapabilities(d.fn.config).filter((c) => c.id === 0x09);
  const types = vendor.map((c) => ({ type: pciConfigRead(d.fn.config, c.offset + 3, 1), bar: pciConfigRead(d.fn.config, c.offset + 4, 1), offset: pciConfigRead(d.fn.config, c.offset + 8, 4) }));
  t.deepEqual(types, [
    { type: 1, bar: 0, offset: VirtioBar.COMMON },
    { type: 3, bar: 0, offset: VirtioBar.ISR },
    { type: 4, bar: 0, offset: VirtioBar.DEVICE },
    { type: 2, bar: 0, offset: VirtioBar.NOTIFY },
  ]);
  t.is(pciConfigRead(d.fn.config, vendor[3].offset + 16, 4), VirtioBar.NOTIFY_MULTIPLIER, 'notify_off_multiplier');
  // Until the command register enables memory decoding, BAR 0 is not there.
  t.is(d.read(VirtioBar.COMMON + CommonCfg.NUM_QUEUES, 2), 0xffff);
  d.enableMemory();
  t.is(d.common(CommonCfg.NUM_QUEUES, 2), 1);
  t.true(d.take().some((e) => e.type === 'pci.bars-changed'), 'the VMM hears the BAR now decodes');
});

test('feature negotiation: FEATURES_OK only for offered features including VERSION_1', (t) => {
  const d = new Driver();
  d.enableMemory();
  d.setCommon(CommonCfg.DEVICE_FEATURE_SELECT, 1, 4);
  t.is(d.common(CommonCfg.DEVICE_FEATURE, 4) & 1, 1, 'VERSION_1 offered');
  d.setCommon(CommonCfg.DEVICE_FEATURE_SELECT, 0, 4);
  t.truthy(d.common(CommonCfg.DEVICE_FEATURE, 4) & (1 << VirtioFeature.RING_EVENT_IDX), 'EVENT_IDX offered');
  d.setCommon(CommonCfg.DEVICE_FEATURE_SELECT, 7, 4);
  t.is(d.common(CommonCfg.DEVICE_FEATURE, 4), 0, 'feature words past the second are 0');

  // A legacy driver (no VERSION_1) does not get FEATURES_OK.
  d.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER, 1);
  d.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.FEATURES_OK, 1);
  t.is(d.common(CommonCfg.DEVICE_STATUS, 1) & VirtioStatus.FEATURES_OK, 0);
  // Nor does one that takes a feature never offered (bit 5 is not an entropy device's).
  d.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 1, 4);
  d.setCommon(CommonCfg.DRIVER_FEATURE, 1, 4);
  d.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 0, 4);
  d.setCommon(CommonCfg.DRIVER_FEATURE, 1 << 5, 4);
  d.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.FEATURES_OK, 1);
  t.is(d.common(CommonCfg.DEVICE_STATUS, 1) & VirtioStatus.FEATURES_OK, 0);
  // DRIVER_OK without FEATURES_OK is refused too: no queue is ever served for it.
  d.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.DRIVER_OK, 1);
  t.false(virtioLive(d.fn.virtio));
  t.false(d.take().some((e) => e.type === 'virtio.activated'));
  // With offered features only, it is accepted and then fixed.
  d.setCommon(CommonCfg.DRIVER_FEATURE, 1 << VirtioFeature.RING_EVENT_IDX, 4);
  d.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.FEATURES_OK, 1);
  t.truthy(d.common(CommonCfg.DEVICE_STATUS, 1) & VirtioStatus.FEATURES_OK);
  d.setCommon(CommonCfg.DRIVER_FEATURE, 0, 4);
  t.is(d.fn.virtio.driverFeatures[0], 1 << VirtioFeature.RING_EVENT_IDX, 'features cannot change after FEATURES_OK');
});

test('bring-up to DRIVER_OK activates the device; queue registers freeze once the queue is enabled; reset returns to power-on', (t) => {
  const d = new Driver();
  d.bringUp(VERSION_1 | EVENT_IDX);
  t.true(virtioLive(d.fn.virtio));
  // (the driver resets the device first, as Linux does: a reset before activation is not reported)
  t.deepEqual(d.take().filter((e) => e.type.startsWith('virtio.')), [{ type: 'virtio.activated', device: '__rng' }]);
  const q = d.fn.virtio.queues[0];
  t.like(q, { size: 128, vector: 1, enabled: true, desc: [0x10000, 0], driver: [0x11000, 0], device: [0x12000, 0] });
  t.is(d.common(CommonCfg.QUEUE_NOTIFY_OFF, 2), 0);
  t.is(Number(d.read(VirtioBar.COMMON + CommonCfg.QUEUE_DESC, 8)), 0x10000, 'a 64-bit read of queue_desc');

  d.setCommon(CommonCfg.QUEUE_SIZE, 64, 2);
  d.setCommon(CommonCfg.QUEUE_DESC, 0x5000, 4);
  t.like(d.fn.virtio.queues[0], { size: 128, desc: [0x10000, 0] }, 'an enabled queue does not change');
  // The driver cannot clear status bits (only a reset does), nor set DEVICE_NEEDS_RESET.
  d.setCommon(CommonCfg.DEVICE_STATUS, VirtioStatus.ACKNOWLEDGE, 1);
  d.setCommon(CommonCfg.DEVICE_STATUS, 0x4f, 1);
  t.is(d.common(CommonCfg.DEVICE_STATUS, 1), 0x0f);

  d.setCommon(CommonCfg.DEVICE_STATUS, 0, 1);
  t.deepEqual(d.take().filter((e) => e.type.startsWith('virtio.')), [{ type: 'virtio.reset', device: '__rng' }]);
  t.is(d.common(CommonCfg.DEVICE_STATUS, 1), 0);
  t.like(d.fn.virtio.queues[0], { size: 256, enabled: false, vector: VIRTIO_MSI_NO_VECTOR, desc: [0, 0], nextAvail: 0, nextUsed: 0 });
  t.deepEqual(d.fn.virtio.driverFeatures, [0, 0]);
});

test('vectors the device lacks read back as NO_VECTOR; registers of a queue that does not exist read 0 and ignore writes', (t) => {
  const d = new Driver();
  d.enableMemory();
  d.setCommon(CommonCfg.CONFIG_MSIX_VECTOR, 2, 2);
  t.is(d.common(CommonCfg.CONFIG_MSIX_VECTOR, 2), VIRTIO_MSI_NO_VECTOR);
  d.setCommon(CommonCfg.QUEUE_MSIX_VECTOR, 0x7fff, 2);
  t.is(d.common(CommonCfg.QUEUE_MSIX_VECTOR, 2), VIRTIO_MSI_NO_VECTOR);
  d.setCommon(CommonCfg.QUEUE_SELECT, 5, 2);
  t.is(d.common(CommonCfg.QUEUE_SIZE, 2), 0);
  const before = d.state;
  d.setCommon(CommonCfg.QUEUE_ENABLE, 1, 2);
  d.setCommon(CommonCfg.QUEUE_DESC, 0x1000, 4);
  t.deepEqual(d.fn.virtio.queues, (before.functions[SLOT] as VirtioFunctionState).virtio.queues);
  // A doorbell for a queue that does not exist is dropped; one for queue 0 asks the VMM to serve it.
  d.take();
  d.write(VirtioBar.NOTIFY + 4 * 3, 3, 2);
  t.deepEqual(d.take(), []);
  d.write(VirtioBar.NOTIFY, 0, 2);
  t.deepEqual(d.take(), [{ type: 'virtio.notify', device: '__rng', queue: 0 }]);
});

test('a served queue records its cursors and sends the queue vector; a masked vector pends until unmasked', (t) => {
  const d = new Driver();
  d.bringUp(VERSION_1);
  d.take();
  const served = (nextUsed: number, interrupt: boolean) => {
    deepFreeze(d.state);
    const r = pciSegmentModel.inputs[VirtioEvents.QueueServed](d.state, { device: '__rng', queue: 0, nextAvail: nextUsed, nextUsed, interrupt });
    d.state = r.state;
    return r.effects;
  };
  t.deepEqual(served(1, true), [{ type: 'msi.send', device: '__rng', vector: 1 }]);
  t.like(d.fn.virtio.queues[0], { nextAvail: 1, nextUsed: 1 });
  t.deepEqual(served(2, false), [], 'no interrupt when the driver did not ask');

  // Mask vector 1: the next interrupt sets its pending bit; unmasking sends it.
  d.write(VirtioBar.MSIX_TABLE + 16 + 12, 1, 4);
  t.true(d.take().some((e) => e.type === 'msi.routes-changed'));
  t.deepEqual(served(3, true), []);
  t.is(Number(d.read(VirtioBar.MSIX_PBA, 8)) & 2, 2, 'vector 1 pending');
  d.write(VirtioBar.MSIX_TABLE + 16 + 12, 0, 4);
  t.deepEqual(d.take(), [
    { type: 'msi.routes-changed', device: '__rng' },
    { type: 'msi.send', device: '__rng', vector: 1 },
  ]);
  t.is(Number(d.read(VirtioBar.MSIX_PBA, 8)) & 2, 0);
});

test('a device its driver broke needs a reset: status bit, config interrupt, and no more serving until reset', (t) => {
  const d = new Driver();
  d.bringUp(VERSION_1);
  d.take();
  const r = pciSegmentModel.inputs[VirtioEvents.NeedsReset](d.state, { device: '__rng', reason: 'loop' });
  d.state = r.state;
  t.deepEqual(r.effects, [{ type: 'msi.send', device: '__rng', vector: 0 }], 'the configuration vector');
  t.truthy(d.common(CommonCfg.DEVICE_STATUS, 1) & VirtioStatus.DEVICE_NEEDS_RESET);
  t.false(virtioLive(d.fn.virtio));
  d.setCommon(CommonCfg.DEVICE_STATUS, 0, 1);
  t.is(d.common(CommonCfg.DEVICE_STATUS, 1), 0, 'a reset clears it');
  // An input for a device the segment does not hold is refused.
  t.throws(() => pciSegmentModel.inputs[VirtioEvents.NeedsReset](d.state, { device: 'nope' }), { instanceOf: RangeError });
});

test('a restored virtio function is checked: features not offered, vectors it lacks, a foreign queue count', (t) => {
  const check = pciSegmentCheckWith(pciFunctionModels);
  const d = new Driver();
  d.bringUp(VERSION_1);
  t.is(check(d.state), null);
  const edit = (f: (fn: VirtioFunctionState) => VirtioFunctionState) => ({ ...d.state, functions: { ...d.state.functions, [SLOT]: f(structuredClone(d.fn)) } });
  t.regex(check(edit((fn) => ({ ...fn, virtio: { ...fn.virtio, deviceFeatures: [0xffff_ffff, 1] } })))!, /deviceFeatures/);
  t.regex(check(edit((fn) => ({ ...fn, virtio: { ...fn.virtio, configVector: 9 } })))!, /configVector/);
  t.regex(check(edit((fn) => ({ ...fn, virtio: { ...fn.virtio, queues: [...fn.virtio.queues, fn.virtio.queues[0]] } })))!, /queues/);
  t.regex(check(edit((fn) => ({ ...fn, virtio: { ...fn.virtio, queues: [{ ...fn.virtio.queues[0], maxSize: 3 }] } })))!, /maxSize/);
  t.regex(check(edit((fn) => ({ ...fn, kind: 'virtio-nonesuch' })))!, /unknown PCI function kind/);
  t.is(virtioRngModel.kind, VIRTIO_RNG_KIND);
  t.is(PCI_SEGMENT_ID, 'pci0');
});
