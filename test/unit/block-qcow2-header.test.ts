// Hostile qcow2 headers: each field set to a value no sane image has is refused with an error
// naming the field, before anything is allocated from it or read outside the file.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { DiskImageError } from '../../src/block/disk-image';
import { openDiskImage } from '../../src/block/open-image';
import { qemuImg, tmpDir } from './block-helpers';

type Patch = (h: Buffer) => void;
const u32 = (off: number, v: number): Patch => (h) => h.writeUInt32BE(v, off);
const u64 = (off: number, v: bigint): Patch => (h) => h.writeBigUInt64BE(v, off);

const cases: [string, RegExp, Patch][] = [
  ['magic', /magic/, u32(0, 0x514649fc)],
  ['version 4', /version/, u32(4, 4)],
  ['cluster_bits 8', /cluster_bits/, u32(20, 8)],
  ['cluster_bits 22', /cluster_bits/, u32(20, 22)],
  ['size beyond 2^52', /size/, u64(24, 1n << 60n)],
  ['size past what L1 maps', /l1_size/, u64(24, 1n << 40n)],
  ['crypt_method AES', /crypt_method/, u32(32, 1)],
  ['l1_size past the cap', /l1_size/, u32(36, 0x10000000)],
  ['l1_table_offset unaligned', /l1_table_offset/, u64(40, 0x30001n)],
  ['l1_table_offset past the end', /l1_table_offset/, u64(40, 1n << 40n)],
  ['l1_table_offset beyond 2^53', /l1_table_offset/, u64(40, 1n << 60n)],
  ['refcount_table_offset past the end', /refcount_table_offset/, u64(48, 0x7770000n)],
  ['refcount_table_offset 0', /refcount_table_offset/, u64(48, 0n)],
  ['refcount_table_clusters 0', /refcount_table_clusters/, u32(56, 0)],
  ['refcount_table_clusters past the cap', /refcount_table_clusters/, u32(56, 0xffffffff)],
  ['nb_snapshots past the cap', /nb_snapshots/, u32(60, 0x7fffffff)],
  ['snapshots_offset past the end', /snapshots_offset/, (h) => { h.writeUInt32BE(1, 60); h.writeBigUInt64BE(1n << 40n, 64); }],
  ['unknown incompatible feature', /incompatible_features has unknown bits 5/, u64(72, 1n << 5n)],
  ['external data file', /incompatible_features.*external data file/, u64(72, 1n << 2n)],
  ['extended L2 entries', /incompatible_features.*extended L2/, u64(72, 1n << 4n)],
  ['zstd compression', /compression_type/, (h) => { h.writeBigUInt64BE(1n << 3n, 72); h[104] = 1; }],
  ['refcount_order 7', /refcount_order/, u32(96, 7)],
  ['refcount_order 0 (1-bit refcounts)', /refcount_order/, u32(96, 0)],
  ['header_length 50', /header_length/, u32(100, 50)],
  ['header_length past the cluster', /header_length/, u32(100, 0x20000)],
  ['backing_file_size 2000', /backing_file_size/, (h) => { h.writeBigUInt64BE(0x200n, 8); h.writeUInt32BE(2000, 16); }],
  ['backing_file_offset past the cluster', /backing_file_offset/, (h) => { h.writeBigUInt64BE(0xfff0n, 8); h.writeUInt32BE(100, 16); }],
  ['backing_file_offset inside the header', /backing_file_offset/, (h) => { h.writeBigUInt64BE(8n, 8); h.writeUInt32BE(10, 16); }],
  ['header extension running off the cluster', /header extension/, (h) => { const at = h.readUInt32BE(100); h.writeUInt32BE(0x12345678, at); h.writeUInt32BE(0xfffffff0, at + 4); }],
];

for (const [name, field, patch] of cases) {
  test(`qcow2 header: ${name} is refused, naming the field`, async (t) => {
    const dir = tmpDir();
    const image = path.join(dir, 'h.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, '1M');
    const fd = fs.openSync(image, 'r+');
    const head = Buffer.alloc(65536);
    fs.readSync(fd, head, 0, head.length, 0);
    patch(head);
    fs.writeSync(fd, head, 0, head.length, 0);
    fs.closeSync(fd);
    // A bad magic is met only when the image is named qcow2: probing takes it for raw.
    const probed = name !== 'magic';
    for (const readonly of [false, true]) {
      const e = await t.throwsAsync(openDiskImage(image, { readonly, format: probed ? undefined : 'qcow2' }), { instanceOf: DiskImageError });
      t.regex(e!.message, field);
    }
    fs.rmSync(dir, { recursive: true });
  });
}

test('qcow2 header: an unmodified image opens (the hostile cases start from a good one)', async (t) => {
  const dir = tmpDir();
  const image = path.join(dir, 'h.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, '1M');
  const img = await openDiskImage(image);
  t.is(img.format, 'qcow2');
  await img.close();
  fs.rmSync(dir, { recursive: true });
});

test('qcow2 tables: an L1 entry past the end, a misaligned L2 entry or a bad refcount table entry is an error, not a crash', async (t) => {
  const dir = tmpDir();
  const image = path.join(dir, 't.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, '1M');
  require('node:child_process').execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 0 4096', image], { stdio: 'ignore' });
  const pristine = fs.readFileSync(image);
  const l1At = Number(pristine.readBigUInt64BE(40));
  const l2At = Number(pristine.readBigUInt64BE(l1At) & 0x00fffffffffffe00n);
  const rtAt = Number(pristine.readBigUInt64BE(48));
  const damaged: [string, RegExp, (b: Buffer) => void][] = [
    ['L1 past the end', /damaged: L1 entry 0 points past the end of the file/, (b) => b.writeBigUInt64BE((1n << 40n) | (1n << 63n), l1At)],
    ['L2 misaligned', /damaged: the L2 entry of guest cluster 0 is not cluster-aligned/, (b) => b.writeBigUInt64BE(0x50200n | (1n << 63n), l2At)],
    ['compressed garbage', /damaged: the compressed cluster/, (b) => b.writeBigUInt64BE((1n << 62n) | 0x200n, l2At)],
  ];
  for (const [name, message, patch] of damaged) {
    const b = Buffer.from(pristine);
    patch(b);
    fs.writeFileSync(image, b);
    const img = await openDiskImage(image, { readonly: true });
    await t.throwsAsync(img.read(0, Buffer.alloc(4096)), { instanceOf: DiskImageError, message }, name);
    await img.close();
  }
  const b = Buffer.from(pristine);
  b.writeBigUInt64BE(1n << 40n, rtAt);
  fs.writeFileSync(image, b);
  await t.throwsAsync(openDiskImage(image), { instanceOf: DiskImageError, message: /damaged: refcount table entry 0 points past the end/ });
  fs.rmSync(dir, { recursive: true });
});
