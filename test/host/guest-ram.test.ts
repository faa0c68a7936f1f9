// Guest RAM slots: chunking above 1 GiB, mapping an existing fd shared or private, and
// chunk lifetime beyond vm.close().
import fs from 'node:fs';

import test from 'ava';

import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import { native } from '../../src/native/kvm';
import { buildGuest, createTestVm, runVcpu } from './harness';
import { fileDataRanges } from '../../src/vmm/guest-ram';

const GiB = 1024 * 1024 * 1024;

test('a slot larger than 1 GiB is split into 1 GiB chunks in address order', (t) => {
  const kvm = native().openKvm();
  const vm = kvm.createVm();
  try {
    const size = 2 * GiB + 8192;
    const slot = vm.addMemorySlot({ slot: 0, guestAddress: 0x1_0000_0000n, size, name: 'big' });
    t.is(slot.chunkSize, GiB);
    t.deepEqual(slot.chunks!.map((c) => c.byteLength), [GiB, GiB, 8192]);
    const mem = new GuestMemory([
      new GuestRegion({ guestAddress: 0x1_0000_0000, size, chunks: slot.chunks!, chunkSize: slot.chunkSize, dirtyBitmap: vm.vmmDirtyBitmap(0) }),
    ]);
    // A write straddling the chunk boundary lands contiguously in the memfd.
    const at = 0x1_0000_0000 + GiB - 3;
    mem.write(at, Uint8Array.of(1, 2, 3, 4, 5, 6));
    const viaFd = Buffer.alloc(6);
    fs.readSync(slot.fd, viaFd, 0, 6, GiB - 3);
    t.deepEqual([...viaFd], [1, 2, 3, 4, 5, 6]);
    t.deepEqual([...mem.read(at, 6)], [1, 2, 3, 4, 5, 6]);
    const dirty = vm.getDirtyBitmap(0);
    t.is(dirty.length, Math.ceil(size / 4096 / 8));
    const lastPageOfChunk0 = GiB / 4096 - 1;
    t.is(dirty[lastPageOfChunk0 >> 3] & (1 << (lastPageOfChunk0 & 7)), 1 << (lastPageOfChunk0 & 7));
    t.is(dirty[(lastPageOfChunk0 + 1) >> 3] & 1, 1);
  } finally {
    vm.close();
    kvm.close();
  }
});

test('deferChunks leaves the ArrayBuffers out; memoryChunks makes them once, over the same RAM', (t) => {
  const kvm = native().openKvm();
  const vm = kvm.createVm();
  try {
    const slot = vm.addMemorySlot({ slot: 0, guestAddress: 0n, size: 2 * 1024 * 1024, name: 'lazy', deferChunks: true });
    t.is(slot.chunks, undefined);
    const chunks = vm.memoryChunks(0);
    t.is(vm.memoryChunks(0), chunks, 'the same array every time');
    new DataView(chunks[0]).setUint32(0x2000, 0xfeedf00d, true);
    const viaFd = Buffer.alloc(4);
    fs.readSync(slot.fd, viaFd, 0, 4, 0x2000);
    t.is(viaFd.readUInt32LE(0), 0xfeedf00d, 'the chunks are the slot\'s RAM');
    // A region built on the lazy source reads the same bytes.
    const region = new GuestRegion({ guestAddress: 0, size: 2 * 1024 * 1024, chunks: () => vm.memoryChunks(0), chunkSize: slot.chunkSize });
    t.deepEqual([...region.read(0x2000, 4)], [0x0d, 0xf0, 0xed, 0xfe]);
    t.throws(() => vm.memoryChunks(7), { message: /slot/ });
  } finally {
    vm.close();
    kvm.close();
  }
});

test('the memfd\'s data ranges name the pages written and leave pages never touched out, without touching them', (t) => {
  const kvm = native().openKvm();
  const vm = kvm.createVm();
  const MiB = 1024 * 1024;
  try {
    const size = 64 * MiB;
    const slot = vm.addMemorySlot({ slot: 0, guestAddress: 0n, size, name: 'sparse' });
    t.deepEqual(fileDataRanges(slot.fd, size), [], 'new RAM is one hole');
    const region = new GuestRegion({ guestAddress: 0, size, chunks: slot.chunks!, chunkSize: slot.chunkSize, dataRanges: () => fileDataRanges(slot.fd, size) });
    region.write(5 * MiB + 10, Uint8Array.of(1));
    region.write(40 * MiB, Uint8Array.of(2));
    const ranges = region.populatedRanges();
    const covered = (at: number) => ranges.some(([s, e]) => at >= s && at < e);
    t.true(covered(5 * MiB + 10) && covered(40 * MiB), 'both written pages');
    t.false(covered(20 * MiB), 'a page never written');
    // (a host with huge shmem pages may report whole 2 MiB pages)
    t.true(ranges.reduce((n, [s, e]) => n + (e - s), 0) <= 4 * MiB);
    t.true(ranges.every(([s, e]) => s % 4096 === 0 && e % 4096 === 0 && e <= size));
    // Asking did not allocate anything: the untouched part is still a hole.
    t.deepEqual(region.populatedRanges(), ranges);
  } finally {
    vm.close();
    kvm.close();
  }
});

test('fromFd maps an existing memfd shared or private (copy-on-write)', async (t) => {
  const a = createTestVm({ ring: 3, memSize: 4 * 1024 * 1024 });
  const kvm = native().openKvm();
  const b = kvm.createVm();
  try {
    a.mem.writeU32(0x1000, 0x11111111);
    const shared = b.addMemorySlot({ slot: 0, guestAddress: 0n, size: 4 * 1024 * 1024, fromFd: a.slot.fd });
    const priv = b.addMemorySlot({
      slot: 1, guestAddress: 0x1000_0000n, size: 1024 * 1024, fromFd: a.slot.fd, fileOffset: 0, privateMap: true,
    });
    t.not(shared.fd, a.slot.fd, 'the slot owns its own descriptor');
    const sharedView = new DataView(shared.chunks![0]);
    const privView = new DataView(priv.chunks![0]);
    t.is(sharedView.getUint32(0x1000, true), 0x11111111);
    t.is(privView.getUint32(0x1000, true), 0x11111111);

    sharedView.setUint32(0x1000, 0x22222222, true);
    t.is(a.mem.readU32(0x1000), 0x22222222, 'shared mapping writes through');
    privView.setUint32(0x1004, 0x33333333, true);
    t.is(a.mem.readU32(0x1004), 0, 'private mapping does not');

    // fileOffset: a window into the middle of the file.
    const window = b.addMemorySlot({ slot: 2, guestAddress: 0x2000_0000n, size: 0x1000, fromFd: a.slot.fd, fileOffset: 0x1000 });
    t.is(new DataView(window.chunks![0]).getUint32(0, true), 0x22222222);
    t.throws(
      () => b.addMemorySlot({ slot: 3, guestAddress: 0x3000_0000n, size: 0x2000, fromFd: a.slot.fd, fileOffset: 4 * 1024 * 1024 - 0x1000 }),
      { code: 'EINVAL', message: /shorter than fileOffset \+ size/ },
    );
  } finally {
    b.close();
    kvm.close();
    a.close();
  }
});

test('chunks stay valid after vm.close(); a guest wrote through the same memory', async (t) => {
  const vm = createTestVm({ guest: buildGuest('dirty'), ring: 3, regs: { rsi: 0x18_0000n, rcx: 1n } });
  vm.mem.writeU64(0x18_0000, 0x30_0000);
  await runVcpu(vm.vcpu);
  const chunk = vm.slot.chunks![0];
  vm.close();
  t.is(new Uint8Array(chunk)[0x30_0000], 0xa5, 'the mapping outlives the VM while referenced');
});

test('zeroPages marks exactly the all-zero 4 KiB pages, a partial last page included', (t) => {
  const buf = new Uint8Array(3 * 4096 + 100);
  buf[4096 + 4095] = 1; // the last byte of page 1
  t.deepEqual([...native().zeroPages(buf)], [1, 0, 1, 1]);
  buf[3 * 4096 + 99] = 7; // the last byte of the partial page
  t.deepEqual([...native().zeroPages(buf)], [1, 0, 1, 0]);
  t.deepEqual([...native().zeroPages(new Uint8Array(0))], []);
  t.throws(() => native().zeroPages(new Uint16Array(4) as unknown as Uint8Array), { message: /expected a Uint8Array/ });
});
