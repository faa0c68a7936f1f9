// A virtio device through the real VMM and KVM, with the tiny kernel as the driver: the test
// lays out the rings in guest RAM as a driver would, and the guest does what only the guest
// can (configuration and BAR accesses, MSI-X programming, the queue doorbell, which KVM turns
// into an ioeventfd signal). The device answers through its MSI-X vector (an irqfd), and the
// guest counts the interrupt. A hostile driver breaks only its own device.
import test, { type ExecutionContext } from 'ava';
import dgram from 'node:dgram';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { VmConfig } from '../../src/config/vm-config';
import { PCI_ECAM_START } from '../../src/boot/layout';
import { PCI_SEGMENT_ID, type PciSegmentState } from '../../src/devices/pci';
import { serialInputEvent } from '../../src/devices/serial-16550a';
import { CommonCfg, VirtioBar, VirtioEvents, VirtioStatus, type VirtioFunctionState } from '../../src/devices/virtio/transport';
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/devices/virtio/virtqueue';
import type { GuestMemory } from '../../src/memory/guest-memory';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { waitUntil } from './harness';
import {
  MailboxOp,
  TINY_KERNEL_MAGIC,
  TINY_KERNEL_MAILBOX,
  TINY_KERNEL_MSI_COUNTS,
  TINY_KERNEL_MSI_VECTOR_BASE,
  TinyKernelCommand,
  TinyKernelStatus,
  buildTinyKernel,
} from './tiny-kernel';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-vmm-virtio-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

const RAM = 64 << 20;
/** Where the test's driver keeps its queue: descriptor table, avail ring, used ring, buffers. */
const DESC = 0x50_0000;
const AVAIL = 0x50_1000;
const USED = 0x50_2000;
const BUF = 0x51_0000;
const QUEUE_SIZE = 16;
const RNG = '__rng';

type Op = { op: number; addr: number; value?: number };

/** The tiny kernel as a virtio driver of device `id` at slot `slot`.0, through its mailbox. */
class TinyDriver {
  /** MBOX lines the guest printed so far in the serial file */
  mailboxes = 0;
  constructor(
    readonly vmm: Vmm,
    private readonly serialFile: string,
    private readonly id = RNG,
    private readonly slot = 1,
  ) {}

  private get ecam(): number {
    return PCI_ECAM_START + (this.slot << 15);
  }

  get mem(): GuestMemory {
    return this.vmm.guestMemory() as unknown as GuestMemory;
  }

  get fn(): VirtioFunctionState {
    const seg = this.vmm.state.devices.instances[PCI_SEGMENT_ID] as PciSegmentState;
    return Object.values(seg.functions).find((f) => (f as VirtioFunctionState).id === this.id) as VirtioFunctionState;
  }

  get bar(): number {
    return (this.fn.config[4] & ~0xf) >>> 0;
  }

  msiCount(vector: number): number {
    return this.mem.readU32(TINY_KERNEL_MSI_COUNTS + 4 * vector);
  }

  /** Run `ops` in the guest; resolves with each op's result (reads) once the guest printed MBOX. */
  async run(ops: Op[]): Promise<number[]> {
    const mem = this.mem;
    mem.writeU32(TINY_KERNEL_MAILBOX, ops.length);
    ops.forEach((o, i) => {
      const at = TINY_KERNEL_MAILBOX + 16 + 16 * i;
      mem.writeU32(at, o.op);
      mem.writeU32(at + 4, o.addr);
      mem.writeU32(at + 8, o.value ?? 0);
      mem.writeU32(at + 12, 0);
    });
    const want = ++this.mailboxes;
    this.vmm.store.dispatch(serialInputEvent('serial0', Buffer.from(TinyKernelCommand.MAILBOX, 'latin1')));
    await waitUntil(`mailbox ${want} done`, () => [...fs.readFileSync(this.serialFile, 'latin1').matchAll(/^MBOX \d+\n/gm)].length >= want, 30_000);
    return ops.map((_, i) => mem.readU32(TINY_KERNEL_MAILBOX + 16 + 16 * i + 12));
  }

  common(reg: number, value: number, size: 1 | 2 | 4): Op {
    return { op: size === 1 ? MailboxOp.WRITE8 : size === 2 ? MailboxOp.WRITE16 : MailboxOp.WRITE32, addr: this.bar + VirtioBar.COMMON + reg, value };
  }

  /** the queue bringUp set up (post rings its doorbell) */
  queue = 0;

  /** Linux's bring-up: memory decoding, MSI-X with vectors 0 (config) and 1 (queue), features, one queue (`queue`, default 0), DRIVER_OK. */
  async bringUp(ring: { size?: number; desc?: number; queue?: number } = {}): Promise<void> {
    this.queue = ring.queue ?? 0;
    const s = VirtioStatus;
    const table = (v: number): Op[] => {
      const e = this.bar + VirtioBar.MSIX_TABLE + 16 * v;
      return [
        { op: MailboxOp.WRITE32, addr: e, value: 0xfee0_0000 },
        { op: MailboxOp.WRITE32, addr: e + 4, value: 0 },
        { op: MailboxOp.WRITE32, addr: e + 8, value: TINY_KERNEL_MSI_VECTOR_BASE + v },
        { op: MailboxOp.WRITE32, addr: e + 12, value: 0 },
      ];
    };
    // Fresh rings before the queue is enabled, as a driver allocates them: both indices at 0.
    this.mem.fill(AVAIL, 0x1000);
    this.mem.fill(USED, 0x1000);
    this.posted = 0;
    const [status] = await this.run([
      { op: MailboxOp.WRITE16, addr: this.ecam + 4, value: 0x6 },
      { op: MailboxOp.WRITE16, addr: this.ecam + 0x42, value: 0x8000 },
      ...table(0),
      ...table(1),
      this.common(CommonCfg.DEVICE_STATUS, 0, 1),
      this.common(CommonCfg.DEVICE_STATUS, s.ACKNOWLEDGE | s.DRIVER, 1),
      this.common(CommonCfg.DRIVER_FEATURE_SELECT, 1, 4),
      this.common(CommonCfg.DRIVER_FEATURE, 1, 4),
      this.common(CommonCfg.DRIVER_FEATURE_SELECT, 0, 4),
      this.common(CommonCfg.DRIVER_FEATURE, 0, 4),
      this.common(CommonCfg.DEVICE_STATUS, s.ACKNOWLEDGE | s.DRIVER | s.FEATURES_OK, 1),
      this.common(CommonCfg.CONFIG_MSIX_VECTOR, 0, 2),
      this.common(CommonCfg.QUEUE_SELECT, this.queue, 2),
      this.common(CommonCfg.QUEUE_SIZE, ring.size ?? QUEUE_SIZE, 2),
      this.common(CommonCfg.QUEUE_MSIX_VECTOR, 1, 2),
      this.common(CommonCfg.QUEUE_DESC, ring.desc ?? DESC, 4),
      this.common(CommonCfg.QUEUE_DESC + 4, 0, 4),
      this.common(CommonCfg.QUEUE_DRIVER, AVAIL, 4),
      this.common(CommonCfg.QUEUE_DRIVER + 4, 0, 4),
      this.common(CommonCfg.QUEUE_DEVICE, USED, 4),
      this.common(CommonCfg.QUEUE_DEVICE + 4, 0, 4),
      this.common(CommonCfg.QUEUE_ENABLE, 1, 2),
      this.common(CommonCfg.DEVICE_STATUS, s.ACKNOWLEDGE | s.DRIVER | s.FEATURES_OK | s.DRIVER_OK, 1),
      { op: MailboxOp.READ32, addr: this.bar + VirtioBar.COMMON + CommonCfg.DEVICE_STATUS },
    ]).then((r) => r.slice(-1));
    // (a queue set up wrong breaks the device as soon as DRIVER_OK starts serving it)
    const wrongRing = ring.size !== undefined || ring.desc !== undefined;
    if (!wrongRing && (status & 0xff) !== 0x0f) throw new Error(`device status after bring-up: 0x${status.toString(16)}`);
  }

  posted = 0;
  /** queue interrupts the guest had taken when the last post rang the doorbell */
  irqsBeforePost = 0;

  /** Post a chain of descriptors `descs` (written at index `first` on), then ring the doorbell. */
  post(descs: { addr: number; len: number; flags: number; next?: number }[], first = 0): Promise<void> {
    return this.postMany([{ first, descs }]);
  }

  /** Post several chains (each a list of descriptors written at its `first`), then ring the doorbell once. */
  async postMany(chains: { first: number; descs: { addr: number; len: number; flags: number; next?: number }[] }[]): Promise<void> {
    const mem = this.mem;
    for (const { first, descs } of chains) {
      descs.forEach((d, i) => {
        const at = DESC + 16 * (first + i);
        mem.writeU64(at, BigInt(d.addr));
        mem.writeU32(at + 8, d.len);
        mem.writeU16(at + 12, d.flags);
        mem.writeU16(at + 14, d.next ?? 0);
      });
      mem.writeU16(AVAIL + 4 + 2 * (this.posted % QUEUE_SIZE), first);
      this.posted++;
    }
    mem.writeU16(AVAIL + 2, this.posted & 0xffff);
    this.irqsBeforePost = this.msiCount(1);
    // (each queue's notify offset is its index: its doorbell is 4 bytes after the previous one's)
    await this.run([{ op: MailboxOp.WRITE16, addr: this.bar + VirtioBar.NOTIFY + 4 * this.queue, value: this.queue }]);
  }

  usedIdx(): number {
    return this.mem.readU16(USED + 2);
  }
}

async function bootWithRng(name: string, devices: Partial<VmConfig> = { rng: { src: '/dev/urandom' } }): Promise<{ vmm: Vmm; driver: TinyDriver; serialFile: string }> {
  const serialFile = path.join(tmp, `${name}.serial`);
  const cfg: VmConfig = {
    payload: { kernel: await buildTinyKernel(), cmdline: 'virtio' },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: RAM },
    serial: { mode: 'File', file: serialFile },
    console: { mode: 'Off' },
    ...devices,
  };
  const vmm = new Vmm({ log: silentLogger() });
  await vmm.create(cfg);
  await vmm.boot();
  const mem = () => vmm.guestMemory()!;
  await waitUntil('the guest runs', () => mem().readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC && mem().readU32(TinyKernelStatus.COUNT) >= 1, 30_000);
  return { vmm, driver: new TinyDriver(vmm, serialFile), serialFile };
}

test.serial('a hostile driver breaks only its net card: short headers, oversized frames, buffers outside RAM and readable receive buffers each need a reset; the tap, the VMM and the entropy device go on', async (t) => {
  const tap = `tkvm${process.pid % 10000}`;
  const hostIp = '10.214.7.1';
  const { vmm, serialFile } = await bootWithRng('hostile-net', { rng: { src: '/dev/urandom' }, net: [{ tap, ip: hostIp, mask: '255.255.255.0', mac: '52:54:00:00:00:07' }] });
  try {
    // Functions are placed in config order: the card (after any disks) at 01.0, the rng at 02.0.
    const net = new TinyDriver(vmm, serialFile, '_net0', 1);
    const rng = new TinyDriver(vmm, serialFile, RNG, 2);
    rng.mailboxes = net.mailboxes = 0;
    const arp = () => {
      const s = dgram.createSocket('udp4');
      s.send(Buffer.from('?'), 9, '10.214.7.2', () => s.close());
    };
    const R = 0; // readable (device reads)
    const cases: [string, number, () => Promise<void>][] = [
      ['a transmit chain shorter than the virtio-net header', 1, () => net.post([{ addr: BUF, len: 8, flags: R }])],
      ['a transmitted frame over 64 KiB', 1, () => net.post([{ addr: BUF, len: 70_000, flags: R }])],
      ['a transmit buffer outside guest RAM', 1, () => net.post([{ addr: RAM + 0x1000, len: 64, flags: R }])],
      ['a receive chain the device cannot write', 0, async () => {
        await net.post([{ addr: BUF, len: 2048, flags: R }]);
        arp(); // (the host asks for the guest's MAC: a frame for the receive queue)
      }],
    ];
    let broken = 0;
    for (const [what, queue, post] of cases) {
      const configIrqs = net.msiCount(0);
      // (both drivers share the mailbox count: keep them in step)
      rng.mailboxes = net.mailboxes;
      await net.bringUp({ queue });
      const counting = vmm.guestMemory()!.readU32(TinyKernelStatus.COUNT);
      await post();
      await waitUntil(`${what}: the card needs a reset`, () => (net.fn.virtio.status & VirtioStatus.DEVICE_NEEDS_RESET) !== 0, 10_000);
      await waitUntil(`${what}: the configuration interrupt reaches the guest`, () => net.msiCount(0) > configIrqs, 10_000);
      broken++;
      t.is(net.usedIdx(), 0, `${what}: nothing was used`);
      await waitUntil(`${what}: the guest keeps counting`, () => vmm.guestMemory()!.readU32(TinyKernelStatus.COUNT) > counting + 1, 10_000);
    }
    const resets = vmm.store.journal().filter((e) => e.type === VirtioEvents.NeedsReset) as unknown as { payload: { device: string; reason: string } }[];
    t.is(resets.length, broken);
    t.true(resets.every((e) => e.payload.device === '_net0'));
    t.log(resets.map((e) => e.payload.reason).join(' | '));
    t.true(fs.existsSync(`/sys/class/net/${tap}`), 'the tap is still there');
    // The other device serves as ever.
    rng.mailboxes = net.mailboxes;
    await rng.bringUp();
    await rng.post([{ addr: BUF, len: 64, flags: VIRTQ_DESC_F_WRITE }]);
    await expectServed(t, rng, 1, 64);
  } finally {
    await vmm.close();
  }
});

async function expectServed(t: ExecutionContext, d: TinyDriver, usedIdx: number, bytes: number): Promise<void> {
  await waitUntil(`used.idx reaches ${usedIdx}`, () => d.usedIdx() === usedIdx, 10_000);
  const elem = USED + 4 + 8 * ((usedIdx - 1) % QUEUE_SIZE);
  t.is(d.mem.readU32(elem + 4), bytes, 'the used element says how much the device wrote');
  await waitUntil('the queue interrupt reaches the guest', () => d.msiCount(1) > d.irqsBeforePost, 10_000);
}

test.serial('virtio-rng served through ioeventfd and irqfd: entropy in the buffer, the used ring advanced, MSI-X vector 1 taken by the guest', async (t) => {
  const { vmm, driver } = await bootWithRng('served');
  try {
    await driver.bringUp();
    t.like(driver.fn.virtio, { status: 0x0f });
    t.true(vmm.store.journal().some((e) => e.type === VirtioEvents.Activated), 'activated is an event');
    driver.mem.fill(BUF, 4096);
    await driver.post([{ addr: BUF, len: 4096, flags: VIRTQ_DESC_F_WRITE }]);
    await expectServed(t, driver, 1, 4096);
    t.true(driver.mem.read(BUF, 4096).some((b) => b !== 0), 'entropy, not the zeros the driver left');
    t.like(driver.fn.virtio.queues[0], { nextAvail: 1, nextUsed: 1 }, 'the cursors are in the store');
    // The health report sees the queue from both sides: the store's cursors and the rings in RAM.
    const rngQueue = vmm.health().queues?.find((q) => q.device === RNG && q.queue === 0);
    t.like(rngQueue, { live: true, served: 'js', nextAvail: 1, nextUsed: 1, availIdx: 1, usedIdx: 1, inFlight: 0, vector: 1, vectorMasked: false, msixEnabled: true });
    t.like(rngQueue?.msi, { routed: true, sent: 1 }, 'the one interrupt the guest took was sent on a routed GSI');
    // The doorbell went through its ioeventfd: KVM consumed the write, the VMM saw no exit for it.
    const doorbell = driver.bar + VirtioBar.NOTIFY;
    const writesTo = (address: number) => vmm.store.journal().filter((e) => e.type === '[PCI Segment] Register Written' && (e.payload as { offset?: number })?.offset === address);
    t.is(writesTo(doorbell).length, 0, 'no doorbell exit');
    t.true(writesTo(driver.bar + VirtioBar.COMMON + CommonCfg.QUEUE_ENABLE).length > 0, '(while the common registers did exit)');
    // A chain of two buffers is filled across both.
    driver.mem.fill(BUF, 8192);
    await driver.post([
      { addr: BUF, len: 100, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 3 },
      { addr: BUF + 4096, len: 200, flags: VIRTQ_DESC_F_WRITE },
    ], 2);
    await expectServed(t, driver, 2, 300);
    t.true(driver.mem.read(BUF + 4096, 200).some((b) => b !== 0));
    t.true(driver.mem.read(BUF + 4096 + 200, 100).every((b) => b === 0), 'nothing past the buffer');
  } finally {
    await vmm.close();
  }
});

test.serial('a hostile driver breaks only its device: needs-reset with a config interrupt, the guest runs on, a reset brings the device back', async (t) => {
  const { vmm, driver, serialFile } = await bootWithRng('hostile');
  try {
    const none = async () => undefined;
    const broken: [string, () => Promise<void>, { size?: number; desc?: number }?][] = [
      ['a queue size that is not a power of two', none, { size: 12 }],
      ['a descriptor table outside guest RAM', none, { desc: RAM + 0x1_0000 }],
      ['a buffer outside guest RAM', () => driver.post([{ addr: RAM + 0x1000, len: 16, flags: VIRTQ_DESC_F_WRITE }])],
      ['a buffer running past the end of RAM', () => driver.post([{ addr: RAM - 8, len: 16, flags: VIRTQ_DESC_F_WRITE }])],
      ['a chain that loops', () => driver.post([
        { addr: BUF, len: 16, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 1 },
        { addr: BUF, len: 16, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 0 },
      ])],
      ['a next index past the queue', () => driver.post([{ addr: BUF, len: 16, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 999 }])],
      ['a zero-length buffer', () => driver.post([{ addr: BUF, len: 0, flags: VIRTQ_DESC_F_WRITE }])],
      ['a huge length', () => driver.post([{ addr: BUF, len: 0xffff_ffff, flags: VIRTQ_DESC_F_WRITE }])],
    ];
    for (const [what, post, ring] of broken) {
      const configIrqs = driver.msiCount(0);
      await driver.bringUp(ring);
      const counting = vmm.guestMemory()!.readU32(TinyKernelStatus.COUNT);
      await post();
      await waitUntil(`${what}: the device needs a reset`, () => (driver.fn.virtio.status & VirtioStatus.DEVICE_NEEDS_RESET) !== 0, 10_000);
      await waitUntil(`${what}: the configuration interrupt reaches the guest`, () => driver.msiCount(0) > configIrqs, 10_000);
      t.is(driver.usedIdx(), 0, `${what}: nothing was used`);
      await waitUntil(`${what}: the guest keeps counting`, () => vmm.guestMemory()!.readU32(TinyKernelStatus.COUNT) > counting + 1, 10_000);
    }
    t.is(vmm.store.journal().filter((e) => e.type === VirtioEvents.NeedsReset).length, broken.length, 'one needs-reset event per broken queue');
    // A doorbell for a queue the device does not have changes nothing.
    await driver.bringUp();
    await driver.run([{ op: MailboxOp.WRITE16, addr: driver.bar + VirtioBar.NOTIFY + 4 * 7, value: 7 }]);
    t.is(driver.fn.virtio.status, 0x0f);
    // After all that, the device works again from a reset.
    await driver.post([{ addr: BUF, len: 64, flags: VIRTQ_DESC_F_WRITE }]);
    await expectServed(t, driver, 1, 64);
    t.regex(fs.readFileSync(serialFile, 'latin1'), /COUNT \d+\n/);
  } finally {
    await vmm.close();
  }
});

test.serial('snapshot and restore carry the device: the restored VM serves the next request where the first left off', async (t) => {
  const { vmm, driver } = await bootWithRng('snapshot');
  const snap = path.join(tmp, 'snap');
  let restored: Vmm | undefined;
  try {
    await driver.bringUp();
    await driver.post([{ addr: BUF, len: 512, flags: VIRTQ_DESC_F_WRITE }]);
    await expectServed(t, driver, 1, 512);
    await vmm.pause();
    fs.mkdirSync(snap);
    await vmm.snapshot(`file://${snap}`);
    const saved = driver.fn;
    await vmm.close();

    restored = new Vmm({ log: silentLogger() });
    await restored.restore({ source_url: `file://${snap}`, resume: true, serial: { mode: 'File', file: path.join(tmp, 'restored.serial') } });
    const again = new TinyDriver(restored, path.join(tmp, 'restored.serial'));
    t.deepEqual(again.fn, saved, 'the device state restored is the state saved');
    again.posted = 1;
    await again.post([{ addr: BUF, len: 256, flags: VIRTQ_DESC_F_WRITE }], 1);
    await expectServed(t, again, 2, 256);
    t.like(again.fn.virtio.queues[0], { nextAvail: 2, nextUsed: 2 });
  } finally {
    await vmm.close().catch(() => undefined);
    await restored?.close();
  }
});

test.serial('virtio-blk through KVM: a write reaches the image, a read brings it back, GET_ID answers, the counters count', async (t) => {
  // (the raw image is served by native queue threads, as raw images are by default)
  const image = path.join(tmp, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(1 << 20, 0x11), { mode: 0o600 });
  const { vmm, serialFile } = await bootWithRng('block', { disks: [{ path: image, serial: 'tiny-disk' }] });
  const disk = new TinyDriver(vmm, serialFile, '_disk0', 1);
  const HDR = 0x52_0000;
  const DATA = 0x52_1000;
  const STATUS = 0x52_3000;
  const header = (type: number, sector: number) => {
    const b = new Uint8Array(16);
    new DataView(b.buffer).setUint32(0, type, true);
    new DataView(b.buffer).setBigUint64(8, BigInt(sector), true);
    disk.mem.write(HDR, b);
    disk.mem.writeU8(STATUS, 0xff);
  };
  try {
    await disk.bringUp();
    const data = Uint8Array.from({ length: 1024 }, (_, i) => (i * 13) & 0xff);
    disk.mem.write(DATA, data);
    header(1, 2);
    await disk.post([
      { addr: HDR, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 1 },
      { addr: DATA, len: 1024, flags: VIRTQ_DESC_F_NEXT, next: 2 },
      { addr: STATUS, len: 1, flags: VIRTQ_DESC_F_WRITE },
    ]);
    await expectServed(t, disk, 1, 1);
    t.is(disk.mem.readU8(STATUS), 0, 'status OK');
    t.deepEqual(new Uint8Array(fs.readFileSync(image).subarray(1024, 2048)), data, 'the image holds the guest\'s sectors 2 and 3');

    disk.mem.fill(DATA, 1024);
    header(0, 2);
    await disk.post([
      { addr: HDR, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 4 },
      { addr: DATA, len: 1024, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 5 },
      { addr: STATUS, len: 1, flags: VIRTQ_DESC_F_WRITE },
    ], 3);
    await expectServed(t, disk, 2, 1025);
    t.deepEqual(disk.mem.read(DATA, 1024), data, 'read back');

    header(8, 0);
    await disk.post([
      { addr: HDR, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 7 },
      { addr: DATA, len: 20, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 8 },
      { addr: STATUS, len: 1, flags: VIRTQ_DESC_F_WRITE },
    ], 6);
    await expectServed(t, disk, 3, 21);
    t.is(Buffer.from(disk.mem.read(DATA, 9)).toString('latin1'), 'tiny-disk');
    // A raw image's queue is served on a native thread: the JavaScript thread saw none of it.
    const servedEvents = () => vmm.store.journal().filter((e) => e.type === VirtioEvents.QueueServed && (e.payload as { device?: string }).device === '_disk0').length;
    t.is(servedEvents(), 0, 'no request went through the JavaScript thread');
    // vm.counters gathers what the thread counted
    vmm.collectDeviceCounters();
    t.deepEqual(disk.fn.counters, { write_bytes: 1024, write_ops: 1, read_bytes: 1024, read_ops: 1 });

    // Four reads in flight at once, one doorbell: each lands in its own buffer with its status,
    // and the used ring takes all four whatever order the disk finishes them in.
    const sectors = [1, 5, 9, 13];
    sectors.forEach((sector, i) => {
      const b = new Uint8Array(16);
      new DataView(b.buffer).setBigUint64(8, BigInt(sector), true);
      disk.mem.write(HDR + 16 * i, b);
      disk.mem.writeU8(STATUS + i, 0xff);
    });
    const image4 = fs.readFileSync(image);
    disk.mem.fill(DATA, 4 * 512);
    await disk.postMany(sectors.map((_, i) => ({
      first: 3 * i,
      descs: [
        { addr: HDR + 16 * i, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 3 * i + 1 },
        { addr: DATA + 512 * i, len: 512, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 3 * i + 2 },
        { addr: STATUS + i, len: 1, flags: VIRTQ_DESC_F_WRITE },
      ],
    })));
    await waitUntil('all four in the used ring', () => disk.usedIdx() === 7, 10_000);
    await waitUntil('the queue interrupt reaches the guest', () => disk.msiCount(1) > disk.irqsBeforePost, 10_000);
    // The health report counts the interrupts the queue's own thread raised (its irqfd writes).
    const diskQueue = vmm.health().queues?.find((q) => q.device === '_disk0' && q.queue === 0);
    t.like(diskQueue, { served: 'native', usedIdx: 7 });
    t.true((diskQueue?.threadInterrupts?.sent ?? 0) >= 1, JSON.stringify(diskQueue?.threadInterrupts));
    t.true((diskQueue?.threadInterrupts?.lastSentMsAgo ?? -1) >= 0 && (diskQueue?.threadInterrupts?.lastSentMsAgo ?? Infinity) < 60_000);
    const heads = [3, 4, 5, 6].map((u) => disk.mem.readU32(USED + 4 + 8 * u)).sort((a, b) => a - b);
    t.deepEqual(heads, [0, 3, 6, 9], 'each chain\'s head once');
    sectors.forEach((sector, i) => {
      t.is(disk.mem.readU8(STATUS + i), 0, `status of read ${i}`);
      t.deepEqual(disk.mem.read(DATA + 512 * i, 512), new Uint8Array(image4.subarray(512 * sector, 512 * sector + 512)), `sector ${sector}`);
    });
    // The thread stops at a pause and its cursors go into the store, where a snapshot finds them.
    await vmm.pause();
    t.like(disk.fn.virtio.queues[0], { nextAvail: 7, nextUsed: 7 }, 'the cursors are in the store');
    t.is(disk.fn.counters.read_ops, 5);
    await vmm.resume();

    // A hostile chain on the native thread breaks the disk alone, as on the JavaScript side.
    const configIrqs = disk.msiCount(0);
    await disk.post([{ addr: RAM + 0x1000, len: 512, flags: VIRTQ_DESC_F_WRITE }], 9);
    await waitUntil('the disk needs a reset', () => (disk.fn.virtio.status & VirtioStatus.DEVICE_NEEDS_RESET) !== 0, 10_000);
    await waitUntil('the configuration interrupt reaches the guest', () => disk.msiCount(0) > configIrqs, 10_000);
    t.is(disk.usedIdx(), 7, 'the broken chain was not used');
    t.regex(String((vmm.store.journal().find((e) => e.type === VirtioEvents.NeedsReset)?.payload as { reason?: string })?.reason), /not inside guest RAM/);
  } finally {
    await vmm.close();
  }
});

test.serial('live migration carries the device: the destination serves the next request with the cursors, routes and doorbells the source had', async (t) => {
  const { vmm: src, driver, serialFile } = await bootWithRng('migrate');
  const dst = new Vmm({ log: silentLogger() });
  try {
    await driver.bringUp();
    await driver.post([{ addr: BUF, len: 256, flags: VIRTQ_DESC_F_WRITE }]);
    await expectServed(t, driver, 1, 256);
    const url = `unix:${path.join(tmp, 'migrate.sock')}`;
    const received = dst.receiveMigration({ receiver_url: url });
    await waitUntil('the destination listens', () => dst.store.journal().some((e) => e.type === '[Migration] Receive Ready'), 10_000);
    await src.sendMigration({ destination_url: url });
    await received;
    await waitUntil('the source has let the VM go', () => src.state.vm.status === 'Shutdown', 30_000);
    // The guest and its serial file go on at the destination (the same path here).
    const moved = new TinyDriver(dst, serialFile);
    moved.mailboxes = driver.mailboxes;
    moved.posted = driver.posted;
    t.like(moved.fn.virtio.queues[0], { nextAvail: 1, nextUsed: 1, enabled: true });
    await moved.post([{ addr: BUF, len: 128, flags: VIRTQ_DESC_F_WRITE }], 1);
    await expectServed(t, moved, 2, 128);
    t.like(moved.fn.virtio.queues[0], { nextAvail: 2, nextUsed: 2 });
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});
