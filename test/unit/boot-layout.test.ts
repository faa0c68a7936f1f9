import test from 'ava';
import {
  ACPI_TABLES_END,
  ACPI_TABLES_START,
  BOOT_STACK_POINTER,
  CMDLINE_ADDRESS,
  CMDLINE_MAX_SIZE,
  E820Type,
  EBDA_START,
  GiB,
  HIGH_RAM_START,
  IOAPIC_ADDRESS,
  KVM_IDENTITY_MAP_ADDRESS,
  KVM_TSS_ADDRESS,
  LAPIC_ADDRESS,
  MMIO_HOLE_END,
  MMIO_HOLE_START,
  MiB,
  PCI_ECAM_SIZE,
  PCI_ECAM_START,
  PCI_MMIO32_SIZE,
  PCI_MMIO32_START,
  PVH_MEMMAP_ADDRESS,
  PVH_MEMMAP_MAX_ENTRIES,
  PVH_MODLIST_ADDRESS,
  PVH_MODLIST_MAX,
  PVH_START_INFO_ADDRESS,
  ZERO_PAGE_ADDRESS,
  e820Map,
  lowRamEnd,
  pciMmio64Window,
  ramRegions,
} from '../../src/boot/layout';
import { BootError } from '../../src/boot/errors';
import {
  BOOT_GDT_ADDRESS,
  BOOT_GDT_LIMIT,
  BOOT_TSS_ADDRESS,
  BOOT_TSS_LIMIT,
  PAGE_TABLES_END,
  PML4_ADDRESS,
} from '../../src/boot/x86/long-mode';

test('RAM below the hole only, when it fits', (t) => {
  t.deepEqual(ramRegions(512 * MiB), [{ guestAddress: 0, size: 512 * MiB }]);
  t.deepEqual(ramRegions(3 * GiB), [{ guestAddress: 0, size: 3 * GiB }]);
  t.is(lowRamEnd(256 * MiB), 256 * MiB);
});

test('RAM beyond 3 GiB continues at 4 GiB', (t) => {
  t.deepEqual(ramRegions(8 * GiB), [
    { guestAddress: 0, size: 3 * GiB },
    { guestAddress: 4 * GiB, size: 5 * GiB },
  ]);
  t.is(lowRamEnd(8 * GiB), MMIO_HOLE_START);
  t.is(MMIO_HOLE_START, 0xc0000000);
  t.is(HIGH_RAM_START, 0x1_0000_0000);
});

test('the MMIO hole holds the IOAPIC, LAPIC and KVM private pages, and no RAM', (t) => {
  for (const a of [IOAPIC_ADDRESS, LAPIC_ADDRESS, KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS]) {
    t.true(a >= MMIO_HOLE_START && a < MMIO_HOLE_END);
  }
  t.is(IOAPIC_ADDRESS, 0xfec00000);
  t.is(LAPIC_ADDRESS, 0xfee00000);
  t.true(KVM_TSS_ADDRESS + 3 * 4096 <= MMIO_HOLE_END);
  t.true(KVM_IDENTITY_MAP_ADDRESS + 4096 <= KVM_TSS_ADDRESS);
  t.true(KVM_IDENTITY_MAP_ADDRESS > LAPIC_ADDRESS + 4096);
  for (const r of ramRegions(16 * GiB)) {
    t.true(r.guestAddress + r.size <= MMIO_HOLE_START || r.guestAddress >= MMIO_HOLE_END);
  }
});

test('e820: RAM, reserved EBDA..0xe0000, ACPI data 0xe0000..1 MiB, RAM above, the PCI ECAM reserved', (t) => {
  t.deepEqual(e820Map(512 * MiB), [
    { addr: 0, size: 0x9fc00, type: E820Type.RAM },
    { addr: 0x9fc00, size: 0xe0000 - 0x9fc00, type: E820Type.RESERVED },
    { addr: 0xe0000, size: 0x20000, type: E820Type.ACPI },
    { addr: 0x100000, size: 512 * MiB - 0x100000, type: E820Type.RAM },
    { addr: 0xe8000000, size: MiB, type: E820Type.RESERVED },
  ]);
  const big = e820Map(6 * GiB);
  t.deepEqual(big.slice(3), [
    { addr: 0x100000, size: 3 * GiB - 0x100000, type: E820Type.RAM },
    { addr: 0xe8000000, size: MiB, type: E820Type.RESERVED },
    { addr: 4 * GiB, size: 3 * GiB, type: E820Type.RAM },
  ]);
  t.is(EBDA_START, 0x9fc00);
  t.is(ACPI_TABLES_START, 0xe0000);
  t.is(ACPI_TABLES_END, 0x100000);
  // sorted, non-overlapping, RAM adds up to the memory size
  for (const size of [2 * MiB, 512 * MiB, 3 * GiB, 6 * GiB]) {
    const map = e820Map(size);
    for (let i = 1; i < map.length; i++) t.true(map[i - 1].addr + map[i - 1].size <= map[i].addr);
    const ram = map.filter((e) => e.type === E820Type.RAM).reduce((n, e) => n + e.size, 0);
    t.is(ram, size - (0x100000 - 0x9fc00), `RAM in e820 for ${size}`);
  }
});

test('invalid memory sizes are rejected', (t) => {
  for (const bad of [0, -4096, 1.5 * MiB + 1, 4096 * 3 + 1, 1 * MiB, NaN]) {
    t.throws(() => ramRegions(bad), { instanceOf: BootError }, String(bad));
  }
});

test('boot structures do not overlap each other or the long-mode GDT, TSS and page tables', (t) => {
  const ranges: [string, number, number][] = [
    ['gdt', BOOT_GDT_ADDRESS, BOOT_GDT_ADDRESS + BOOT_GDT_LIMIT + 1],
    ['tss', BOOT_TSS_ADDRESS, BOOT_TSS_ADDRESS + BOOT_TSS_LIMIT + 1],
    ['start_info', PVH_START_INFO_ADDRESS, PVH_START_INFO_ADDRESS + 56],
    ['modlist', PVH_MODLIST_ADDRESS, PVH_MODLIST_ADDRESS + 32 * PVH_MODLIST_MAX],
    ['memmap', PVH_MEMMAP_ADDRESS, PVH_MEMMAP_ADDRESS + 24 * PVH_MEMMAP_MAX_ENTRIES],
    ['zero page', ZERO_PAGE_ADDRESS, ZERO_PAGE_ADDRESS + 4096],
    ['stack', BOOT_STACK_POINTER - 0x800, BOOT_STACK_POINTER],
    ['page tables', PML4_ADDRESS, PAGE_TABLES_END],
    ['cmdline', CMDLINE_ADDRESS, CMDLINE_ADDRESS + CMDLINE_MAX_SIZE],
    ['acpi', ACPI_TABLES_START, ACPI_TABLES_END],
  ];
  for (let i = 0; i < ranges.length; i++) {
    for (let j = i + 1; j < ranges.length; j++) {
      const [a, as, ae] = ranges[i];
      const [b, bs, be] = ranges[j];
      t.true(ae <= bs || be <= as, `${a} overlaps ${b}`);
    }
  }
  t.true(PVH_MEMMAP_MAX_ENTRIES >= 128);
  t.is(BOOT_STACK_POINTER % 16, 0);
  t.true(CMDLINE_ADDRESS + CMDLINE_MAX_SIZE <= EBDA_START);
});

test('the reset vector holds code that writes the ACPI reset register, inside the reserved area', async (t) => {
  const { RESET_VECTOR_ADDRESS, resetVectorCode } = await import('../../src/boot/reset-vector');
  const { ACPI_TABLES_START, ACPI_TABLES_END } = await import('../../src/boot/layout');
  const code = resetVectorCode(0x602, 6);
  // mov dx, 0x602 / mov al, 6 / out dx, al / hlt / jmp back to hlt
  t.deepEqual(Array.from(code), [0xba, 0x02, 0x06, 0xb0, 0x06, 0xee, 0xf4, 0xeb, 0xfd]);
  t.true(RESET_VECTOR_ADDRESS >= ACPI_TABLES_START && RESET_VECTOR_ADDRESS + code.length <= ACPI_TABLES_END);
});

test('PCI windows: the 32-bit BAR window and ECAM sit in the hole below the IOAPIC; the 64-bit window starts above RAM', (t) => {
  t.is(PCI_MMIO32_START, MMIO_HOLE_START);
  t.is(PCI_MMIO32_START + PCI_MMIO32_SIZE, PCI_ECAM_START, 'BARs end where ECAM starts');
  t.is(PCI_ECAM_SIZE, MiB, 'bus 0: 32 devices x 8 functions x 4 KiB');
  t.true(PCI_ECAM_START % MiB === 0 && PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_ADDRESS);
  for (const a of [KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS]) t.true(a >= PCI_ECAM_START + PCI_ECAM_SIZE);
  t.deepEqual(pciMmio64Window(64 * MiB), { start: HIGH_RAM_START, size: 64 * GiB });
  t.deepEqual(pciMmio64Window(6 * GiB), { start: 7 * GiB, size: 64 * GiB }, '3 GiB above 4 GiB ends at 7 GiB');
  t.deepEqual(pciMmio64Window(6 * GiB + 4096).start, 8 * GiB, 'the next GiB boundary');
  for (const size of [64 * MiB, 3 * GiB, 6 * GiB + 4096, 16 * GiB]) {
    const w = pciMmio64Window(size);
    for (const r of ramRegions(size)) t.true(r.guestAddress + r.size <= w.start, `${size}: RAM below the window`);
  }
});
