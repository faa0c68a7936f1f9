// The split virtqueue driven like a driver would: descriptors, available entries and avail.idx
// laid out in guest RAM, then popped and handed back. Hostile rings must each end in a
// VirtqueueError with nothing written, and random garbage must never get anything else out.
import test, { type ExecutionContext } from 'ava';
import { GuestMemory, GuestRegion, PAGE_SIZE, type GuestAddress } from '../../src/memory/guest-memory';
import { deepFreeze } from '../../src/state/json';
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_MAX_CHAIN_BYTES,
  VirtqueueError,
  availableCount,
  popChain,
  publishAvailEvent,
  pushUsed,
  queueRingsProblem,
  readFromChain,
  shouldInterrupt,
  writeToChain,
  type QueueCursors,
  type QueueRings,
} from '../../src/devices/virtio/virtqueue';

const NEXT = VIRTQ_DESC_F_NEXT;
const WRITE = VIRTQ_DESC_F_WRITE;
const INDIRECT = VIRTQ_DESC_F_INDIRECT;

/** Two RAM regions with a hole between them, like low and high RAM. */
const LAYOUT = [
  { guestAddress: 0, size: 0x10000 },
  { guestAddress: 0x20000, size: 0x10000 },
];

interface Ram {
  mem: GuestMemory;
  buffers: ArrayBuffer[];
  dirty: Uint8Array[];
}

/**
 * Guest RAM built as anonymousGuestMemory builds it, but keeping the backing and the dirty
 * bitmaps at hand so a test can see what was written. `sparse` regions have no backing: only
 * their bounds may be consulted.
 */
function ram(layout: { guestAddress: number; size: number; sparse?: boolean }[] = LAYOUT): Ram {
  const buffers = layout.map((l) => new ArrayBuffer(l.sparse ? 0 : l.size));
  const dirty = layout.map((l) => new Uint8Array(Math.ceil(l.size / PAGE_SIZE / 8)));
  const regions = layout.map(
    (l, i) =>
      new GuestRegion({
        guestAddress: l.guestAddress,
        size: l.size,
        chunks: l.sparse ? () => { throw new Error('a sparse region was read or written'); } : [buffers[i]],
        chunkSize: l.size,
        dirtyBitmap: dirty[i],
      }),
  );
  return { mem: new GuestMemory(regions), buffers, dirty };
}

/** Guest addresses of the pages marked dirty. */
function dirtyPages(r: Ram): GuestAddress[] {
  const out: GuestAddress[] = [];
  r.mem.regions.forEach((region, i) => {
    for (let p = 0; p < r.dirty[i].length * 8; p++) if (r.dirty[i][p >> 3] & (1 << (p & 7))) out.push(region.guestAddress + p * PAGE_SIZE);
  });
  return out;
}

function clearDirty(r: Ram): void {
  for (const d of r.dirty) d.fill(0);
}

function snapshot(r: Ram): Uint8Array[] {
  return r.buffers.map((b) => new Uint8Array(b).slice());
}

const RINGS: QueueRings = deepFreeze({ size: 8, desc: 0x1000, avail: 0x2000, used: 0x3000, eventIdx: false, indirect: false });
const INDIRECT_TABLE = 0x4000;

interface Desc {
  addr: number | bigint;
  len: number;
  flags?: number;
  next?: number;
}

/** The driver's side: writes descriptors and available entries as a virtio driver does. */
class Driver {
  availIdx: number;

  constructor(
    readonly mem: GuestMemory,
    readonly q: QueueRings = RINGS,
    start = 0,
  ) {
    this.availIdx = start;
    mem.writeU16(q.avail + 2, start);
    mem.writeU16(q.used + 2, start);
  }

  /** Descriptor `i` of the queue's table, or of the table at `table`. */
  desc(i: number, d: Desc, table = this.q.desc): this {
    this.mem.writeU64(table + 16 * i, BigInt(d.addr));
    this.mem.writeU32(table + 16 * i + 8, d.len);
    this.mem.writeU16(table + 16 * i + 12, d.flags ?? 0);
    this.mem.writeU16(table + 16 * i + 14, d.next ?? 0);
    return this;
  }

  /** Make the chain at `head` available and publish the new avail.idx. */
  offer(head: number): this {
    this.mem.writeU16(this.q.avail + 4 + 2 * (this.availIdx % this.q.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.mem.writeU16(this.q.avail + 2, this.availIdx);
    return this;
  }
}

const cursors = (nextAvail = 0, nextUsed = nextAvail): QueueCursors => deepFreeze({ nextAvail, nextUsed });

test('a readable then two writable descriptors pop as one chain and the available cursor advances', (t) => {
  const r = ram();
  const d = new Driver(r.mem)
    .desc(2, { addr: 0x8000, len: 16, flags: NEXT, next: 5 })
    .desc(5, { addr: 0x9000, len: 0x100, flags: WRITE | NEXT, next: 1 })
    .desc(1, { addr: 0x20100, len: 0x200, flags: WRITE })
    .offer(2);
  r.mem.write(0x8000, Uint8Array.from({ length: 16 }, (_, i) => i + 1));
  t.is(availableCount(r.mem, RINGS, cursors()), 1);

  const popped = popChain(r.mem, RINGS, cursors());
  t.truthy(popped);
  const { chain, cursors: c } = popped!;
  t.deepEqual(chain, {
    head: 2,
    readable: [{ addr: 0x8000, len: 16 }],
    writable: [
      { addr: 0x9000, len: 0x100 },
      { addr: 0x20100, len: 0x200 },
    ],
    readableBytes: 16,
    writableBytes: 0x300,
  });
  t.deepEqual(c, { nextAvail: 1, nextUsed: 0 });
  t.is(availableCount(r.mem, RINGS, c), 0);
  t.is(popChain(r.mem, RINGS, c), null);
  t.is(d.availIdx, 1);

  t.deepEqual([...readFromChain(r.mem, chain)], Array.from({ length: 16 }, (_, i) => i + 1));
  t.deepEqual([...readFromChain(r.mem, chain, 4, 10)], [11, 12, 13, 14]);
  t.is(readFromChain(r.mem, chain, 100, 20).length, 0);

  // Writing spans both writable buffers, in order, and dirties exactly their pages.
  clearDirty(r);
  const data = Uint8Array.from({ length: 0x180 }, (_, i) => i & 0xff);
  t.is(writeToChain(r.mem, chain, data), 0x180);
  t.deepEqual([...r.mem.read(0x9000, 0x100)], [...data.subarray(0, 0x100)]);
  t.deepEqual([...r.mem.read(0x20100, 0x80)], [...data.subarray(0x100)]);
  t.deepEqual(dirtyPages(r), [0x9000, 0x20000]);
  t.is(writeToChain(r.mem, chain, Uint8Array.of(0xee), 0x2ff), 1);
  t.is(r.mem.readU8(0x202ff), 0xee);
  t.is(writeToChain(r.mem, chain, new Uint8Array(0x400)), 0x300, 'only what fits is written');
});

test('the 16-bit indices wrap: cursors from 65534 take ring slots 6, 7, 0 and used.idx wraps to 1', (t) => {
  const r = ram();
  const d = new Driver(r.mem, RINGS, 65534);
  for (const head of [3, 4, 5]) d.desc(head, { addr: 0x8000 + 0x100 * head, len: 8, flags: WRITE }).offer(head);
  t.is(d.availIdx, 1);
  let c = cursors(65534);
  t.is(availableCount(r.mem, RINGS, c), 3);
  const heads: number[] = [];
  const seen: number[] = [];
  for (let i = 0; i < 3; i++) {
    const p = popChain(r.mem, RINGS, c)!;
    heads.push(p.chain.head);
    c = deepFreeze(pushUsed(r.mem, RINGS, p.cursors, p.chain.head, 8 - i));
    seen.push(c.nextAvail, c.nextUsed);
  }
  t.deepEqual(heads, [3, 4, 5]);
  t.deepEqual(seen, [65535, 65535, 0, 0, 1, 1]);
  t.is(popChain(r.mem, RINGS, c), null);
  // used elements in slots 6, 7 and 0
  const elem = (slot: number) => [r.mem.readU32(RINGS.used + 4 + 8 * slot), r.mem.readU32(RINGS.used + 8 + 8 * slot)];
  t.deepEqual([elem(6), elem(7), elem(0)], [[3, 8], [4, 7], [5, 6]]);
  t.is(r.mem.readU16(RINGS.used + 2), 1);
});

test('pushUsed writes the element then used.idx, marking only the used ring page dirty', (t) => {
  const r = ram();
  new Driver(r.mem).desc(3, { addr: 0x8000, len: 64, flags: WRITE }).offer(3);
  const p = popChain(r.mem, RINGS, cursors())!;
  clearDirty(r);
  const c = pushUsed(r.mem, RINGS, p.cursors, p.chain.head, 42);
  t.deepEqual(c, { nextAvail: 1, nextUsed: 1 });
  t.is(r.mem.readU32(RINGS.used + 4), 3);
  t.is(r.mem.readU32(RINGS.used + 8), 42);
  t.is(r.mem.readU16(RINGS.used + 2), 1);
  t.deepEqual(dirtyPages(r), [RINGS.used]);

  // A used ring straddling a page boundary dirties both pages it was written on.
  const q = deepFreeze({ ...RINGS, used: 0x4ffc });
  clearDirty(r);
  pushUsed(r.mem, q, cursors(0, 0), 1, 1);
  t.deepEqual(dirtyPages(r), [0x4000, 0x5000]);

  // a device passing values it could not have got from popChain is a bug, not the guest's
  t.throws(() => pushUsed(r.mem, RINGS, c, 8, 0), { instanceOf: RangeError });
  t.throws(() => pushUsed(r.mem, RINGS, c, 0, 2 ** 32), { instanceOf: RangeError });
  assertRefused(t, r, /used ring element at 0x10004\+0x8 is not inside guest RAM/, () => pushUsed(r.mem, deepFreeze({ ...RINGS, used: 0xfff8 }), c, 0, 0));
});

test('indirect chains: next indices are relative to the table; an indirect descriptor may end a direct chain', (t) => {
  const r = ram();
  const q = deepFreeze({ ...RINGS, indirect: true });
  const d = new Driver(r.mem, q)
    .desc(4, { addr: INDIRECT_TABLE, len: 48, flags: INDIRECT })
    .desc(0, { addr: 0x8000, len: 8, flags: NEXT, next: 2 }, INDIRECT_TABLE)
    .desc(2, { addr: 0x9000, len: 32, flags: WRITE | NEXT, next: 1 }, INDIRECT_TABLE)
    .desc(1, { addr: 0xa000, len: 4, flags: WRITE }, INDIRECT_TABLE)
    .offer(4);
  const p = popChain(r.mem, q, cursors())!;
  t.deepEqual(p.chain, {
    head: 4,
    readable: [{ addr: 0x8000, len: 8 }],
    writable: [
      { addr: 0x9000, len: 32 },
      { addr: 0xa000, len: 4 },
    ],
    readableBytes: 8,
    writableBytes: 36,
  });

  d.desc(6, { addr: 0x8100, len: 12, flags: NEXT, next: 7 })
    .desc(7, { addr: 0x5000, len: 16, flags: INDIRECT })
    .desc(0, { addr: 0xb000, len: 100, flags: WRITE }, 0x5000)
    .offer(6);
  const p2 = popChain(r.mem, q, p.cursors)!;
  t.deepEqual(p2.chain.readable, [{ addr: 0x8100, len: 12 }]);
  t.deepEqual(p2.chain.writable, [{ addr: 0xb000, len: 100 }]);

  // An indirect table of exactly the queue size is the longest chain there can be.
  d.desc(0, { addr: 0x6000, len: 16 * q.size, flags: INDIRECT });
  for (let i = 0; i < q.size; i++) d.desc(i, { addr: 0xc000 + 0x10 * i, len: 16, flags: WRITE | (i < q.size - 1 ? NEXT : 0), next: i + 1 }, 0x6000);
  d.offer(0);
  t.is(popChain(r.mem, q, p2.cursors)!.chain.writable.length, q.size);
});

test('shouldInterrupt without EVENT_IDX: unless the driver set NO_INTERRUPT, and never for nothing used', (t) => {
  const r = ram();
  t.true(shouldInterrupt(r.mem, RINGS, 0, 1));
  t.false(shouldInterrupt(r.mem, RINGS, 5, 5), 'nothing was used');
  r.mem.writeU16(RINGS.avail, VIRTQ_AVAIL_F_NO_INTERRUPT);
  t.false(shouldInterrupt(r.mem, RINGS, 0, 1));
});

test('shouldInterrupt with EVENT_IDX: when used_event lies in the used window, modulo 2^16; flags are ignored', (t) => {
  const r = ram();
  const q = deepFreeze({ ...RINGS, eventIdx: true });
  const usedEvent = RINGS.avail + 4 + 2 * RINGS.size;
  const at = (event: number, before: number, after: number) => {
    r.mem.writeU16(usedEvent, event);
    return shouldInterrupt(r.mem, q, before, after);
  };
  r.mem.writeU16(RINGS.avail, VIRTQ_AVAIL_F_NO_INTERRUPT);
  // entries 10 and 11 were used (idx 10 -> 12): an interrupt when the driver asked at 10 or 11
  t.deepEqual([9, 10, 11, 12].map((e) => at(e, 10, 12)), [false, true, true, false]);
  // idx 65535 -> 1 used entries 65535 and 0
  t.deepEqual([65534, 65535, 0, 1].map((e) => at(e, 65535, 1)), [false, true, true, false]);
  t.false(at(10, 10, 10));
  t.false(at(0, 0, 0));
});

test('publishAvailEvent writes c.nextAvail after the used elements under EVENT_IDX, and nothing without', (t) => {
  const r = ram();
  const q = deepFreeze({ ...RINGS, eventIdx: true });
  const availEvent = RINGS.used + 4 + 8 * RINGS.size;
  clearDirty(r);
  publishAvailEvent(r.mem, q, cursors(0x1234, 7));
  t.is(r.mem.readU16(availEvent), 0x1234);
  t.deepEqual(dirtyPages(r), [RINGS.used]);
  t.is(r.mem.readU16(RINGS.used + 2), 0, 'used.idx untouched');

  clearDirty(r);
  publishAvailEvent(r.mem, RINGS, cursors(0x4321));
  t.is(r.mem.readU16(availEvent), 0x1234);
  t.deepEqual(dirtyPages(r), []);
});

/** A hostile queue: how the driver lays it out, the rings it uses, and what the error must say. */
interface HostileCase {
  name: string;
  message: RegExp;
  q?: Partial<QueueRings>;
  layout?: Parameters<typeof ram>[0];
  setup(d: Driver): void;
}

const hostile: HostileCase[] = [
  { name: 'a buffer in the hole between RAM regions', message: /descriptor 0: buffer 0x18000\+0x10 is not inside guest RAM/, setup: (d) => d.desc(0, { addr: 0x18000, len: 16 }).offer(0) },
  { name: 'a buffer past the end of RAM', message: /not inside guest RAM/, setup: (d) => d.desc(0, { addr: 0x30000, len: 16 }).offer(0) },
  { name: 'a buffer crossing the end of the last region', message: /buffer 0x2ff00\+0x200 is not inside/, setup: (d) => d.desc(0, { addr: 0x2ff00, len: 0x200, flags: WRITE }).offer(0) },
  { name: 'a buffer crossing from a region into the hole', message: /not inside guest RAM/, setup: (d) => d.desc(0, { addr: 0xff00, len: 0x101 }).offer(0) },
  { name: 'a 64-bit address above 2^53', message: /address 0x1000000000000000 is beyond guest RAM/, setup: (d) => d.desc(0, { addr: 1n << 60n, len: 16 }).offer(0) },
  { name: 'an address of exactly 2^53', message: /beyond guest RAM/, setup: (d) => d.desc(0, { addr: 1n << 53n, len: 1 }).offer(0) },
  { name: 'an address whose low 32 bits are in RAM', message: /beyond guest RAM|not inside/, setup: (d) => d.desc(0, { addr: 0xffff_ffff_0000_8000n, len: 1 }).offer(0) },
  { name: 'a head index equal to the queue size', message: /head descriptor 8 is not below the queue size 8/, setup: (d) => d.offer(8) },
  { name: 'a head index of 0xffff', message: /head descriptor 65535/, setup: (d) => d.offer(0xffff) },
  { name: 'a next index equal to the queue size', message: /next index 8 is not below the queue size 8/, setup: (d) => d.desc(0, { addr: 0x8000, len: 1, flags: NEXT, next: 8 }).offer(0) },
  {
    name: 'a loop 0 -> 1 -> 0',
    message: /more than 8 descriptors .*or a loop/,
    setup: (d) => d.desc(0, { addr: 0x8000, len: 1, flags: NEXT, next: 1 }).desc(1, { addr: 0x8000, len: 1, flags: NEXT, next: 0 }).offer(0),
  },
  { name: 'a descriptor pointing at itself', message: /or a loop/, setup: (d) => d.desc(3, { addr: 0x8000, len: 1, flags: WRITE | NEXT, next: 3 }).offer(3) },
  {
    name: 'a chain longer than the queue (direct descriptors, then an indirect table)',
    message: /more than 8 descriptors/,
    q: { indirect: true },
    setup: (d) => {
      for (let i = 0; i < 3; i++) d.desc(i, { addr: 0x8000, len: 1, flags: NEXT, next: i + 1 });
      d.desc(3, { addr: INDIRECT_TABLE, len: 16 * 6, flags: INDIRECT });
      for (let i = 0; i < 6; i++) d.desc(i, { addr: 0x9000, len: 1, flags: WRITE | NEXT, next: i + 1 }, INDIRECT_TABLE);
      d.desc(5, { addr: 0x9000, len: 1, flags: WRITE }, INDIRECT_TABLE).offer(0);
    },
  },
  { name: 'a zero-length buffer', message: /descriptor 0: zero-length buffer/, setup: (d) => d.desc(0, { addr: 0x8000, len: 0 }).offer(0) },
  { name: 'a length of 0xffffffff', message: /buffer 0x8000\+0xffffffff is not inside guest RAM/, setup: (d) => d.desc(0, { addr: 0x8000, len: 0xffff_ffff, flags: WRITE }).offer(0) },
  {
    name: 'more writable bytes than a u32 can report',
    message: new RegExp(`more than ${VIRTQ_MAX_CHAIN_BYTES} device-writable bytes`),
    layout: [...LAYOUT, { guestAddress: 2 ** 32, size: 2 ** 33, sparse: true }],
    setup: (d) =>
      d.desc(0, { addr: 2 ** 32, len: 0xffff_f000, flags: WRITE | NEXT, next: 1 }).desc(1, { addr: 2 ** 33, len: 0x1000, flags: WRITE }).offer(0),
  },
  {
    name: 'more readable bytes than 2^32 - 1',
    message: /device-readable bytes/,
    layout: [...LAYOUT, { guestAddress: 2 ** 32, size: 2 ** 33, sparse: true }],
    setup: (d) => d.desc(0, { addr: 2 ** 32, len: 0xffff_ffff, flags: NEXT, next: 1 }).desc(1, { addr: 2 ** 33, len: 1 }).offer(0),
  },
  {
    name: 'a readable descriptor after a writable one',
    message: /descriptor 1: device-readable buffer after a device-writable one/,
    setup: (d) => d.desc(0, { addr: 0x8000, len: 4, flags: WRITE | NEXT, next: 1 }).desc(1, { addr: 0x9000, len: 4 }).offer(0),
  },
  { name: 'INDIRECT when it was not negotiated', message: /indirect descriptors were not negotiated/, setup: (d) => d.desc(0, { addr: INDIRECT_TABLE, len: 16, flags: INDIRECT }).offer(0) },
  {
    name: 'INDIRECT together with NEXT',
    message: /INDIRECT together with NEXT/,
    q: { indirect: true },
    setup: (d) => d.desc(0, { addr: INDIRECT_TABLE, len: 16, flags: INDIRECT | NEXT, next: 1 }).desc(0, { addr: 0x8000, len: 1 }, INDIRECT_TABLE).offer(0),
  },
  {
    name: 'INDIRECT inside an indirect table',
    message: /indirect table entry 1: INDIRECT inside an indirect table/,
    q: { indirect: true },
    setup: (d) =>
      d
        .desc(0, { addr: INDIRECT_TABLE, len: 32, flags: INDIRECT })
        .desc(0, { addr: 0x8000, len: 1, flags: NEXT, next: 1 }, INDIRECT_TABLE)
        .desc(1, { addr: INDIRECT_TABLE, len: 32, flags: INDIRECT }, INDIRECT_TABLE)
        .offer(0),
  },
  { name: 'an indirect table length not a multiple of 16', message: /indirect table length 40 is not a non-zero multiple of 16/, q: { indirect: true }, setup: (d) => d.desc(0, { addr: INDIRECT_TABLE, len: 40, flags: INDIRECT }).offer(0) },
  { name: 'an indirect table of length 0', message: /indirect table length 0/, q: { indirect: true }, setup: (d) => d.desc(0, { addr: INDIRECT_TABLE, len: 0, flags: INDIRECT }).offer(0) },
  { name: 'an indirect table larger than the queue', message: /indirect table of 9 entries is larger than the queue size 8/, q: { indirect: true }, setup: (d) => d.desc(0, { addr: INDIRECT_TABLE, len: 16 * 9, flags: INDIRECT }).offer(0) },
  { name: 'an indirect table crossing the end of a region', message: /indirect table 0xfff0\+0x20 is not inside guest RAM/, q: { indirect: true }, setup: (d) => d.desc(0, { addr: 0xfff0, len: 32, flags: INDIRECT }).offer(0) },
  { name: 'an indirect table above 2^53', message: /indirect table address .* is beyond guest RAM/, q: { indirect: true }, setup: (d) => d.desc(0, { addr: 1n << 63n, len: 32, flags: INDIRECT }).offer(0) },
  {
    name: 'a next index inside an indirect table past its entries',
    message: /indirect table entry 0: next index 2 is not below the indirect table size 2/,
    q: { indirect: true },
    setup: (d) => d.desc(0, { addr: INDIRECT_TABLE, len: 32, flags: INDIRECT }).desc(0, { addr: 0x8000, len: 1, flags: NEXT, next: 2 }, INDIRECT_TABLE).offer(0),
  },
  {
    name: 'avail.idx more than the queue size ahead',
    message: /available index 9 is 9 entries past the device's 0, more than the queue size 8/,
    setup: (d) => {
      d.desc(0, { addr: 0x8000, len: 1 });
      for (let i = 0; i < 9; i++) d.offer(0);
    },
  },
  { name: 'avail.idx behind the device (0xffff ahead)', message: /more than the queue size/, setup: (d) => d.mem.writeU16(d.q.avail + 2, 0xffff) },
  { name: 'rings that were never validated: a queue size of 3', message: /queue size 3 is not a power of two/, q: { size: 3 }, setup: () => {} },
  { name: 'rings that were never validated: an available ring outside RAM', message: /available ring index at 0x30002\+0x2 is not inside guest RAM/, q: { avail: 0x30000 }, setup: () => {} },
];

/** `call` throws a VirtqueueError saying `message`, and guest memory is as it was. */
function assertRefused(t: ExecutionContext, r: Ram, message: RegExp, call: () => unknown): void {
  const before = snapshot(r);
  clearDirty(r);
  const err = t.throws(call, { instanceOf: VirtqueueError, message });
  t.is(err?.name, 'VirtqueueError');
  t.deepEqual(dirtyPages(r), [], 'nothing was written');
  t.deepEqual(snapshot(r), before, 'guest memory is unchanged');
}

for (const h of hostile) {
  test(`refused: ${h.name}`, (t) => {
    const r = ram(h.layout);
    const q = deepFreeze({ ...RINGS, ...h.q });
    // the driver lays out the usual rings; q may then say they are elsewhere
    h.setup(new Driver(r.mem));
    const c = cursors();
    assertRefused(t, r, h.message, () => popChain(r.mem, q, c));
  });
}

test('availableCount refuses an avail.idx too far ahead; exactly the queue size is allowed', (t) => {
  const r = ram();
  r.mem.writeU16(RINGS.avail + 2, 8);
  t.is(availableCount(r.mem, RINGS, cursors()), 8);
  r.mem.writeU16(RINGS.avail + 2, 9);
  assertRefused(t, r, /9 entries past/, () => availableCount(r.mem, RINGS, cursors()));
  // from 65530, an index of 2 is 8 ahead
  r.mem.writeU16(RINGS.avail + 2, 2);
  t.is(availableCount(r.mem, RINGS, cursors(65530)), 8);
});

test('queueRingsProblem: sizes, alignment and every ring wholly in one RAM region, event fields included', (t) => {
  const r = ram();
  const problem = (q: Partial<QueueRings>) => queueRingsProblem(r.mem, { ...RINGS, ...q });
  t.is(problem({}), null);
  t.is(problem({ size: 1 }), null);
  for (const size of [0, 3, 6, 65536, 1.5, -8, NaN]) t.regex(problem({ size }) ?? '', /not a power of two/, `size ${size}`);

  t.regex(problem({ desc: 0x1008 }) ?? '', /descriptor table at 0x1008 is not 16-byte aligned/);
  t.regex(problem({ avail: 0x2001 }) ?? '', /available ring at 0x2001 is not 2-byte aligned/);
  t.regex(problem({ used: 0x3002 }) ?? '', /used ring at 0x3002 is not 4-byte aligned/);
  t.regex(problem({ desc: -16 }) ?? '', /not a guest address/);
  t.regex(problem({ used: 2 ** 60 }) ?? '', /not a guest address/);

  t.regex(problem({ desc: 0xffc0 }) ?? '', /descriptor table at 0xffc0\+0x80 is not inside guest RAM/);
  t.is(problem({ desc: 0x10000 - 0x80 }), null, 'a table ending at the end of a region');
  t.regex(problem({ desc: 0x18000 }) ?? '', /not inside guest RAM/, 'in the hole');
  t.regex(problem({ desc: 0x30000 }) ?? '', /not inside guest RAM/, 'past the end');
  // only used_event (the avail ring's last u16) or avail_event (the used ring's) sticks out
  t.is(problem({ avail: 0x10000 - 22 }), null);
  t.regex(problem({ avail: 0x10000 - 20 }) ?? '', /available ring at 0xffec\+0x16 is not inside guest RAM/);
  t.is(problem({ used: 0x10000 - 72 }), null);
  t.regex(problem({ used: 0x10000 - 68 }) ?? '', /used ring at 0xffbc\+0x46 is not inside guest RAM/);

  const big = ram([{ guestAddress: 0, size: 0x100000 }]);
  const max = { size: 32768, desc: 0, avail: 0x80000, used: 0xa0000, eventIdx: true, indirect: true };
  t.is(queueRingsProblem(big.mem, max), null);
  t.regex(queueRingsProblem(big.mem, { ...max, used: 0xc0000 }) ?? '', /used ring at 0xc0000\+0x40006 is not inside guest RAM/);
});

/** mulberry32: a small seeded PRNG, so a failure can be replayed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** GuestMemory counting its reads, to bound the work one popChain does. */
class CountingMemory extends GuestMemory {
  reads = 0;
  override read(addr: GuestAddress, len: number): Uint8Array {
    this.reads++;
    return super.read(addr, len);
  }
}

test('random garbage in the descriptor table, indirect tables and available ring gets only VirtqueueErrors, in bounded work', (t) => {
  const rand = prng(0x7e57);
  const int = (n: number) => Math.floor(rand() * n);
  const pick = <T>(xs: T[]): T => xs[int(xs.length)];
  const backing = [new ArrayBuffer(0x10000), new ArrayBuffer(0x10000)];
  const mem = new CountingMemory(LAYOUT.map((l, i) => new GuestRegion({ ...l, chunks: [backing[i]], chunkSize: l.size })));
  const tables = [0x1000, 0x4000, 0x4800, 0xfff0];

  const address = (): bigint =>
    pick<() => bigint>([
      () => BigInt(0x8000 + int(0x8000)),
      () => BigInt(0x20000 + int(0x10000)),
      () => BigInt(pick(tables)),
      () => BigInt(pick([0xffff, 0x10000, 0x1ffff, 0x2ffff, 0x30000])),
      () => (BigInt(int(2 ** 32)) << 32n) | BigInt(int(2 ** 32)),
      () => (1n << 53n) - BigInt(int(4)),
    ])();
  const length = (size: number): number =>
    pick<() => number>([() => 1 + int(64), () => 1 + int(64), () => 16 * int(size + 2), () => 0, () => 0xffff_ffff, () => int(2 ** 32), () => 0x10000 - int(3)])();
  // Each field is sane with probability `sanity` (chosen per round), garbage otherwise: rounds
  // of all garbage and rounds with a single bad field both come up.
  // A sane descriptor is a buffer going on to the next entry, or ending the chain, or a
  // well-formed pointer to one of the indirect tables.
  const descriptor = (i: number, size: number, sanity: number): Desc => {
    if (rand() < sanity * 0.1) return { addr: pick([0x4000, 0x4800]), len: 16 * (1 + int(size)), flags: INDIRECT, next: int(0x10000) };
    return {
      addr: rand() < sanity ? 0x8000 + 0x40 * i : address(),
      len: rand() < sanity ? 1 + int(0x40) : length(size),
      flags: rand() < sanity ? (rand() < 0.8 ? NEXT : 0) | (i > size / 2 ? WRITE : 0) : rand() < 0.9 ? int(8) : int(0x10000),
      next: rand() < sanity ? i + 1 : rand() < 0.8 ? int(size + 1) : int(0x10000),
    };
  };

  let popped = 0;
  let refused = 0;
  let longest = 0;
  for (let iter = 0; iter < 4000; iter++) {
    const size = pick([1, 2, 4, 8, 16]);
    const q: QueueRings = deepFreeze({ size, desc: 0x1000, avail: 0x2000, used: 0x3000, eventIdx: rand() < 0.5, indirect: rand() < 0.7 });
    const d = new Driver(mem, q, int(0x10000));
    const sanity = pick([0, 0.5, 0.9, 0.97]);
    for (const table of [0x1000, 0x4000, 0x4800]) for (let i = 0; i < 17; i++) d.desc(i, descriptor(i, size, sanity), table);
    for (let i = 0; i < size; i++) mem.writeU16(q.avail + 4 + 2 * i, rand() < 0.8 ? int(size + 1) : int(0x10000));
    const start = d.availIdx;
    mem.writeU16(q.avail + 2, rand() < 0.8 ? (start + 1 + int(size + 1)) & 0xffff : int(0x10000));
    const c = cursors(start, int(0x10000));

    mem.reads = 0;
    let reads = 0;
    try {
      const p = popChain(mem, q, c);
      reads = mem.reads;
      if (p) {
        popped++;
        const { chain } = p;
        const segments = [...chain.readable, ...chain.writable];
        longest = Math.max(longest, segments.length);
        t.true(segments.length <= size);
        t.true(chain.head < size);
        for (const s of segments) t.true(s.len > 0 && mem.regions.some((reg) => reg.contains(s.addr, s.len)), 'every buffer is in RAM');
        t.is(chain.readableBytes, chain.readable.reduce((n, s) => n + s.len, 0));
        t.is(chain.writableBytes, chain.writable.reduce((n, s) => n + s.len, 0));
        t.is(readFromChain(mem, chain, 256).length, Math.min(256, chain.readableBytes));
        t.is(writeToChain(mem, chain, new Uint8Array(64)), Math.min(64, chain.writableBytes));
        t.deepEqual(p.cursors, { nextAvail: (start + 1) & 0xffff, nextUsed: c.nextUsed });
      }
    } catch (e) {
      if (!(e instanceof VirtqueueError)) {
        t.fail(`iteration ${iter}: ${(e as Error).name}: ${(e as Error).message}`);
        return;
      }
      reads = mem.reads;
      refused++;
    }
    // the head entry, at most size + 1 descriptors (the last one refused) and one indirect
    // descriptor: no more
    t.true(reads <= size + 3, `iteration ${iter}: ${reads} reads for a queue of ${size}`);
  }
  t.log(`${popped} chains popped (longest ${longest}), ${refused} refused`);
  t.true(popped > 100 && refused > 100, 'the garbage reaches both outcomes');
  t.true(longest > 4);
});
