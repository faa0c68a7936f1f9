// Snapshot directories: the three files Cloud Hypervisor writes (config.json, state.json,
// memory-ranges), holding a paused VM's store state and guest RAM. The destination directory
// may exist (empty, as after Cloud Hypervisor's `mkdir -p D`) or is created 0700. Each file is
// written under a temporary name inside it, fsynced, and renamed into place without replacing
// anything (renameat2 RENAME_NOREPLACE), state.json last: a directory without state.json is
// never a snapshot a restore accepts. The temporary files are flock()ed while written, so the
// next snapshot into the same directory can tell the leftovers of a killed writer (removed)
// from a writer still at work (refused).
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
// Integrity (snapshot format 2): state.json's `memory` records the SHA-256 of the whole header
// (range table included) and one SHA-256 per range over its non-zero pages (see RangeHasher).
// Every restore checks the header's; a copy restore checks each range's as it reads it. An
// ondemand restore maps the file and does not read it, so it checks the header only: checking
// the ranges would mean reading all of guest RAM up front, which is what ondemand avoids. With
// prefault it touches every page anyway, and then checks the ranges too.
// Format-1 snapshots (older builds) carry no memory checksums and are accepted without them.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkVmConfig } from '../api/request-body';
import type { VmConfig } from '../config/vm-config';
import type { GuestMemory } from '../memory/guest-memory';
import { native } from '../native/kvm';
import {
  TernStateError,
  rootSchemaVersionOf,
  upgradeState,
  validateState,
  vmConfigProblems,
  type RootState,
} from '../state';
import { HostFileError, openRegularFile, parseJsonFile, readRegularFile } from '../util/host-file';
import { canonicalJson } from './canonical-json';
import { checkSavedConfig, checkSavedState } from './saved-vm';

export { canonicalJson };

export const SNAPSHOT_CONFIG_FILE = 'config.json';
export const SNAPSHOT_STATE_FILE = 'state.json';
export const SNAPSHOT_MEMORY_FILE = 'memory-ranges';
/** 2: state.json records memory checksums; 1: it does not (still read) */
export const SNAPSHOT_FORMAT_VERSION = 2;
const OLDEST_SNAPSHOT_FORMAT = 1;

/** caps on what a restore reads into memory before checking it */
export const MAX_CONFIG_BYTES = 1 << 20;
export const MAX_STATE_BYTES = 64 << 20;
/** JSON nesting the reader accepts (the API's limit; a real state is far shallower) */
const MAX_JSON_DEPTH = 128;

const MEM_MAGIC = 'TERNMEMR';
const MEM_FORMAT_VERSION = 1;
const PAGE = 4096;
const HEADER_FIXED = 32;
const RANGE_ENTRY = 24;
const MAX_RANGES = 1024;
/** bytes copied per write/read call */
const IO_BLOCK = 1 << 20;
const PARTIAL = '.partial-';

export class SnapshotError extends TernStateError {
  constructor(message: string) {
    super('SnapshotFailed', message);
  }
}

export interface MemoryRange {
  guestAddress: number;
  length: number;
  fileOffset: number;
}

/** state.json's record of memory-ranges (format 2). */
export interface MemoryChecksums {
  /** "sha256:<hex>" of the memory file's header, range table included */
  header: string;
  /** one per range, in table order (RangeHasher) */
  ranges: string[];
}

/** The state.json envelope. */
export interface SnapshotStateFile {
  tern_snapshot_version: number;
  schema_version: number;
  /** "sha256:<hex>" of canonicalJson(state) */
  checksum: string;
  /** absent in format 1 */
  memory?: MemoryChecksums;
  state: unknown;
}

/** A file:// URL as a local absolute path. */
export function snapshotDirFromUrl(url: unknown, what: string): string {
  if (typeof url !== 'string' || !url) throw new SnapshotError(`${what} must be a file:// URL`);
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new SnapshotError(`${what} '${url}' is not a URL`);
  }
  if (u.protocol !== 'file:') throw new SnapshotError(`${what} '${url}': only file:// URLs are supported`);
  const p = path.resolve(fileURLToPath(u));
  if (p === path.parse(p).root) throw new SnapshotError(`${what} '${url}' names the root directory`);
  return p;
}

const sha256 = (data: crypto.BinaryLike): string => `sha256:${crypto.createHash('sha256').update(data).digest('hex')}`;

export function stateChecksum(state: unknown): string {
  return sha256(canonicalJson(state));
}

/**
 * SHA-256 of one range's non-zero pages, fed in increasing page order: each maximal run of
 * non-zero pages hashes as [u64 first page][its bytes][u64 page after it]. Zero pages are not
 * hashed, so it does not matter whether one is stored as a hole or as zeros, and a reader that
 * visits only the file's data extents computes the same value as the writer that saw them all.
 */
export class RangeHasher {
  private readonly hash = crypto.createHash('sha256');
  /** the page after the open run, or -1 */
  private runEnd = -1;

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
    return `sha256:${this.hash.digest('hex')}`;
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

/** pwrite(2) as fs.writeSync: bytes written, which may be fewer than asked. */
export type PositionalWrite = (fd: number, buffer: Uint8Array, offset: number, length: number, position: number) => number;

const defaultWrite: PositionalWrite = (fd, buffer, offset, length, position) => fs.writeSync(fd, buffer, offset, length, position);

/** Write all `length` bytes or throw: a short write (a full disk) never passes silently. */
function writeWhole(write: PositionalWrite, fd: number, file: string, buffer: Uint8Array, offset: number, length: number, position: number): void {
  for (let done = 0; done < length;) {
    const n = write(fd, buffer, offset + done, length - done, position + done);
    if (!(n > 0)) throw new SnapshotError(`${file}: short write, ${done} of ${length} bytes at offset ${position} (is the disk full?)`);
    done += n;
  }
}

/** Write guest RAM; returns the bytes of data written (non-zero pages) and the checksums. */
function writeMemoryFile(fd: number, file: string, memory: GuestMemory, write: PositionalWrite): { written: number; checksums: MemoryChecksums } {
  const { ranges, fileLength } = planMemoryRanges(memory.regions);
  const header = encodeHeader(ranges, fileLength);
  writeWhole(write, fd, file, header, 0, header.length, 0);
  const addon = native();
  let written = 0;
  const rangeSums = memory.regions.map((region, i) => {
    const base = ranges[i].fileOffset;
    const hasher = new RangeHasher();
    for (let off = 0; off < region.size; off += IO_BLOCK) {
      const len = Math.min(IO_BLOCK, region.size - off);
      const block = region.view(off, len) ?? region.read(off, len);
      const zero = addon.zeroPages(block);
      hasher.feed(off / PAGE, block, zero);
      // Runs of non-zero pages are written; zero pages are skipped, leaving holes.
      let run = -1;
      for (let p = 0; p <= zero.length; p++) {
        const isZero = p === zero.length || zero[p] === 1;
        if (!isZero && run < 0) run = p;
        if (isZero && run >= 0) {
          const start = run * PAGE;
          const end = Math.min(p * PAGE, len);
          writeWhole(write, fd, file, block, start, end - start, base + off + start);
          written += end - start;
          run = -1;
        }
      }
    }
    return hasher.digest();
  });
  fs.ftruncateSync(fd, fileLength);
  return { written, checksums: { header: sha256(header), ranges: rangeSums } };
}

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

const SNAPSHOT_FILES = [SNAPSHOT_CONFIG_FILE, SNAPSHOT_MEMORY_FILE, SNAPSHOT_STATE_FILE];

/** The snapshot file a temporary name belongs to, if it is one of ours. */
function partialOf(entry: string): string | undefined {
  return SNAPSHOT_FILES.find((f) => entry.startsWith(`.${f}${PARTIAL}`));
}

/**
 * Builds before this one wrote a snapshot as a directory `.NAME.partial-XXXXXX` beside its
 * destination and renamed it; a VMM killed meanwhile left it there with a full copy of guest
 * RAM. Remove those of `dir`: nothing writes them any more, so none can be in use.
 */
function removeOldPartialDirs(dir: string): void {
  const parent = path.dirname(dir);
  const prefix = `.${path.basename(dir)}${PARTIAL}`;
  for (const e of fs.readdirSync(parent, { withFileTypes: true })) {
    if (!e.isDirectory() || !e.name.startsWith(prefix) || e.name.length !== prefix.length + 6) continue;
    const old = path.join(parent, e.name);
    // Only what such a directory ever held: the snapshot files.
    if (fs.readdirSync(old).every((f) => SNAPSHOT_FILES.includes(f))) fs.rmSync(old, { recursive: true });
  }
}

/**
 * Make `dir` ready to receive a snapshot: create it (0700) if missing; else it must be a
 * directory holding no snapshot and nothing but the leftovers of an interrupted snapshot
 * (unlocked temporary files; config.json or memory-ranges without state.json), which are
 * removed. Returns whether it was created.
 */
function prepareDestination(dir: string): boolean {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    const parent = path.dirname(dir);
    if (!fs.existsSync(parent)) throw new SnapshotError(`snapshot destination's parent ${parent} does not exist`);
    fs.mkdirSync(dir, { mode: 0o700 });
    return true;
  }
  if (!st.isDirectory()) throw new SnapshotError(`snapshot destination ${dir} already exists and is not a directory`);
  const entries = fs.readdirSync(dir);
  if (entries.includes(SNAPSHOT_STATE_FILE)) throw new SnapshotError(`snapshot destination ${dir} already exists and holds a snapshot`);
  const foreign = entries.filter((e) => e !== SNAPSHOT_CONFIG_FILE && e !== SNAPSHOT_MEMORY_FILE && partialOf(e) === undefined);
  if (foreign.length) throw new SnapshotError(`snapshot destination ${dir} is not empty (it holds ${foreign.length} other entries)`);
  const stale: string[] = [];
  for (const e of entries) {
    const file = path.join(dir, e);
    if (partialOf(e) === undefined) {
      stale.push(file);
      continue;
    }
    // A writer holds its temporary files locked until it is done; the lock dies with it.
    const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    try {
      if (!native().flock(fd, { nonblocking: true })) throw new SnapshotError(`snapshot destination ${dir}: another snapshot is being written into it`);
    } finally {
      fs.closeSync(fd);
    }
    stale.push(file);
  }
  for (const file of stale) fs.unlinkSync(file);
  return false;
}

export interface WriteSnapshotInput {
  dir: string;
  config: VmConfig;
  state: RootState;
  memory: GuestMemory;
  /** the positional write used for every file (default fs.writeSync); tests inject short writes */
  write?: PositionalWrite;
}

interface PartialFile {
  name: string;
  tmp: string;
  fd: number;
  renamed: boolean;
}

/**
 * Write a complete snapshot into `dir`: a missing directory is created, an existing one must
 * hold no snapshot. On failure no snapshot file and no temporary file of this attempt is left.
 */
export function writeSnapshot(input: WriteSnapshotInput): { memoryBytes: number } {
  const { dir } = input;
  const write = input.write ?? defaultWrite;
  const files: PartialFile[] = [];
  let created = false;
  const open = (name: string): PartialFile => {
    const tmp = path.join(dir, `.${name}${PARTIAL}${crypto.randomBytes(6).toString('hex')}`);
    const { O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
    const f = { name, tmp, fd: fs.openSync(tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600), renamed: false };
    files.push(f);
    native().flock(f.fd);
    return f;
  };
  const writeText = (name: string, text: string): void => {
    const f = open(name);
    const b = Buffer.from(text);
    writeWhole(write, f.fd, name, b, 0, b.length, 0);
    fs.fsyncSync(f.fd);
  };
  try {
    created = prepareDestination(dir);
    removeOldPartialDirs(dir);
    writeText(SNAPSHOT_CONFIG_FILE, `${JSON.stringify(input.config, null, 2)}\n`);
    const mem = open(SNAPSHOT_MEMORY_FILE);
    const { written, checksums } = writeMemoryFile(mem.fd, SNAPSHOT_MEMORY_FILE, input.memory, write);
    fs.fsyncSync(mem.fd);
    const envelope: SnapshotStateFile = {
      tern_snapshot_version: SNAPSHOT_FORMAT_VERSION,
      schema_version: input.state.schemaVersion,
      checksum: stateChecksum(input.state),
      memory: checksums,
      state: input.state,
    };
    writeText(SNAPSHOT_STATE_FILE, `${JSON.stringify(envelope)}\n`);
    // state.json last: until it is in place the directory is no snapshot.
    for (const f of files) {
      native().renameNoReplace(f.tmp, path.join(dir, f.name));
      f.renamed = true;
    }
    fsyncDir(dir);
    if (created) fsyncDir(path.dirname(dir));
    return { memoryBytes: written };
  } catch (e) {
    for (const f of files) fs.rmSync(f.renamed ? path.join(dir, f.name) : f.tmp, { force: true });
    if (created) fs.rmSync(dir, { recursive: true, force: true });
    if (e instanceof SnapshotError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw new SnapshotError(`snapshot destination ${dir}: another snapshot was written into it meanwhile`);
    throw new SnapshotError(`cannot write snapshot ${dir}: ${(e as Error).message}`);
  } finally {
    for (const f of files) fs.closeSync(f.fd);
  }
}

export interface LoadedSnapshot {
  dir: string;
  config: VmConfig;
  /** upgraded to this build's schema and validated */
  state: RootState;
  /** the schema version state.json was written with */
  storedSchemaVersion: number;
  memoryPath: string;
  ranges: MemoryRange[];
  /** per-range checksums (format 2); undefined for a format-1 snapshot */
  rangeChecksums?: string[];
}

/** Read and parse a snapshot JSON file: regular, not a symlink, capped; errors never quote it. */
function readJson(file: string, maxBytes: number): unknown {
  try {
    return parseJsonFile(readRegularFile(file, maxBytes), file, MAX_JSON_DEPTH);
  } catch (e) {
    if (e instanceof HostFileError) throw new SnapshotError(e.message);
    throw e;
  }
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
      throw new SnapshotError(`${file}: its header and range table fail the checksum recorded in ${SNAPSHOT_STATE_FILE}`);
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

/** Where a range's bytes go: a view of `len` bytes at `offset` inside the range. */
export interface RangeTarget {
  view(offset: number, len: number): Uint8Array | undefined;
}

/**
 * Copy one range of an open memory-ranges file into `target`, reading only the file's data
 * extents (lseek SEEK_DATA/SEEK_HOLE): holes are zero pages, and fresh guest RAM is already
 * zero, so they cost neither a read nor resident memory. With `checksum` (format 2) the bytes
 * read are hashed as they arrive and a mismatch is refused, naming the range.
 */
export function copyMemoryRange(file: string, fd: number, range: MemoryRange, index: number, target: RangeTarget, checksum?: string): void {
  const addon = native();
  const hasher = checksum === undefined ? undefined : new RangeHasher();
  const end = range.fileOffset + range.length;
  const where = `range ${index} (guest 0x${range.guestAddress.toString(16)})`;
  for (let pos = range.fileOffset; pos < end;) {
    const found = addon.seekData(fd, pos);
    if (found < 0 || found >= end) break;
    // Extents of a file system with blocks smaller than a page: widen to whole pages.
    const data = Math.max(range.fileOffset, found - (found % PAGE));
    const hole = Math.min(Math.ceil(addon.seekHole(fd, found) / PAGE) * PAGE, end);
    for (let p = data; p < hole;) {
      const off = p - range.fileOffset;
      // Blocks never cross a 1 MiB boundary, so never a RAM chunk's either.
      const len = Math.min(IO_BLOCK - (off % IO_BLOCK), hole - p);
      const view = target.view(off, len);
      if (!view) throw new SnapshotError(`${file}: ${where} does not fit the guest RAM it is restored into`);
      for (let done = 0; done < len;) {
        const got = fs.readSync(fd, view, done, len - done, p + done);
        if (got === 0) throw new SnapshotError(`${file}: ends at ${p + done}, inside ${where}`);
        done += got;
      }
      hasher?.feed(off / PAGE, view, addon.zeroPages(view));
      p += len;
    }
    pos = hole;
  }
  if (hasher && hasher.digest() !== checksum) {
    throw new SnapshotError(`${file}: ${where} fails the checksum recorded in ${SNAPSHOT_STATE_FILE} (truncated or altered)`);
  }
}

/**
 * Check a range already in guest RAM against its checksum, reading every page of it: for an
 * ondemand restore with prefault, which touches every page anyway.
 */
export function verifyRangeInRam(file: string, range: MemoryRange, index: number, target: RangeTarget, checksum: string): void {
  const addon = native();
  const hasher = new RangeHasher();
  for (let off = 0; off < range.length; off += IO_BLOCK) {
    const len = Math.min(IO_BLOCK, range.length - off);
    const view = target.view(off, len);
    if (!view) throw new SnapshotError(`${file}: range ${index} does not fit the guest RAM it is restored into`);
    hasher.feed(off / PAGE, view, addon.zeroPages(view));
  }
  if (hasher.digest() !== checksum) {
    throw new SnapshotError(`${file}: range ${index} (guest 0x${range.guestAddress.toString(16)}) fails the checksum recorded in ${SNAPSHOT_STATE_FILE} (truncated or altered)`);
  }
}

function isChecksum(v: unknown): v is string {
  return typeof v === 'string' && /^sha256:[0-9a-f]{64}$/.test(v);
}

/** Read, verify and upgrade a snapshot directory. Throws SnapshotError naming the file and fault. */
export function readSnapshot(dir: string): LoadedSnapshot {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new SnapshotError(`snapshot ${dir}: no such directory`);
  const stateFile = path.join(dir, SNAPSHOT_STATE_FILE);
  const configFile = path.join(dir, SNAPSHOT_CONFIG_FILE);
  const rawConfig = readJson(configFile, MAX_CONFIG_BYTES);
  const snapshotError = (m: string) => new SnapshotError(m);
  const config = checkSavedConfig(rawConfig, configFile, snapshotError);

  const env = readJson(stateFile, MAX_STATE_BYTES) as SnapshotStateFile;
  if (typeof env !== 'object' || env === null || Array.isArray(env) || typeof env.state !== 'object' || env.state === null) {
    throw new SnapshotError(`${stateFile}: no state object`);
  }
  const format = env.tern_snapshot_version;
  if (!Number.isInteger(format) || format < OLDEST_SNAPSHOT_FORMAT || format > SNAPSHOT_FORMAT_VERSION) {
    throw new SnapshotError(`${stateFile}: snapshot format ${String(format)} is not one this build reads (${OLDEST_SNAPSHOT_FORMAT}..${SNAPSHOT_FORMAT_VERSION})`);
  }
  if (typeof env.checksum !== 'string') throw new SnapshotError(`${stateFile}: no checksum`);
  const actual = stateChecksum(env.state);
  if (actual !== env.checksum) throw new SnapshotError(`${stateFile}: checksum mismatch (the state does not hash to the recorded checksum)`);
  // Format 1 had no memory checksums; from format 2 on they are required.
  let memorySums: MemoryChecksums | undefined;
  if (format >= 2) {
    const m = env.memory;
    if (typeof m !== 'object' || m === null || !isChecksum(m.header) || !Array.isArray(m.ranges) || !m.ranges.every(isChecksum)) {
      throw new SnapshotError(`${stateFile}: no valid memory checksums`);
    }
    memorySums = m;
  }
  const { state, storedSchemaVersion: stored } = checkSavedState(
    env.state,
    { config, statuses: ['Paused'], where: stateFile, configWhere: configFile, stateName: SNAPSHOT_STATE_FILE, declaredSchema: env.schema_version },
    snapshotError,
  );

  const memoryPath = path.join(dir, SNAPSHOT_MEMORY_FILE);
  const ranges = readMemoryRanges(memoryPath, memorySums?.header);
  if (memorySums && memorySums.ranges.length !== ranges.length) {
    throw new SnapshotError(`${stateFile}: records ${memorySums.ranges.length} range checksums for the ${ranges.length} ranges of ${SNAPSHOT_MEMORY_FILE}`);
  }
  const total = ranges.reduce((n, r) => n + r.length, 0);
  // A sparse file can declare any amount of RAM for the price of a few blocks; a VM larger than
  // the host cannot be restored, and trying would exhaust host memory setting it up.
  if (total > os.totalmem()) {
    throw new SnapshotError(`${memoryPath}: declares ${total} bytes of RAM, more than this host's ${os.totalmem()}`);
  }
  const size = config.memory?.size;
  if (size !== undefined && size !== total) {
    throw new SnapshotError(`${memoryPath}: holds ${total} bytes of RAM but ${SNAPSHOT_CONFIG_FILE} says memory.size=${size}`);
  }
  const layout = state.memory.regions;
  if (layout.length !== ranges.length || layout.some((l, i) => l.guestAddress !== ranges[i].guestAddress || l.size !== ranges[i].length)) {
    throw new SnapshotError(`${memoryPath}: its ranges do not match the RAM regions recorded in the saved state`);
  }
  return { dir, config, state, storedSchemaVersion: stored, memoryPath, ranges, rangeChecksums: memorySums?.ranges };
}
