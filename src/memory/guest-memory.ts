// Guest physical memory as seen from TypeScript: a set of regions, each a list of zero-copy
// ArrayBuffer chunks over the native memfd mapping. Every write made through this class marks
// the region's VMM-side dirty bitmap (injected per region, not global), so the dirty set the
// native side reports is KVM's log OR what the VMM itself wrote.

import fs from 'node:fs';
import { native } from '../native/kvm';

/** A guest physical address. Plain number: guest RAM stays far below 2^53. */
export type GuestAddress = number;

export const PAGE_SIZE = 4096;

export interface GuestRegionInit {
  guestAddress: GuestAddress;
  size: number;
  /** the chunks, or how to get them when first needed (a restore need not touch RAM) */
  chunks: ArrayBuffer[] | (() => ArrayBuffer[]);
  chunkSize: number;
  /** VMM-side dirty bitmap, one bit per page; omitted = writes are not tracked. */
  dirtyBitmap?: Uint8Array;
  /**
   * Where the backing may hold non-zero bytes, as [start, end, ...] offsets (the memfd's data,
   * its holes read as zero); undefined when unknown. Omitted = anywhere.
   */
  dataRanges?: () => number[] | undefined;
  /** a file the region is a shared mapping of, from its offset 0: bulk writes go through it */
  backingFd?: number;
}

export class GuestMemoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GuestMemoryError';
  }
}

export class GuestRegion {
  readonly guestAddress: GuestAddress;
  readonly size: number;
  private chunkViews?: Uint8Array[];
  private readonly chunkSource: ArrayBuffer[] | (() => ArrayBuffer[]);
  private readonly chunkSize: number;
  private readonly dirty?: Uint8Array;
  private readonly dataRangesOf?: () => number[] | undefined;
  private readonly backingFd?: number;

  constructor(init: GuestRegionInit) {
    this.guestAddress = init.guestAddress;
    this.size = init.size;
    this.chunkSource = init.chunks;
    this.chunkSize = init.chunkSize;
    this.dirty = init.dirtyBitmap;
    this.dataRangesOf = init.dataRanges;
    this.backingFd = init.backingFd;
  }

  /**
   * Page-aligned [start, end) offsets outside which the region is known to be all zero, in
   * order: a scan for non-zero pages reads only these (reading an untouched memfd page would
   * allocate it). The whole region when the backing cannot tell.
   */
  populatedRanges(): [number, number][] {
    const flat = this.dataRangesOf?.();
    if (!flat) return [[0, this.size]];
    const out: [number, number][] = [];
    for (let i = 0; i + 1 < flat.length; i += 2) {
      const start = Math.floor(flat[i] / PAGE_SIZE) * PAGE_SIZE;
      const end = Math.min(this.size, Math.ceil(flat[i + 1] / PAGE_SIZE) * PAGE_SIZE);
      if (end <= start) continue;
      const last = out[out.length - 1];
      if (last && start <= last[1]) last[1] = Math.max(last[1], end);
      else out.push([start, end]);
    }
    return out;
  }

  private get chunks(): Uint8Array[] {
    if (!this.chunkViews) {
      const buffers = typeof this.chunkSource === 'function' ? this.chunkSource() : this.chunkSource;
      this.chunkViews = buffers.map((b) => new Uint8Array(b));
    }
    return this.chunkViews;
  }

  get end(): GuestAddress {
    return this.guestAddress + this.size;
  }

  contains(addr: GuestAddress, len = 1): boolean {
    return addr >= this.guestAddress && addr + len <= this.end;
  }

  /** Call `fn` for each chunk-local piece of [offset, offset+len), in order. */
  private forEachSpan(offset: number, len: number, fn: (chunk: Uint8Array, start: number, n: number, done: number) => void): void {
    let done = 0;
    while (done < len) {
      const off = offset + done;
      const c = Math.floor(off / this.chunkSize);
      const inChunk = off - c * this.chunkSize;
      const n = Math.min(len - done, this.chunkSize - inChunk);
      fn(this.chunks[c], inChunk, n, done);
      done += n;
    }
  }

  /** Copy out of the region; crosses chunk boundaries. */
  read(offset: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    this.forEachSpan(offset, len, (chunk, start, n, done) => out.set(chunk.subarray(start, start + n), done));
    return out;
  }

  write(offset: number, data: Uint8Array): void {
    this.forEachSpan(offset, data.length, (chunk, start, n, done) => chunk.set(data.subarray(done, done + n), start));
    this.markDirty(offset, data.length);
  }

  /**
   * write() for bulk data, such as all of RAM arriving in a migration: through the backing file
   * (pwrite) when there is one, so the kernel fills the pages without a page fault for each.
   */
  writeBulk(offset: number, data: Uint8Array): void {
    if (this.backingFd === undefined) return this.write(offset, data);
    if (offset < 0 || offset + data.length > this.size) throw new GuestMemoryError(`bulk write 0x${offset.toString(16)}+${data.length} outside the region`);
    for (let done = 0; done < data.length; ) {
      const n = fs.writeSync(this.backingFd, data, done, data.length - done, offset + done);
      if (n <= 0) throw new GuestMemoryError(`short write into guest RAM at 0x${(offset + done).toString(16)}`);
      done += n;
    }
    this.markDirty(offset, data.length);
  }

  /**
   * writeBulk() of several spans of `data` at once, `runs` being [offset in data, length, offset
   * in the region] triples: through the backing file as one task on libuv's thread pool, so
   * the JavaScript thread goes on meanwhile (a migration destination reads the next frame).
   * `data` must not change until the promise settles; the caller orders overlapping writes.
   */
  async writeBulkRuns(data: Uint8Array, runs: Float64Array): Promise<void> {
    let total = 0;
    for (let i = 0; i + 2 < runs.length; i += 3) {
      const [from, len, at] = [runs[i], runs[i + 1], runs[i + 2]];
      if (from < 0 || len < 0 || from + len > data.length || at < 0 || at + len > this.size) {
        throw new GuestMemoryError(`bulk write 0x${at.toString(16)}+${len} outside the region or its data`);
      }
      total += len;
    }
    if (this.backingFd === undefined) {
      for (let i = 0; i + 2 < runs.length; i += 3) this.write(runs[i + 2], data.subarray(runs[i], runs[i] + runs[i + 1]));
      return;
    }
    for (let i = 0; i + 2 < runs.length; i += 3) this.markDirty(runs[i + 2], runs[i + 1]);
    const written = await native().pwriteRuns(this.backingFd, data, runs);
    if (written !== total) throw new GuestMemoryError(`short write into guest RAM (${written} of ${total} bytes)`);
  }

  fill(offset: number, len: number, value = 0): void {
    this.forEachSpan(offset, len, (chunk, start, n) => chunk.fill(value, start, start + n));
    this.markDirty(offset, len);
  }

  /**
   * A zero-copy view of [offset, offset+len) when it lies inside one chunk, else undefined.
   * Writers through a view must call markDirty themselves.
   */
  view(offset: number, len: number): Uint8Array | undefined {
    const c = Math.floor(offset / this.chunkSize);
    const inChunk = offset - c * this.chunkSize;
    if (inChunk + len > this.chunkSize) return undefined;
    return this.chunks[c].subarray(inChunk, inChunk + len);
  }

  /** Atomically: native queue workers mark bits of the same bytes from their threads. */
  markDirty(offset: number, len: number): void {
    if (!this.dirty || len <= 0) return;
    const first = Math.floor(offset / PAGE_SIZE);
    const last = Math.floor((offset + len - 1) / PAGE_SIZE);
    for (let p = first; p <= last; p++) Atomics.or(this.dirty, p >> 3, 1 << (p & 7));
  }

  /** The region's host mapping and dirty bitmap, for a native worker that reads and writes it. */
  hostRange(): { guestAddress: GuestAddress; chunks: ArrayBuffer[]; dirty?: Uint8Array } {
    return { guestAddress: this.guestAddress, chunks: this.chunks.map((c) => c.buffer as ArrayBuffer), ...(this.dirty ? { dirty: this.dirty } : {}) };
  }
}

export class GuestMemory {
  readonly regions: GuestRegion[];

  constructor(regions: GuestRegion[]) {
    this.regions = [...regions].sort((a, b) => a.guestAddress - b.guestAddress);
  }

  /** Total bytes of RAM. */
  get size(): number {
    return this.regions.reduce((n, r) => n + r.size, 0);
  }

  regionFor(addr: GuestAddress, len = 1): GuestRegion {
    for (const r of this.regions) if (r.contains(addr, len)) return r;
    throw new GuestMemoryError(
      `guest range 0x${addr.toString(16)}+0x${len.toString(16)} is not inside guest RAM`,
    );
  }

  read(addr: GuestAddress, len: number): Uint8Array {
    const r = this.regionFor(addr, len);
    return r.read(addr - r.guestAddress, len);
  }

  write(addr: GuestAddress, data: Uint8Array): void {
    const r = this.regionFor(addr, data.length);
    r.write(addr - r.guestAddress, data);
  }

  fill(addr: GuestAddress, len: number, value = 0): void {
    const r = this.regionFor(addr, len);
    r.fill(addr - r.guestAddress, len, value);
  }

  readU8(addr: GuestAddress): number {
    return this.read(addr, 1)[0];
  }
  readU16(addr: GuestAddress): number {
    const b = this.read(addr, 2);
    return b[0] | (b[1] << 8);
  }
  readU32(addr: GuestAddress): number {
    const b = this.read(addr, 4);
    return new DataView(b.buffer).getUint32(0, true);
  }
  readU64(addr: GuestAddress): bigint {
    const b = this.read(addr, 8);
    return new DataView(b.buffer).getBigUint64(0, true);
  }
  writeU8(addr: GuestAddress, v: number): void {
    this.write(addr, Uint8Array.of(v & 0xff));
  }
  writeU16(addr: GuestAddress, v: number): void {
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, v, true);
    this.write(addr, b);
  }
  writeU32(addr: GuestAddress, v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v >>> 0, true);
    this.write(addr, b);
  }
  writeU64(addr: GuestAddress, v: bigint | number): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
    this.write(addr, b);
  }
}

/** Guest memory over plain ArrayBuffers, for code that builds guest images without KVM. */
export function anonymousGuestMemory(layout: { guestAddress: GuestAddress; size: number }[]): GuestMemory {
  return new GuestMemory(
    layout.map(
      (l) =>
        new GuestRegion({
          guestAddress: l.guestAddress,
          size: l.size,
          chunks: [new ArrayBuffer(l.size)],
          chunkSize: l.size,
          dirtyBitmap: new Uint8Array(Math.ceil(l.size / PAGE_SIZE / 8)),
        }),
    ),
  );
}
