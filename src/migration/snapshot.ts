// Snapshot directories: the three files Cloud Hypervisor writes (config.json, state.json,
// memory-ranges), holding a paused VM's store state and guest RAM. The destination directory
// may exist (empty, as after Cloud Hypervisor's `mkdir -p D`) or is created 0700. Each file is
// written under a temporary name inside it, fsynced, and renamed into place without replacing
// anything (renameat2 RENAME_NOREPLACE), state.json last: a directory without state.json is
// never a snapshot a restore accepts. The temporary files are flock()ed while written, so the
// next snapshot into the same directory can tell the leftovers of a killed writer (removed)
// from a writer still at work (refused).
//
// The memory-ranges file itself (layout, checksums) is memory-ranges.ts.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { VmConfig } from '../config/vm-config';
import type { GuestMemory } from '../memory/guest-memory';
import { native } from '../native/kvm';
import type { RootState } from '../state';
import { HostFileError, parseJsonFile, readRegularFile } from '../util/host-file';
import { canonicalJson } from './canonical-json';
import {
  defaultWrite,
  isChecksum,
  rangeChecksumKindOf,
  readMemoryRanges,
  sha256,
  writeMemoryFile,
  writeWhole,
  type MemoryChecksums,
  type MemoryRange,
  type PositionalWrite,
} from './memory-ranges';
import { SnapshotError } from './snapshot-error';
import { checkSavedConfig, checkSavedState } from './saved-vm';

export { canonicalJson, SnapshotError };
export * from './memory-ranges';

export const SNAPSHOT_CONFIG_FILE = 'config.json';
export const SNAPSHOT_STATE_FILE = 'state.json';
export const SNAPSHOT_MEMORY_FILE = 'memory-ranges';
/**
 * 3: state.json records memory checksums, XXH64 per range; 2: SHA-256 per range; 1: no memory
 * checksums. All three are read.
 */
export const SNAPSHOT_FORMAT_VERSION = 3;
const OLDEST_SNAPSHOT_FORMAT = 1;

/** caps on what a restore reads into memory before checking it */
export const MAX_CONFIG_BYTES = 1 << 20;
export const MAX_STATE_BYTES = 64 << 20;
/** JSON nesting the reader accepts (the API's limit; a real state is far shallower) */
const MAX_JSON_DEPTH = 128;

const PARTIAL = '.partial-';

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

export function stateChecksum(state: unknown): string {
  return sha256(canonicalJson(state));
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
  /** the positional write used for every file instead of the default ones; tests inject short writes and crashes */
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
export async function writeSnapshot(input: WriteSnapshotInput): Promise<{ memoryBytes: number; memoryExtents: number; memoryMs: number }> {
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
  const writeText = async (name: string, text: string): Promise<void> => {
    const f = open(name);
    const b = Buffer.from(text);
    await writeWhole(write, f.fd, name, b, 0, b.length, 0);
    fs.fsyncSync(f.fd);
  };
  try {
    created = prepareDestination(dir);
    removeOldPartialDirs(dir);
    const mem = open(SNAPSHOT_MEMORY_FILE);
    const t0 = performance.now();
    // config.json and the state's text are made while the last chunks of RAM are written (this
    // thread waits for them then): only the envelope around the state is left for after.
    let state: { json: string; checksum: string } | undefined;
    const configAndStateText = async (): Promise<void> => {
      await writeText(SNAPSHOT_CONFIG_FILE, `${JSON.stringify(input.config, null, 2)}\n`);
      state = { json: JSON.stringify(input.state), checksum: stateChecksum(input.state) };
    };
    const { written, extents, checksums } = await writeMemoryFile(mem.fd, SNAPSHOT_MEMORY_FILE, input.memory, input.write, configAndStateText);
    // (writeMemoryFile runs it unless a write failed, and then throws: this is only a safeguard)
    if (!state) await configAndStateText();
    fs.fsyncSync(mem.fd);
    const memoryMs = performance.now() - t0;
    await writeText(SNAPSHOT_STATE_FILE, `${stateFileText(input.state.schemaVersion, state!, checksums)}\n`);
    // state.json last: until it is in place the directory is no snapshot.
    for (const f of files) {
      native().renameNoReplace(f.tmp, path.join(dir, f.name));
      f.renamed = true;
    }
    fsyncDir(dir);
    if (created) fsyncDir(path.dirname(dir));
    return { memoryBytes: written, memoryExtents: extents, memoryMs };
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

/**
 * state.json's text: JSON.stringify of its SnapshotStateFile, key for key, around the state's
 * own text (made beforehand, so that this is all that waits for the memory checksums).
 */
function stateFileText(schemaVersion: number, state: { json: string; checksum: string }, memory: MemoryChecksums): string {
  const head: Omit<SnapshotStateFile, 'state'> = { tern_snapshot_version: SNAPSHOT_FORMAT_VERSION, schema_version: schemaVersion, checksum: state.checksum, memory };
  return `${JSON.stringify(head).slice(0, -1)},"state":${state.json}}`;
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
  // Format 1 had no memory checksums; from format 2 on they are required, each range's of the
  // kind its format names.
  let memorySums: MemoryChecksums | undefined;
  if (format >= 2) {
    const m = env.memory;
    const kind = rangeChecksumKindOf(format);
    const valid = (v: unknown) => isChecksum(v, kind);
    if (typeof m !== 'object' || m === null || !isChecksum(m.header, 'sha256') || !Array.isArray(m.ranges) || !m.ranges.every(valid)) {
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
