// The split virtqueue (virtio 1.2, 2.7), modern and little-endian only, as plain functions over
// guest memory. A queue's configuration and the device's cursors are plain data the caller keeps
// in its store and passes in; these functions hold nothing between calls.
//
// The guest is hostile: every value read from its memory is checked before it is used, and a
// broken queue is a VirtqueueError (the device then sets DEVICE_NEEDS_RESET), never a RangeError
// or a GuestMemoryError escaping from deeper down; a RangeError means the device itself passed a
// value it could not have got from here. Each descriptor is copied out of guest memory once and
// only the copy is checked and used, so the guest cannot change it in between.
//
// Layout (all little-endian):
//   descriptor table  16 bytes per entry: addr u64, len u32, flags u16, next u16
//   available ring    flags u16, idx u16, ring[size] u16, used_event u16
//   used ring         flags u16, idx u16, ring[size] { id u32, len u32 }, avail_event u16

import type { GuestAddress, GuestMemory, GuestRegion } from '../../memory/guest-memory';

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
/** available ring flags: the driver asks for no interrupts (ignored under EVENT_IDX) */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** used ring flags: the device asks for no kicks (ignored under EVENT_IDX) */
export const VIRTQ_USED_F_NO_NOTIFY = 1;
/** The largest queue size a split ring can have. */
export const VIRTQ_MAX_SIZE = 32768;
/**
 * The most bytes a chain may carry in each direction. The used element's length is a u32, so a
 * device could not report more written than this anyway.
 */
export const VIRTQ_MAX_CHAIN_BYTES = 0xffff_ffff;

const DESC_SIZE = 16;
const USED_ELEM_SIZE = 8;

/** Where a queue's rings are and what was negotiated: from the store. */
export interface QueueRings {
  size: number;
  desc: GuestAddress;
  avail: GuestAddress;
  used: GuestAddress;
  /** VIRTIO_F_EVENT_IDX */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC */
  indirect: boolean;
}

/** The device's cursors (16-bit, wrapping): from the store, returned updated. */
export interface QueueCursors {
  /** the next available ring entry the device will take */
  nextAvail: number;
  /** the next used ring entry the device will fill (and the used.idx it last published) */
  nextUsed: number;
}

/** The guest broke the queue: the device must set DEVICE_NEEDS_RESET. */
export class VirtqueueError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'VirtqueueError';
  }
}

/** A buffer in guest RAM, wholly inside one RAM region. */
export interface BufferSegment {
  addr: GuestAddress;
  len: number;
}

/** A chain the driver made available: the device-readable buffers, then the device-writable. */
export interface DescriptorChain {
  /** the head descriptor's index: what pushUsed reports back */
  head: number;
  readable: BufferSegment[];
  writable: BufferSegment[];
  readableBytes: number;
  writableBytes: number;
}

// Uint16Array is in host byte order; the rings are little-endian.
const HOST_LITTLE_ENDIAN = new Uint8Array(Uint16Array.of(1).buffer)[0] === 1;
const le16 = (v: number): number => (HOST_LITTLE_ENDIAN ? v : ((v & 0xff) << 8) | (v >> 8));

const hex = (v: number | bigint): string => `0x${v.toString(16)}`;

function isPowerOfTwoSize(size: number): boolean {
  return Number.isInteger(size) && size >= 1 && size <= VIRTQ_MAX_SIZE && (size & (size - 1)) === 0;
}

/** The RAM region holding all of [addr, addr+len), if one does. */
function regionHolding(mem: GuestMemory, addr: number, len: number): GuestRegion | undefined {
  return mem.regions.find((r) => r.contains(addr, len));
}

function requireRam(mem: GuestMemory, addr: number, len: number, what: string): GuestRegion {
  const r = regionHolding(mem, addr, len);
  if (!r) throw new VirtqueueError(`${what} at ${hex(addr)}+${hex(len)} is not inside guest RAM`);
  return r;
}

/**
 * The 16-bit ring fields the driver and device hand over to each other (the indices and the
 * event fields) are read and written with Atomics on an aligned view of guest RAM: a copy made
 * byte by byte could see half of a concurrent update (0x00ff -> 0x0100 read as 0x01ff), and a
 * sequentially consistent store is also the full barrier the notification protocol needs
 * between publishing an index and reading the other side's event field.
 */
function sharedU16View(mem: GuestMemory, addr: number, what: string): { region: GuestRegion; offset: number; cell?: Uint16Array } {
  const region = requireRam(mem, addr, 2, what);
  const offset = addr - region.guestAddress;
  const view = region.view(offset, 2);
  const cell = view && view.byteOffset % 2 === 0 ? new Uint16Array(view.buffer, view.byteOffset, 1) : undefined;
  return { region, offset, cell };
}

function loadShared16(mem: GuestMemory, addr: number, what: string): number {
  const { cell } = sharedU16View(mem, addr, what);
  return cell ? le16(Atomics.load(cell, 0)) : mem.readU16(addr);
}

function storeShared16(mem: GuestMemory, addr: number, value: number, what: string): void {
  const { region, offset, cell } = sharedU16View(mem, addr, what);
  if (!cell) return mem.writeU16(addr, value);
  Atomics.store(cell, 0, le16(value & 0xffff));
  region.markDirty(offset, 2);
}

function checkSize(q: QueueRings): void {
  if (!isPowerOfTwoSize(q.size)) throw new VirtqueueError(`queue size ${q.size} is not a power of two from 1 to ${VIRTQ_MAX_SIZE}`);
}

/** Where a queue's rings are: all the ring-field addresses below need. */
type RingPlace = Pick<QueueRings, 'size' | 'avail' | 'used'>;

const availIdxAddr = (q: RingPlace): number => q.avail + 2;
const availRingAddr = (q: RingPlace, slot: number): number => q.avail + 4 + 2 * slot;
const usedEventAddr = (q: RingPlace): number => q.avail + 4 + 2 * q.size;
const usedIdxAddr = (q: RingPlace): number => q.used + 2;
const usedElemAddr = (q: RingPlace, slot: number): number => q.used + 4 + USED_ELEM_SIZE * slot;
const availEventAddr = (q: RingPlace): number => q.used + 4 + USED_ELEM_SIZE * q.size;

/**
 * The four index fields the driver and device exchange, as guest RAM holds them now, each null
 * where RAM holds no ring (a health report's view; nothing is checked or written).
 */
export function ringIndexFields(mem: GuestMemory, q: RingPlace): { availIdx: number | null; usedEvent: number | null; usedIdx: number | null; availEvent: number | null } {
  const at = (addr: number): number | null => (regionHolding(mem, addr, 2) ? mem.readU16(addr) : null);
  return { availIdx: at(availIdxAddr(q)), usedEvent: at(usedEventAddr(q)), usedIdx: at(usedIdxAddr(q)), availEvent: at(availEventAddr(q)) };
}

/**
 * Why the rings cannot be used as configured, or null. Each ring's whole extent must lie in one
 * RAM region, including the event-index fields whether or not EVENT_IDX was negotiated (the
 * spec sizes the rings with them).
 */
export function queueRingsProblem(mem: GuestMemory, q: QueueRings): string | null {
  if (!isPowerOfTwoSize(q.size)) return `queue size ${q.size} is not a power of two from 1 to ${VIRTQ_MAX_SIZE}`;
  const rings: [string, number, number, number][] = [
    ['descriptor table', q.desc, 16, DESC_SIZE * q.size],
    ['available ring', q.avail, 2, 6 + 2 * q.size],
    ['used ring', q.used, 4, 6 + USED_ELEM_SIZE * q.size],
  ];
  for (const [what, addr, align, len] of rings) {
    if (!Number.isSafeInteger(addr) || addr < 0) return `${what} address ${addr} is not a guest address`;
    if (addr % align !== 0) return `${what} at ${hex(addr)} is not ${align}-byte aligned`;
    if (!regionHolding(mem, addr, len)) return `${what} at ${hex(addr)}+${hex(len)} is not inside guest RAM`;
  }
  return null;
}

/** How many chains the driver has made available and the device not yet taken. */
export function availableCount(mem: GuestMemory, q: QueueRings, c: QueueCursors): number {
  checkSize(q);
  const idx = loadShared16(mem, availIdxAddr(q), 'available ring index');
  const n = (idx - c.nextAvail) & 0xffff;
  if (n > q.size) throw new VirtqueueError(`available index ${idx} is ${n} entries past the device's ${c.nextAvail & 0xffff}, more than the queue size ${q.size}`);
  return n;
}

interface Descriptor {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

function readDescriptor(mem: GuestMemory, addr: number, where: () => string): Descriptor {
  if (!regionHolding(mem, addr, DESC_SIZE)) throw new VirtqueueError(`${where()}: the descriptor at ${hex(addr)} is not inside guest RAM`);
  const b = mem.read(addr, DESC_SIZE);
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return { addr: v.getBigUint64(0, true), len: v.getUint32(8, true), flags: v.getUint16(12, true), next: v.getUint16(14, true) };
}

/**
 * A descriptor's address as a number, once it is known to be below 2^53 and [addr, addr+len)
 * known to lie in one RAM region (guest RAM here never spans two regions without a hole).
 */
function bufferAddress(mem: GuestMemory, addr: bigint, len: number, where: () => string, what: string): number {
  if (addr >= 1n << 53n) throw new VirtqueueError(`${where()}: ${what} address ${hex(addr)} is beyond guest RAM`);
  const a = Number(addr);
  if (!regionHolding(mem, a, len)) throw new VirtqueueError(`${where()}: ${what} ${hex(a)}+${hex(len)} is not inside guest RAM`);
  return a;
}

/**
 * Take the next available chain, or null when there is none. Nothing is written: the device
 * reports the chain back with pushUsed when it is done with it.
 *
 * Checks, each a VirtqueueError: the head and every next index inside its table; at most
 * q.size buffer descriptors in the chain, counting those in an indirect table (this is also
 * what stops a loop); INDIRECT only when negotiated, never together with NEXT, never inside an
 * indirect table, its table a non-zero multiple of 16 bytes of at most q.size entries (a chain
 * could not use more) lying in guest RAM; every buffer non-empty, below 2^53 and wholly in one
 * RAM region; no device-readable buffer after a device-writable one; at most
 * VIRTQ_MAX_CHAIN_BYTES readable and as many writable.
 *
 * An indirect descriptor may end a chain of direct ones (the spec forbids only NEXT on it); its
 * table's next indices are relative to the table and bounded by its entry count.
 */
export function popChain(mem: GuestMemory, q: QueueRings, c: QueueCursors): { chain: DescriptorChain; cursors: QueueCursors } | null {
  if (availableCount(mem, q, c) === 0) return null;
  // The driver wrote the ring entry and the descriptors before it published avail.idx, and
  // availableCount read the index with an atomic load, which later loads do not move ahead of.
  // The size divides 2^16, so the slot stays right when the 16-bit index wraps.
  const slot = c.nextAvail % q.size;
  const entryAddr = availRingAddr(q, slot);
  requireRam(mem, entryAddr, 2, `available ring entry ${slot}`);
  const head = mem.readU16(entryAddr);
  if (head >= q.size) throw new VirtqueueError(`available ring entry ${slot}: head descriptor ${head} is not below the queue size ${q.size}`);

  const chain: DescriptorChain = { head, readable: [], writable: [], readableBytes: 0, writableBytes: 0 };
  let table = q.desc;
  let entries = q.size;
  let indirect = false;
  let index = head;
  let buffers = 0;
  // only built for an error message
  const where = () => (indirect ? `chain ${head}: indirect table entry ${index}` : `chain ${head}: descriptor ${index}`);
  for (;;) {
    const d = readDescriptor(mem, table + DESC_SIZE * index, where);
    if (d.flags & VIRTQ_DESC_F_INDIRECT) {
      if (!q.indirect) throw new VirtqueueError(`${where()}: INDIRECT, but indirect descriptors were not negotiated`);
      if (indirect) throw new VirtqueueError(`${where()}: INDIRECT inside an indirect table`);
      if (d.flags & VIRTQ_DESC_F_NEXT) throw new VirtqueueError(`${where()}: INDIRECT together with NEXT`);
      if (d.len === 0 || d.len % DESC_SIZE !== 0) throw new VirtqueueError(`${where()}: indirect table length ${d.len} is not a non-zero multiple of ${DESC_SIZE}`);
      if (d.len > DESC_SIZE * q.size) throw new VirtqueueError(`${where()}: indirect table of ${d.len / DESC_SIZE} entries is larger than the queue size ${q.size}`);
      table = bufferAddress(mem, d.addr, d.len, where, 'indirect table');
      entries = d.len / DESC_SIZE;
      indirect = true;
      index = 0;
      continue;
    }
    if (++buffers > q.size) throw new VirtqueueError(`chain ${head}: more than ${q.size} descriptors (the queue size), or a loop`);
    if (d.len === 0) throw new VirtqueueError(`${where()}: zero-length buffer`);
    const addr = bufferAddress(mem, d.addr, d.len, where, 'buffer');
    if (d.flags & VIRTQ_DESC_F_WRITE) {
      if (chain.writableBytes + d.len > VIRTQ_MAX_CHAIN_BYTES) throw new VirtqueueError(`chain ${head}: more than ${VIRTQ_MAX_CHAIN_BYTES} device-writable bytes`);
      chain.writable.push({ addr, len: d.len });
      chain.writableBytes += d.len;
    } else {
      if (chain.writable.length > 0) throw new VirtqueueError(`${where()}: device-readable buffer after a device-writable one`);
      if (chain.readableBytes + d.len > VIRTQ_MAX_CHAIN_BYTES) throw new VirtqueueError(`chain ${head}: more than ${VIRTQ_MAX_CHAIN_BYTES} device-readable bytes`);
      chain.readable.push({ addr, len: d.len });
      chain.readableBytes += d.len;
    }
    if (!(d.flags & VIRTQ_DESC_F_NEXT)) break;
    if (d.next >= entries) {
      throw new VirtqueueError(`${where()}: next index ${d.next} is not below the ${indirect ? 'indirect table' : 'queue'} size ${entries}`);
    }
    index = d.next;
  }
  return { chain, cursors: { nextAvail: (c.nextAvail + 1) & 0xffff, nextUsed: c.nextUsed & 0xffff } };
}

/**
 * Hand a chain back to the driver, `written` bytes of it written by the device: the used
 * element first, then used.idx, since the driver reads the index and then the element. The
 * element goes through GuestMemory.write and the index is an atomic store whose page is marked
 * dirty as well, so a migration carries both. A head or length the device could not have taken
 * from popChain is a RangeError (a device bug); rings outside RAM are refused before anything
 * is written.
 */
export function pushUsed(mem: GuestMemory, q: QueueRings, c: QueueCursors, head: number, written: number): QueueCursors {
  checkSize(q);
  if (!Number.isInteger(head) || head < 0 || head >= q.size) throw new RangeError(`used head ${head} is not a descriptor index of a queue of ${q.size}`);
  if (!Number.isInteger(written) || written < 0 || written > VIRTQ_MAX_CHAIN_BYTES) throw new RangeError(`used length ${written} is not a u32`);
  const slot = c.nextUsed % q.size;
  const elemAddr = usedElemAddr(q, slot);
  requireRam(mem, elemAddr, USED_ELEM_SIZE, 'used ring element');
  requireRam(mem, usedIdxAddr(q), 2, 'used ring index');
  const elem = new Uint8Array(USED_ELEM_SIZE);
  const v = new DataView(elem.buffer);
  v.setUint32(0, head, true);
  v.setUint32(4, written, true);
  mem.write(elemAddr, elem);
  const nextUsed = (c.nextUsed + 1) & 0xffff;
  storeShared16(mem, usedIdxAddr(q), nextUsed, 'used ring index');
  return { nextAvail: c.nextAvail & 0xffff, nextUsed };
}

/**
 * Whether the driver wants an interrupt for the used entries from `usedBefore` up to
 * `usedAfter` (the used.idx values before and after the device's pushes). With EVENT_IDX, when
 * used_event lies in that window, counting modulo 2^16 (vring_need_event); else unless the
 * driver set NO_INTERRUPT. Call after used.idx is published: the driver may change its event
 * field until it sees the new index.
 */
export function shouldInterrupt(mem: GuestMemory, q: QueueRings, usedBefore: number, usedAfter: number): boolean {
  checkSize(q);
  if (((usedAfter - usedBefore) & 0xffff) === 0) return false;
  if (q.eventIdx) {
    const event = loadShared16(mem, usedEventAddr(q), 'used_event');
    return ((usedAfter - event - 1) & 0xffff) < ((usedAfter - usedBefore) & 0xffff);
  }
  return (loadShared16(mem, q.avail, 'available ring flags') & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
}

/**
 * With EVENT_IDX, ask the driver to kick when it makes the next chain available: avail_event
 * (after the used ring's elements) becomes c.nextAvail. Without EVENT_IDX nothing is written
 * (used.flags stays 0: the driver kicks for every chain). A chain the driver made available
 * before it saw the new value brings no kick, so check availableCount again afterwards.
 */
export function publishAvailEvent(mem: GuestMemory, q: QueueRings, c: QueueCursors): void {
  checkSize(q);
  if (!q.eventIdx) return;
  storeShared16(mem, availEventAddr(q), c.nextAvail & 0xffff, 'avail_event');
}

/** Each piece of a chain's segments from byte `offset` on, `len` bytes at most, in order. */
function forEachPiece(mem: GuestMemory, segments: BufferSegment[], offset: number, len: number, fn: (addr: number, n: number, done: number) => void): number {
  let skip = offset;
  let done = 0;
  for (const s of segments) {
    if (done >= len) break;
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    const n = Math.min(s.len - skip, len - done);
    requireRam(mem, s.addr + skip, n, 'buffer');
    fn(s.addr + skip, n, done);
    done += n;
    skip = 0;
  }
  return done;
}

/**
 * The chain's device-readable bytes concatenated, from byte `offset` on and `max` bytes at most
 * (default: all of them). A copy: the guest may change its buffers while the device works.
 */
export function readFromChain(mem: GuestMemory, chain: DescriptorChain, max = chain.readableBytes, offset = 0): Uint8Array {
  const len = Math.max(0, Math.min(max, chain.readableBytes - offset));
  const out = new Uint8Array(len);
  forEachPiece(mem, chain.readable, offset, len, (addr, n, done) => out.set(mem.read(addr, n), done));
  return out;
}

/**
 * Fill the chain's device-writable buffers in order with `data`, from writable byte `offset` on;
 * returns how many bytes fit. Written through GuestMemory, so the pages are marked dirty.
 */
export function writeToChain(mem: GuestMemory, chain: DescriptorChain, data: Uint8Array, offset = 0): number {
  return forEachPiece(mem, chain.writable, offset, data.length, (addr, n, done) => mem.write(addr, data.subarray(done, done + n)));
}
