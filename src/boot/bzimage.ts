// bzImage loading for the Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst):
// the protected-mode kernel goes to 0x100000, a zero page (struct boot_params) carries the
// setup header, command line, initrd and e820 map, and the CPU enters at load address + 0x200
// in long mode with identity paging, %rsi = zero page.

import type { Regs } from '../native/kvm';
import { GuestAddress, GuestMemory } from '../memory/guest-memory';
import { BootError } from './errors';
import { BOOT_STACK_POINTER, BZIMAGE_LOAD_ADDRESS, E820Entry, ZERO_PAGE_ADDRESS, alignUp, hex } from './layout';
import { emptyRegs } from './vcpu-init';

/** "HdrS" at 0x202. */
export const SETUP_HEADER_MAGIC = 0x5372_6448;
export const BOOT_FLAG_MAGIC = 0xaa55;
/** 2.12: xloadflags, and with it XLF_KERNEL_64 (the 64-bit entry point at +0x200). */
export const MIN_BOOT_PROTOCOL = 0x020c;
/** 2.14+: the zero page's acpi_rsdp_addr is read by the kernel. */
export const ACPI_RSDP_BOOT_PROTOCOL = 0x020e;
export const XLF_KERNEL_64 = 1 << 0;
export const XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1;
export const LOADED_HIGH = 1 << 0;
export const TYPE_OF_LOADER_UNDEFINED = 0xff;
export const ENTRY_64_OFFSET = 0x200;
export const ZERO_PAGE_SIZE = 4096;
export const E820_MAX_ENTRIES_ZEROPAGE = 128;
const E820_ENTRY_SIZE = 20;

/** Offsets in struct boot_params (arch/x86/include/uapi/asm/bootparam.h). */
export const ZeroPage = {
  ACPI_RSDP_ADDR: 0x070,
  EXT_RAMDISK_IMAGE: 0x0c0,
  EXT_RAMDISK_SIZE: 0x0c4,
  EXT_CMD_LINE_PTR: 0x0c8,
  E820_ENTRIES: 0x1e8,
  SENTINEL: 0x1ef,
  SETUP_HEADER: 0x1f1,
  E820_TABLE: 0x2d0,
} as const;

/** Offsets of setup_header fields, relative to the start of the image / zero page. */
export const SetupHeader = {
  SETUP_SECTS: 0x1f1,
  SYSSIZE: 0x1f4,
  VID_MODE: 0x1fa,
  BOOT_FLAG: 0x1fe,
  JUMP: 0x200,
  HEADER: 0x202,
  VERSION: 0x206,
  TYPE_OF_LOADER: 0x210,
  LOADFLAGS: 0x211,
  CODE32_START: 0x214,
  RAMDISK_IMAGE: 0x218,
  RAMDISK_SIZE: 0x21c,
  HEAP_END_PTR: 0x224,
  CMD_LINE_PTR: 0x228,
  INITRD_ADDR_MAX: 0x22c,
  KERNEL_ALIGNMENT: 0x230,
  RELOCATABLE_KERNEL: 0x234,
  XLOADFLAGS: 0x236,
  CMDLINE_SIZE: 0x238,
  PREF_ADDRESS: 0x258,
  INIT_SIZE: 0x260,
} as const;

export interface BzImage {
  /** boot protocol version, e.g. 0x020f */
  version: number;
  setupSects: number;
  /** end of the setup header in the image: 0x202 + byte at 0x201 */
  headerEnd: number;
  loadflags: number;
  xloadflags: number;
  initrdAddrMax: number;
  kernelAlignment: number;
  relocatable: boolean;
  /** maximum command line length, excluding the NUL */
  cmdlineSize: number;
  prefAddress: number;
  /** bytes the kernel needs from its (possibly relocated) run address during decompression */
  initSize: number;
  /** file offset of the protected-mode kernel */
  kernelOffset: number;
  kernelSize: number;
}

export function isBzImage(image: Uint8Array): boolean {
  if (image.length < SetupHeader.HEADER + 4) return false;
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  return dv.getUint32(SetupHeader.HEADER, true) === SETUP_HEADER_MAGIC;
}

/** Parse and check a bzImage's setup header. */
export function parseBzImage(image: Uint8Array, file = 'kernel'): BzImage {
  if (image.length < SetupHeader.HEADER + 6) {
    throw new BootError(`truncated bzImage: ${image.length} bytes, too short for a setup header`, file);
  }
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  if (dv.getUint32(SetupHeader.HEADER, true) !== SETUP_HEADER_MAGIC) {
    throw new BootError('not a bzImage: no "HdrS" setup header signature at 0x202', file);
  }
  if (dv.getUint16(SetupHeader.BOOT_FLAG, true) !== BOOT_FLAG_MAGIC) {
    throw new BootError(`bzImage boot_flag is ${hex(dv.getUint16(SetupHeader.BOOT_FLAG, true))}, expected 0xaa55`, file);
  }
  const version = dv.getUint16(SetupHeader.VERSION, true);
  if (version < MIN_BOOT_PROTOCOL) {
    throw new BootError(
      `boot protocol ${version >> 8}.${version & 0xff} is too old; 2.12 or newer is needed for the 64-bit entry point`,
      file,
    );
  }
  const headerEnd = SetupHeader.HEADER + image[SetupHeader.JUMP + 1];
  if (headerEnd < SetupHeader.INIT_SIZE + 4 || image.length < headerEnd) {
    throw new BootError(`truncated bzImage: setup header ends at ${hex(headerEnd)}, file is ${image.length} bytes`, file);
  }
  const xloadflags = dv.getUint16(SetupHeader.XLOADFLAGS, true);
  if (!(xloadflags & XLF_KERNEL_64)) {
    throw new BootError('bzImage has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags)', file);
  }
  const loadflags = image[SetupHeader.LOADFLAGS];
  if (!(loadflags & LOADED_HIGH)) throw new BootError('bzImage is a zImage (LOADED_HIGH clear); not supported', file);
  let setupSects = image[SetupHeader.SETUP_SECTS];
  if (setupSects === 0) setupSects = 4;
  const kernelOffset = (setupSects + 1) * 512;
  if (image.length <= kernelOffset) {
    throw new BootError(
      `truncated bzImage: ${setupSects} setup sectors put the kernel at ${hex(kernelOffset)}, past the end of the ${image.length}-byte file`,
      file,
    );
  }
  // syssize counts 16-byte paragraphs; a signed image carries its signature after them.
  const syssize = dv.getUint32(SetupHeader.SYSSIZE, true) * 16;
  const available = image.length - kernelOffset;
  if (syssize > available) {
    throw new BootError(
      `truncated bzImage: header says the protected-mode kernel is ${syssize} bytes, file has ${available} after the setup code`,
      file,
    );
  }
  const kernelSize = syssize > 0 ? syssize : available;
  return {
    version,
    setupSects,
    headerEnd,
    loadflags,
    xloadflags,
    initrdAddrMax: dv.getUint32(SetupHeader.INITRD_ADDR_MAX, true),
    kernelAlignment: dv.getUint32(SetupHeader.KERNEL_ALIGNMENT, true),
    relocatable: image[SetupHeader.RELOCATABLE_KERNEL] !== 0,
    cmdlineSize: dv.getUint32(SetupHeader.CMDLINE_SIZE, true),
    prefAddress: Number(dv.getBigUint64(SetupHeader.PREF_ADDRESS, true)),
    initSize: dv.getUint32(SetupHeader.INIT_SIZE, true),
    kernelOffset,
    kernelSize,
  };
}

/**
 * First byte after the memory the kernel uses while decompressing. A relocatable kernel
 * moves itself to max(load address rounded up to kernel_alignment, pref_address) and then
 * needs init_size bytes from there.
 */
export function bzImageMemoryEnd(bz: BzImage, loadAddress = BZIMAGE_LOAD_ADDRESS): GuestAddress {
  let runAddress = loadAddress;
  if (bz.relocatable && bz.kernelAlignment > 0) {
    runAddress = Math.max(alignUp(loadAddress, bz.kernelAlignment), bz.prefAddress);
  }
  return Math.max(loadAddress + bz.kernelSize, runAddress + bz.initSize);
}

/** Copy the protected-mode kernel to 0x100000. */
export function loadBzImageKernel(mem: GuestMemory, image: Uint8Array, bz: BzImage): GuestAddress {
  mem.write(BZIMAGE_LOAD_ADDRESS, image.subarray(bz.kernelOffset, bz.kernelOffset + bz.kernelSize));
  return BZIMAGE_LOAD_ADDRESS;
}

export interface ZeroPageInput {
  cmdlineAddress: GuestAddress;
  ramdisk?: { address: GuestAddress; size: number };
  e820: E820Entry[];
  rsdpAddress?: GuestAddress;
}

/** Build struct boot_params at ZERO_PAGE_ADDRESS; return its address. */
export function writeZeroPage(mem: GuestMemory, image: Uint8Array, bz: BzImage, input: ZeroPageInput): GuestAddress {
  if (input.e820.length > E820_MAX_ENTRIES_ZEROPAGE) {
    throw new BootError(`memory map has ${input.e820.length} entries; the zero page holds ${E820_MAX_ENTRIES_ZEROPAGE}`);
  }
  const zp = new Uint8Array(ZERO_PAGE_SIZE);
  const dv = new DataView(zp.buffer);
  zp.set(image.subarray(SetupHeader.SETUP_SECTS, bz.headerEnd), SetupHeader.SETUP_SECTS);

  zp[SetupHeader.TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED;
  const lo32 = (v: number) => v >>> 0;
  const hi32 = (v: number) => Math.floor(v / 0x1_0000_0000);
  dv.setUint32(SetupHeader.CMD_LINE_PTR, lo32(input.cmdlineAddress), true);
  dv.setUint32(ZeroPage.EXT_CMD_LINE_PTR, hi32(input.cmdlineAddress), true);
  if (input.ramdisk) {
    dv.setUint32(SetupHeader.RAMDISK_IMAGE, lo32(input.ramdisk.address), true);
    dv.setUint32(ZeroPage.EXT_RAMDISK_IMAGE, hi32(input.ramdisk.address), true);
    dv.setUint32(SetupHeader.RAMDISK_SIZE, lo32(input.ramdisk.size), true);
    dv.setUint32(ZeroPage.EXT_RAMDISK_SIZE, hi32(input.ramdisk.size), true);
  } else {
    dv.setUint32(SetupHeader.RAMDISK_IMAGE, 0, true);
    dv.setUint32(SetupHeader.RAMDISK_SIZE, 0, true);
  }
  if (input.rsdpAddress !== undefined && bz.version >= ACPI_RSDP_BOOT_PROTOCOL) {
    dv.setBigUint64(ZeroPage.ACPI_RSDP_ADDR, BigInt(input.rsdpAddress), true);
  }
  zp[ZeroPage.E820_ENTRIES] = input.e820.length;
  input.e820.forEach((e, i) => {
    const o = ZeroPage.E820_TABLE + i * E820_ENTRY_SIZE;
    dv.setBigUint64(o, BigInt(e.addr), true);
    dv.setBigUint64(o + 8, BigInt(e.size), true);
    dv.setUint32(o + 16, e.type, true);
  });
  mem.write(ZERO_PAGE_ADDRESS, zp);
  return ZERO_PAGE_ADDRESS;
}

/** Registers for the 64-bit entry: rip = load + 0x200, rsi = zero page, a small stack. */
export function bzImageEntryRegs(loadAddress: GuestAddress, zeroPage: GuestAddress): Regs {
  return {
    ...emptyRegs(),
    rip: BigInt(loadAddress + ENTRY_64_OFFSET),
    rsi: BigInt(zeroPage),
    rsp: BigInt(BOOT_STACK_POINTER),
    rbp: BigInt(BOOT_STACK_POINTER),
  };
}
