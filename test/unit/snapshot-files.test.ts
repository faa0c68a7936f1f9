// Snapshot files as untrusted input, and the snapshot writer's failure modes, without KVM:
// every snapshot here is written by writeSnapshot from a state and RAM built in the test (or is
// the schema-2 fixture), then broken the way a crafted or damaged snapshot would be.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  copyMemoryRange,
  openMemoryFile,
  readSnapshot,
  verifyRangeInRam,
  writeSnapshot,
  type LoadedSnapshot,
} from '../../src/migration/snapshot';
import { native } from '../../src/native/kvm';
import { editState } from '../support/snapshot-edit';
import { FORMAT2_FIXTURE, RAM, emptyRegion, guestMemory, snapshotInput, tempDir, unpackFixture, unpackSchema2 } from './snapshot-fixture';

const root = tempDir();
let serial = 0;
const fresh = (name: string): string => path.join(root, `${name}-${++serial}`);

/** A complete snapshot directory written by writeSnapshot. */
async function written(name: string): Promise<string> {
  const d = fresh(name);
  await writeSnapshot(snapshotInput(d));
  return d;
}

/**
 * Copy every range of a loaded snapshot into fresh RAM, checking checksums as restore does: a
 * sparse file of the RAM's size stands for the memfd behind it.
 */
function copyAll(snap: LoadedSnapshot, ramFile = fresh('ram')): Uint8Array {
  fs.writeFileSync(ramFile, '');
  fs.truncateSync(ramFile, snap.ranges[0].length);
  const ramFd = fs.openSync(ramFile, 'r+');
  const { fd } = openMemoryFile(snap.memoryPath);
  try {
    snap.ranges.forEach((r, i) => copyMemoryRange(snap.memoryPath, fd, r, i, ramFd, snap.rangeChecksums?.[i]));
    return new Uint8Array(fs.readFileSync(ramFile));
  } finally {
    fs.closeSync(fd);
    fs.closeSync(ramFd);
  }
}

const editConfig = (d: string, f: (c: Record<string, any>) => void): void => {
  const p = path.join(d, 'config.json');
  const c = JSON.parse(fs.readFileSync(p, 'utf8'));
  f(c);
  fs.writeFileSync(p, JSON.stringify(c));
};
/** Overwrite bytes of a file in place. */
const poke = (file: string, at: number, bytes: Buffer): void => {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, at);
  fs.closeSync(fd);
};

const SNAPSHOT_JS = require.resolve('../../src/migration/snapshot');
const FIXTURE_JS = require.resolve('./snapshot-fixture');

/** readSnapshot in a child process, so a read that blocks or never ends cannot hang the tests. */
function readInChild(dir: string): { code: number | null; stderr: string; timedOut: boolean } {
  const script = `try { require(${JSON.stringify(SNAPSHOT_JS)}).readSnapshot(${JSON.stringify(dir)}); } catch (e) { process.stderr.write(e.message); process.exit(1); }`;
  const r = spawnSync(process.execPath, ['--max-old-space-size=256', '-e', script], { timeout: 15_000, encoding: 'utf8' });
  return { code: r.status, stderr: r.stderr ?? '', timedOut: r.error !== undefined || r.signal !== null };
}

// --- the baseline every case below breaks ---------------------------------------------------

test('a written snapshot reads back and its RAM copies in byte for byte; the directory is 0700, files 0600', async (t) => {
  const d = await written('ok');
  t.is(fs.statSync(d).mode & 0o777, 0o700);
  t.deepEqual(fs.readdirSync(d).sort(), ['config.json', 'memory-ranges', 'state.json']);
  for (const f of fs.readdirSync(d)) t.is(fs.statSync(path.join(d, f)).mode & 0o777, 0o600, f);
  const snap = readSnapshot(d);
  t.is(snap.rangeChecksums?.length, 1);
  t.deepEqual(copyAll(snap), guestMemory().regions[0].read(0, RAM));
});

test('state.json is its envelope as JSON.stringify writes it, the state last and as it was saved; config.json is the config', async (t) => {
  const d = fresh('envelope');
  const input = snapshotInput(d);
  await writeSnapshot(input);
  const text = fs.readFileSync(path.join(d, 'state.json'), 'utf8');
  const envelope = JSON.parse(text) as Record<string, unknown>;
  t.is(text, `${JSON.stringify(envelope)}\n`);
  t.deepEqual(Object.keys(envelope), ['tern_snapshot_version', 'schema_version', 'checksum', 'memory', 'state']);
  t.deepEqual(envelope.state, JSON.parse(JSON.stringify(input.state)));
  t.is(envelope.schema_version, input.state.schemaVersion);
  t.deepEqual(JSON.parse(fs.readFileSync(path.join(d, 'config.json'), 'utf8')), JSON.parse(JSON.stringify(input.config)));
});

test('a copy restore writes the same bytes into the file behind guest RAM, leaves its holes alone and checks the checksum', async (t) => {
  const d = await written('ramfd');
  const snap = readSnapshot(d);
  const ramFile = fresh('ram-file');
  t.deepEqual(copyAll(snap, ramFile), guestMemory().regions[0].read(0, RAM));
  // Only the data extents were written: the zero pages stay holes in the RAM file.
  t.true(fs.statSync(ramFile).blocks * 512 < RAM / 2, `${fs.statSync(ramFile).blocks} blocks allocated`);
  poke(snap.memoryPath, snap.ranges[0].fileOffset + 7 * 4096 + 5, Buffer.from([0xee]));
  t.throws(() => copyAll(readSnapshot(d)), { message: /range 0 \(guest 0x0\) fails the checksum/ });
});

// --- finding 3: short writes and the memory checksum ----------------------------------------

test('a short write (full disk) fails the snapshot and leaves nothing behind', async (t) => {
  const d = fresh('full');
  let budget = 8192 + 4096 + 100; // the config, the header, then the disk fills up mid-page
  const write = (fd: number, b: Uint8Array, o: number, l: number, p: number): number => {
    const n = Math.min(l, budget);
    budget -= n;
    return n === 0 ? 0 : fs.writeSync(fd, b, o, n, p);
  };
  await t.throwsAsync(() => writeSnapshot(snapshotInput(d, { write })), { message: /memory-ranges: short write/ });
  t.false(fs.existsSync(d), 'the directory it created is gone');
  t.deepEqual(fs.readdirSync(root).filter((e) => e.includes('full')), []);
});

test('a real file-size limit (RLIMIT_FSIZE) inside guest RAM fails the snapshot cleanly', (t) => {
  const d = fresh('fsize');
  // The limit falls inside the first data page of memory-ranges (file offset 4096..8192): that
  // write is cut short by the kernel, the next gets EFBIG.
  const script = `
    const { writeSnapshot } = require(${JSON.stringify(SNAPSHOT_JS)});
    const { snapshotInput } = require(${JSON.stringify(FIXTURE_JS)});
    writeSnapshot(snapshotInput(${JSON.stringify(d)})).catch((e) => { process.stderr.write(e.message); process.exit(3); });`;
  const r = spawnSync('prlimit', ['--fsize=6000', process.execPath, '-e', script], { timeout: 30_000, encoding: 'utf8' });
  if (r.error) return t.pass('prlimit unavailable');
  t.is(r.status, 3, r.stderr);
  t.regex(r.stderr, /cannot write snapshot .*EFBIG/);
  t.false(fs.existsSync(d), 'nothing left behind');
});

test('a write that takes only part of each call is completed, not truncated', async (t) => {
  const d = fresh('partial-writes');
  const write = (fd: number, b: Uint8Array, o: number, l: number, p: number): number => fs.writeSync(fd, b, o, Math.min(l, 1000), p);
  await writeSnapshot(snapshotInput(d, { write }));
  t.deepEqual(copyAll(readSnapshot(d)), guestMemory().regions[0].read(0, RAM));
});

test('altered guest RAM in memory-ranges fails its range checksum at copy restore', async (t) => {
  const d = await written('altered');
  const snap = readSnapshot(d);
  poke(snap.memoryPath, snap.ranges[0].fileOffset + 7 * 4096 + 5, Buffer.from([0xee]));
  t.throws(() => copyAll(readSnapshot(d)), { message: /memory-ranges: range 0 \(guest 0x0\) fails the checksum recorded in state\.json/ });
});

test('a data page of memory-ranges zeroed (lost) fails the range checksum', async (t) => {
  const d = await written('lost-page');
  const snap = readSnapshot(d);
  poke(snap.memoryPath, snap.ranges[0].fileOffset + 255 * 4096, Buffer.alloc(4096));
  t.throws(() => copyAll(readSnapshot(d)), { message: /range 0 .* fails the checksum/ });
});

test('an ondemand restore with prefault checks each range in the mapped RAM', async (t) => {
  const d = await written('prefault');
  const snap = readSnapshot(d);
  const r = snap.ranges[0];
  // What a MAP_PRIVATE mapping of the range shows, in an ordinary buffer.
  const mapped = () => {
    const region = emptyRegion(r.length);
    region.view(0, r.length)!.set(fs.readFileSync(snap.memoryPath).subarray(r.fileOffset, r.fileOffset + r.length));
    return region;
  };
  t.notThrows(() => verifyRangeInRam(snap.memoryPath, r, 0, mapped(), snap.rangeChecksums![0]));
  poke(snap.memoryPath, r.fileOffset + 100 * 4096, Buffer.from([1])); // a byte in a hole
  t.throws(() => verifyRangeInRam(snap.memoryPath, r, 0, mapped(), snap.rangeChecksums![0]), { message: /range 0 \(guest 0x0\) fails the checksum/ });
});

test('an altered range table fails the header checksum before anything is mapped', async (t) => {
  const d = await written('table');
  const file = path.join(d, 'memory-ranges');
  // Move range 0 to guest 0x1000 and shrink it by a page: consistent, but not what was saved.
  const hdr = fs.readFileSync(file).subarray(0, 64);
  hdr.writeBigUInt64LE(BigInt(RAM - 4096), 40);
  hdr.writeBigUInt64LE(BigInt(4096 + RAM - 4096), 24);
  poke(file, 0, hdr);
  t.throws(() => readSnapshot(d), { message: /memory-ranges: its header and range table fail the checksum recorded in state\.json/ });
});

test('a format-2 or later snapshot without memory checksums is refused; the schema-2 fixture (format 1) has none and restores', async (t) => {
  const d = await written('no-sums');
  editState(d, (e) => delete e.memory);
  t.throws(() => readSnapshot(d), { message: /state\.json: no valid memory checksums/ });
  const old = fresh('schema2');
  unpackSchema2(old);
  const snap = readSnapshot(old);
  t.is(snap.storedSchemaVersion, 2);
  t.is(snap.rangeChecksums, undefined);
  const ram = copyAll(snap);
  t.true(ram.some((b) => b !== 0), 'the old snapshot RAM copies in');
});

test('a new snapshot is format 3 with an XXH64 per range; a format-2 snapshot (SHA-256 per range, written by an earlier build) still restores and is checked', async (t) => {
  const d = await written('format3');
  const env = JSON.parse(fs.readFileSync(path.join(d, 'state.json'), 'utf8'));
  t.is(env.tern_snapshot_version, 3);
  t.regex(env.memory.ranges[0], /^xxh64:[0-9a-f]{16}$/);
  t.regex(env.memory.header, /^sha256:[0-9a-f]{64}$/);

  const old = fresh('format2');
  unpackFixture(FORMAT2_FIXTURE, old);
  const snap = readSnapshot(old);
  t.regex(snap.rangeChecksums![0], /^sha256:/);
  t.deepEqual(copyAll(snap), guestMemory().regions[0].read(0, RAM), 'its RAM copies in, byte for byte');
  poke(snap.memoryPath, snap.ranges[0].fileOffset + 7 * 4096 + 5, Buffer.from([0xee]));
  t.throws(() => copyAll(readSnapshot(old)), { message: /range 0 \(guest 0x0\) fails the checksum recorded in state\.json/ });

  // Each format's range checksums are of its own kind: an XXH64 in a format-2 file is refused.
  const mixed = await written('mixed');
  editState(mixed, (e) => (e.tern_snapshot_version = 2));
  t.throws(() => readSnapshot(mixed), { message: /state\.json: no valid memory checksums/ });
});

// --- finding 2: what restore opens ------------------------------------------------------------

test('a FIFO as state.json is refused at once instead of blocking the VMM', async (t) => {
  const d = await written('fifo');
  fs.rmSync(path.join(d, 'state.json'));
  const mk = spawnSync('mkfifo', [path.join(d, 'state.json')]);
  if (mk.status !== 0) return t.pass('mkfifo unavailable');
  const r = readInChild(d);
  t.false(r.timedOut, 'readSnapshot returned');
  t.is(r.code, 1);
  t.regex(r.stderr, /state\.json: is not a regular file/);
});

test('state.json and memory-ranges as symlinks (to /dev/zero) are refused without reading them', async (t) => {
  const d = await written('devzero');
  fs.rmSync(path.join(d, 'state.json'));
  fs.symlinkSync('/dev/zero', path.join(d, 'state.json'));
  const r = readInChild(d);
  t.false(r.timedOut, 'readSnapshot returned');
  t.regex(r.stderr, /state\.json: is a symbolic link/);
  const m = await written('memlink');
  const real = path.join(root, `real-memory-${serial}`);
  fs.renameSync(path.join(m, 'memory-ranges'), real);
  fs.symlinkSync(real, path.join(m, 'memory-ranges'));
  t.throws(() => readSnapshot(m), { message: /memory-ranges: is a symbolic link/ });
});

test('a state.json larger than the cap is refused by its size, unread', async (t) => {
  const d = await written('huge');
  fs.truncateSync(path.join(d, 'state.json'), (64 << 20) + 1);
  t.throws(() => readSnapshot(d), { message: /state\.json: is 67108865 bytes, more than the 67108864 allowed/ });
});

test('a parse error names the file and position, never the file contents', async (t) => {
  const secret = 'root:$y$j9T$SECRETHASH:19000:0:99999:7:::';
  const d = await written('secret');
  fs.writeFileSync(path.join(d, 'config.json'), `${secret}\n`);
  const e1 = t.throws(() => readSnapshot(d));
  t.regex(e1!.message, /config\.json: not valid JSON/);
  t.notRegex(e1!.message, /SECRET|root:/);
  // The same through a hard-to-spot route: a JSON file that breaks after a secret-bearing prefix.
  const d2 = await written('secret2');
  fs.writeFileSync(path.join(d2, 'state.json'), `{"state": "${secret}" oops}`);
  const e2 = t.throws(() => readSnapshot(d2));
  t.regex(e2!.message, /state\.json: not valid JSON at position \d+/);
  t.notRegex(e2!.message, /SECRET|root:/);
});

test('JSON nested deeper than the limit is refused without recursing', async (t) => {
  const d = await written('deep');
  fs.writeFileSync(path.join(d, 'config.json'), `${'['.repeat(100_000)}${']'.repeat(100_000)}`);
  t.throws(() => readSnapshot(d), { message: /config\.json: not valid JSON \(nested deeper than 128 levels\)/ });
});

test('a sparse memory-ranges declaring more RAM than the host has is refused before anything is set up', async (t) => {
  const d = await written('vast');
  const big = Math.ceil((os.totalmem() * 2) / (2 << 20)) * (2 << 20);
  const file = path.join(d, 'memory-ranges');
  const hdr = fs.readFileSync(file).subarray(0, 64);
  hdr.writeBigUInt64LE(BigInt(4096 + big), 24);
  hdr.writeBigUInt64LE(BigInt(big), 40);
  poke(file, 0, hdr);
  fs.truncateSync(file, 4096 + big);
  const header = Buffer.alloc(4096);
  const fd = fs.openSync(file, 'r');
  fs.readSync(fd, header, 0, 4096, 0);
  fs.closeSync(fd);
  editState(d, (e) => {
    e.state.vm.config.memory.size = big;
    e.state.memory.regions = [{ guestAddress: 0, size: big }];
    e.memory.header = `sha256:${crypto.createHash('sha256').update(header).digest('hex')}`;
  });
  editConfig(d, (c) => (c.memory.size = big));
  t.throws(() => readSnapshot(d), { message: new RegExp(`memory-ranges: declares ${big} bytes of RAM, more than this host's`) });
});

// --- finding 1: the config a restore would act on ---------------------------------------------

test('config.json is checked with the vm.create validator: wrong types are refused, naming the field', async (t) => {
  const d = await written('badcfg');
  const bad = (c: Record<string, any>) => (c.serial = { mode: 'File', file: 42 });
  editConfig(d, bad);
  editState(d, (e) => bad(e.state.vm.config));
  t.throws(() => readSnapshot(d), { message: /config\.json: not a valid VM config \(.*\/serial\/file: Expected string/ });
  const d2 = await written('extracfg');
  const extra = (c: Record<string, any>) => (c.payload.firmware_blob = '/etc/shadow');
  editConfig(d2, extra);
  editState(d2, (e) => extra(e.state.vm.config));
  t.throws(() => readSnapshot(d2), { message: /config\.json: has fields a VM config does not have/ });
});

// --- findings 4 and 5: where and how the snapshot is written ----------------------------------

test('an existing empty directory (mkdir -p D, as with Cloud Hypervisor) receives the snapshot', async (t) => {
  const d = fresh('existing');
  fs.mkdirSync(d, { mode: 0o755 });
  await writeSnapshot(snapshotInput(d));
  t.deepEqual(fs.readdirSync(d).sort(), ['config.json', 'memory-ranges', 'state.json']);
  t.deepEqual(copyAll(readSnapshot(d)), guestMemory().regions[0].read(0, RAM));
});

test('a directory holding a snapshot, or anything else, is refused and left as it was', async (t) => {
  const d = await written('twice');
  const before = fs.readdirSync(d).map((f) => [f, fs.statSync(path.join(d, f)).mtimeMs]);
  await t.throwsAsync(() => writeSnapshot(snapshotInput(d)), { message: /already exists and holds a snapshot/ });
  t.deepEqual(fs.readdirSync(d).map((f) => [f, fs.statSync(path.join(d, f)).mtimeMs]), before);
  const other = fresh('other');
  fs.mkdirSync(other);
  fs.writeFileSync(path.join(other, 'notes.txt'), 'mine');
  await t.throwsAsync(() => writeSnapshot(snapshotInput(other)), { message: /is not empty/ });
  t.deepEqual(fs.readdirSync(other), ['notes.txt']);
});

test('a writer killed with SIGKILL mid-snapshot leaves no snapshot; the next snapshot there removes its files', async (t) => {
  const d = fresh('killed');
  const script = `
    const fs = require('fs');
    const { writeSnapshot } = require(${JSON.stringify(SNAPSHOT_JS)});
    const { snapshotInput } = require(${JSON.stringify(FIXTURE_JS)});
    let calls = 0;
    writeSnapshot(snapshotInput(${JSON.stringify(d)}, { write: (fd, b, o, l, p) => {
      if (++calls === 4) process.kill(process.pid, 'SIGKILL');
      return fs.writeSync(fd, b, o, l, p);
    } }));`;
  const r = spawnSync(process.execPath, ['-e', script], { timeout: 30_000 });
  t.is(r.signal, 'SIGKILL');
  const left = fs.readdirSync(d);
  t.true(left.some((f) => f.startsWith('.memory-ranges.partial-')), `partial RAM left: ${left.join(', ')}`);
  t.false(left.includes('state.json'), 'no state.json: no snapshot');
  t.throws(() => readSnapshot(d), { message: /\.json: missing/ });
  await writeSnapshot(snapshotInput(d));
  t.deepEqual(fs.readdirSync(d).sort(), ['config.json', 'memory-ranges', 'state.json']);
  readSnapshot(d);
});

test('the partial directory an older build left beside the destination when killed is removed', async (t) => {
  const d = fresh('older');
  const old = path.join(root, `.${path.basename(d)}.partial-Ab3xYz`);
  fs.mkdirSync(old);
  fs.writeFileSync(path.join(old, 'config.json'), '{}');
  fs.writeFileSync(path.join(old, 'memory-ranges'), Buffer.alloc(8192, 7));
  const unrelated = path.join(root, `.${path.basename(d)}.partial-keep`);
  fs.mkdirSync(unrelated);
  await writeSnapshot(snapshotInput(d));
  t.false(fs.existsSync(old));
  t.true(fs.existsSync(unrelated), 'a name that is not such a directory is left alone');
});

test('an interrupted snapshot that got as far as config.json and memory-ranges is no snapshot and is replaced', async (t) => {
  const d = await written('half');
  fs.rmSync(path.join(d, 'state.json'));
  t.throws(() => readSnapshot(d), { message: /state\.json: missing/ });
  await writeSnapshot(snapshotInput(d));
  t.deepEqual(copyAll(readSnapshot(d)), guestMemory().regions[0].read(0, RAM));
});

test('a snapshot still being written (its temporary file locked) is not disturbed', async (t) => {
  const d = fresh('busy');
  fs.mkdirSync(d);
  const busy = path.join(d, '.memory-ranges.partial-0123456789ab');
  const fd = fs.openSync(busy, 'w', 0o600);
  try {
    t.true(native().flock(fd, { nonblocking: true }));
    await t.throwsAsync(() => writeSnapshot(snapshotInput(d)), { message: /another snapshot is being written into it/ });
    t.deepEqual(fs.readdirSync(d), [path.basename(busy)]);
  } finally {
    fs.closeSync(fd);
  }
});

test('renameNoReplace refuses to replace an existing file (EEXIST)', (t) => {
  const a = path.join(root, 'rename-a');
  const b = path.join(root, 'rename-b');
  fs.writeFileSync(a, 'a');
  fs.writeFileSync(b, 'b');
  t.throws(() => native().renameNoReplace(a, b), { code: 'EEXIST' });
  t.is(fs.readFileSync(b, 'utf8'), 'b');
});

// --- finding 6: every slice and device state checked at restore --------------------------------

test('a slice named like an Object.prototype member is an unknown slice', async (t) => {
  for (const key of ['toString', 'constructor', 'hasOwnProperty']) {
    const d = await written(`proto-${key}`);
    editState(d, (e) => (e.state[key] = { schemaVersion: 1 }));
    t.throws(() => readSnapshot(d), { message: new RegExp(`state\\.json: state has unknown slices: ${key}`) }, key);
  }
});

test('device state fields are type-checked: rx: null is refused naming the slice, device and field', async (t) => {
  const d = await written('rx-null');
  editState(d, (e) => (e.state.devices.instances.serial0.rx = null));
  t.throws(() => readSnapshot(d), { message: /state\.json: slice 'devices' device 'serial0' \(serial-16550a\) field \/rx: Expected array/ });
  const d2 = await written('rx-overfull');
  editState(d2, (e) => (e.state.devices.instances.serial0.rx = new Array(65).fill(1)));
  t.throws(() => readSnapshot(d2), { message: /device 'serial0' \(serial-16550a\) field \/rx: holds 65 bytes, more than rxCapacity 64/ });
  const d3 = await written('cmos');
  editState(d3, (e) => (e.state.devices.instances.rtc.cmos = [1, 2, 3]));
  t.throws(() => readSnapshot(d3), { message: /device 'rtc' \(cmos-rtc\) field \/cmos/ });
});

test('vcpus, kvm, bus, memory and vm slices are type-checked, naming the slice and field', async (t) => {
  const cases: [string, (s: Record<string, any>) => void, RegExp][] = [
    ['vcpus', (s) => (s.vcpus.saved['0'].regs.rip = 5), /slice 'vcpus' field \/saved\/0\/regs\/rip/],
    ['vcpus key', (s) => (s.vcpus.saved.x = s.vcpus.saved['0']), /slice 'vcpus' field \/saved/],
    ['kvm', (s) => (s.kvm.saved.pit = null), /slice 'kvm' field \/saved/],
    ['bus', (s) => (s.bus.pio[0].length = -1), /slice 'bus' field \/pio\/0\/length/],
    ['memory', (s) => (s.memory.regions[0].size = '2M'), /slice 'memory' field \/regions\/0\/size/],
    ['vm', (s) => (s.vm.bootCount = 'many'), /slice 'vm' field \/bootCount/],
  ];
  for (const [name, breakIt, expected] of cases) {
    const d = await written(`slice-${name.replace(' ', '-')}`);
    editState(d, (e) => breakIt(e.state));
    t.throws(() => readSnapshot(d), { message: expected }, name);
  }
});

// --- finding 7: the corrupt snapshots the host tests restore through KVM, without it ----------

const CORRUPTIONS: [string, (d: string) => void, RegExp][] = [
  ['missing state.json', (d) => fs.rmSync(path.join(d, 'state.json')), /state\.json: missing/],
  ['missing memory-ranges', (d) => fs.rmSync(path.join(d, 'memory-ranges')), /memory-ranges: missing/],
  ['state.json not JSON', (d) => fs.writeFileSync(path.join(d, 'state.json'), '{"state": '), /state\.json: not valid JSON/],
  ['config.json not JSON', (d) => fs.writeFileSync(path.join(d, 'config.json'), 'nope'), /config\.json: not valid JSON/],
  ['wrong checksum', (d) => editState(d, (e) => (e.state.vm.bootCount += 1), false), /state\.json: checksum mismatch/],
  ['schema newer than this build', (d) => editState(d, (e) => { e.state.schemaVersion = 99; e.schema_version = 99; }), /state\.json: .*schemaVersion 99 is newer than this build's/],
  ['snapshot format newer than this build', (d) => editState(d, (e) => (e.tern_snapshot_version = 4)), /state\.json: snapshot format 4 is not one this build reads/],
  ['memory file shorter than its table', (d) => fs.truncateSync(path.join(d, 'memory-ranges'), 1 << 20), /memory-ranges: file is 1048576 bytes, shorter than its range table needs/],
  ['memory file bad magic', (d) => poke(path.join(d, 'memory-ranges'), 0, Buffer.from('XXXX')), /memory-ranges: not a memory-ranges file/],
  ['memory file truncated header', (d) => fs.truncateSync(path.join(d, 'memory-ranges'), 20), /memory-ranges: truncated header/],
  ['config contradicts state', (d) => editConfig(d, (c) => (c.memory.size = 4 << 20)), /config\.json: contradicts the VM config recorded in state\.json/],
  ['memory size contradicts config', (d) => {
    editState(d, (e) => (e.state.vm.config.memory.size = 4 << 20));
    editConfig(d, (c) => (c.memory.size = 4 << 20));
  }, /memory-ranges: holds 2097152 bytes of RAM but config\.json says memory\.size=4194304/],
  ['RAM regions in state.json contradict memory-ranges', (d) => editState(d, (e) => (e.state.memory.regions = [{ guestAddress: 0, size: 1 << 20 }])),
    /memory-ranges: its ranges do not match the RAM regions recorded in the saved state/],
  ['schema 1 state', (d) => editState(d, (e) => { delete e.state.kvm; delete e.state.memory; e.state.schemaVersion = 1; e.schema_version = 1; }), /saved state has no KVM irqchip\/PIT\/clock state/],
  ['a vCPU missing', (d) => editState(d, (e) => (e.state.vcpus.saved = {})), /state\.json: the saved state has no vCPU 0/],
  ['not paused', (d) => editState(d, (e) => (e.state.vm.status = 'Running')), /state\.json: the VM in it is Running, not Paused/],
  ['no such directory', (d) => fs.rmSync(d, { recursive: true }), /no such directory/],
];

for (const [name, breakIt, expected] of CORRUPTIONS) {
  test(`corrupt snapshot: ${name} -> refused with its own error, nothing written`, async (t) => {
    const d = await written(`bad-${name.replace(/[^a-z0-9]+/gi, '-')}`);
    breakIt(d);
    const before = fs.existsSync(d) ? fs.readdirSync(d).sort() : [];
    t.throws(() => readSnapshot(d), { message: expected });
    t.deepEqual(fs.existsSync(d) ? fs.readdirSync(d).sort() : [], before, 'nothing written');
  });
}
