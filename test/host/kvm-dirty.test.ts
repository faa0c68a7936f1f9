// Dirty-page tracking: KVM's log for guest writes OR the VMM-side bitmap for writes made
// through GuestMemory, both cleared on read.
import fs from 'node:fs';

import test from 'ava';

import { PDPT_ADDRESS, PD_ADDRESS, PML4_ADDRESS } from '../../src/boot/x86/long-mode';
import { buildGuest, createTestVm, dirtyPages, runVcpu, vmFlagsOfMemfd } from './harness';

const PAGE = 4096;
/** The guest's page-table pages (PML4, PDPT, first page directory), which its CPU walks. */
const PAGE_TABLE_PAGES = [PML4_ADDRESS / PAGE, PDPT_ADDRESS / PAGE, PD_ADDRESS / PAGE];

test('getDirtyBitmap reports exactly the guest-written and VMM-written pages, then nothing', async (t) => {
  const guest = buildGuest('dirty');
  const guestPages = [0x300, 0x345, 0x400, 0x7ff, 0x801, 0xabc, 0xfff];
  const table = 0x18_0000;
  const vm = createTestVm({ guest, ring: 3, regs: { rsi: BigInt(table), rcx: BigInt(guestPages.length) } });
  try {
    const targets = guestPages.map((p, i) => p * PAGE + ((i * 517) % PAGE));
    targets.forEach((a, i) => vm.mem.writeU64(table + i * 8, a));

    // Everything written during setup (GDT, page tables, code, table) is reported once...
    const setup = dirtyPages(vm.vm.getDirtyBitmap(0));
    t.true(setup.includes(guest.loadAddress / PAGE), 'setup writes are VMM-dirty');
    t.true(setup.includes(table / PAGE));
    // ...and then cleared.
    t.deepEqual(dirtyPages(vm.vm.getDirtyBitmap(0)), []);

    // VMM writes while the guest is stopped: one straddles a page boundary.
    vm.mem.writeU32(0x500 * PAGE + PAGE - 2, 0x11223344);
    vm.mem.writeU8(0x900 * PAGE + 0x123, 7);
    const vmmPages = [0x500, 0x501, 0x900];

    let atSignal: number[] | undefined;
    let afterSignal: number[] | undefined;
    await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind === 'io' && exit.port === 0x502) {
        atSignal = dirtyPages(vm.vm.getDirtyBitmap(0));
        afterSignal = dirtyPages(vm.vm.getDirtyBitmap(0));
      }
      return undefined;
    });

    const expected = [...new Set([...guestPages, ...vmmPages])].sort((a, b) => a - b);
    // The guest also reads its code page and the table page, and its CPU walks the page
    // tables. KVM may log those pages too: on a read fault it can map a page writable (the boot
    // page tables map it writable with D preset) and mark it, and with AMD nested paging every
    // guest page-table access counts as a write. Nothing outside these pages may appear.
    const readOnly = [guest.loadAddress / PAGE, table / PAGE, ...PAGE_TABLE_PAGES];
    const got = atSignal ?? [];
    t.deepEqual(expected.filter((p) => !got.includes(p)), [], 'every written page is reported');
    const extra = got.filter((p) => !expected.includes(p));
    t.deepEqual(extra.filter((p) => !readOnly.includes(p)), [], 'no page outside the written and read set');
    if (extra.length) t.log(`pages only read but reported dirty: ${extra.map((p) => p.toString(16)).join(' ')}`);
    t.deepEqual(afterSignal, [], 'a second read returns an empty set');
    for (const a of targets) t.is(vm.mem.readU8(a), 0xa5, `guest byte at 0x${a.toString(16)}`);
  } finally {
    vm.close();
  }
});

test('with clean page-table leaves, the dirty set is the written pages plus the page directory, and only pages the guest touched', async (t) => {
  const guest = buildGuest('dirty');
  const guestPages = [0x2ff, 0x456, 0x9a0, 0xc00, 0xd01, 0xe77, 0xffe];
  const table = 0x18_0000;
  const vm = createTestVm({
    guest, ring: 3, presetDirty: false, regs: { rsi: BigInt(table), rcx: BigInt(guestPages.length) },
  });
  try {
    guestPages.forEach((p, i) => vm.mem.writeU64(table + i * 8, p * PAGE + 8 * i));
    vm.vm.getDirtyBitmap(0);
    vm.mem.fill(0x777 * PAGE, 2 * PAGE, 1);
    let atSignal: number[] | undefined;
    await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind === 'io' && exit.port === 0x502) atSignal = dirtyPages(vm.vm.getDirtyBitmap(0));
      return undefined;
    });
    // The guest's first write into each 2 MiB page sets D in the first page directory.
    const pageDirectory = PD_ADDRESS / PAGE;
    const required = [...guestPages, 0x777, 0x778, pageDirectory].sort((a, b) => a - b);
    const got = atSignal ?? [];
    t.deepEqual(required.filter((p) => !got.includes(p)), [], 'every written page and the page directory');
    // As above, pages the guest only read or walked may be logged by some hosts; no other.
    const touched = [guest.loadAddress / PAGE, table / PAGE, ...PAGE_TABLE_PAGES];
    t.deepEqual(got.filter((p) => !required.includes(p) && !touched.includes(p)), [], 'no page the guest did not touch');
    // The guest ran on to its exit after that read: at most its page tables were walked again.
    t.deepEqual(dirtyPages(vm.vm.getDirtyBitmap(0)).filter((p) => !PAGE_TABLE_PAGES.includes(p)), [], 'nothing written after the signal');
  } finally {
    vm.close();
  }
});

test('the VMM-side bitmap is shared: marks made on it appear in getDirtyBitmap and are cleared', (t) => {
  const vm = createTestVm({ ring: 3 });
  try {
    vm.vm.getDirtyBitmap(0);
    const shared = vm.vm.vmmDirtyBitmap(0);
    t.is(shared.length, Math.ceil(vm.slot.size / PAGE / 8));
    t.is(vm.vm.vmmDirtyBitmap(0).buffer, shared.buffer, 'one ArrayBuffer per bitmap');
    shared[0x42 >> 3] |= 1 << (0x42 & 7);
    shared[shared.length - 1] |= 0x80;
    const lastPage = vm.slot.size / PAGE - 1;
    t.deepEqual(dirtyPages(vm.vm.getDirtyBitmap(0)), [0x42, lastPage]);
    t.true(shared.every((b) => b === 0), 'reading cleared the shared bitmap');
    t.deepEqual(dirtyPages(vm.vm.getDirtyBitmap(0)), []);
  } finally {
    vm.close();
  }
});

test('guest RAM chunks are zero-copy views of the memfd mapping', (t) => {
  const vm = createTestVm({ ring: 3, memSize: 8 * 1024 * 1024 });
  try {
    t.is(vm.slot.chunks!.length, 1);
    t.is(vm.slot.chunks![0].byteLength, 8 * 1024 * 1024);
    t.true(vm.slot.fd >= 0);
    const view = new Uint8Array(vm.slot.chunks![0]);
    vm.mem.writeU32(0x12340, 0xa1b2c3d4);
    t.deepEqual([...view.subarray(0x12340, 0x12344)], [0xd4, 0xc3, 0xb2, 0xa1]);
    // The memfd itself sees the same bytes (MAP_SHARED).
    const viaFd = Buffer.alloc(4);
    fs.readSync(vm.slot.fd, viaFd, 0, 4, 0x12340);
    t.is(viaFd.readUInt32LE(0), 0xa1b2c3d4);
  } finally {
    vm.close();
  }
});

test('the dirty log is on from the start, and can be turned off and on again', (t) => {
  const vm = createTestVm({ ring: 3 });
  try {
    vm.mem.writeU8(0x124 * PAGE, 1);
    t.true(dirtyPages(vm.vm.getDirtyBitmap(0)).includes(0x124), 'the log of a new slot can be read at once, with the write in it');
    vm.vm.setDirtyLogging(0, false);
    t.throws(() => vm.vm.getDirtyBitmap(0), { message: /dirty logging is off for slot 0/ });
    vm.vm.setDirtyLogging(0, true);
    vm.mem.writeU8(0x123 * PAGE, 1);
    t.true(dirtyPages(vm.vm.getDirtyBitmap(0)).includes(0x123));
    t.throws(() => vm.vm.setDirtyLogging(7, true), { message: /no memory slot 7/ });
  } finally {
    vm.close();
  }
});

test('a slot may start without the dirty log, and asks for transparent huge pages only when told', (t) => {
  const vm = createTestVm({ ring: 3 });
  try {
    const plain = vm.vm.addMemorySlot({ slot: 1, guestAddress: 0x1_0000_0000n, size: 4 << 20, name: 'tern-test-plain', dirtyLogging: false });
    const huge = vm.vm.addMemorySlot({ slot: 2, guestAddress: 0x2_0000_0000n, size: 4 << 20, name: 'tern-test-huge', dirtyLogging: false, hugePages: true });
    // No log until asked for: KVM may then map the slot in large pages.
    t.throws(() => vm.vm.getDirtyBitmap(1), { message: /dirty logging is off for slot 1/ });
    vm.vm.setDirtyLogging(1, true);
    t.deepEqual(dirtyPages(vm.vm.getDirtyBitmap(1)), []);
    // MADV_HUGEPAGE shows as the mapping's "hg" flag, whatever the host's shmem_enabled.
    t.true(vmFlagsOfMemfd(huge.fd).includes('hg'));
    t.false(vmFlagsOfMemfd(plain.fd).includes('hg'));
    t.false(vmFlagsOfMemfd(vm.slot.fd).includes('hg'));
  } finally {
    vm.close();
  }
});
