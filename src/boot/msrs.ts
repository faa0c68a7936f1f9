// MSR values a vCPU gets before the kernel's first instruction, as firmware would leave them.

import type { MsrEntry } from '../native/kvm';

export const Msr = {
  IA32_TSC: 0x10,
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  IA32_MISC_ENABLE: 0x1a0,
  MTRR_DEF_TYPE: 0x2ff,
  STAR: 0xc000_0081,
  LSTAR: 0xc000_0082,
  CSTAR: 0xc000_0083,
  SYSCALL_MASK: 0xc000_0084,
  KERNEL_GS_BASE: 0xc000_0102,
} as const;

/** IA32_MISC_ENABLE[0]: fast-string operations (rep movs/stos) enabled. */
export const MISC_ENABLE_FAST_STRING = 1n;
/** IA32_MTRR_DEF_TYPE: E (bit 11) enables MTRRs; type 6 = write-back for unmatched memory. */
export const MTRR_ENABLE = 1n << 11n;
export const MTRR_TYPE_WRBACK = 6n;

/**
 * The boot-time MSR list for every vCPU. With MTRRs enabled and write-back as default,
 * Linux's MTRR/PAT code sees a consistent, cacheable memory map on all CPUs.
 */
export function bootMsrs(): MsrEntry[] {
  return [
    { index: Msr.IA32_SYSENTER_CS, data: 0n },
    { index: Msr.IA32_SYSENTER_ESP, data: 0n },
    { index: Msr.IA32_SYSENTER_EIP, data: 0n },
    { index: Msr.STAR, data: 0n },
    { index: Msr.CSTAR, data: 0n },
    { index: Msr.KERNEL_GS_BASE, data: 0n },
    { index: Msr.SYSCALL_MASK, data: 0n },
    { index: Msr.LSTAR, data: 0n },
    { index: Msr.IA32_TSC, data: 0n },
    { index: Msr.IA32_MISC_ENABLE, data: MISC_ENABLE_FAST_STRING },
    { index: Msr.MTRR_DEF_TYPE, data: MTRR_ENABLE | MTRR_TYPE_WRBACK },
  ];
}
