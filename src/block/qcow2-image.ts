// A qcow2 image (versions 2 and 3): guest clusters map through the L1 table and L2 tables to
// host clusters. Unallocated clusters read from the backing image or as zeroes; writes
// allocate clusters at the end of the file. Metadata goes to disk in dependency order, data
// first, then the refcount, then the L2 entry, then the L1 entry, so a crash leaves at worst
// leaked clusters. Every lookup and every metadata change runs in one serial queue; data
// reads happen outside it.
import zlib from 'node:zlib';
import { native } from '../native/kvm';
import { InFlight } from './in-flight';
import { checkRange, DiskImageError, type DiskImage } from './disk-image';
import { closeImageFile, lockImageFile, unlockImageFile, readAt, syncFile, writeAt, type ImageFile } from './image-file';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, Qcow2DamageError, type Qcow2Header } from './qcow2-header';
import { Qcow2Refcounts } from './qcow2-refcounts';
import { SerialQueue } from './serial-queue';

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
const ZERO = 1n;
const OFFSET_MASK = 0x00fffffffffffe00n;
/** Bytes of L2 tables kept in memory. */
const L2_CACHE_BYTES = 4 << 20;

type Mapping =
  | { kind: 'data'; host: number; entry: bigint }
  | { kind: 'zero'; entry: bigint }
  | { kind: 'unallocated' }
  | { kind: 'compressed'; entry: bigint };

export class Qcow2Image implements DiskImage {
  readonly format = 'qcow2';
  readonly size: number;
  readonly readonly: boolean;
  readonly id: string;
  private readonly clusterSize: number;
  private readonly l2Entries: number;
  private readonly l1: BigUint64Array;
  private readonly l2Cache = new Map<number, BigUint64Array>();
  private readonly l2CacheMax: number;
  private readonly refcounts: Qcow2Refcounts;
  private readonly queue = new SerialQueue();
  private closed = false;
  /** Damage was found: no more writes. */
  private markedCorrupt = false;
  private readonly inFlight = new InFlight();

  private constructor(
    private readonly file: ImageFile,
    private readonly header: Qcow2Header,
    private readonly backing: DiskImage | undefined,
    l1Raw: Buffer,
  ) {
    this.size = header.size;
    this.readonly = file.readonly;
    this.id = file.id;
    this.clusterSize = 2 ** header.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l2CacheMax = Math.max(4, Math.floor(L2_CACHE_BYTES / this.clusterSize));
    this.l1 = new BigUint64Array(header.l1Size);
    for (let i = 0; i < header.l1Size; i++) this.l1[i] = l1Raw.readBigUInt64BE(i * 8);
    this.refcounts = new Qcow2Refcounts(file, header);
  }

  /** Open over a checked header; `backing` (already open, read-only) is closed with this image. */
  static async open(file: ImageFile, header: Qcow2Header, backing: DiskImage | undefined): Promise<Qcow2Image> {
    const refuse = (why: string) => new DiskImageError(`qcow2 image ${file.path}: ${why}`);
    if (!file.readonly) {
      if (header.incompatibleFeatures & INCOMPAT_CORRUPT) throw refuse('is marked corrupt; it can only be opened read-only (qemu-img check -r all repairs it)');
      if (header.incompatibleFeatures & INCOMPAT_DIRTY) throw refuse('is marked dirty (its refcounts need repair); open it read-only or run qemu-img check -r all');
      if (header.nbSnapshots > 0) throw refuse('has internal snapshots; it can only be opened read-only');
    }
    const l1Raw = Buffer.alloc(header.l1Size * 8);
    await readAt(file, l1Raw, header.l1TableOffset);
    const img = new Qcow2Image(file, header, backing, l1Raw);
    if (!file.readonly) {
      await img.refcounts.load();
      // Autoclear features (bitmaps) are kept in step only by writers that know them: clear them.
      if (header.version === 3 && header.autoclearFeatures !== 0n) await writeAt(file, new Uint8Array(8), 88);
    }
    return img;
  }

  private corrupt(what: string): DiskImageError {
    return new Qcow2DamageError(this.file.path, what);
  }

  /**
   * Run a task in the queue. Damage found while the image is open for writing marks a v3 image
   * corrupt on disk (as QEMU does) and stops writes to it, so it is not made worse before
   * `qemu-img check -r` has looked at it.
   */
  private serialized<T>(task: () => Promise<T>): Promise<T> {
    return this.queue.run(async () => {
      try {
        return await task();
      } catch (e) {
        if (e instanceof Qcow2DamageError && !this.readonly && !this.markedCorrupt) {
          this.markedCorrupt = true;
          if (this.header.version === 3) {
            const bits = Buffer.alloc(8);
            bits.writeBigUInt64BE(this.header.incompatibleFeatures | INCOMPAT_CORRUPT);
            await writeAt(this.file, bits, 72);
            await syncFile(this.file);
          }
        }
        throw e;
      }
    });
  }

  private get fileEnd(): number {
    return Math.max(this.file.size, this.refcounts.nextFree * this.clusterSize);
  }

  private l2Offset(l1Index: number): number {
    const off = Number(this.l1[l1Index] & OFFSET_MASK);
    if (off % this.clusterSize !== 0) throw this.corrupt(`L1 entry ${l1Index} is not cluster-aligned`);
    if (off + this.clusterSize > this.fileEnd) throw this.corrupt(`L1 entry ${l1Index} points past the end of the file`);
    return off;
  }

  private async l2Table(off: number): Promise<BigUint64Array> {
    let t = this.l2Cache.get(off);
    if (t) {
      this.l2Cache.delete(off);
    } else {
      const raw = Buffer.alloc(this.clusterSize);
      await readAt(this.file, raw, off);
      t = new BigUint64Array(this.l2Entries);
      for (let i = 0; i < this.l2Entries; i++) t[i] = raw.readBigUInt64BE(i * 8);
      if (this.l2Cache.size >= this.l2CacheMax) this.l2Cache.delete(this.l2Cache.keys().next().value as number);
    }
    this.l2Cache.set(off, t);
    return t;
  }

  /** Where guest cluster `vc` lives. Runs inside the queue. */
  private async lookup(vc: number): Promise<Mapping> {
    const l1Index = Math.floor(vc / this.l2Entries);
    const l2Off = this.l2Offset(l1Index);
    if (l2Off === 0) return { kind: 'unallocated' };
    const entry = (await this.l2Table(l2Off))[vc % this.l2Entries];
    if (entry & COMPRESSED) return { kind: 'compressed', entry };
    const host = Number(entry & OFFSET_MASK);
    if (this.header.version === 3 && entry & ZERO) return { kind: 'zero', entry };
    if (host === 0) return { kind: 'unallocated' };
    if (host % this.clusterSize !== 0) throw this.corrupt(`the L2 entry of guest cluster ${vc} is not cluster-aligned`);
    if (host >= this.fileEnd) throw this.corrupt(`the L2 entry of guest cluster ${vc} points past the end of the file`);
    return { kind: 'data', host, entry };
  }

  private check(offset: number, length: number, writing: boolean): void {
    if (this.closed) throw new DiskImageError(`disk image ${this.file.path}: closed`);
    checkRange(this.size, offset, length, writing, this.readonly);
    if (writing && this.markedCorrupt) throw new DiskImageError(`qcow2 image ${this.file.path}: found damaged; no more writes until it is repaired`);
  }

  /** The pieces of [offset, offset+length) cut at cluster boundaries. */
  private *pieces(offset: number, length: number): Generator<{ vc: number; inCluster: number; at: number; len: number }> {
    for (let at = 0; at < length;) {
      const pos = offset + at;
      const inCluster = pos % this.clusterSize;
      const len = Math.min(this.clusterSize - inCluster, length - at);
      yield { vc: Math.floor(pos / this.clusterSize), inCluster, at, len };
      at += len;
    }
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    return this.inFlight.track(this.readNow(offset, into));
  }

  private async readNow(offset: number, into: Uint8Array): Promise<void> {
    this.check(offset, into.length, false);
    const plan = await this.serialized(async () => {
      const out: { piece: { vc: number; inCluster: number; at: number; len: number }; m: Mapping }[] = [];
      for (const piece of this.pieces(offset, into.length)) out.push({ piece, m: await this.lookup(piece.vc) });
      return out;
    });
    // Clusters are never reused once freed: a read racing a write or discard of the same range
    // gets old data or zeroes (as overlapping requests may), never another cluster's data.
    for (const { piece, m } of plan) {
      const dst = into.subarray(piece.at, piece.at + piece.len);
      const guestPos = piece.vc * this.clusterSize + piece.inCluster;
      if (m.kind === 'data') await readAt(this.file, dst, m.host + piece.inCluster, true);
      else if (m.kind === 'zero') dst.fill(0);
      else if (m.kind === 'unallocated') await this.readBacking(guestPos, dst);
      else dst.set((await this.decompress(m.entry)).subarray(piece.inCluster, piece.inCluster + piece.len));
    }
  }

  private async readBacking(pos: number, dst: Uint8Array): Promise<void> {
    const inBacking = this.backing ? Math.max(0, Math.min(dst.length, this.backing.size - pos)) : 0;
    if (inBacking > 0) await this.backing!.read(pos, dst.subarray(0, inBacking));
    dst.fill(0, inBacking);
  }

  private compressedExtent(entry: bigint): { offset: number; length: number } {
    const shift = 62 - (this.header.clusterBits - 8);
    const offset = Number(entry & ((1n << BigInt(shift)) - 1n));
    const sectors = Number((entry >> BigInt(shift)) & ((1n << BigInt(this.header.clusterBits - 8)) - 1n)) + 1;
    const length = Math.min(sectors * 512 - (offset % 512), this.fileEnd - offset);
    if (length <= 0) throw this.corrupt('a compressed cluster lies past the end of the file');
    return { offset, length };
  }

  private async decompress(entry: bigint): Promise<Buffer> {
    const { offset, length } = this.compressedExtent(entry);
    const raw = Buffer.alloc(length);
    await readAt(this.file, raw, offset, true);
    let out: Buffer;
    try {
      out = zlib.inflateRawSync(raw, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize });
    } catch {
      throw this.corrupt(`the compressed cluster at ${offset} does not inflate to one cluster`);
    }
    if (out.length !== this.clusterSize) throw this.corrupt(`the compressed cluster at ${offset} inflates to ${out.length} bytes, not ${this.clusterSize}`);
    return out;
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.inFlight.track(this.writeNow(offset, data));
  }

  private async writeNow(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length, true);
    await this.serialized(async () => {
      for (const p of this.pieces(offset, data.length)) await this.writePiece(p.vc, p.inCluster, data.subarray(p.at, p.at + p.len));
    });
  }

  /** Whether a data cluster may be written in place: counted once (no snapshot shares it). */
  private async writable(m: { host: number; entry: bigint }): Promise<boolean> {
    if (m.entry & COPIED) return true;
    return (await this.refcounts.get(m.host / this.clusterSize)) === 1;
  }

  /**
   * A damaged or hostile image may point guest data at its own header or tables: writing there
   * would let the guest rewrite the image's metadata, so it is refused.
   */
  private checkNotMetadata(host: number, vc: number): void {
    const overlaps = (start: number, bytes: number) => host < start + bytes && start < host + this.clusterSize;
    const rc = this.refcounts;
    if (overlaps(0, this.clusterSize) || overlaps(this.header.l1TableOffset, this.header.l1Size * 8) || overlaps(rc.tableOffset, rc.tableClusters * this.clusterSize)) {
      throw this.corrupt(`guest cluster ${vc} points into the image's header or tables`);
    }
  }

  private async writePiece(vc: number, inCluster: number, data: Uint8Array): Promise<void> {
    const m = await this.lookup(vc);
    if (m.kind === 'data') this.checkNotMetadata(m.host, vc);
    if (m.kind === 'data' && (await this.writable(m))) {
      await writeAt(this.file, data, m.host + inCluster);
      return;
    }
    if (m.kind === 'data') throw new DiskImageError(`qcow2 image ${this.file.path}: guest cluster ${vc} is shared; writing shared clusters is not supported`);
    // A new cluster: the whole of it is written (the rest from what the guest saw before), then
    // pointed to; the old compressed data is freed last.
    const cluster = Buffer.alloc(this.clusterSize);
    if (data.length < this.clusterSize) {
      if (m.kind === 'unallocated') await this.readBacking(vc * this.clusterSize, cluster);
      else if (m.kind === 'compressed') (await this.decompress(m.entry)).copy(cluster);
    }
    cluster.set(data, inCluster);
    const host = await this.refcounts.allocate();
    await writeAt(this.file, cluster, host);
    await this.setL2Entry(vc, BigInt(host) | COPIED);
    if (m.kind === 'compressed' || m.kind === 'zero') await this.free(m.entry);
  }

  /** Point guest cluster `vc` at `entry`, allocating its L2 table if it has none. */
  private async setL2Entry(vc: number, entry: bigint): Promise<void> {
    const l1Index = Math.floor(vc / this.l2Entries);
    const i = vc % this.l2Entries;
    let l2Off = this.l2Offset(l1Index);
    if (l2Off !== 0 && !(this.l1[l1Index] & COPIED) && (await this.refcounts.get(l2Off / this.clusterSize)) !== 1) {
      throw new DiskImageError(`qcow2 image ${this.file.path}: an L2 table is shared; writing shared tables is not supported`);
    }
    if (l2Off === 0) {
      l2Off = await this.refcounts.allocate();
      const table = new BigUint64Array(this.l2Entries);
      table[i] = entry;
      const raw = Buffer.alloc(this.clusterSize);
      raw.writeBigUInt64BE(entry, i * 8);
      await writeAt(this.file, raw, l2Off);
      this.l2Cache.set(l2Off, table);
      const e = Buffer.alloc(8);
      this.l1[l1Index] = BigInt(l2Off) | COPIED;
      e.writeBigUInt64BE(this.l1[l1Index]);
      await writeAt(this.file, e, this.header.l1TableOffset + l1Index * 8);
      return;
    }
    const table = await this.l2Table(l2Off);
    table[i] = entry;
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(entry);
    await writeAt(this.file, e, l2Off + i * 8);
  }

  /** Drop the host clusters an old L2 entry held (after nothing points to them any more). */
  private async free(entry: bigint): Promise<void> {
    if (entry & COMPRESSED) {
      const { offset, length } = this.compressedExtent(entry);
      const first = Math.floor(offset / this.clusterSize);
      const last = Math.floor((offset + length - 1) / this.clusterSize);
      for (let c = first; c <= last; c++) await this.releaseCluster(c);
      return;
    }
    const host = Number(entry & OFFSET_MASK);
    if (host !== 0) await this.releaseCluster(host / this.clusterSize);
  }

  private async releaseCluster(c: number): Promise<void> {
    // A freed cluster's space goes back to the file system; it is never handed out again by
    // this image (allocation appends), so readers planned before the free still read old data.
    if ((await this.refcounts.decrement(c)) === 0) native().fallocate(this.file.fd, 'punch-hole', c * this.clusterSize, this.clusterSize);
  }

  flush(): Promise<void> {
    return this.inFlight.track(this.flushNow());
  }

  private async flushNow(): Promise<void> {
    if (this.readonly) return;
    await this.serialized(() => syncFile(this.file));
  }

  /**
   * Whole clusters in the range stop taking space: they read as zeroes afterwards (v3's zero
   * flag when a backing file would show through, else unallocated). Version 2 images with a
   * backing file cannot express a zero cluster, so discard leaves them as they are; partial
   * clusters are left as they are too (discard is a hint).
   */
  discard(offset: number, length: number): Promise<void> {
    return this.inFlight.track(this.discardNow(offset, length));
  }

  private async discardNow(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    if (this.header.version === 2 && this.backing) return;
    await this.serialized(async () => {
      for (const p of this.pieces(offset, length)) if (p.len === this.clusterSize) await this.zeroCluster(p.vc);
    });
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.inFlight.track(this.writeZeroesNow(offset, length));
  }

  private async writeZeroesNow(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    const canZero = this.header.version === 3 || !this.backing;
    await this.serialized(async () => {
      for (const p of this.pieces(offset, length)) {
        if (p.len === this.clusterSize && canZero) await this.zeroCluster(p.vc);
        else await this.writePiece(p.vc, p.inCluster, new Uint8Array(p.len));
      }
    });
  }

  private async zeroCluster(vc: number): Promise<void> {
    const m = await this.lookup(vc);
    const entry = this.backing ? ZERO : 0n;
    if (m.kind === 'unallocated' && entry === 0n) return;
    if (m.kind === 'zero' && !(m.entry & OFFSET_MASK)) return;
    await this.setL2Entry(vc, entry);
    if (m.kind !== 'unallocated') await this.free(m.entry);
  }

  releaseLock(): void {
    unlockImageFile(this.file);
  }

  takeLock(): void {
    lockImageFile(this.file);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.inFlight.settled();
    closeImageFile(this.file);
    await this.backing?.close();
  }
}
