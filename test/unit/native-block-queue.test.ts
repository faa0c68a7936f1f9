// The native virtio-blk queue thread without KVM: guest RAM is plain memory, the doorbell and
// the interrupt are eventfds, the disk a raw image file. The test plays the driver: it builds
// the rings, posts chains and rings the doorbell, then reads what the thread put in the used
// ring, the guest's buffers, the image and the dirty bitmap; a hostile chain stops the thread
// and reports why, with what was served before it kept.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { VirtioBlkStatus, VirtioBlkType } from '../../src/devices/virtio/block';
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/devices/virtio/virtqueue';
import { anonymousGuestMemory, type GuestMemory } from '../../src/memory/guest-memory';
import { EventFdFlags, native, type NativeBlockQueue } from '../../src/native/kvm';
import { tmpDir } from './block-helpers';
import { ringDriver, until, type RingDriver } from './ring-driver';

const dir = tmpDir();
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));

const SIZE = 16;
const DESC = 0x0;
const AVAIL = 0x1000;
const USED = 0x2000;
const RAM = 1 << 20;
const SECTORS = 2048;

interface Driver extends RingDriver {
  mem: GuestMemory;
  dirty: Uint8Array;
  kick: number;
  irq: number;
  image: string;
  fd: number;
  queue: NativeBlockQueue;
  broken: string[];
  close(): void;
}

function start(t: { teardown(fn: () => void): void }, opts: { readonly?: boolean; eventIdx?: boolean } = {}): Driver {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: RAM }]);
  const image = path.join(dir, `disk-${Math.random().toString(36).slice(2)}.img`);
  fs.writeFileSync(image, Buffer.alloc(SECTORS * 512, 0x5a), { mode: 0o600 });
  const fd = fs.openSync(image, opts.readonly ? 'r' : 'r+');
  const kickFd = native().eventfd(0, EventFdFlags.NONBLOCK | EventFdFlags.CLOEXEC);
  const irq = native().eventfd(0, EventFdFlags.NONBLOCK | EventFdFlags.CLOEXEC);
  const broken: string[] = [];
  const range = mem.regions[0].hostRange();
  const queue = native().serveBlockQueue(
    {
      memory: [range],
      size: SIZE,
      desc: DESC,
      avail: AVAIL,
      used: USED,
      eventIdx: opts.eventIdx ?? false,
      indirect: false,
      nextAvail: 0,
      nextUsed: 0,
      kickFd,
      interruptFd: irq,
      imageFd: fd,
      capacity: SECTORS,
      readonly: opts.readonly ?? false,
      id: 'tern-disk-0',
    },
    (reason) => broken.push(reason),
  );
  const d: Driver = {
    mem,
    dirty: range.dirty!,
    kick: kickFd,
    irq,
    image,
    fd,
    queue,
    broken,
    ...ringDriver(mem, { size: SIZE, desc: DESC, avail: AVAIL, used: USED }, kickFd),
    close() {
      queue.stop();
      native().closeFd(kickFd);
      native().closeFd(irq);
      fs.closeSync(fd);
    },
  };
  t.teardown(() => d.close());
  return d;
}

function header(type: number, sector: number): Uint8Array {
  const h = new Uint8Array(16);
  new DataView(h.buffer).setUint32(0, type, true);
  new DataView(h.buffer).setBigUint64(8, BigInt(sector), true);
  return h;
}

const HDR = 0x10000;
const STATUS = 0x11000;
const DATA = 0x20000;

function pageDirty(d: Driver, addr: number): boolean {
  const p = Math.floor(addr / 4096);
  return (d.dirty[p >> 3] & (1 << (p & 7))) !== 0;
}

test('a write reaches the image, a read lands in the guest buffers, GET_ID answers, each with its status and an interrupt', async (t) => {
  const d = start(t);
  const pattern = Buffer.alloc(4096);
  for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7) & 0xff;
  d.mem.write(HDR, header(VirtioBlkType.OUT, 2));
  d.mem.write(DATA, pattern);
  d.mem.writeU8(STATUS, 0xee);
  // the data in two buffers: the thread writes them as one vector
  const head = d.post([[HDR, 16, false], [DATA, 1000, false], [DATA + 1000, 3096, false], [STATUS, 1, true]]);
  await until('the write to be used', () => d.usedIdx() === 1);
  t.deepEqual(d.used(0), { id: head, len: 1 });
  t.is(d.mem.readU8(STATUS), VirtioBlkStatus.OK);
  t.not(native().eventfdRead(d.irq), null, 'an interrupt for the used buffer');
  t.deepEqual(fs.readFileSync(d.image).subarray(1024, 1024 + 4096), pattern, 'the image holds the data at sector 2');

  d.dirty.fill(0);
  const READ_AT = 0x40000;
  d.mem.write(HDR, header(VirtioBlkType.IN, 1));
  d.mem.writeU8(STATUS, 0xee);
  d.post([[HDR, 16, false], [READ_AT, 512, true], [READ_AT + 0x3000, 1024, true], [STATUS, 1, true]]);
  await until('the read to be used', () => d.usedIdx() === 2);
  t.is(d.used(1).len, 1536 + 1, 'the data and the status were written');
  t.is(d.mem.readU8(STATUS), VirtioBlkStatus.OK);
  t.deepEqual(Buffer.from(d.mem.read(READ_AT, 512)), Buffer.alloc(512, 0x5a), 'sector 1 as the image has it');
  t.deepEqual(Buffer.from(d.mem.read(READ_AT + 0x3000, 512)), pattern.subarray(0, 512), 'sector 2 is what was written');
  t.deepEqual(Buffer.from(d.mem.read(READ_AT + 0x3200, 512)), pattern.subarray(512, 1024));
  t.true(pageDirty(d, READ_AT) && pageDirty(d, READ_AT + 0x3000), 'the pages the read filled are in the dirty bitmap');
  t.true(pageDirty(d, USED) && pageDirty(d, STATUS), 'so are the used ring and the status byte');
  t.false(pageDirty(d, READ_AT + 0x1000), 'a page it did not write is not');

  d.mem.write(HDR, header(VirtioBlkType.GET_ID, 0));
  d.post([[HDR, 16, false], [READ_AT, 20, true], [STATUS, 1, true]]);
  await until('GET_ID to be used', () => d.usedIdx() === 3);
  t.is(Buffer.from(d.mem.read(READ_AT, 20)).toString('latin1'), 'tern-disk-0'.padEnd(20, '\0'));

  d.mem.write(HDR, header(99, 0));
  d.post([[HDR, 16, false], [STATUS, 1, true]]);
  await until('the unknown request to be used', () => d.usedIdx() === 4);
  t.is(d.mem.readU8(STATUS), VirtioBlkStatus.UNSUPP);

  const end = d.queue.stop();
  t.deepEqual(end, { nextAvail: 4, nextUsed: 4, counters: { read_bytes: 1536, read_ops: 1, write_bytes: 4096, write_ops: 1 }, interrupt: false });
  t.deepEqual(d.broken, []);
});

test('requests the disk cannot carry out get IOERR, and the queue goes on', async (t) => {
  const d = start(t, { readonly: true });
  d.mem.write(HDR, header(VirtioBlkType.OUT, 0));
  d.post([[HDR, 16, false], [DATA, 512, false], [STATUS, 1, true]]);
  await until('the write to be used', () => d.usedIdx() === 1);
  t.is(d.mem.readU8(STATUS), VirtioBlkStatus.IOERR, 'a read-only disk refuses a write');
  d.mem.write(HDR, header(VirtioBlkType.IN, SECTORS - 1));
  d.post([[HDR, 16, false], [DATA, 1024, true], [STATUS, 1, true]]);
  await until('the read to be used', () => d.usedIdx() === 2);
  t.is(d.mem.readU8(STATUS), VirtioBlkStatus.IOERR, 'a read past the end');
  d.mem.write(HDR, header(VirtioBlkType.IN, 0));
  d.post([[HDR, 16, false], [DATA, 100, true], [STATUS, 1, true]]);
  await until('the partial-sector read to be used', () => d.usedIdx() === 3);
  t.is(d.mem.readU8(STATUS), VirtioBlkStatus.IOERR, 'a read of less than a sector');
  t.deepEqual(d.broken, []);
  t.deepEqual(d.queue.stop().counters, { read_bytes: 0, read_ops: 0, write_bytes: 0, write_ops: 0 });
});

test('a hostile chain stops the thread with the reason; what was served before it stays served', async (t) => {
  const d = start(t);
  d.mem.write(HDR, header(VirtioBlkType.IN, 0));
  d.post([[HDR, 16, false], [DATA, 512, true], [STATUS, 1, true]]);
  await until('the good request to be used', () => d.usedIdx() === 1);
  d.post([[HDR, 16, false], [RAM - 256, 512, true], [STATUS, 1, true]]);
  await until('the thread to report the broken chain', () => d.broken.length > 0);
  t.regex(d.broken[0], /buffer 0x[0-9a-f]+\+0x200 is not inside guest RAM/);
  d.post([[HDR, 16, false], [DATA, 512, true], [STATUS, 1, true]]);
  await new Promise((r) => setTimeout(r, 50));
  t.is(d.usedIdx(), 1, 'nothing more is served once the queue is broken');
  t.deepEqual(d.queue.stop(), { nextAvail: 1, nextUsed: 1, counters: { read_bytes: 512, read_ops: 1, write_bytes: 0, write_ops: 0 }, interrupt: false });
});

test('a chain without a status byte, a loop and an impossible index break the queue', async (t) => {
  for (const [what, setup, reason] of [
    ['no status byte', (d: Driver) => d.post([[HDR, 16, false]]), /no status byte/],
    [
      'a loop',
      (d: Driver) => {
        // Made into a loop before the chain is made available: a thread that takes its first
        // look at the ring as soon as it starts must never see it whole. (Posting it whole and
        // then closing the loop left a window in which a thread started late served it.)
        const head = d.chain([[HDR, 16, false], [STATUS, 1, true]]);
        d.mem.writeU16(DESC + 16 + 12, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
        d.mem.writeU16(DESC + 16 + 14, 0);
        d.offer(head);
      },
      /more than 16 descriptors|device-readable buffer after a device-writable one/,
    ],
    [
      'avail.idx far ahead',
      (d: Driver) => {
        d.mem.writeU16(AVAIL + 2, 100);
        native().eventfdWrite(d.kick, 1n);
      },
      /more than the queue size/,
    ],
  ] as const) {
    const d = start(t);
    setup(d);
    await until(`the thread to report ${what}`, () => d.broken.length > 0);
    t.regex(d.broken[0], reason, what);
    t.is(d.usedIdx(), 0, `${what}: nothing used`);
  }
});

test('with EVENT_IDX the thread publishes avail_event and interrupts only when used_event asks', async (t) => {
  const d = start(t, { eventIdx: true });
  // used_event 5: no interrupt until the sixth used buffer
  d.mem.writeU16(AVAIL + 4 + 2 * SIZE, 5);
  d.mem.write(HDR, header(VirtioBlkType.FLUSH, 0));
  d.post([[HDR, 16, false], [STATUS, 1, true]]);
  await until('the flush to be used', () => d.usedIdx() === 1);
  t.is(d.mem.readU8(STATUS), VirtioBlkStatus.OK);
  t.is(d.mem.readU16(USED + 4 + 8 * SIZE), 1, 'avail_event: kick me at the next chain');
  await new Promise((r) => setTimeout(r, 20));
  t.is(native().eventfdRead(d.irq), null, 'no interrupt: used_event is further on');
  for (let i = 0; i < 5; i++) d.post([[HDR, 16, false], [STATUS, 1, true]]);
  await until('all six to be used', () => d.usedIdx() === 6);
  await until('the interrupt used_event asked for', () => native().eventfdRead(d.irq) !== null);
  t.pass();
});
