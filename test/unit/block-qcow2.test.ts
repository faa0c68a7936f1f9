// qcow2 images made by qemu-img, read and written by Tern, then judged by qemu-img: `check`
// finds no errors (leaks included) and `convert -O raw` gives what a plain buffer applying the
// same operations holds.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DiskImageError, type DiskImage } from '../../src/block/disk-image';
import { openDiskImage } from '../../src/block/open-image';
import { qemuCheck, qemuImg, qemuToRaw, randomBytes, rng, tmpDir } from './block-helpers';

const SIZE = 4 << 20;
const CLUSTER = 4096;

interface Setup {
  compat: '0.10' | '1.1';
  backing?: 'raw' | 'qcow2';
}

/** An image (and its backing file, whose data covers the first 3 MiB), plus the model of what it holds. */
function makeImage(dir: string, s: Setup, seed: number): { image: string; model: Buffer } {
  const model = Buffer.alloc(SIZE);
  const image = path.join(dir, 'disk.qcow2');
  const args = ['create', '-q', '-f', 'qcow2', '-o', `compat=${s.compat},cluster_size=${CLUSTER}`];
  if (s.backing) {
    const data = randomBytes(rng(seed), 3 << 20);
    data.copy(model);
    fs.writeFileSync(path.join(dir, 'base.raw'), data);
    let base = 'base.raw';
    if (s.backing === 'qcow2') {
      qemuImg('convert', '-q', '-O', 'qcow2', path.join(dir, 'base.raw'), path.join(dir, 'base.qcow2'));
      base = 'base.qcow2';
    }
    args.push('-b', base, '-F', s.backing); // relative: resolved against the image's directory
  }
  qemuImg(...args, image, String(SIZE));
  return { image, model };
}

/** Random writes, zero writes and discards, crossing clusters and L2 tables, checked as they go. */
async function exercise(t: import('ava').ExecutionContext, img: DiskImage, model: Buffer, s: Setup, seed: number): Promise<void> {
  const rand = rng(seed * 7 + 3);
  const discardZeroes = !(s.compat === '0.10' && s.backing);
  for (let op = 0; op < 160; op++) {
    const kind = rand(10);
    const offset = rand(8) === 0 ? (2 << 20) - rand(3 * CLUSTER) : rand(SIZE - 1); // near the L2 table boundary too
    const length = Math.min(SIZE - offset, 1 + rand(rand(4) === 0 ? 5 * CLUSTER : 2 * CLUSTER));
    if (kind < 6) {
      const data = randomBytes(rand, length);
      await img.write(offset, data);
      data.copy(model, offset);
    } else if (kind < 8) {
      await img.writeZeroes(offset, length);
      model.fill(0, offset, offset + length);
    } else {
      await img.discard(offset, length);
      if (discardZeroes) {
        const first = Math.ceil(offset / CLUSTER) * CLUSTER;
        const end = Math.floor((offset + length) / CLUSTER) * CLUSTER;
        if (end > first) model.fill(0, first, end);
      }
    }
    if (op % 16 === 0) {
      const at = rand(SIZE - 65536);
      const got = Buffer.alloc(65536);
      await img.read(at, got);
      t.true(got.equals(model.subarray(at, at + 65536)), `read at ${at} after op ${op}`);
    }
  }
}

const setups: Setup[] = [
  { compat: '0.10' },
  { compat: '1.1' },
  { compat: '0.10', backing: 'raw' },
  { compat: '1.1', backing: 'raw' },
  { compat: '1.1', backing: 'qcow2' },
];

for (const [n, s] of setups.entries()) {
  test(`qcow2 compat=${s.compat}${s.backing ? ` over a ${s.backing} backing file` : ''}: qemu-img check is clean and convert gives the model's bytes`, async (t) => {
    const dir = tmpDir();
    const { image, model } = makeImage(dir, s, n + 1);
    const img = await openDiskImage(image);
    t.is(img.format, 'qcow2');
    t.is(img.size, SIZE);
    await exercise(t, img, model, s, n + 1);
    await img.flush();
    await img.close();
    t.deepEqual(qemuCheck(image), { corruptions: 0, leaks: 0, errors: 0 });
    t.true(qemuToRaw(image).equals(model), 'qemu-img convert -O raw differs from the model');
    const again = await openDiskImage(image, { readonly: true });
    const all = Buffer.alloc(SIZE);
    await again.read(0, all);
    t.true(all.equals(model), 'reading the image back differs from the model');
    await again.close();
    fs.rmSync(dir, { recursive: true });
  });
}

test('qcow2: what QEMU wrote (qemu-io, zero clusters, a compressed image) reads back, and writing into compressed clusters keeps check clean', async (t) => {
  const dir = tmpDir();
  const raw = path.join(dir, 'src.raw');
  const data = randomBytes(rng(99), 1 << 20);
  data.fill(0x5a, 300000, 400000); // compressible
  fs.writeFileSync(raw, data);
  const image = path.join(dir, 'c.qcow2');
  qemuImg('convert', '-q', '-c', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, image);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -z 131072 65536', '-c', 'write -P 0xab 70000 1000', image], { stdio: 'ignore' });
  data.fill(0, 131072, 196608);
  data.fill(0xab, 70000, 71000);
  const img = await openDiskImage(image);
  const got = Buffer.alloc(data.length);
  await img.read(0, got);
  t.true(got.equals(data));
  const patch = randomBytes(rng(5), 10000);
  await img.write(500000, patch); // into a compressed cluster: decompressed, rewritten, freed
  patch.copy(data, 500000);
  await img.writeZeroes(655360, 65536);
  data.fill(0, 655360, 720896);
  await img.close();
  t.deepEqual(qemuCheck(image), { corruptions: 0, leaks: 0, errors: 0 });
  t.true(qemuToRaw(image).equals(data));
  fs.rmSync(dir, { recursive: true });
});

test('qcow2: concurrent writes and reads of one image all land', async (t) => {
  const dir = tmpDir();
  const { image, model } = makeImage(dir, { compat: '1.1', backing: 'raw' }, 11);
  const img = await openDiskImage(image);
  const rand = rng(12);
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < 64; i++) {
    const offset = i * 65536 + rand(30000); // disjoint ranges, mostly crossing clusters
    const data = randomBytes(rand, 1 + rand(30000));
    data.copy(model, offset);
    jobs.push(img.write(offset, data));
    jobs.push(img.read(rand(SIZE - 4096), Buffer.alloc(4096)));
  }
  await Promise.all(jobs);
  await img.close();
  t.deepEqual(qemuCheck(image), { corruptions: 0, leaks: 0, errors: 0 });
  t.true(qemuToRaw(image).equals(model));
  fs.rmSync(dir, { recursive: true });
});

test('qcow2: writes past what the first refcount table covers move it, and check stays clean', async (t) => {
  const dir = tmpDir();
  const image = path.join(dir, 'small-clusters.qcow2');
  // 512-byte clusters: one refcount table cluster (64 blocks of 256 clusters) covers 8 MiB.
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', image, '16M');
  const tableAt = () => fs.readFileSync(image).readBigUInt64BE(48);
  const before = tableAt();
  const img = await openDiskImage(image);
  const data = randomBytes(rng(3), 10 << 20);
  for (let at = 0; at < data.length; at += 1 << 20) await img.write(at, data.subarray(at, at + (1 << 20)));
  await img.close();
  t.not(tableAt(), before, 'the refcount table did not move');
  t.deepEqual(qemuCheck(image), { corruptions: 0, leaks: 0, errors: 0 });
  const out = qemuToRaw(image);
  t.true(out.subarray(0, data.length).equals(data));
  t.true(fs.statSync(image).size > 10 << 20);
  fs.rmSync(dir, { recursive: true });
});

test('qcow2: backing files are read-only, relative to the image, and chains are capped', async (t) => {
  const dir = tmpDir();
  qemuImg('create', '-q', '-f', 'raw', path.join(dir, 'b0'), '1M');
  for (let i = 1; i <= 10; i++) qemuImg('create', '-q', '-f', 'qcow2', '-b', `b${i - 1}`, '-F', i === 1 ? 'raw' : 'qcow2', path.join(dir, `b${i}`));
  await t.throwsAsync(openDiskImage(path.join(dir, 'b10')), { instanceOf: DiskImageError, message: /backing chain deeper than 8/ });
  const ok = await openDiskImage(path.join(dir, 'b8'));
  // The backing images are held with shared locks: they can be read elsewhere, not written.
  await t.throwsAsync(openDiskImage(path.join(dir, 'b0')), { message: /locked/ });
  const ro = await openDiskImage(path.join(dir, 'b0'), { readonly: true });
  await ro.close();
  await ok.close();
  qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.raw', '-F', 'raw', path.join(dir, 'orphan'), '1M');
  await t.throwsAsync(openDiskImage(path.join(dir, 'orphan')), { message: new RegExp(`${dir}/missing.raw: missing`) });
  fs.rmSync(dir, { recursive: true });
});

test('qcow2: an image marked corrupt or dirty opens read-only only; written images stay clean of those bits', async (t) => {
  const dir = tmpDir();
  const image = path.join(dir, 'c.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', image, '1M');
  const fd = fs.openSync(image, 'r+');
  const bits = Buffer.alloc(8);
  for (const [bit, word] of [[2, /corrupt/], [1, /dirty/]] as const) {
    bits.writeBigUInt64BE(BigInt(bit));
    fs.writeSync(fd, bits, 0, 8, 72);
    await t.throwsAsync(openDiskImage(image), { instanceOf: DiskImageError, message: word });
    const ro = await openDiskImage(image, { readonly: true });
    await ro.close();
  }
  bits.writeBigUInt64BE(0n);
  fs.writeSync(fd, bits, 0, 8, 72);
  fs.closeSync(fd);
  const img = await openDiskImage(image);
  await img.write(1000, Buffer.alloc(5000, 1));
  await img.close();
  t.is(fs.readFileSync(image).readBigUInt64BE(72), 0n);
  fs.rmSync(dir, { recursive: true });
});

test('qcow2: a guest cluster that points at the L1 table is never written (the guest cannot rewrite metadata), and the image is marked corrupt', async (t) => {
  const dir = tmpDir();
  const image = path.join(dir, 'evil.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, '1M');
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4096', image], { stdio: 'ignore' });
  const fd = fs.openSync(image, 'r+');
  const b = Buffer.alloc(8);
  const l1At = (fs.readSync(fd, b, 0, 8, 40), b.readBigUInt64BE());
  const l2At = (fs.readSync(fd, b, 0, 8, Number(l1At)), b.readBigUInt64BE() & 0x00fffffffffffe00n);
  b.writeBigUInt64BE(l1At | (1n << 63n));
  fs.writeSync(fd, b, 0, 8, Number(l2At)); // guest cluster 0 -> the L1 table
  fs.closeSync(fd);
  const before = fs.readFileSync(image);
  const img = await openDiskImage(image);
  await t.throwsAsync(img.write(0, Buffer.alloc(512, 0xff)), { instanceOf: DiskImageError, message: /points into the image's header or tables/ });
  // Found damaged: no more writes, anywhere, and the image is marked corrupt on disk.
  await t.throwsAsync(img.write(1 << 19, Buffer.alloc(512)), { message: /found damaged/ });
  await img.close();
  const after = fs.readFileSync(image);
  t.is(after.readBigUInt64BE(72), 2n, 'the corrupt bit');
  after.writeBigUInt64BE(0n, 72);
  t.true(after.equals(before), 'nothing else changed');
  await t.throwsAsync(openDiskImage(image), { message: /marked corrupt/ });
  fs.rmSync(dir, { recursive: true });
});

test('qcow2: freeing a cluster whose refcount is already 0 is damage: the error names it and the image is marked corrupt', async (t) => {
  const dir = tmpDir();
  const image = path.join(dir, 'rc.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, '1M');
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 65536', image], { stdio: 'ignore' });
  const b = fs.readFileSync(image);
  const l2At = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
  const dataCluster = Number(b.readBigUInt64BE(l2At) & 0x00fffffffffffe00n) / 65536;
  const blockAt = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(48))));
  b.writeUInt16BE(0, blockAt + dataCluster * 2); // 16-bit refcounts
  fs.writeFileSync(image, b);
  const img = await openDiskImage(image);
  await t.throwsAsync(img.discard(0, 65536), { instanceOf: DiskImageError, message: /damaged: cluster \d+ is in use with a refcount of 0/ });
  await t.throwsAsync(img.write(4096, Buffer.alloc(512)), { message: /found damaged/ });
  await img.close();
  t.is(fs.readFileSync(image).readBigUInt64BE(72), 2n);
  fs.rmSync(dir, { recursive: true });
});
