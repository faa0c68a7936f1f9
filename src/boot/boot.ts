// The kernel loader: from a kernel image (ELF vmlinux with a PVH note, or bzImage), an
// optional initramfs and a command line, write everything the guest needs into guest memory
// and return a plain-data plan of the vCPU state to apply. No KVM calls happen here.

import type { CpuidEntry, Fpu, MsrEntry, Regs } from '../native/kvm';
import { GuestAddress, GuestMemory, GuestMemoryError, PAGE_SIZE } from '../memory/guest-memory';
import { AcpiConfig, AcpiTables, writeAcpiTables } from './acpi';
import {
  BzImage,
  ENTRY_64_OFFSET,
  bzImageEntryRegs,
  bzImageMemoryEnd,
  isBzImage,
  loadBzImageKernel,
  parseBzImage,
  writeZeroPage,
} from './bzimage';
import { CpuidOptions, buildCpuid } from './cpuid';
import { ElfKernel, isElf, loadElfSegments, parseElfKernel, pvhEntryRegs, writePvhStartInfo } from './elf-pvh';
import { BootError } from './errors';
import {
  BZIMAGE_LOAD_ADDRESS,
  CMDLINE_ADDRESS,
  CMDLINE_MAX_SIZE,
  E820Entry,
  HIGH_MEMORY_START,
  RamRegion,
  alignDown,
  alignUp,
  e820Map,
  hex,
  lowRamEnd,
  ramRegions,
  validateMemorySize,
} from './layout';
import { bootMsrs } from './msrs';
import { BOOT_LAPIC_LINT, LapicDeliveryMode, initialFpu } from './vcpu-init';
import { writeResetVector } from './reset-vector';
import { writeBootGdt, writeIdentityPageTables } from './x86/long-mode';

export { BootError } from './errors';

/** Linux's x86 COMMAND_LINE_SIZE (2048) includes the NUL; PVH has no header to say otherwise. */
export const PVH_CMDLINE_MAX = 2047;
/** Sanity bound; KVM_CAP_MAX_VCPUS is the real limit and is checked where the VM is made. */
export const MAX_VCPUS = 1024;

export interface LoadKernelOptions {
  kernel: Uint8Array;
  initramfs?: Uint8Array;
  cmdline: string;
  vcpuCount: number;
  /** bytes of guest RAM; `mem` must have been created from ramRegions(memorySize) */
  memorySize: number;
  /** names used in error messages (file paths); default "kernel" / "initramfs" */
  kernelName?: string;
  initramfsName?: string;
  /** KVM_GET_SUPPORTED_CPUID; when given, the plan carries each vCPU's CPUID table */
  supportedCpuid?: readonly CpuidEntry[];
  cpuidOptions?: CpuidOptions;
  /** ACPI/DSDT options (which legacy devices to describe, extra AML or tables) */
  acpi?: Omit<AcpiConfig, 'vcpuCount'>;
}

/** How to set the boot vCPU's special registers (with long-mode.ts). */
export type SregsPlan =
  /** protectedMode32Sregs(current): flat 32-bit protected mode, paging off (PVH entry) */
  | { mode: 'pvh32' }
  /** longModeSregs(current, { cr3, ring: 0 }): 64-bit mode on identity page tables */
  | { mode: 'long64'; cr3: GuestAddress };

/** KVM_MP_STATE_* values. */
export const KvmMpState = { RUNNABLE: 0, UNINITIALIZED: 1, INIT_RECEIVED: 2, HALTED: 3, SIPI_RECEIVED: 4 } as const;

export interface VcpuBootInputs {
  id: number;
  apicId: number;
  /** KVM_SET_CPUID2 entries; absent when loadKernel was not given supportedCpuid */
  cpuid?: CpuidEntry[];
  /** KVM_SET_MSRS */
  msrs: MsrEntry[];
  /** KVM_SET_FPU */
  fpu: Fpu;
  /** LVT LINT0/LINT1 delivery modes to patch into KVM_GET_LAPIC output (patchLapicLint) */
  lapic: { lint0: LapicDeliveryMode; lint1: LapicDeliveryMode };
  /**
   * 'runnable' for the boot vCPU. 'wait-for-sipi' (KVM_MP_STATE_UNINITIALIZED) for APs: the
   * in-kernel LAPIC starts them that way, so no KVM_SET_MP_STATE is needed.
   */
  mpState: 'runnable' | 'wait-for-sipi';
}

export interface BootPlan {
  format: 'elf-pvh' | 'bzimage';
  /** guest-physical entry point (= boot.regs.rip) */
  entry: GuestAddress;
  boot: {
    /** KVM_SET_REGS for vCPU 0 */
    regs: Regs;
    sregs: SregsPlan;
  };
  /** one per vCPU, index = vCPU id */
  vcpus: VcpuBootInputs[];
  memory: { regions: RamRegion[]; e820: E820Entry[] };
  /** guest-physical range the kernel occupies (bzImage: including decompression space) */
  kernel: { start: GuestAddress; end: GuestAddress };
  initramfs?: { address: GuestAddress; size: number };
  cmdline: { address: GuestAddress; length: number };
  /** zero page (bzImage) or hvm_start_info (PVH) */
  bootParams: GuestAddress;
  acpi: AcpiTables;
  /** the boot protocol version of a bzImage, e.g. 0x20f */
  bootProtocol?: number;
}

function encodeCmdline(cmdline: string, max: number, file: string): Uint8Array {
  const bytes = Buffer.from(cmdline, 'utf8');
  if (bytes.includes(0)) throw new BootError('kernel command line contains a NUL byte');
  const limit = Math.min(max, CMDLINE_MAX_SIZE - 1);
  if (bytes.length > limit) {
    throw new BootError(`kernel command line is ${bytes.length} bytes; this kernel accepts at most ${limit}`, file);
  }
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/**
 * Place the initramfs page-aligned as high as possible with its end at or below `limit`
 * and its start at or above `floor`.
 */
function placeInitramfs(size: number, floor: GuestAddress, limit: GuestAddress, file: string): GuestAddress {
  const address = alignDown(limit - size, PAGE_SIZE);
  const lowest = alignUp(floor, PAGE_SIZE);
  if (size > limit || address < lowest) {
    throw new BootError(
      `initramfs of ${size} bytes does not fit in guest RAM between the kernel's end ${hex(lowest)} ` +
        `and ${hex(limit)} (${Math.max(0, limit - lowest)} bytes free); give the VM more memory`,
      file,
    );
  }
  return address;
}

function checkMemoryCovers(mem: GuestMemory, regions: RamRegion[], memorySize: number): void {
  for (const r of regions) {
    try {
      mem.regionFor(r.guestAddress, r.size);
    } catch (e) {
      if (e instanceof GuestMemoryError) {
        throw new BootError(
          `guest memory does not cover ${hex(r.guestAddress)}+${hex(r.size)}, which a ${memorySize}-byte VM needs`,
        );
      }
      throw e;
    }
  }
}

/** Load a kernel and its boot data into `mem`; return the vCPU state to apply. */
export function loadKernel(mem: GuestMemory, opts: LoadKernelOptions): BootPlan {
  const kernelName = opts.kernelName ?? 'kernel';
  const initrdName = opts.initramfsName ?? 'initramfs';
  const { vcpuCount, memorySize } = opts;
  if (!Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > MAX_VCPUS) {
    throw new BootError(`vCPU count ${vcpuCount} is outside 1..${MAX_VCPUS}`);
  }
  validateMemorySize(memorySize);
  const regions = ramRegions(memorySize);
  checkMemoryCovers(mem, regions, memorySize);
  const e820 = e820Map(memorySize);
  const lowEnd = lowRamEnd(memorySize);
  const image = opts.kernel;

  let format: BootPlan['format'];
  let elf: ElfKernel | undefined;
  let bz: BzImage | undefined;
  if (isElf(image)) {
    format = 'elf-pvh';
    elf = parseElfKernel(image, kernelName);
  } else if (isBzImage(image)) {
    format = 'bzimage';
    bz = parseBzImage(image, kernelName);
  } else if (image.length < 0x206 && image[0] === 0x4d && image[1] === 0x5a) {
    throw new BootError(`truncated bzImage: ${image.length} bytes, too short for a setup header`, kernelName);
  } else {
    throw new BootError(
      'unknown kernel format: neither an ELF vmlinux (\\x7fELF) nor a bzImage ("HdrS" at 0x202)',
      kernelName,
    );
  }

  // Where the kernel lives (and, for a bzImage, decompresses).
  let kernelStart: GuestAddress;
  let kernelEnd: GuestAddress;
  if (elf) {
    kernelStart = elf.start;
    kernelEnd = elf.end;
    if (kernelStart < HIGH_MEMORY_START) {
      throw new BootError(`ELF segment at ${hex(kernelStart)} overlaps the boot data below 1 MiB`, kernelName);
    }
  } else {
    kernelStart = BZIMAGE_LOAD_ADDRESS;
    kernelEnd = bzImageMemoryEnd(bz!);
  }
  if (kernelEnd > lowEnd) {
    throw new BootError(
      `memory too small for the kernel: it needs RAM up to ${hex(kernelEnd)} ` +
        `(${Math.ceil(kernelEnd / 0x100000)} MiB), the VM has ${memorySize} bytes (low RAM ends at ${hex(lowEnd)})`,
      kernelName,
    );
  }

  const cmdline = encodeCmdline(opts.cmdline, bz ? bz.cmdlineSize : PVH_CMDLINE_MAX, kernelName);

  let initramfs: BootPlan['initramfs'];
  if (opts.initramfs && opts.initramfs.length > 0) {
    let limit = lowEnd;
    if (bz) limit = Math.min(limit, bz.initrdAddrMax + 1);
    const address = placeInitramfs(opts.initramfs.length, kernelEnd, limit, initrdName);
    initramfs = { address, size: opts.initramfs.length };
  }

  // Everything is checked; write.
  if (elf) loadElfSegments(mem, image, elf);
  else loadBzImageKernel(mem, image, bz!);
  if (initramfs) mem.write(initramfs.address, opts.initramfs!);
  mem.fill(CMDLINE_ADDRESS, CMDLINE_MAX_SIZE, 0);
  mem.write(CMDLINE_ADDRESS, cmdline);
  const acpi = writeAcpiTables(mem, { ...opts.acpi, vcpuCount });
  writeBootGdt(mem);
  writeResetVector(mem);

  let regs: Regs;
  let sregs: SregsPlan;
  let bootParams: GuestAddress;
  let entry: GuestAddress;
  if (elf) {
    bootParams = writePvhStartInfo(mem, {
      cmdlineAddress: CMDLINE_ADDRESS,
      modules: initramfs ? [{ address: initramfs.address, size: initramfs.size }] : [],
      memmap: e820,
      rsdpAddress: acpi.rsdp,
    });
    entry = elf.pvhEntry;
    regs = pvhEntryRegs(entry, bootParams);
    sregs = { mode: 'pvh32' };
  } else {
    bootParams = writeZeroPage(mem, image, bz!, {
      cmdlineAddress: CMDLINE_ADDRESS,
      ramdisk: initramfs,
      e820,
      rsdpAddress: acpi.rsdp,
    });
    const cr3 = writeIdentityPageTables(mem);
    entry = BZIMAGE_LOAD_ADDRESS + ENTRY_64_OFFSET;
    regs = bzImageEntryRegs(BZIMAGE_LOAD_ADDRESS, bootParams);
    sregs = { mode: 'long64', cr3 };
  }

  const vcpus: VcpuBootInputs[] = [];
  for (let id = 0; id < vcpuCount; id++) {
    vcpus.push({
      id,
      apicId: id,
      cpuid: opts.supportedCpuid ? buildCpuid(opts.supportedCpuid, id, vcpuCount, opts.cpuidOptions) : undefined,
      msrs: bootMsrs(),
      fpu: initialFpu(),
      lapic: { ...BOOT_LAPIC_LINT },
      mpState: id === 0 ? 'runnable' : 'wait-for-sipi',
    });
  }

  return {
    format,
    entry,
    boot: { regs, sregs },
    vcpus,
    memory: { regions, e820 },
    kernel: { start: kernelStart, end: kernelEnd },
    initramfs,
    cmdline: { address: CMDLINE_ADDRESS, length: cmdline.length - 1 },
    bootParams,
    acpi,
    bootProtocol: bz?.version,
  };
}
