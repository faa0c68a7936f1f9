// Boot GDT, identity page tables and mode-switch sregs: the bytes written, and what KVM
// accepts and runs.
import test from 'ava';

import {
  BOOT_GDT_ADDRESS,
  BOOT_GDT_LIMIT,
  BOOT_STAR,
  BOOT_TSS_ADDRESS,
  BOOT_TSS_LIMIT,
  PDPT_ADDRESS,
  PD_ADDRESS,
  PML4_ADDRESS,
  Selector,
  bootGdtEntry,
  longModeSregs,
  protectedMode32Sregs,
  writeBootGdt,
  writeIdentityPageTables,
} from '../../src/boot/x86/long-mode';
import { anonymousGuestMemory } from '../../src/memory/guest-memory';
import { buildGuest, createTestVm, runVcpu } from './harness';

test('boot GDT holds the documented descriptors and a TSS with an I/O bitmap', (t) => {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: 0x10000 }]);
  const gdtr = writeBootGdt(mem, { userPortIo: true, rsp0: 0x8000n });
  t.deepEqual(gdtr, { base: BigInt(BOOT_GDT_ADDRESS), limit: BOOT_GDT_LIMIT });
  const at = (sel: number) => mem.readU64(BOOT_GDT_ADDRESS + sel);
  t.is(at(Selector.NULL), 0n);
  t.is(at(Selector.CODE64), 0x00af9b000000ffffn);
  t.is(at(Selector.DATA), 0x00cf93000000ffffn);
  t.is(at(Selector.CODE32), 0x00cf9b000000ffffn);
  t.is(at(Selector.DATA32), 0x00cf93000000ffffn);
  t.is(at(Selector.USER_CODE32), 0x00cffb000000ffffn);
  t.is(at(Selector.USER_DATA), 0x00cff3000000ffffn);
  t.is(at(Selector.USER_CODE64), 0x00affb000000ffffn);
  t.is(at(Selector.CODE64), bootGdtEntry(Selector.CODE64));
  // 64-bit busy TSS, base 0x1000, byte-granular limit covering the bitmap.
  t.is(at(Selector.TSS), 0x00008b0010002068n);
  t.is(at(Selector.TSS + 8), 0n);
  t.is(BOOT_TSS_LIMIT, 0x2068);
  t.is(mem.readU64(BOOT_TSS_ADDRESS + 4), 0x8000n);
  t.is(mem.readU16(BOOT_TSS_ADDRESS + 0x66), 0x68);
  t.is(mem.readU8(BOOT_TSS_ADDRESS + 0x68 + 0x3f8 / 8), 0, 'port 0x3f8 allowed');
  t.is(mem.readU8(BOOT_TSS_ADDRESS + BOOT_TSS_LIMIT), 0xff);
  // SYSRET with this STAR lands on USER_DATA / USER_CODE64 at RPL 3.
  t.is(Number((BOOT_STAR >> 48n) + 8n) | 3, Selector.USER_DATA | 3);
  t.is(Number((BOOT_STAR >> 48n) + 16n) | 3, Selector.USER_CODE64 | 3);

  writeBootGdt(mem);
  t.is(mem.readU8(BOOT_TSS_ADDRESS + 0x68 + 0x3f8 / 8), 0xff, 'ports denied by default');
});

test('identity page tables map 4 GiB with 2 MiB pages; user=true sets U/S everywhere', (t) => {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: 0x10000 }]);
  t.is(writeIdentityPageTables(mem), PML4_ADDRESS);
  t.is(mem.readU64(PML4_ADDRESS), BigInt(PDPT_ADDRESS) | 0x23n);
  t.is(mem.readU64(PML4_ADDRESS + 8), 0n);
  for (let i = 0; i < 4; i++) t.is(mem.readU64(PDPT_ADDRESS + i * 8), BigInt(PD_ADDRESS + i * 0x1000) | 0x23n);
  t.is(mem.readU64(PD_ADDRESS), 0xe3n);
  t.is(mem.readU64(PD_ADDRESS + 3 * 0x1000 + 511 * 8), 0xffe00000n | 0xe3n);
  writeIdentityPageTables(mem, { user: true, presetDirty: false });
  t.is(mem.readU64(PML4_ADDRESS), BigInt(PDPT_ADDRESS) | 0x27n);
  t.is(mem.readU64(PD_ADDRESS + 0x68 * 8), (0x68n << 21n) | 0xa7n);
});

test('KVM accepts the long-mode sregs unchanged for ring 0 and ring 3', (t) => {
  for (const ring of [0, 3] as const) {
    const vm = createTestVm({ ring });
    try {
      const s = vm.vcpu.getSregs();
      t.deepEqual(s, longModeSregs(s, { cr3: PML4_ADDRESS, ring }));
      t.is(s.cs.selector, ring === 3 ? Selector.USER_CODE64 | 3 : Selector.CODE64);
      t.is(s.ss.dpl, ring);
      t.is(s.efer & 0x500n, 0x500n);
    } finally {
      vm.close();
    }
  }
});

test('protectedMode32Sregs runs a flat 32-bit guest with paging off', async (t) => {
  const vm = createTestVm({ guest: buildGuest('pm32'), ring: 0 });
  try {
    vm.vcpu.setSregs(protectedMode32Sregs(vm.vcpu.getSregs()));
    const s = vm.vcpu.getSregs();
    t.is(s.cr0 & 0x80000001n, 1n);
    t.is(s.efer, 0n);
    t.is(s.cs.db, 1);
    t.is(s.cs.l, 0);
    const { exits } = await runVcpu(vm.vcpu);
    t.deepEqual(exits[0], { kind: 'io', direction: 'out', port: 0x515, size: 4, data: 0x600dc0de });
    t.is(vm.mem.readU32(0x180000), 0x600dc0de);
  } finally {
    vm.close();
  }
});
