// ELF64 vmlinux loading and the PVH boot protocol (Xen's "HVM direct boot", which Linux
// implements for any hypervisor when built with CONFIG_PVH). The kernel is entered in 32-bit
// protected mode, paging off, at the address in its XEN_ELFNOTE_PHYS32_ENTRY note, with
// %ebx pointing to struct hvm_start_info.

import type { Regs } from '../native/kvm';
import { GuestAddress, GuestMemory } from '../memory/guest-memory';
import { BootError } from './errors';
import {
  E820Entry,
  PVH_MEMMAP_ADDRESS,
  PVH_MEMMAP_MAX_ENTRIES,
  PVH_MODLIST_ADDRESS,
  PVH_MODLIST_MAX,
  PVH_START_INFO_ADDRESS,
  hex,
} from './layout';
import { emptyRegs } from './vcpu-init';

export const ELF_MAGIC = Uint8Array.of(0x7f, 0x45, 0x4c, 0x46);
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const EM_X86_64 = 62;
const ELF64_EHDR_SIZE = 64;
const ELF64_PHDR_SIZE = 56;
export const PT_LOAD = 1;
export const PT_NOTE = 4;

/** include/xen/interface/elfnote.h */
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;

/** include/xen/interface/hvm/start_info.h */
export const XEN_HVM_START_MAGIC_VALUE = 0x336ec578;
export const HVM_START_INFO_VERSION = 1;
export const HVM_START_INFO_SIZE = 56;
export const HVM_MODLIST_ENTRY_SIZE = 32;
export const HVM_MEMMAP_ENTRY_SIZE = 24;

/** Offsets in struct hvm_start_info. */
export const StartInfoOffset = {
  MAGIC: 0,
  VERSION: 4,
  FLAGS: 8,
  NR_MODULES: 12,
  MODLIST_PADDR: 16,
  CMDLINE_PADDR: 24,
  RSDP_PADDR: 32,
  MEMMAP_PADDR: 40,
  MEMMAP_ENTRIES: 48,
  RESERVED: 52,
} as const;

export function isElf(image: Uint8Array): boolean {
  return image.length >= 4 && ELF_MAGIC.every((b, i) => image[i] === b);
}

export interface ElfLoadSegment {
  /** where the segment goes: p_paddr */
  paddr: GuestAddress;
  fileOffset: number;
  fileSize: number;
  memSize: number;
}

export interface ElfKernel {
  segments: ElfLoadSegment[];
  /** 32-bit PVH entry point (physical) */
  pvhEntry: GuestAddress;
  /** lowest p_paddr of a PT_LOAD segment */
  start: GuestAddress;
  /** first byte after the highest PT_LOAD segment (p_paddr + p_memsz) */
  end: GuestAddress;
}

function readU64(dv: DataView, off: number): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) return Number.MAX_SAFE_INTEGER;
  return Number(v);
}

/** Parse an x86-64 ELF kernel: its PT_LOAD segments and the PVH entry note. */
export function parseElfKernel(image: Uint8Array, file = 'kernel'): ElfKernel {
  if (!isElf(image)) throw new BootError('not an ELF file (no \\x7fELF magic)', file);
  if (image.length < ELF64_EHDR_SIZE) {
    throw new BootError(`truncated ELF: ${image.length} bytes, shorter than the 64-byte ELF64 header`, file);
  }
  if (image[4] !== ELFCLASS64) throw new BootError(`ELF class ${image[4]} is not ELFCLASS64; a 64-bit vmlinux is required`, file);
  if (image[5] !== ELFDATA2LSB) throw new BootError('ELF is not little-endian', file);
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const machine = dv.getUint16(18, true);
  if (machine !== EM_X86_64) throw new BootError(`ELF machine ${machine} is not x86-64 (${EM_X86_64})`, file);
  const phoff = readU64(dv, 32);
  const phentsize = dv.getUint16(54, true);
  const phnum = dv.getUint16(56, true);
  if (phentsize !== ELF64_PHDR_SIZE) throw new BootError(`ELF program header size ${phentsize}, expected ${ELF64_PHDR_SIZE}`, file);
  if (phnum === 0) throw new BootError('ELF has no program headers', file);
  if (phoff + phnum * phentsize > image.length) {
    throw new BootError(
      `truncated ELF: program headers at ${hex(phoff)} (${phnum} x ${phentsize} bytes) run past the end of the ${image.length}-byte file`,
      file,
    );
  }

  const segments: ElfLoadSegment[] = [];
  let pvhEntry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    const type = dv.getUint32(ph, true);
    const offset = readU64(dv, ph + 8);
    const paddr = readU64(dv, ph + 24);
    const filesz = readU64(dv, ph + 32);
    const memsz = readU64(dv, ph + 40);
    if (type !== PT_LOAD && type !== PT_NOTE) continue;
    if (offset + filesz > image.length) {
      throw new BootError(
        `truncated ELF: program header ${i} needs file bytes ${hex(offset)}..${hex(offset + filesz)} but the file is ${image.length} bytes`,
        file,
      );
    }
    if (type === PT_LOAD) {
      if (memsz < filesz) throw new BootError(`ELF segment ${i} has p_memsz < p_filesz`, file);
      if (memsz === 0) continue;
      segments.push({ paddr, fileOffset: offset, fileSize: filesz, memSize: memsz });
    } else {
      const entry = findPvhEntry(image.subarray(offset, offset + filesz));
      if (entry !== undefined) pvhEntry = entry;
    }
  }
  if (segments.length === 0) throw new BootError('ELF has no PT_LOAD segments', file);
  if (pvhEntry === undefined) {
    throw new BootError(
      'ELF has no PVH entry point (no "Xen" note of type XEN_ELFNOTE_PHYS32_ENTRY); was the kernel built with CONFIG_PVH=y?',
      file,
    );
  }
  const start = Math.min(...segments.map((s) => s.paddr));
  const end = Math.max(...segments.map((s) => s.paddr + s.memSize));
  if (end > 0x1_0000_0000) throw new BootError(`ELF segments end at ${hex(end)}, above 4 GiB`, file);
  return { segments, pvhEntry, start, end };
}

/** Scan an ELF note area for Xen's PHYS32_ENTRY; desc is a 32-bit or 64-bit address. */
function findPvhEntry(notes: Uint8Array): number | undefined {
  const dv = new DataView(notes.buffer, notes.byteOffset, notes.byteLength);
  const align4 = (n: number) => (n + 3) & ~3;
  let off = 0;
  while (off + 12 <= notes.length) {
    const namesz = dv.getUint32(off, true);
    const descsz = dv.getUint32(off + 4, true);
    const type = dv.getUint32(off + 8, true);
    const nameOff = off + 12;
    const descOff = nameOff + align4(namesz);
    const next = descOff + align4(descsz);
    if (descOff + descsz > notes.length) return undefined;
    const name = Buffer.from(notes.subarray(nameOff, nameOff + namesz)).toString('latin1');
    if (name === 'Xen\0' && type === XEN_ELFNOTE_PHYS32_ENTRY) {
      if (descsz === 4) return dv.getUint32(descOff, true);
      if (descsz === 8) {
        const v = dv.getBigUint64(descOff, true);
        if (v < 0x1_0000_0000n) return Number(v);
      }
    }
    off = next;
  }
  return undefined;
}

/** Copy the PT_LOAD segments to their physical addresses, zeroing each p_memsz tail (.bss). */
export function loadElfSegments(mem: GuestMemory, image: Uint8Array, kernel: ElfKernel): void {
  for (const s of kernel.segments) {
    if (s.fileSize > 0) mem.write(s.paddr, image.subarray(s.fileOffset, s.fileOffset + s.fileSize));
    if (s.memSize > s.fileSize) mem.fill(s.paddr + s.fileSize, s.memSize - s.fileSize, 0);
  }
}

export interface PvhModule {
  address: GuestAddress;
  size: number;
  /** physical address of the module's NUL-terminated command line, 0 if none */
  cmdlineAddress?: GuestAddress;
}

export interface PvhStartInfoInput {
  cmdlineAddress: GuestAddress;
  /** modules in order; Linux takes the first one as its initramfs */
  modules: PvhModule[];
  memmap: E820Entry[];
  rsdpAddress: GuestAddress;
}

/** Write hvm_start_info (version 1), its module list and memory map; return its address. */
export function writePvhStartInfo(mem: GuestMemory, input: PvhStartInfoInput): GuestAddress {
  if (input.modules.length > PVH_MODLIST_MAX) throw new BootError(`at most ${PVH_MODLIST_MAX} PVH modules are supported`);
  if (input.memmap.length > PVH_MEMMAP_MAX_ENTRIES) {
    throw new BootError(`memory map has ${input.memmap.length} entries; the PVH table holds ${PVH_MEMMAP_MAX_ENTRIES}`);
  }
  const info = new Uint8Array(HVM_START_INFO_SIZE);
  const dv = new DataView(info.buffer);
  dv.setUint32(StartInfoOffset.MAGIC, XEN_HVM_START_MAGIC_VALUE, true);
  dv.setUint32(StartInfoOffset.VERSION, HVM_START_INFO_VERSION, true);
  dv.setUint32(StartInfoOffset.FLAGS, 0, true);
  dv.setUint32(StartInfoOffset.NR_MODULES, input.modules.length, true);
  dv.setBigUint64(StartInfoOffset.MODLIST_PADDR, BigInt(input.modules.length ? PVH_MODLIST_ADDRESS : 0), true);
  dv.setBigUint64(StartInfoOffset.CMDLINE_PADDR, BigInt(input.cmdlineAddress), true);
  dv.setBigUint64(StartInfoOffset.RSDP_PADDR, BigInt(input.rsdpAddress), true);
  dv.setBigUint64(StartInfoOffset.MEMMAP_PADDR, BigInt(PVH_MEMMAP_ADDRESS), true);
  dv.setUint32(StartInfoOffset.MEMMAP_ENTRIES, input.memmap.length, true);
  mem.write(PVH_START_INFO_ADDRESS, info);

  if (input.modules.length) {
    const mods = new Uint8Array(HVM_MODLIST_ENTRY_SIZE * input.modules.length);
    const mdv = new DataView(mods.buffer);
    input.modules.forEach((m, i) => {
      const o = i * HVM_MODLIST_ENTRY_SIZE;
      mdv.setBigUint64(o, BigInt(m.address), true);
      mdv.setBigUint64(o + 8, BigInt(m.size), true);
      mdv.setBigUint64(o + 16, BigInt(m.cmdlineAddress ?? 0), true);
    });
    mem.write(PVH_MODLIST_ADDRESS, mods);
  }

  const map = new Uint8Array(HVM_MEMMAP_ENTRY_SIZE * input.memmap.length);
  const mapDv = new DataView(map.buffer);
  input.memmap.forEach((e, i) => {
    const o = i * HVM_MEMMAP_ENTRY_SIZE;
    mapDv.setBigUint64(o, BigInt(e.addr), true);
    mapDv.setBigUint64(o + 8, BigInt(e.size), true);
    mapDv.setUint32(o + 16, e.type, true);
  });
  mem.write(PVH_MEMMAP_ADDRESS, map);
  return PVH_START_INFO_ADDRESS;
}

/**
 * Registers for the PVH entry: rip = entry, rbx = start info, everything else zero and
 * RFLAGS with IF and VM clear. Segment state is protected-mode 32-bit (see long-mode.ts).
 */
export function pvhEntryRegs(entry: GuestAddress, startInfo: GuestAddress): Regs {
  return { ...emptyRegs(), rip: BigInt(entry), rbx: BigInt(startInfo) };
}
