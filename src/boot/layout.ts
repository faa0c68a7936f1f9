// Guest physical memory layout of a Tern x86-64 VM.
//
//   0x0000_0000  real-mode IVT/BDA (RAM)
//   0x0000_0500  boot GDT (x86/long-mode.ts)
//   0x0000_1000  boot TSS + I/O bitmap, ..0x306a (x86/long-mode.ts)
//   0x0000_6000  PVH hvm_start_info, modlist, memmap table
//   0x0000_7000  zero page (struct boot_params)
//   0x0000_8000  boot stack (grows down from 0x8ff0)
//   0x0000_9000  identity-map page tables, ..0xf000 (x86/long-mode.ts)
//   0x0002_0000  kernel command line
//   0x0009_fc00  EBDA .. 0xe0000 reserved (legacy BIOS/VGA area)
//   0x000e_0000  ACPI tables (RSDP first, where a legacy scan finds it) .. 0x100000
//   0x0010_0000  bzImage protected-mode kernel; ELF kernels load at their p_paddr
//   ...          initramfs, as high as the kernel's limits allow
//   0xc000_0000  32-bit MMIO hole .. 4 GiB:
//     0xc000_0000  PCI 32-bit BAR window .. 0xe800_0000
//     0xe800_0000  PCI ECAM (config space of bus 0, 1 MiB)
//     0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC
//   0x1_0000_0000 RAM above 4 GiB (whatever did not fit below the hole)
//   above RAM    PCI 64-bit BAR window (1 GiB aligned)

import { GuestAddress, PAGE_SIZE } from '../memory/guest-memory';
import { BootError } from './errors';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Start of the 32-bit MMIO hole; low RAM ends here at the latest. */
export const MMIO_HOLE_START: GuestAddress = 0xc000_0000;
export const MMIO_HOLE_END: GuestAddress = 0x1_0000_0000;
/** RAM that does not fit below the hole continues here. */
export const HIGH_RAM_START: GuestAddress = 0x1_0000_0000;

/**
 * Where PCI functions' 32-bit memory BARs go: the bottom of the hole up to the ECAM window,
 * the same split Cloud Hypervisor uses, clear of the IOAPIC/LAPIC pages and the KVM pages.
 */
export const PCI_MMIO32_START: GuestAddress = MMIO_HOLE_START;
export const PCI_MMIO32_SIZE = 0xe800_0000 - MMIO_HOLE_START;
/** ECAM (PCIe enhanced configuration access): 4 KiB per function, 1 MiB per bus; bus 0 only. */
export const PCI_ECAM_START: GuestAddress = 0xe800_0000;
export const PCI_ECAM_BUSES = 1;
export const PCI_ECAM_SIZE = PCI_ECAM_BUSES * MiB;
/** Size of the 64-bit BAR window above RAM: room for large BARs, well inside 39 physical address bits. */
export const PCI_MMIO64_SIZE = 64 * GiB;

export const IOAPIC_ADDRESS: GuestAddress = 0xfec0_0000;
export const IOAPIC_SIZE = 0x1000;
export const LAPIC_ADDRESS: GuestAddress = 0xfee0_0000;
export const LAPIC_SIZE = 0x1000;
/** Number of IOAPIC pins (KVM's in-kernel IOAPIC). */
export const IOAPIC_PINS = 24;

/**
 * KVM_SET_IDENTITY_MAP_ADDR (one page) and KVM_SET_TSS_ADDR (three pages) on Intel hosts:
 * inside the hole, clear of the IOAPIC and LAPIC pages and of any memory slot.
 */
export const KVM_IDENTITY_MAP_ADDRESS: GuestAddress = 0xfeff_c000;
export const KVM_TSS_ADDRESS: GuestAddress = 0xfeff_d000;

/** struct hvm_start_info (56 bytes), then the module list and the memory map. */
export const PVH_START_INFO_ADDRESS: GuestAddress = 0x6000;
export const PVH_MODLIST_ADDRESS: GuestAddress = 0x6040;
/** Room for 4 modules of 32 bytes before the memmap. */
export const PVH_MODLIST_MAX = 4;
export const PVH_MEMMAP_ADDRESS: GuestAddress = 0x6100;
/** hvm_memmap_table_entry is 24 bytes; the table must end before the zero page. */
export const PVH_MEMMAP_MAX_ENTRIES = Math.floor((0x7000 - 0x6100) / 24);

export const ZERO_PAGE_ADDRESS: GuestAddress = 0x7000;
/** Initial rsp/rbp for the 64-bit entry: top of the page below the page tables, 16-aligned. */
export const BOOT_STACK_POINTER: GuestAddress = 0x8ff0;

export const CMDLINE_ADDRESS: GuestAddress = 0x2_0000;
/** Bytes reserved for the command line including its NUL. */
export const CMDLINE_MAX_SIZE = 0x1_0000;

export const EBDA_START: GuestAddress = 0x9_fc00;
export const ACPI_TABLES_START: GuestAddress = 0xe_0000;
export const ACPI_TABLES_END: GuestAddress = 0x10_0000;
/** The RSDP sits at the start of the ACPI area (16-byte aligned, inside 0xe0000..0xfffff). */
export const RSDP_ADDRESS: GuestAddress = ACPI_TABLES_START;

/** Where RAM above the legacy area starts; also where a bzImage's protected-mode code goes. */
export const HIGH_MEMORY_START: GuestAddress = 0x10_0000;
export const BZIMAGE_LOAD_ADDRESS: GuestAddress = HIGH_MEMORY_START;

/** E820 / hvm_memmap_table_entry types (same numbering). */
export const E820Type = {
  RAM: 1,
  RESERVED: 2,
  ACPI: 3,
  NVS: 4,
  UNUSABLE: 5,
} as const;
export type E820TypeValue = (typeof E820Type)[keyof typeof E820Type];

export interface E820Entry {
  addr: GuestAddress;
  size: number;
  type: E820TypeValue;
}

export interface RamRegion {
  guestAddress: GuestAddress;
  size: number;
}

/** Smallest memory size the layout supports: the whole legacy first MiB must be RAM. */
export const MIN_MEMORY_SIZE = 2 * MiB;

export function validateMemorySize(memorySize: number): void {
  if (!Number.isSafeInteger(memorySize) || memorySize <= 0) {
    throw new BootError(`memory size ${memorySize} is not a positive integer number of bytes`);
  }
  if (memorySize % PAGE_SIZE !== 0) {
    throw new BootError(`memory size ${memorySize} is not a multiple of the ${PAGE_SIZE}-byte page size`);
  }
  if (memorySize < MIN_MEMORY_SIZE) {
    throw new BootError(`memory size ${memorySize} is below the minimum of ${MIN_MEMORY_SIZE} bytes`);
  }
}

/** End (exclusive) of RAM below the 32-bit hole. */
export function lowRamEnd(memorySize: number): GuestAddress {
  return Math.min(memorySize, MMIO_HOLE_START);
}

/** Guest RAM regions (memory slots) for a VM of `memorySize` bytes, in address order. */
export function ramRegions(memorySize: number): RamRegion[] {
  validateMemorySize(memorySize);
  const low = lowRamEnd(memorySize);
  const regions: RamRegion[] = [{ guestAddress: 0, size: low }];
  if (memorySize > low) regions.push({ guestAddress: HIGH_RAM_START, size: memorySize - low });
  return regions;
}

/**
 * The firmware memory map the guest sees. The whole of low RAM is backed by one slot,
 * but 0x9fc00..0x100000 is reported as not usable: EBDA/VGA/BIOS area, and the ACPI
 * tables at 0xe0000 as ACPI data so the kernel keeps them. The PCI ECAM window is reserved.
 */
export function e820Map(memorySize: number): E820Entry[] {
  validateMemorySize(memorySize);
  const low = lowRamEnd(memorySize);
  const map: E820Entry[] = [
    { addr: 0, size: EBDA_START, type: E820Type.RAM },
    { addr: EBDA_START, size: ACPI_TABLES_START - EBDA_START, type: E820Type.RESERVED },
    { addr: ACPI_TABLES_START, size: ACPI_TABLES_END - ACPI_TABLES_START, type: E820Type.ACPI },
  ];
  if (low > HIGH_MEMORY_START) {
    map.push({ addr: HIGH_MEMORY_START, size: low - HIGH_MEMORY_START, type: E820Type.RAM });
  }
  // ECAM is reserved in the firmware map as well as in ACPI: Linux's early MMCONFIG check
  // looks only here, and without a reservation it would put other resources on top of it.
  map.push({ addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, type: E820Type.RESERVED });
  if (memorySize > low) map.push({ addr: HIGH_RAM_START, size: memorySize - low, type: E820Type.RAM });
  return map;
}

/** The 64-bit BAR window of a VM with `memorySize` bytes of RAM: from the first GiB above its RAM. */
export function pciMmio64Window(memorySize: number): { start: GuestAddress; size: number } {
  validateMemorySize(memorySize);
  const low = lowRamEnd(memorySize);
  const ramEnd = memorySize > low ? HIGH_RAM_START + (memorySize - low) : HIGH_RAM_START;
  return { start: alignUp(ramEnd, GiB), size: PCI_MMIO64_SIZE };
}

export function alignUp(v: number, align: number): number {
  return Math.ceil(v / align) * align;
}

export function alignDown(v: number, align: number): number {
  return Math.floor(v / align) * align;
}

export function hex(v: number | bigint): string {
  return '0x' + v.toString(16);
}
