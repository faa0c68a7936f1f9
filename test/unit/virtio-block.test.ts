// virtio-blk without KVM: the configuration structure and features a driver reads, and the
// request worker over a real image file and guest memory: reads land in the guest's buffers,
// writes reach the image, and every request the disk cannot carry out gets its status byte
// (not an exception), while a chain with no room for a status breaks the queue.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { openDiskImage } from '../../src/block/open-image';
import {
  VIRTIO_BLK_MAX_REQUEST,
  VirtioBlkFeature,
  VirtioBlkStatus,
  VirtioBlkType,
  blkSegMax,
  virtioBlockConfigBytes,
  virtioBlockFeatures,
  virtioBlockModel,
  type VirtioBlockDevice,
} from '../../src/devices/virtio/block';
import type { VirtioFunctionState } from '../../src/devices/virtio/transport';
import { VirtqueueError, type DescriptorChain } from '../../src/devices/virtio/virtqueue';
import { anonymousGuestMemory } from '../../src/memory/guest-memory';
import { silentLogger } from '../../src/util/log';
import { blockWorker } from '../../src/vmm/device-backends';
import { tmpDir } from './block-helpers';

const dir = tmpDir();
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));

const DISK: VirtioBlockDevice = { capacity: 2048, readonly: false, serial: 'tern-disk-0', numQueues: 1, segMax: blkSegMax(128) };

test('the configuration structure and features say what the disk is', (t) => {
  const c = new DataView(virtioBlockConfigBytes({ ...DISK, numQueues: 4 }).buffer);
  t.is(c.getBigUint64(0, true), 2048n, 'capacity in sectors');
  t.is(c.getUint32(0x14, true), 512, 'blk_size');
  t.is(c.getUint16(0x22, true), 4, 'num_queues');
  t.is(c.getUint32(0x0c, true), 126, 'seg_max: a request of seg_max + 2 descriptors fits a queue of 128');
  t.is(blkSegMax(64), 62);
  const has = (f: bigint, bit: number) => ((f >> BigInt(bit)) & 1n) === 1n;
  const rw = virtioBlockFeatures(DISK);
  t.true(has(rw, VirtioBlkFeature.FLUSH) && has(rw, VirtioBlkFeature.DISCARD) && has(rw, VirtioBlkFeature.WRITE_ZEROES));
  t.false(has(rw, VirtioBlkFeature.RO) || has(rw, VirtioBlkFeature.MQ));
  const ro = virtioBlockFeatures({ ...DISK, readonly: true, numQueues: 2 });
  t.true(has(ro, VirtioBlkFeature.RO) && has(ro, VirtioBlkFeature.MQ));
  t.false(has(ro, VirtioBlkFeature.DISCARD) || has(ro, VirtioBlkFeature.WRITE_ZEROES), 'a read-only disk offers nothing that changes it');
  t.throws(() => virtioBlockModel.create('d', DISK, [128, 100]), { instanceOf: RangeError }, 'queue sizes are powers of two');
});

/** Guest RAM with a header at 0x1000, data buffers at 0x10000.., the status byte at 0x2000. */
function request(type: number, sector: number, opts: { data?: Uint8Array; readLen?: number[]; payload?: Uint8Array; noStatus?: boolean } = {}) {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: 1 << 20 }]);
  const header = new Uint8Array(16);
  new DataView(header.buffer).setUint32(0, type, true);
  new DataView(header.buffer).setBigUint64(8, BigInt(sector), true);
  mem.write(0x1000, header);
  const readable = [{ addr: 0x1000, len: 16 }];
  const writable: { addr: number; len: number }[] = [];
  let at = 0x10000;
  const out = opts.data ?? opts.payload;
  if (out) {
    mem.write(at, out);
    readable.push({ addr: at, len: out.length });
  }
  for (const len of opts.readLen ?? []) {
    writable.push({ addr: at, len });
    at += len + 0x1000;
  }
  if (!opts.noStatus) {
    mem.write(0x2000, Uint8Array.of(0xee));
    writable.push({ addr: 0x2000, len: 1 });
  }
  const chain: DescriptorChain = {
    head: 0,
    readable,
    writable,
    readableBytes: readable.reduce((n, s) => n + s.len, 0),
    writableBytes: writable.reduce((n, s) => n + s.len, 0),
  };
  return { mem, chain, status: () => mem.readU8(0x2000) };
}

async function disk(readonly = false): Promise<{ worker: ReturnType<typeof blockWorker>; fn: VirtioFunctionState; file: string; close: () => Promise<void> }> {
  const file = path.join(dir, `d${Math.random().toString(16).slice(2)}.img`);
  const bytes = Buffer.alloc(2048 * 512);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + (i >> 9)) & 0xff;
  fs.writeFileSync(file, bytes);
  const image = await openDiskImage(file, { readonly, format: 'raw' });
  const fn = virtioBlockModel.create('_disk0', { ...DISK, readonly }, [128]) as VirtioFunctionState;
  return { worker: blockWorker(image, silentLogger()), fn, file, close: () => image.close() };
}

test('a read fills the guest buffers in order across segments; the used length counts data and status', async (t) => {
  const d = await disk();
  try {
    const r = request(VirtioBlkType.IN, 3, { readLen: [512, 1024] });
    const done = await d.worker.chain(d.fn, 0, r.chain, r.mem);
    t.deepEqual(done, { written: 1536 + 1, counters: { read_bytes: 1536, read_ops: 1 } }, 'the used length counts data and status');
    t.is(r.status(), VirtioBlkStatus.OK);
    const want = fs.readFileSync(d.file).subarray(3 * 512, 3 * 512 + 1536);
    t.deepEqual(Buffer.concat([r.mem.read(0x10000, 512), r.mem.read(0x10000 + 512 + 0x1000, 1024)]), want);
  } finally {
    await d.close();
  }
});

test('a write reaches the image; flush, write-zeroes and discard succeed; GET_ID answers the serial', async (t) => {
  const d = await disk();
  try {
    const data = new Uint8Array(1024).fill(0x5a);
    const w = request(VirtioBlkType.OUT, 10, { data });
    t.deepEqual(await d.worker.chain(d.fn, 0, w.chain, w.mem), { written: 1, counters: { write_bytes: 1024, write_ops: 1 } });
    t.is(w.status(), VirtioBlkStatus.OK);
    t.deepEqual(fs.readFileSync(d.file).subarray(10 * 512, 11 * 512 + 512), Buffer.from(data));

    const f = request(VirtioBlkType.FLUSH, 0);
    await d.worker.chain(d.fn, 0, f.chain, f.mem);
    t.is(f.status(), VirtioBlkStatus.OK);

    const range = new Uint8Array(16);
    new DataView(range.buffer).setBigUint64(0, 10n, true);
    new DataView(range.buffer).setUint32(8, 2, true);
    const z = request(VirtioBlkType.WRITE_ZEROES, 0, { payload: range });
    await d.worker.chain(d.fn, 0, z.chain, z.mem);
    t.is(z.status(), VirtioBlkStatus.OK);
    t.true(fs.readFileSync(d.file).subarray(10 * 512, 12 * 512).every((b) => b === 0));

    const id = request(VirtioBlkType.GET_ID, 0, { readLen: [20] });
    t.is((await d.worker.chain(d.fn, 0, id.chain, id.mem)).written, 21);
    t.is(Buffer.from(id.mem.read(0x10000, 20)).toString('latin1'), 'tern-disk-0'.padEnd(20, '\0'));
  } finally {
    await d.close();
  }
});

test('requests the disk cannot carry out get their status, and the image is untouched', async (t) => {
  const d = await disk();
  const ro = await disk(true);
  try {
    const before = fs.readFileSync(d.file);
    const cases: [string, typeof d, ReturnType<typeof request>, number][] = [
      ['a read past the end', d, request(VirtioBlkType.IN, 2047, { readLen: [1024] }), VirtioBlkStatus.IOERR],
      ['a write past the end', d, request(VirtioBlkType.OUT, 2048, { data: new Uint8Array(512) }), VirtioBlkStatus.IOERR],
      ['a sector number near 2^64', d, request(VirtioBlkType.IN, Number.MAX_SAFE_INTEGER, { readLen: [512] }), VirtioBlkStatus.IOERR],
      ['data that is not whole sectors', d, request(VirtioBlkType.OUT, 0, { data: new Uint8Array(100) }), VirtioBlkStatus.IOERR],
      ['a request larger than the cap', d, request(VirtioBlkType.IN, 0, { readLen: [VIRTIO_BLK_MAX_REQUEST + 512] }), VirtioBlkStatus.IOERR],
      ['an unknown request type', d, request(99, 0), VirtioBlkStatus.UNSUPP],
      ['a discard range with a flag', d, request(VirtioBlkType.DISCARD, 0, { payload: Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0) }), VirtioBlkStatus.UNSUPP],
      ['a range list that is not whole ranges', d, request(VirtioBlkType.DISCARD, 0, { payload: new Uint8Array(10) }), VirtioBlkStatus.IOERR],
      ['a write to a read-only disk', ro, request(VirtioBlkType.OUT, 0, { data: new Uint8Array(512) }), VirtioBlkStatus.IOERR],
      ['write-zeroes on a read-only disk', ro, request(VirtioBlkType.WRITE_ZEROES, 0, { payload: new Uint8Array(16) }), VirtioBlkStatus.IOERR],
    ];
    for (const [what, target, r, status] of cases) {
      const done = await target.worker.chain(target.fn, 0, r.chain, r.mem);
      t.is(r.status(), status, what);
      t.deepEqual(done, { written: 1 }, `${what}: only the status is written, nothing counted`);
    }
    t.deepEqual(fs.readFileSync(d.file), before);
    // A range list the guest claims is 1 GiB long is refused by its length, before anything is copied.
    const huge = request(VirtioBlkType.DISCARD, 0, { payload: new Uint8Array(16) });
    huge.chain.readable[1].len = 1 << 30;
    huge.chain.readableBytes = 16 + (1 << 30);
    t.deepEqual(await d.worker.chain(d.fn, 0, huge.chain, huge.mem), { written: 1 });
    t.is(huge.status(), VirtioBlkStatus.IOERR);
    const seventeen = request(VirtioBlkType.WRITE_ZEROES, 0, { payload: new Uint8Array(17 * 16) });
    await d.worker.chain(d.fn, 0, seventeen.chain, seventeen.mem);
    t.is(seventeen.status(), VirtioBlkStatus.IOERR, 'more ranges than the device offers');
    // No status byte: the driver broke the queue, which is not the disk's to answer.
    const bad = request(VirtioBlkType.IN, 0, { readLen: [], noStatus: true });
    t.throws(() => d.worker.chain(d.fn, 0, bad.chain, bad.mem), { instanceOf: VirtqueueError });
  } finally {
    await d.close();
    await ro.close();
  }
});
