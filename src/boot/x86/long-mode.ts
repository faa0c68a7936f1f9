// Put an x86-64 vCPU straight into 64-bit long mode (or flat 32-bit protected mode for PVH)
// without firmware: a boot GDT + TSS, identity-mapped page tables, and matching segment
// registers. Pure: everything is written through GuestMemory or returned as data.
//
// Layout (see also ../layout.ts):
//   0x0500  GDT (BOOT_GDT_ENTRIES descriptors)
//   0x1000  64-bit TSS, then an 8 KiB I/O permission bitmap and its 0xff terminator (..0x3069)
//   0x9000  PML4, 0xa000 PDPT, 0xb000..0xefff four page directories (2 MiB pages, 4 GiB)
//
// Accessed bits are preset in every descriptor and page-table entry (and dirty bits in the
// 2 MiB leaves unless asked otherwise) so the CPU does not write them back into the boot
// pages.
import type { GuestMemory } from '../../memory/guest-memory';
import type { DTable, Segment, Sregs } from '../../native/kvm';

export const BOOT_GDT_ADDRESS = 0x500;
export const BOOT_TSS_ADDRESS = 0x1000;
export const PML4_ADDRESS = 0x9000;
export const PDPT_ADDRESS = 0xa000;
/** Four page directories, one per GiB. */
export const PD_ADDRESS = 0xb000;
export const IDENTITY_MAP_SIZE = 4 * 1024 * 1024 * 1024;
/** First byte after the page tables. */
export const PAGE_TABLES_END = PD_ADDRESS + 4 * 0x1000;

/**
 * GDT selectors (RPL 0). The user block is laid out for SYSCALL/SYSRET: with
 * STAR[63:48] = USER_CODE32, SYSRET loads SS = USER_DATA|3 and CS = USER_CODE64|3.
 */
export const Selector = {
  NULL: 0x00,
  CODE64: 0x08,
  DATA: 0x10,
  CODE32: 0x18,
  DATA32: 0x20,
  USER_CODE32: 0x28,
  USER_DATA: 0x30,
  USER_CODE64: 0x38,
  /** 16-byte system descriptor (two slots). */
  TSS: 0x40,
} as const;

export const BOOT_GDT_ENTRIES = 10;
export const BOOT_GDT_LIMIT = BOOT_GDT_ENTRIES * 8 - 1;

/** struct tss64 is 104 bytes; the I/O bitmap follows it directly. */
export const TSS64_SIZE = 0x68;
export const TSS_IO_BITMAP_OFFSET = TSS64_SIZE;
/** 65536 ports, one bit each. */
export const TSS_IO_BITMAP_SIZE = 8192;
/** Limit covers the bitmap plus the mandatory all-ones byte after it. */
export const BOOT_TSS_LIMIT = TSS_IO_BITMAP_OFFSET + TSS_IO_BITMAP_SIZE;
/** First byte after the TSS and its bitmap (0x3069). */
export const BOOT_TSS_END = BOOT_TSS_ADDRESS + BOOT_TSS_LIMIT + 1;

/** MSR_STAR value matching the GDT layout (SYSCALL -> CODE64/DATA, SYSRET -> user selectors). */
export const BOOT_STAR = (BigInt(Selector.USER_CODE32 | 3) << 48n) | (BigInt(Selector.CODE64) << 32n);

export const CR0_PE = 1n << 0n;
export const CR0_MP = 1n << 1n;
export const CR0_ET = 1n << 4n;
export const CR0_NE = 1n << 5n;
export const CR0_WP = 1n << 16n;
export const CR0_AM = 1n << 18n;
export const CR0_PG = 1n << 31n;
export const CR4_PAE = 1n << 5n;
export const CR4_OSFXSR = 1n << 9n;
export const CR4_OSXMMEXCPT = 1n << 10n;
export const EFER_SCE = 1n << 0n;
export const EFER_LME = 1n << 8n;
export const EFER_LMA = 1n << 10n;

export const RFLAGS_FIXED = 1n << 1n;
export const RFLAGS_IOPL3 = 3n << 12n;

/** CR0 for long mode: protection, paging, native FPU errors, write-protect. */
export const LONG_MODE_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
/** CR4 for long mode: PAE plus SSE enabled (compiled guest code uses it freely). */
export const LONG_MODE_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
export const LONG_MODE_EFER = EFER_SCE | EFER_LME | EFER_LMA;

// Page-table entry bits.
export const PTE_PRESENT = 1n << 0n;
export const PTE_WRITE = 1n << 1n;
export const PTE_USER = 1n << 2n;
export const PTE_ACCESSED = 1n << 5n;
export const PTE_DIRTY = 1n << 6n;
export const PTE_LARGE = 1n << 7n;

/** A code/data descriptor in the fields of struct kvm_segment, plus its raw 8-byte form. */
interface Descriptor {
  base: number;
  /** 20-bit limit as stored (pages when g = 1). */
  limit: number;
  /** 4-bit type including the accessed bit. */
  type: number;
  s: number;
  dpl: number;
  present: number;
  avl: number;
  l: number;
  db: number;
  g: number;
}

function flat(type: number, dpl: number, l: number, db: number): Descriptor {
  return { base: 0, limit: 0xfffff, type, s: 1, dpl, present: 1, avl: 0, l, db, g: 1 };
}

const CODE = 0xb; // execute/read, accessed
const DATA = 0x3; // read/write, accessed
const TSS_BUSY = 0xb; // 64-bit TSS, busy (as after LTR)

/** Code/data descriptors by selector. */
const SEGMENT_DESCRIPTORS: Record<number, Descriptor> = {
  [Selector.CODE64]: flat(CODE, 0, 1, 0),
  [Selector.DATA]: flat(DATA, 0, 0, 1),
  [Selector.CODE32]: flat(CODE, 0, 0, 1),
  [Selector.DATA32]: flat(DATA, 0, 0, 1),
  [Selector.USER_CODE32]: flat(CODE, 3, 0, 1),
  [Selector.USER_DATA]: flat(DATA, 3, 0, 1),
  [Selector.USER_CODE64]: flat(CODE, 3, 1, 0),
};

function encodeDescriptor(d: Descriptor): bigint {
  const base = BigInt(d.base);
  const limit = BigInt(d.limit);
  const access = BigInt(d.type | (d.s << 4) | (d.dpl << 5) | (d.present << 7));
  const flags = BigInt(d.avl | (d.l << 1) | (d.db << 2) | (d.g << 3));
  return (
    (limit & 0xffffn) |
    ((base & 0xffffffn) << 16n) |
    (access << 40n) |
    (((limit >> 16n) & 0xfn) << 48n) |
    (flags << 52n) |
    (((base >> 24n) & 0xffn) << 56n)
  );
}

/** Raw 8-byte GDT entry for a code/data selector of the boot GDT (RPL bits ignored). */
export function bootGdtEntry(selector: number): bigint {
  const d = SEGMENT_DESCRIPTORS[selector & ~7];
  if (!d) throw new RangeError(`selector 0x${selector.toString(16)} is not a code/data entry of the boot GDT`);
  return encodeDescriptor(d);
}

/** The cached (hidden) segment state KVM expects for `selector` of the boot GDT. */
export function bootSegment(selector: number): Segment {
  const d = SEGMENT_DESCRIPTORS[selector & ~7];
  if (!d) throw new RangeError(`selector 0x${selector.toString(16)} is not a code/data entry of the boot GDT`);
  return {
    base: BigInt(d.base),
    limit: d.g ? ((d.limit << 12) | 0xfff) >>> 0 : d.limit,
    selector,
    type: d.type,
    present: d.present,
    dpl: d.dpl,
    db: d.db,
    s: d.s,
    l: d.l,
    g: d.g,
    avl: d.avl,
    unusable: 0,
  };
}

/** TR as loaded from the boot GDT's TSS descriptor. */
export function bootTaskRegister(): Segment {
  return {
    base: BigInt(BOOT_TSS_ADDRESS),
    limit: BOOT_TSS_LIMIT,
    selector: Selector.TSS,
    type: TSS_BUSY,
    present: 1,
    dpl: 0,
    db: 0,
    s: 0,
    l: 0,
    g: 0,
    avl: 0,
    unusable: 0,
  };
}

export interface BootGdtOptions {
  /**
   * Let CPL-3 code use every I/O port through the TSS I/O permission bitmap (all bits clear).
   * Without it the bitmap denies every port. Needed on hosts that ignore RFLAGS.IOPL for
   * ring-3 guest code (PVM does).
   */
  userPortIo?: boolean;
  /** Stack loaded on a CPL 3 -> 0 transition (TSS.RSP0). */
  rsp0?: bigint | number;
}

/** Write the boot GDT at BOOT_GDT_ADDRESS and its 64-bit TSS (with I/O bitmap) at BOOT_TSS_ADDRESS. */
export function writeBootGdt(mem: GuestMemory, opts: BootGdtOptions = {}): DTable {
  const gdt = new DataView(new ArrayBuffer(BOOT_GDT_ENTRIES * 8));
  for (const [sel, d] of Object.entries(SEGMENT_DESCRIPTORS)) {
    gdt.setBigUint64(Number(sel), encodeDescriptor(d), true);
  }
  // 16-byte TSS descriptor: the low half is laid out like a segment descriptor (s = 0),
  // the high half holds base[63:32].
  const tssLow = encodeDescriptor({
    base: BOOT_TSS_ADDRESS,
    limit: BOOT_TSS_LIMIT,
    type: TSS_BUSY,
    s: 0,
    dpl: 0,
    present: 1,
    avl: 0,
    l: 0,
    db: 0,
    g: 0,
  });
  gdt.setBigUint64(Selector.TSS, tssLow, true);
  gdt.setBigUint64(Selector.TSS + 8, BigInt(BOOT_TSS_ADDRESS) >> 32n, true);
  mem.write(BOOT_GDT_ADDRESS, new Uint8Array(gdt.buffer));

  const tss = new Uint8Array(BOOT_TSS_LIMIT + 1);
  const tv = new DataView(tss.buffer);
  tv.setBigUint64(4, BigInt(opts.rsp0 ?? 0), true); // RSP0
  tv.setUint16(0x66, TSS_IO_BITMAP_OFFSET, true); // I/O map base
  tss.fill(opts.userPortIo ? 0x00 : 0xff, TSS_IO_BITMAP_OFFSET, TSS_IO_BITMAP_OFFSET + TSS_IO_BITMAP_SIZE);
  tss[BOOT_TSS_LIMIT] = 0xff;
  mem.write(BOOT_TSS_ADDRESS, tss);
  return { base: BigInt(BOOT_GDT_ADDRESS), limit: BOOT_GDT_LIMIT };
}

export interface PageTableOptions {
  /** Set U/S on every level so CPL-3 code may use the whole map. */
  user?: boolean;
  /**
   * Preset D in the 2 MiB leaves (default true): no page-table writes when the guest
   * first writes a page. With D preset, a shadow-paging host logs every page the guest
   * merely reads as dirty (it maps them writable at once); with D clear it logs reads as
   * clean but logs the page directory when the guest first writes into each 2 MiB page.
   */
  presetDirty?: boolean;
}

/**
 * Identity-map [0, 4 GiB) with 2 MiB pages: PML4 at PML4_ADDRESS, one PDPT, four PDs.
 * Returns the CR3 value.
 */
export function writeIdentityPageTables(mem: GuestMemory, opts: PageTableOptions = {}): number {
  const us = opts.user ? PTE_USER : 0n;
  const table = PTE_PRESENT | PTE_WRITE | PTE_ACCESSED | us;
  const leaf = table | (opts.presetDirty === false ? 0n : PTE_DIRTY) | PTE_LARGE;

  const pml4 = new DataView(new ArrayBuffer(0x1000));
  pml4.setBigUint64(0, BigInt(PDPT_ADDRESS) | table, true);
  mem.write(PML4_ADDRESS, new Uint8Array(pml4.buffer));

  const pdpt = new DataView(new ArrayBuffer(0x1000));
  for (let i = 0; i < 4; i++) pdpt.setBigUint64(i * 8, BigInt(PD_ADDRESS + i * 0x1000) | table, true);
  mem.write(PDPT_ADDRESS, new Uint8Array(pdpt.buffer));

  const pds = new DataView(new ArrayBuffer(4 * 0x1000));
  for (let i = 0; i < 4 * 512; i++) pds.setBigUint64(i * 8, (BigInt(i) << 21n) | leaf, true);
  mem.write(PD_ADDRESS, new Uint8Array(pds.buffer));
  return PML4_ADDRESS;
}

export interface LongModeOptions {
  cr3: bigint | number;
  /** 0: kernel selectors; 3: user selectors with RPL 3. */
  ring: 0 | 3;
  /** IDT to load; default empty (limit 0), so any exception escalates to a triple fault. */
  idt?: DTable;
}

/**
 * Sregs for 64-bit mode on the boot GDT (write it with writeBootGdt first). Fields not
 * concerned with mode or segmentation (cr2, cr8, apic_base, interrupt_bitmap, ldt) are
 * taken from `current`.
 */
export function longModeSregs(current: Sregs, opts: LongModeOptions): Sregs {
  const user = opts.ring === 3;
  const code = bootSegment(user ? Selector.USER_CODE64 | 3 : Selector.CODE64);
  const data = bootSegment(user ? Selector.USER_DATA | 3 : Selector.DATA);
  return {
    ...current,
    cs: code,
    ds: { ...data },
    es: { ...data },
    fs: { ...data },
    gs: { ...data },
    ss: { ...data },
    tr: bootTaskRegister(),
    gdt: { base: BigInt(BOOT_GDT_ADDRESS), limit: BOOT_GDT_LIMIT },
    idt: opts.idt ?? { base: 0n, limit: 0 },
    cr0: LONG_MODE_CR0,
    cr3: BigInt(opts.cr3),
    cr4: LONG_MODE_CR4,
    efer: LONG_MODE_EFER,
    interrupt_bitmap: [...current.interrupt_bitmap],
  };
}

/**
 * Sregs for a flat 32-bit protected-mode entry with paging off, as the PVH boot ABI
 * requires: CS 32-bit code and DS/ES/SS/FS/GS flat data (base 0, limit 4 GiB), TR a busy
 * 32-bit TSS with base 0 and limit 0x67, CR0.PE only (plus ET), CR4 = 0, EFER = 0.
 */
export function protectedMode32Sregs(current: Sregs): Sregs {
  const data = bootSegment(Selector.DATA32);
  return {
    ...current,
    cs: bootSegment(Selector.CODE32),
    ds: { ...data },
    es: { ...data },
    fs: { ...data },
    gs: { ...data },
    ss: { ...data },
    tr: {
      base: 0n, limit: 0x67, selector: 0, type: TSS_BUSY, present: 1, dpl: 0,
      db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0,
    },
    gdt: { base: BigInt(BOOT_GDT_ADDRESS), limit: BOOT_GDT_LIMIT },
    idt: { base: 0n, limit: 0 },
    cr0: CR0_PE | CR0_ET,
    cr3: 0n,
    cr4: 0n,
    efer: 0n,
    interrupt_bitmap: [...current.interrupt_bitmap],
  };
}
