// memory-ranges: guest RAM in one sparse file, as a snapshot keeps it and a restore reads or
// maps it. This module owns the format; snapshot.ts owns the directory around it.
//
// memory-ranges layout (little-endian):
//   header, padded to a whole number of 4 KiB pages:
//     0  magic "TERNMEMR"       8  u32 format version (1)   12 u32 page size (4096)
//     16 u32 range count        20 u32 header bytes          24 u64 file length
//     32 range table, 24 bytes each: u64 guest address, u64 length, u64 file offset
//   then each range's bytes at its page-aligned file offset, in table order. All-zero pages
//   are never written (holes read as zeros), so the file is sparse and a MAP_PRIVATE mapping
//   of [offset, offset+length) is the range's exact contents.
//
// Integrity: state.json's `memory` records the SHA-256 of the whole header (range table
// included) and one checksum per range over its non-zero pages (see RangeHasher): XXH64 from
// snapshot format 3 on, SHA-256 in format 2. The range checksums guard against truncation and
// damage, not forgery (whoever can rewrite memory-ranges can rewrite state.json beside it), so
// a checksum the writer computes faster than the disk takes the bytes does the job; SHA-256
// held a snapshot to a third of the disk's speed.
// Every restore checks the header's; a copy restore checks each range's as it reads it. An
// ondemand restore maps the file and does not read it, so it checks the header only: checking
// the ranges would mean reading all of guest RAM up front, which is what ondemand avoids. With
// prefault it touches every page anyway, and then checks the ranges too.
// Format-1 snapshots (older builds) carry no memory checksums and are accepted without them.
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { GuestMemory } from '../memory/guest-memory';
import { native } from '../native/kvm';
import { HostFileError, openRegularFile } from '../util/host-file';
import { SnapshotError } from './snapshot-error';

/** the file that records the memory checksums, for error messages */
const STATE_FILE = 'state.json';

const MEM_MAGIC = 'TERNMEMR';
const MEM_FORMAT_VERSION = 1;
const PAGE = 4096;
const HEADER_FIXED = 32;
const RANGE_ENTRY = 24;
const MAX_RANGES = 1024;
/** bytes copied per write/read call */
export const IO_BLOCK = 1 << 20;

export interface MemoryRange {
  guestAddress: number;
  length: number;
  fileOffset: number;
}

/** state.json's record of memory-ranges (formats 2 and 3). */
export interface MemoryChecksums {
  /** "sha256:<hex>" of the memory file's header, range table included */
  header: string;
  /** one per range, in table order (RangeHasher): "xxh64:<16 hex>" (format 3), "sha256:<hex>" (format 2) */
  ranges: string[];
}

/** How a range checksum is computed, named by its prefix. */
export type RangeChecksumKind = 'xxh64' | 'sha256';

/** the range checksum this build writes */
export const RANGE_CHECKSUM: RangeChecksumKind = 'xxh64';

/** The kind of range checksum a snapshot of `format` (2 or later) records. */
export function rangeChecksumKindOf(format: number): RangeChecksumKind {
  return format === 2 ? 'sha256' : RANGE_CHECKSUM;
}

const CHECKSUM_FORMS: Record<RangeChecksumKind, RegExp> = { xxh64: /^xxh64:[0-9a-f]{16}$/, sha256: /^sha256:[0-9a-f]{64}$/ };

/** Whether `v` is a well-formed checksum of `kind` ("kind:hex"). */
export function isChecksum(v: unknown, kind: RangeChecksumKind): v is string {
  return typeof v === 'string' && CHECKSUM_FORMS[kind].test(v);
}

/** Incremental digest behind a range checksum. */
interface Digest {
  update(data: Uint8Array): void;
  digest(): string;
}

function xxh64Digest(): Digest {
  const addon = native();
  const state = addon.xxh64Init();
  return {
    update: (data) => addon.xxh64Update(state, data),
    digest: () => `xxh64:${addon.xxh64Digest(state)}`,
  };
}

function sha256Digest(): Digest {
  const hash = crypto.createHash('sha256');
  return {
    update: (data) => {
      hash.update(data);
    },
    digest: () => `sha256:${hash.digest('hex')}`,
  };
}

export const sha256 = (data: crypto.BinaryLike): string => `sha256:${crypto.createHash('sha256').update(data).digest('hex')}`;


/**
 * The checksum of one range's non-zero pages, fed in increasing page order: each maximal run of
 * non-zero pages hashes as [u64 first page][its bytes][u64 page after it]. Zero pages are not
 * hashed, so it does not matter whether one is stored as a hole or as zeros, and a reader that
 * visits only the file's data extents computes the same value as the writer that saw them all.
 */
export class RangeHasher {
  private readonly hash: Digest;
  /** the page after the open run, or -1 */
  private runEnd = -1;

  constructor(kind: RangeChecksumKind = RANGE_CHECKSUM) {
    this.hash = kind === 'xxh64' ? xxh64Digest() : sha256Digest();
  }

  /** A hasher of the kind `checksum` (a recorded range checksum) was made with. */
  static matching(checksum: string): RangeHasher {
    return new RangeHasher(checksum.startsWith('sha256:') ? 'sha256' : 'xxh64');
  }

  private marker(page: number): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(page));
    this.hash.update(b);
  }

  private close(): void {
    if (this.runEnd >= 0) this.marker(this.runEnd);
    this.runEnd = -1;
  }

  /** `block` starts at page `firstPage` of the range; zero[i] is 1 where its page i is all zero. */
  feed(firstPage: number, block: Uint8Array, zero: Uint8Array): void {
    let pending = -1; // first page in block of bytes not yet hashed
    const flush = (to: number) => {
      if (pending >= 0) this.hash.update(block.subarray(pending * PAGE, Math.min(to * PAGE, block.length)));
      pending = -1;
    };
    for (let p = 0; p < zero.length; p++) {
      const page = firstPage + p;
      if (zero[p] === 1) {
        flush(p);
        this.close();
        continue;
      }
      if (this.runEnd !== page) {
        flush(p);
        this.close();
        this.marker(page);
      }
      if (pending < 0) pending = p;
      this.runEnd = page + 1;
    }
    flush(zero.length);
  }

  digest(): string {
    this.close();
    return this.hash.digest();
  }
}

function headerBytes(ranges: number): number {
  return Math.ceil((HEADER_FIXED + RANGE_ENTRY * ranges) / PAGE) * PAGE;
}

/** Lay out the regions of `memory` in a memory-ranges file. */
export function planMemoryRanges(regions: readonly { guestAddress: number; size: number }[]): { ranges: MemoryRange[]; fileLength: number } {
  let offset = headerBytes(regions.length);
  const ranges = regions.map((r) => {
    const range = { guestAddress: r.guestAddress, length: r.size, fileOffset: offset };
    offset += Math.ceil(r.size / PAGE) * PAGE;
    return range;
  });
  return { ranges, fileLength: offset };
}

function encodeHeader(ranges: readonly MemoryRange[], fileLength: number): Buffer {
  const b = Buffer.alloc(headerBytes(ranges.length));
  b.write(MEM_MAGIC, 0, 'latin1');
  b.writeUInt32LE(MEM_FORMAT_VERSION, 8);
  b.writeUInt32LE(PAGE, 12);
  b.writeUInt32LE(ranges.length, 16);
  b.writeUInt32LE(b.length, 20);
  b.writeBigUInt64LE(BigInt(fileLength), 24);
  ranges.forEach((r, i) => {
    const at = HEADER_FIXED + i * RANGE_ENTRY;
    b.writeBigUInt64LE(BigInt(r.guestAddress), at);
    b.writeBigUInt64LE(BigInt(r.length), at + 8);
    b.writeBigUInt64LE(BigInt(r.fileOffset), at + 16);
  });
  return b;
}

/** pwrite(2): the bytes written, which may be fewer than asked; synchronous or not. */
export type PositionalWrite = (fd: number, buffer: Uint8Array, offset: number, length: number, position: number) => number | Promise<number>;

/** pwrite(2) on libuv's thread pool. */
export const defaultWrite: PositionalWrite = (fd, buffer, offset, length, position) =>
  new Promise((resolve, reject) => fs.write(fd, buffer, offset, length, position, (e, n) => (e ? reject(e) : resolve(n))));

/** Write all `length` bytes or throw: a short write (a full disk) never passes silently. */
export async function writeWhole(write: PositionalWrite, fd: number, file: string, buffer: Uint8Array, offset: number, length: number, position: number): Promise<void> {
  for (let done = 0; done < length;) {
    const n = await write(fd, buffer, offset + done, length - done, position + done);
    if (!(n > 0)) throw new SnapshotError(`${file}: short write, ${done} of ${length} bytes at offset ${position} (is the disk full?)`);
    done += n;
  }
}

/**
 * Guest RAM goes to the file a chunk at a time: each chunk's runs of non-zero pages are one
 * task on libuv's thread pool, which writes them while this thread checksums the chunk. (A
 * task per run or per 1 MiB cost a hand-off between threads each, which on the lab's emulated
 * CPU made the snapshot 0.6-0.8 of a plain write's speed.)
 */
const WRITE_CHUNK = 16 << 20;

/** Chunks whose writes may be in flight: the disk is never idle, and a failure stops it soon. */
const CHUNKS_IN_FLIGHT = 3;

/**
 * Write guest RAM; returns the bytes of data written (non-zero pages) and the checksums. The
 * writes of a chunk go to the thread pool while this thread checksums it, so the snapshot runs
 * at the disk's speed rather than at the disk's and the checksum's added together. It returns
 * (or throws) only when no write of it is still running. `write` replaces the pool's pwrite
 * (tests inject short writes and crashes with it). `meanwhile` runs once every chunk is queued,
 * while the last ones are written: this thread has nothing else to do then.
 */
export async function writeMemoryFile(
  fd: number,
  file: string,
  memory: GuestMemory,
  write?: PositionalWrite,
  meanwhile?: () => Promise<void>,
): Promise<{ written: number; extents: number; checksums: MemoryChecksums }> {
  const { ranges, fileLength } = planMemoryRanges(memory.regions);
  const header = encodeHeader(ranges, fileLength);
  await writeWhole(write ?? defaultWrite, fd, file, header, 0, header.length, 0);
  const addon = native();
  /** Write runs ([offset in block, length, file position] triples) of `block`, all or throw. */
  const writeRuns = async (block: Uint8Array, runs: number[]): Promise<void> => {
    if (write) {
      for (let i = 0; i < runs.length; i += 3) await writeWhole(write, fd, file, block, runs[i], runs[i + 1], runs[i + 2]);
      return;
    }
    let total = 0;
    for (let i = 1; i < runs.length; i += 3) total += runs[i];
    // Queued at once: the native side runs one chunk's task at a time and starts the next as
    // soon as one ends. (Chaining them here made each wait for this thread to finish
    // checksumming before it was even queued: 0.46 of a plain write's speed on a real CPU,
    // against 0.67 queued at once; README, Benchmarks.)
    const n = await addon.pwriteRuns(fd, block, Float64Array.from(runs));
    if (n < total) throw new SnapshotError(`${file}: short write, ${n} of ${total} bytes (is the disk full?)`);
  };
  let written = 0;
  let extents = 0;
  // Each chunk's writes, settled: the first failure is kept and thrown once nothing runs.
  const inFlight: Promise<void>[] = [];
  let failure: { error: unknown } | undefined;
  const settled = (p: Promise<unknown>): Promise<void> =>
    p.then(
      () => undefined,
      (error) => {
        failure ??= { error };
      },
    );
  const rangeSums: string[] = [];
  try {
    for (const [i, region] of memory.regions.entries()) {
      const base = ranges[i].fileOffset;
      const hasher = new RangeHasher();
      // Pages the guest never touched are holes in its memfd: not read (that would allocate
      // them), not hashed (zero pages never are), left as holes in the file.
      for (const [from, to] of region.populatedRanges()) {
        for (let off = from; off < to && !failure; off += WRITE_CHUNK) {
          const len = Math.min(WRITE_CHUNK, to - off);
          const block = region.view(off, len) ?? region.read(off, len);
          const zero = addon.zeroPages(block);
          // Runs of non-zero pages are written; zero pages are skipped, leaving holes.
          const runs: number[] = [];
          let run = -1;
          for (let p = 0; p <= zero.length; p++) {
            const isZero = p === zero.length || zero[p] === 1;
            if (!isZero && run < 0) run = p;
            if (isZero && run >= 0) {
              const start = run * PAGE;
              const end = Math.min(p * PAGE, len);
              runs.push(start, end - start, base + off + start);
              written += end - start;
              extents++;
              run = -1;
            }
          }
          if (runs.length) inFlight.push(settled(writeRuns(block, runs)));
          hasher.feed(off / PAGE, block, zero);
          if (inFlight.length >= CHUNKS_IN_FLIGHT) await inFlight.shift();
        }
      }
      rangeSums.push(hasher.digest());
    }
    if (!failure) await meanwhile?.();
  } finally {
    await Promise.all(inFlight);
  }
  if (failure) throw failure.error;
  fs.ftruncateSync(fd, fileLength);
  return { written, extents, checksums: { header: sha256(header), ranges: rangeSums } };
}

/** Open memory-ranges for reading: regular file, not a symlink (fd and size). */
export function openMemoryFile(file: string): { fd: number; size: number } {
  try {
    return openRegularFile(file);
  } catch (e) {
    if (e instanceof HostFileError) throw new SnapshotError(e.message);
    throw e;
  }
}

/**
 * Read and check a memory-ranges file's header and table against the file's real size, and
 * against `headerChecksum` when the snapshot recorded one.
 */
export function readMemoryRanges(file: string, headerChecksum?: string): MemoryRange[] {
  const { fd, size } = openMemoryFile(file);
  try {
    const fixed = Buffer.alloc(HEADER_FIXED);
    if (fs.readSync(fd, fixed, 0, HEADER_FIXED, 0) < HEADER_FIXED) {
      throw new SnapshotError(`${file}: truncated header (${size} bytes)`);
    }
    if (fixed.toString('latin1', 0, 8) !== MEM_MAGIC) throw new SnapshotError(`${file}: not a memory-ranges file (bad magic)`);
    const version = fixed.readUInt32LE(8);
    if (version !== MEM_FORMAT_VERSION) throw new SnapshotError(`${file}: format version ${version} is not the supported ${MEM_FORMAT_VERSION}`);
    if (fixed.readUInt32LE(12) !== PAGE) throw new SnapshotError(`${file}: page size ${fixed.readUInt32LE(12)} is not ${PAGE}`);
    const count = fixed.readUInt32LE(16);
    const hdr = fixed.readUInt32LE(20);
    if (count === 0 || count > MAX_RANGES || hdr !== headerBytes(count)) throw new SnapshotError(`${file}: corrupt range table header (${count} ranges, ${hdr} header bytes)`);
    const declared = Number(fixed.readBigUInt64LE(24));
    const header = Buffer.alloc(hdr);
    if (fs.readSync(fd, header, 0, hdr, 0) < hdr) throw new SnapshotError(`${file}: truncated range table`);
    if (headerChecksum !== undefined && sha256(header) !== headerChecksum) {
      throw new SnapshotError(`${file}: its header and range table fail the checksum recorded in ${STATE_FILE}`);
    }
    const table = header.subarray(HEADER_FIXED);
    const ranges: MemoryRange[] = [];
    let end = hdr;
    for (let i = 0; i < count; i++) {
      const r = {
        guestAddress: Number(table.readBigUInt64LE(i * RANGE_ENTRY)),
        length: Number(table.readBigUInt64LE(i * RANGE_ENTRY + 8)),
        fileOffset: Number(table.readBigUInt64LE(i * RANGE_ENTRY + 16)),
      };
      const safe = Number.isSafeInteger(r.guestAddress) && Number.isSafeInteger(r.length) && Number.isSafeInteger(r.fileOffset + r.length);
      if (!safe || r.guestAddress % PAGE || r.length % PAGE || r.fileOffset % PAGE || r.length === 0 || r.fileOffset < end) {
        throw new SnapshotError(`${file}: range ${i} is not page-aligned or overlaps the one before it`);
      }
      end = r.fileOffset + r.length;
      ranges.push(r);
    }
    if (declared !== end) throw new SnapshotError(`${file}: header says ${declared} bytes but its ranges end at ${end}`);
    if (size < end) throw new SnapshotError(`${file}: file is ${size} bytes, shorter than its range table needs (${end})`);
    return ranges;
  } finally {
    fs.closeSync(fd);
  }
}

/** Guest RAM a range is checked in: a view of `len` bytes at `offset` inside the range. */
export interface RangeTarget {
  view(offset: number, len: number): Uint8Array | undefined;
}

/**
 * Copy one range of an open memory-ranges file into `ramFd`, the file behind the guest RAM it
 * is restored into (a memfd, at the range's own offsets), reading only the file's data extents
 * (lseek SEEK_DATA/SEEK_HOLE): holes are zero pages, and fresh guest RAM is already zero, so
 * they cost neither a read nor resident memory. With `checksum` (format 2 on) the bytes read
 * are hashed as they arrive and a mismatch is refused, naming the range.
 *
 * The bytes go into the memfd by pwrite from one reused buffer, not by reading into the RAM
 * mapping: that would fault in and zero every page before copying into it (10-30% slower in
 * the lab).
 */
export function copyMemoryRange(file: string, fd: number, range: MemoryRange, index: number, ramFd: number, checksum?: string): void {
  const addon = native();
  const hasher = checksum === undefined ? undefined : RangeHasher.matching(checksum);
  const end = range.fileOffset + range.length;
  const where = `range ${index} (guest 0x${range.guestAddress.toString(16)})`;
  const buffer = Buffer.allocUnsafe(IO_BLOCK);
  for (let pos = range.fileOffset; pos < end;) {
    const found = addon.seekData(fd, pos);
    if (found < 0 || found >= end) break;
    // Extents of a file system with blocks smaller than a page: widen to whole pages.
    const data = Math.max(range.fileOffset, found - (found % PAGE));
    const hole = Math.min(Math.ceil(addon.seekHole(fd, found) / PAGE) * PAGE, end);
    for (let p = data; p < hole;) {
      const off = p - range.fileOffset;
      const len = Math.min(IO_BLOCK - (off % IO_BLOCK), hole - p);
      const block = buffer.subarray(0, len);
      for (let done = 0; done < len;) {
        const got = fs.readSync(fd, block, done, len - done, p + done);
        if (got === 0) throw new SnapshotError(`${file}: ends at ${p + done}, inside ${where}`);
        done += got;
      }
      hasher?.feed(off / PAGE, block, addon.zeroPages(block));
      for (let done = 0; done < len;) {
        const n = fs.writeSync(ramFd, block, done, len - done, off + done);
        if (!(n > 0)) throw new SnapshotError(`guest RAM of ${where}: short write at ${off + done}`);
        done += n;
      }
      p += len;
    }
    pos = hole;
  }
  if (hasher && hasher.digest() !== checksum) {
    throw new SnapshotError(`${file}: ${where} fails the checksum recorded in ${STATE_FILE} (truncated or altered)`);
  }
}

/**
 * Check a range already in guest RAM against its checksum, reading every page of it: for an
 * ondemand restore with prefault, which touches every page anyway.
 */
export function verifyRangeInRam(file: string, range: MemoryRange, index: number, target: RangeTarget, checksum: string): void {
  const addon = native();
  const hasher = RangeHasher.matching(checksum);
  for (let off = 0; off < range.length; off += IO_BLOCK) {
    const len = Math.min(IO_BLOCK, range.length - off);
    const view = target.view(off, len);
    if (!view) throw new SnapshotError(`${file}: range ${index} does not fit the guest RAM it is restored into`);
    hasher.feed(off / PAGE, view, addon.zeroPages(view));
  }
  if (hasher.digest() !== checksum) {
    throw new SnapshotError(`${file}: range ${index} (guest 0x${range.guestAddress.toString(16)}) fails the checksum recorded in ${STATE_FILE} (truncated or altered)`);
  }
}

