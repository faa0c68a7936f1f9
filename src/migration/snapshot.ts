// Snapshot directories: the three files Cloud Hypervisor writes (config.json, state.json,
// memory-ranges), holding a paused VM's store state and guest RAM. The directory is written
// under a temporary name next to its destination and renamed into place, so a destination
// either does not exist or is complete.
//
// memory-ranges layout (little-endian):
//   header, padded to a whole number of 4 KiB pages:
//     0  magic "TERNMEMR"       8  u32 format version (1)   12 u32 page size (4096)
//     16 u32 range count        20 u32 header bytes          24 u64 file length
//     32 range table, 24 bytes each: u64 guest address, u64 length, u64 file offset
//   then each range's bytes at its page-aligned file offset, in table order. All-zero pages
//   are never written (holes read as zeros), so the file is sparse and a MAP_PRIVATE mapping
//   of [offset, offset+length) is the range's exact contents.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { VmConfig } from '../config/vm-config';
import type { GuestMemory } from '../memory/guest-memory';
import { native } from '../native/kvm';
import {
  TernStateError,
  rootSchemaVersionOf,
  upgradeState,
  validateState,
  type RootState,
} from '../state';

export const SNAPSHOT_CONFIG_FILE = 'config.json';
export const SNAPSHOT_STATE_FILE = 'state.json';
export const SNAPSHOT_MEMORY_FILE = 'memory-ranges';
export const SNAPSHOT_FORMAT_VERSION = 1;

const MEM_MAGIC = 'TERNMEMR';
const MEM_FORMAT_VERSION = 1;
const PAGE = 4096;
const HEADER_FIXED = 32;
const RANGE_ENTRY = 24;
/** bytes copied per write/read call */
const IO_BLOCK = 1 << 20;

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

/** The state.json envelope. */
export interface SnapshotStateFile {
  tern_snapshot_version: number;
  schema_version: number;
  /** "sha256:<hex>" of canonicalJson(state) */
  checksum: string;
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

/** JSON with object keys sorted at every level: the same state always gives the same text. */
export function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (typeof v === 'object' && v !== null) {
    const o = v as Record<string, unknown>;
    return `{${Object.keys(o)
      .sort()
      .filter((k) => o[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

export function stateChecksum(state: unknown): string {
  return `sha256:${crypto.createHash('sha256').update(canonicalJson(state)).digest('hex')}`;
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

/** Write guest RAM; returns the bytes of data actually written (non-zero pages). */
function writeMemoryFile(fd: number, memory: GuestMemory): number {
  const { ranges, fileLength } = planMemoryRanges(memory.regions);
  fs.writeSync(fd, encodeHeader(ranges, fileLength), 0, undefined, 0);
  const addon = native();
  let written = 0;
  memory.regions.forEach((region, i) => {
    const base = ranges[i].fileOffset;
    for (let off = 0; off < region.size; off += IO_BLOCK) {
      const len = Math.min(IO_BLOCK, region.size - off);
      const block = region.view(off, len) ?? region.read(off, len);
      const zero = addon.zeroPages(block);
      // Runs of non-zero pages are written; zero pages are skipped, leaving holes.
      let run = -1;
      for (let p = 0; p <= zero.length; p++) {
        const isZero = p === zero.length || zero[p] === 1;
        if (!isZero && run < 0) run = p;
        if (isZero && run >= 0) {
          const start = run * PAGE;
          const end = Math.min(p * PAGE, len);
          fs.writeSync(fd, block, start, end - start, base + off + start);
          written += end - start;
          run = -1;
        }
      }
    }
  });
  fs.ftruncateSync(fd, fileLength);
  return written;
}

function writeFileSynced(dir: string, name: string, data: string | Buffer): void {
  const fd = fs.openSync(path.join(dir, name), 'wx', 0o600);
  try {
    fs.writeFileSync(fd, data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export interface WriteSnapshotInput {
  dir: string;
  config: VmConfig;
  state: RootState;
  memory: GuestMemory;
}

/** Write a complete snapshot directory at `dir`, which must not exist. */
export function writeSnapshot(input: WriteSnapshotInput): { memoryBytes: number } {
  const { dir } = input;
  const parent = path.dirname(dir);
  if (fs.existsSync(dir)) throw new SnapshotError(`snapshot destination ${dir} already exists`);
  if (!fs.existsSync(parent)) throw new SnapshotError(`snapshot destination's parent ${parent} does not exist`);
  const tmp = fs.mkdtempSync(path.join(parent, `.${path.basename(dir)}.partial-`));
  try {
    const envelope: SnapshotStateFile = {
      tern_snapshot_version: SNAPSHOT_FORMAT_VERSION,
      schema_version: input.state.schemaVersion,
      checksum: stateChecksum(input.state),
      state: input.state,
    };
    writeFileSynced(tmp, SNAPSHOT_CONFIG_FILE, `${JSON.stringify(input.config, null, 2)}\n`);
    writeFileSynced(tmp, SNAPSHOT_STATE_FILE, `${JSON.stringify(envelope)}\n`);
    const fd = fs.openSync(path.join(tmp, SNAPSHOT_MEMORY_FILE), 'wx', 0o600);
    let memoryBytes: number;
    try {
      memoryBytes = writeMemoryFile(fd, input.memory);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fsyncDir(tmp);
    // rename(2) would replace an empty directory created meanwhile: check once more.
    if (fs.existsSync(dir)) throw new SnapshotError(`snapshot destination ${dir} already exists`);
    fs.renameSync(tmp, dir);
    fsyncDir(parent);
    return { memoryBytes };
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    if (e instanceof SnapshotError) throw e;
    throw new SnapshotError(`cannot write snapshot ${dir}: ${(e as Error).message}`);
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
}

function readText(dir: string, name: string): string {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new SnapshotError(`${file}: ${code === 'ENOENT' ? 'missing' : `cannot be read (${code ?? (e as Error).message})`}`);
  }
}

function parseJsonFile(dir: string, name: string): unknown {
  const text = readText(dir, name);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new SnapshotError(`${path.join(dir, name)}: not valid JSON (${(e as Error).message})`);
  }
}

/** Read and check a memory-ranges file's header and table against the file's real size. */
export function readMemoryRanges(file: string): MemoryRange[] {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new SnapshotError(`${file}: ${code === 'ENOENT' ? 'missing' : `cannot be opened (${code})`}`);
  }
  try {
    const size = fs.fstatSync(fd).size;
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
    if (count === 0 || count > 1024 || hdr !== headerBytes(count)) throw new SnapshotError(`${file}: corrupt range table header (${count} ranges, ${hdr} header bytes)`);
    const declared = Number(fixed.readBigUInt64LE(24));
    const table = Buffer.alloc(count * RANGE_ENTRY);
    if (fs.readSync(fd, table, 0, table.length, HEADER_FIXED) < table.length) throw new SnapshotError(`${file}: truncated range table`);
    const ranges: MemoryRange[] = [];
    let end = hdr;
    for (let i = 0; i < count; i++) {
      const r = {
        guestAddress: Number(table.readBigUInt64LE(i * RANGE_ENTRY)),
        length: Number(table.readBigUInt64LE(i * RANGE_ENTRY + 8)),
        fileOffset: Number(table.readBigUInt64LE(i * RANGE_ENTRY + 16)),
      };
      if (r.guestAddress % PAGE || r.length % PAGE || r.fileOffset % PAGE || r.length === 0 || r.fileOffset < end) {
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

/** Read, verify and upgrade a snapshot directory. Throws SnapshotError naming the file and fault. */
export function readSnapshot(dir: string): LoadedSnapshot {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new SnapshotError(`snapshot ${dir}: no such directory`);
  const stateFile = path.join(dir, SNAPSHOT_STATE_FILE);
  const configFile = path.join(dir, SNAPSHOT_CONFIG_FILE);
  const config = parseJsonFile(dir, SNAPSHOT_CONFIG_FILE) as VmConfig;
  if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new SnapshotError(`${configFile}: not a VM config object`);

  const env = parseJsonFile(dir, SNAPSHOT_STATE_FILE) as SnapshotStateFile;
  if (typeof env !== 'object' || env === null || typeof env.state !== 'object' || env.state === null) {
    throw new SnapshotError(`${stateFile}: no state object`);
  }
  if (env.tern_snapshot_version !== SNAPSHOT_FORMAT_VERSION) {
    throw new SnapshotError(`${stateFile}: snapshot format ${String(env.tern_snapshot_version)} is not the supported ${SNAPSHOT_FORMAT_VERSION}`);
  }
  if (typeof env.checksum !== 'string') throw new SnapshotError(`${stateFile}: no checksum`);
  const actual = stateChecksum(env.state);
  if (actual !== env.checksum) throw new SnapshotError(`${stateFile}: checksum mismatch (file says ${env.checksum}, state hashes to ${actual})`);
  let stored: number;
  let state: RootState;
  try {
    stored = rootSchemaVersionOf(env.state);
    if (env.schema_version !== stored) throw new SnapshotError(`schema_version ${String(env.schema_version)} differs from the state's ${stored}`);
    const upgraded = upgradeState(env.state);
    validateState(upgraded);
    state = upgraded as RootState;
  } catch (e) {
    throw new SnapshotError(`${stateFile}: ${(e as Error).message}`);
  }
  if (state.vm.status !== 'Paused' || state.vm.config === null) {
    throw new SnapshotError(`${stateFile}: the VM in it is ${state.vm.status}, not Paused`);
  }
  if (canonicalJson(config) !== canonicalJson(state.vm.config)) {
    throw new SnapshotError(`${configFile}: contradicts the VM config recorded in ${SNAPSHOT_STATE_FILE}`);
  }

  const memoryPath = path.join(dir, SNAPSHOT_MEMORY_FILE);
  const ranges = readMemoryRanges(memoryPath);
  const total = ranges.reduce((n, r) => n + r.length, 0);
  const size = state.vm.config.memory?.size;
  if (size !== undefined && size !== total) {
    throw new SnapshotError(`${memoryPath}: holds ${total} bytes of RAM but ${SNAPSHOT_CONFIG_FILE} says memory.size=${size}`);
  }
  return { dir, config, state, storedSchemaVersion: stored, memoryPath, ranges };
}

