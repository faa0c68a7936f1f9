// qcow2 refcounts: the refcount table (held in memory, at most 8 MiB), refcount blocks (a few
// cached), and cluster allocation at the end of the file. Every change is written through at
// once, and a refcount is always on disk before anything that points to its cluster, so a
// crash at any moment leaves at worst clusters counted but unused (leaks), never a cluster in
// use with no count. Called only from inside the image's serial queue.
import { DiskImageError } from './disk-image';
import { MAX_REFCOUNT_TABLE_BYTES, Qcow2DamageError, type Qcow2Header } from './qcow2-header';
import { readAt, writeAt, type ImageFile } from './image-file';

const OFFSET_MASK = 0xfffffffffffffe00n;
const BLOCK_CACHE = 16;

export class Qcow2Refcounts {
  private readonly clusterSize: number;
  private readonly entryBytes: number;
  /** Refcount entries in one block. */
  private readonly perBlock: number;
  private table: number[] = [];
  tableOffset: number;
  tableClusters: number;
  private readonly blocks = new Map<number, Buffer>();
  /** Index of the first cluster past everything allocated: where the next allocation goes. */
  nextFree: number;

  constructor(
    private readonly file: ImageFile,
    header: Qcow2Header,
  ) {
    this.clusterSize = 2 ** header.clusterBits;
    this.entryBytes = 2 ** header.refcountOrder / 8;
    this.perBlock = this.clusterSize / this.entryBytes;
    this.tableOffset = header.refcountTableOffset;
    this.tableClusters = header.refcountTableClusters;
    this.nextFree = Math.ceil(file.size / this.clusterSize);
  }

  private corrupt(what: string): DiskImageError {
    return new Qcow2DamageError(this.file.path, what);
  }

  async load(): Promise<void> {
    const raw = Buffer.alloc(this.tableClusters * this.clusterSize);
    await readAt(this.file, raw, this.tableOffset);
    this.table = [];
    for (let i = 0; i < raw.length / 8; i++) {
      const e = raw.readBigUInt64BE(i * 8);
      const off = Number(e & OFFSET_MASK);
      if (off % this.clusterSize !== 0) throw this.corrupt(`refcount table entry ${i} (${off}) is not cluster-aligned`);
      if (off + this.clusterSize > this.nextFree * this.clusterSize) throw this.corrupt(`refcount table entry ${i} points past the end of the file`);
      this.table.push(off);
    }
  }

  private async block(index: number): Promise<Buffer | undefined> {
    const off = this.table[index] ?? 0;
    if (off === 0) return undefined;
    let b = this.blocks.get(off);
    if (b) {
      this.blocks.delete(off);
    } else {
      b = Buffer.alloc(this.clusterSize);
      await readAt(this.file, b, off);
      if (this.blocks.size >= BLOCK_CACHE) this.blocks.delete(this.blocks.keys().next().value as number);
    }
    this.blocks.set(off, b);
    return b;
  }

  private readEntry(b: Buffer, i: number): number {
    const at = i * this.entryBytes;
    switch (this.entryBytes) {
      case 1: return b[at];
      case 2: return b.readUInt16BE(at);
      case 4: return b.readUInt32BE(at);
      default: {
        const v = b.readBigUInt64BE(at);
        if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw this.corrupt('a refcount is beyond 2^53');
        return Number(v);
      }
    }
  }

  private writeEntry(b: Buffer, i: number, v: number): void {
    const at = i * this.entryBytes;
    const max = this.entryBytes >= 8 ? Number.MAX_SAFE_INTEGER : 2 ** (this.entryBytes * 8) - 1;
    if (v > max) throw new DiskImageError(`qcow2 image ${this.file.path}: refcount overflow`);
    switch (this.entryBytes) {
      case 1: b[at] = v; break;
      case 2: b.writeUInt16BE(v, at); break;
      case 4: b.writeUInt32BE(v, at); break;
      default: b.writeBigUInt64BE(BigInt(v), at);
    }
  }

  async get(cluster: number): Promise<number> {
    const b = await this.block(Math.floor(cluster / this.perBlock));
    return b ? this.readEntry(b, cluster % this.perBlock) : 0;
  }

  /** Set one refcount and write its bytes. */
  async set(cluster: number, value: number): Promise<void> {
    const index = Math.floor(cluster / this.perBlock);
    await this.ensureBlock(index);
    const b = (await this.block(index))!;
    const i = cluster % this.perBlock;
    this.writeEntry(b, i, value);
    await writeAt(this.file, b.subarray(i * this.entryBytes, (i + 1) * this.entryBytes), this.table[index] + i * this.entryBytes);
  }

  async decrement(cluster: number): Promise<number> {
    const v = await this.get(cluster);
    if (v === 0) throw this.corrupt(`cluster ${cluster} is in use with a refcount of 0`);
    await this.set(cluster, v - 1);
    return v - 1;
  }

  /** Allocate one cluster past the end of everything allocated; its refcount (1) is on disk when this returns. */
  async allocate(): Promise<number> {
    for (;;) {
      const c = this.nextFree++;
      if ((await this.get(c)) !== 0) continue; // counted already (a damaged image): never hand it out twice
      await this.set(c, 1);
      return c * this.clusterSize;
    }
  }

  /** Make sure refcount block `index` exists: allocated, counted, and in the table. */
  private async ensureBlock(index: number): Promise<void> {
    if (index >= this.table.length) await this.growTable(index + 1);
    if (this.table[index] !== 0) return;
    const at = this.nextFree++;
    const b = Buffer.alloc(this.clusterSize);
    const own = Math.floor(at / this.perBlock) === index;
    if (own) this.writeEntry(b, at % this.perBlock, 1); // the block counts itself
    await writeAt(this.file, b, at * this.clusterSize);
    if (!own) await this.set(at, 1);
    await this.setTableEntry(index, at * this.clusterSize);
    this.blocks.set(at * this.clusterSize, b);
  }

  private async setTableEntry(index: number, off: number): Promise<void> {
    this.table[index] = off;
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(BigInt(off));
    await writeAt(this.file, e, this.tableOffset + index * 8);
  }

  /**
   * Move the refcount table to a larger place at the end of the file. The new table, and the
   * refcount blocks that count it and themselves, are written before the header points to
   * them; the old table's clusters are freed after.
   */
  private async growTable(minEntries: number): Promise<void> {
    const perCluster = this.clusterSize / 8;
    let entries = Math.ceil(Math.max(minEntries, this.table.length * 2) / perCluster) * perCluster;
    if (entries * 8 > MAX_REFCOUNT_TABLE_BYTES) throw new DiskImageError(`qcow2 image ${this.file.path}: the refcount table would pass ${MAX_REFCOUNT_TABLE_BYTES} bytes`);
    const start = this.nextFree;
    let tableClusters: number;
    let newBlocks: number[] = [];
    for (;;) {
      tableClusters = (entries * 8) / this.clusterSize;
      const end = start + tableClusters + newBlocks.length;
      const needed: number[] = [];
      for (let r = Math.floor(start / this.perBlock); r <= Math.floor((end - 1) / this.perBlock); r++) {
        if (!this.table[r]) needed.push(r);
      }
      if (needed.length === newBlocks.length) break;
      newBlocks = needed;
      const last = needed[needed.length - 1] + 1;
      if (last > entries) entries = Math.ceil(last / perCluster) * perCluster;
    }
    const end = start + tableClusters + newBlocks.length;
    const table = [...this.table];
    while (table.length < entries) table.push(0);
    newBlocks.forEach((r, k) => (table[r] = (start + tableClusters + k) * this.clusterSize));
    // Count every cluster of [start, end) in the blocks that cover it, new ones and old.
    for (let r = Math.floor(start / this.perBlock); r <= Math.floor((end - 1) / this.perBlock); r++) {
      const isNew = newBlocks.includes(r);
      const b = isNew ? Buffer.alloc(this.clusterSize) : (await this.block(r))!;
      for (let c = Math.max(start, r * this.perBlock); c < Math.min(end, (r + 1) * this.perBlock); c++) this.writeEntry(b, c % this.perBlock, 1);
      await writeAt(this.file, b, table[r]);
      this.blocks.set(table[r], b);
    }
    const t = Buffer.alloc(entries * 8);
    table.forEach((off, i) => t.writeBigUInt64BE(BigInt(off), i * 8));
    await writeAt(this.file, t, start * this.clusterSize);
    const header = Buffer.alloc(12);
    header.writeBigUInt64BE(BigInt(start * this.clusterSize), 0);
    header.writeUInt32BE(tableClusters, 8);
    await writeAt(this.file, header, 48); // refcount_table_offset and refcount_table_clusters in one write
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = table;
    this.tableOffset = start * this.clusterSize;
    this.tableClusters = tableClusters;
    this.nextFree = end;
    for (let c = 0; c < oldClusters; c++) await this.decrement(oldOffset / this.clusterSize + c);
  }
}
