// Raw images: what may be opened, the locks that keep two VMMs off one image, O_DIRECT, and
// discard/zeroing.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DiskImageError } from '../../src/block/disk-image';
import { openDiskImage } from '../../src/block/open-image';
import { randomBytes, rng, tmpDir } from './block-helpers';

function rawImage(dir: string, bytes: Buffer): string {
  const f = path.join(dir, 'disk.raw');
  fs.writeFileSync(f, bytes, { mode: 0o600 });
  return f;
}

test('raw: reads and writes reach the file at the same offsets, and size and id come from the file', async (t) => {
  const dir = tmpDir();
  const data = randomBytes(rng(1), 1 << 20);
  const file = rawImage(dir, data);
  const img = await openDiskImage(file);
  t.is(img.format, 'raw');
  t.is(img.size, 1 << 20);
  const st = fs.statSync(file);
  t.is(img.id, `${st.dev}${st.rdev}${st.ino}`.slice(0, 20));
  const got = Buffer.alloc(3000);
  await img.read(12345, got);
  t.true(got.equals(data.subarray(12345, 15345)));
  await img.write(777, Buffer.alloc(100, 0xee));
  await img.flush();
  t.true(fs.readFileSync(file).subarray(777, 877).equals(Buffer.alloc(100, 0xee)));
  await t.throwsAsync(img.read((1 << 20) - 10, Buffer.alloc(11)), { instanceOf: DiskImageError, message: /past the end/ });
  await img.close();
  fs.rmSync(dir, { recursive: true });
});

test('raw: a second writer is refused while one holds the image; two read-only opens share it', async (t) => {
  const dir = tmpDir();
  const file = rawImage(dir, Buffer.alloc(65536));
  const writer = await openDiskImage(file);
  await t.throwsAsync(openDiskImage(file), { instanceOf: DiskImageError, message: /locked by another process/ });
  await t.throwsAsync(openDiskImage(file, { readonly: true }), { message: /locked by another process/ });
  await writer.close();
  const r1 = await openDiskImage(file, { readonly: true });
  const r2 = await openDiskImage(file, { readonly: true });
  await t.throwsAsync(openDiskImage(file), { message: /locked by another process/ });
  await t.throwsAsync(r1.write(0, Buffer.alloc(512)), { message: /read-only/ });
  await r1.close();
  await r2.close();
  const again = await openDiskImage(file);
  await again.close();
  fs.rmSync(dir, { recursive: true });
});

test('raw: a migration hands the lock over: the destination opens without it and takes it once the source lets it go', async (t) => {
  const dir = tmpDir();
  t.teardown(() => fs.rmSync(dir, { recursive: true }));
  const file = rawImage(dir, Buffer.alloc(65536));
  const source = await openDiskImage(file);
  const destination = await openDiskImage(file, { deferLock: true });
  t.throws(() => destination.takeLock(), { instanceOf: DiskImageError, message: /locked by another process/ }, 'not while the source holds it');
  source.releaseLock();
  destination.takeLock();
  t.throws(() => source.takeLock(), { message: /locked by another process/ }, 'the source cannot take it back while the destination holds it');
  await t.throwsAsync(openDiskImage(file), { message: /locked by another process/ }, 'nor can a third VMM open it');
  await destination.close();
  source.takeLock();
  await source.close();
  // a qcow2 image reads its tables at open: it takes its lock then, even for a destination
  const q = path.join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', q, '1M']);
  const holder = await openDiskImage(q);
  await t.throwsAsync(openDiskImage(q, { deferLock: true }), { message: /locked by another process/ });
  await holder.close();
});

test('raw: symlinks, directories and FIFOs are refused', async (t) => {
  const dir = tmpDir();
  const file = rawImage(dir, Buffer.alloc(4096));
  fs.symlinkSync(file, path.join(dir, 'link'));
  await t.throwsAsync(openDiskImage(path.join(dir, 'link')), { message: /symbolic link/ });
  await t.throwsAsync(openDiskImage(dir, { readonly: true }), { message: /is not a regular file/ });
  const fifo = path.join(dir, 'fifo');
  require('node:child_process').execFileSync('mkfifo', [fifo]);
  await t.throwsAsync(openDiskImage(fifo, { readonly: true }), { message: /is not a regular file/ });
  fs.rmSync(dir, { recursive: true });
});

// Creating a device node needs root; elsewhere there is no block device a test may open.
(process.getuid?.() === 0 ? test : test.skip)('raw: a block device is refused (its size would need BLKGETSIZE64)', async (t) => {
  const dir = tmpDir();
  const node = path.join(dir, 'loop');
  require('node:child_process').execFileSync('mknod', [node, 'b', '7', '200']);
  await t.throwsAsync(openDiskImage(node, { readonly: true }), { instanceOf: DiskImageError, message: /is a block device/ });
  fs.rmSync(dir, { recursive: true });
});

test('raw: direct=on moves aligned ranges through aligned buffers and refuses unaligned ones', async (t) => {
  const dir = tmpDir();
  const data = randomBytes(rng(2), 3 << 20);
  const file = rawImage(dir, data);
  const img = await openDiskImage(file, { direct: true });
  const got = Buffer.alloc((2 << 20) + 512); // more than one bounce buffer
  await img.read(512, got);
  t.true(got.equals(data.subarray(512, 512 + got.length)));
  const patch = randomBytes(rng(3), (1 << 20) + 1025);
  await img.write(4096, patch.subarray(1)); // a source buffer that starts unaligned in memory
  t.true(fs.readFileSync(file).subarray(4096, 4096 + patch.length - 1).equals(patch.subarray(1)));
  await t.throwsAsync(img.read(100, Buffer.alloc(512)), { message: /multiples of 512/ });
  await t.throwsAsync(img.write(0, Buffer.alloc(100)), { message: /multiples of 512/ });
  await img.close();
  fs.rmSync(dir, { recursive: true });
});

test('raw: discard and write-zeroes leave zeroes and the file keeps its size', async (t) => {
  const dir = tmpDir();
  const data = randomBytes(rng(4), 1 << 20);
  const file = rawImage(dir, data);
  for (const direct of [false, true]) {
    const img = await openDiskImage(file, { direct });
    await img.discard(65536, 131072);
    await img.writeZeroes(4096, 512);
    await img.close();
    data.fill(0, 65536, 196608);
    data.fill(0, 4096, 4608);
    t.true(fs.readFileSync(file).equals(data));
    t.is(fs.statSync(file).size, 1 << 20);
  }
  fs.rmSync(dir, { recursive: true });
});

test('raw and qcow2: close waits for the operations in progress, which all complete', async (t) => {
  const dir = tmpDir();
  const file = rawImage(dir, Buffer.alloc(8 << 20));
  const qcow = path.join(dir, 'disk.qcow2');
  require('node:child_process').execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '8M']);
  for (const f of [file, qcow]) {
    const img = await openDiskImage(f);
    const data = randomBytes(rng(9), 1 << 20);
    const ops = [0, 1, 2, 3, 4, 5].map((i) => img.write(i << 20, data));
    const closed = img.close();
    await Promise.all(ops);
    await closed;
    await t.throwsAsync(img.read(0, Buffer.alloc(512)), { message: /closed/ });
    const again = await openDiskImage(f, { readonly: true });
    const got = Buffer.alloc(1 << 20);
    await again.read(5 << 20, got);
    t.true(got.equals(data));
    await again.close();
  }
  fs.rmSync(dir, { recursive: true });
});
