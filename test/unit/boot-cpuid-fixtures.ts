// KVM_GET_SUPPORTED_CPUID tables for the CPUID tests.
import type { CpuidEntry } from '../../src/native/kvm';

/**
 * Recorded from KVM_GET_SUPPORTED_CPUID on an AMD EPYC (family 0x17) host that is itself a
 * VM: sparse, with a degenerate leaf 0xB (one subleaf, level type 0) and real 0x8000001D
 * cache leaves.
 */
export const AMD_EPYC_NESTED: readonly CpuidEntry[] = [
  { function: 0x0, index: 0, flags: 0, eax: 0x0000000d, ebx: 0x68747541, ecx: 0x444d4163, edx: 0x69746e65 },
  { function: 0x1, index: 0, flags: 0, eax: 0x00800f12, ebx: 0x01020800, ecx: 0x81202000, edx: 0x078bfbff },
  { function: 0x2, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x3, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x4, index: 0, flags: 1, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x5, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x6, index: 0, flags: 0, eax: 0x00000004, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x7, index: 0, flags: 1, eax: 0x00000000, ebx: 0x00800002, ecx: 0x00000000, edx: 0x20000000 },
  { function: 0x8, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x9, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0xa, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0xb, index: 0, flags: 1, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000001 },
  { function: 0xc, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0xd, index: 0, flags: 1, eax: 0x00000007, ebx: 0x00000340, ecx: 0x00000340, edx: 0x00000000 },
  { function: 0xd, index: 1, flags: 1, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0xd, index: 2, flags: 1, eax: 0x00000100, ebx: 0x00000240, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000000, index: 0, flags: 0, eax: 0x80000021, ebx: 0x68747541, ecx: 0x444d4163, edx: 0x69746e65 },
  { function: 0x80000001, index: 0, flags: 0, eax: 0x00800f12, ebx: 0x40000000, ecx: 0x00400393, edx: 0x23d3fbff },
  { function: 0x80000002, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000003, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000004, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000005, index: 0, flags: 0, eax: 0xff40ff40, ebx: 0xff40ff40, ecx: 0x20080140, edx: 0x40040140 },
  { function: 0x80000006, index: 0, flags: 0, eax: 0x36006400, ebx: 0x56006400, ecx: 0x02006140, edx: 0x0200c140 },
  { function: 0x80000007, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000100 },
  { function: 0x80000008, index: 0, flags: 0, eax: 0x00003030, ebx: 0x02001005, ecx: 0x00007001, edx: 0x00000000 },
  { function: 0x80000009, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000000a, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000000b, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000000c, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000000d, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000000e, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000000f, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000010, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000011, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000012, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000013, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000014, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000015, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000016, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000017, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000018, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000019, index: 0, flags: 0, eax: 0xf040f040, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000001a, index: 0, flags: 0, eax: 0x00000003, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000001b, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000001c, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000001d, index: 0, flags: 1, eax: 0x00000121, ebx: 0x01c0003f, ecx: 0x0000003f, edx: 0x00000000 },
  { function: 0x8000001d, index: 1, flags: 1, eax: 0x00000122, ebx: 0x00c0003f, ecx: 0x000000ff, edx: 0x00000000 },
  { function: 0x8000001d, index: 2, flags: 1, eax: 0x00000143, ebx: 0x01c0003f, ecx: 0x000003ff, edx: 0x00000002 },
  { function: 0x8000001d, index: 3, flags: 1, eax: 0x00004163, ebx: 0x03c0003f, ecx: 0x00001fff, edx: 0x00000001 },
  { function: 0x8000001d, index: 4, flags: 1, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000001e, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x8000001f, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000020, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000021, index: 0, flags: 0, eax: 0x10000204, ebx: 0x00000000, ecx: 0x00000006, edx: 0x00000000 },
  { function: 0x40000000, index: 0, flags: 0, eax: 0x40000001, ebx: 0x4b4d564b, ecx: 0x564b4d56, edx: 0x0000004d },
  { function: 0x40000001, index: 0, flags: 0, eax: 0x01007efb, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
];

/**
 * Representative of KVM_GET_SUPPORTED_CPUID on an Intel Xeon (Cascade Lake, 24 cores / 48
 * threads per package): host topology in leaves 1, 4 and 0xB that the builder must replace.
 */
export const INTEL_XEON: readonly CpuidEntry[] = [
  // max basic leaf 0x16, "GenuineIntel"
  { function: 0x0, index: 0, flags: 0, eax: 0x00000016, ebx: 0x756e6547, ecx: 0x6c65746e, edx: 0x49656e69 },
  // APIC ID 0x1a, 64 addressable IDs, HTT, x2APIC, hypervisor; no TSC-deadline (QEMU adds it)
  { function: 0x1, index: 0, flags: 0, eax: 0x00050657, ebx: 0x1a400800, ecx: 0xf6fa3223, edx: 0x1f8bfbff },
  { function: 0x2, index: 0, flags: 0, eax: 0x00feff01, ebx: 0x000000f0, ecx: 0x00000000, edx: 0x00000000 },
  // deterministic cache parameters: L1d, L1i, L2 shared by 2 threads, L3 by 64, terminator
  { function: 0x4, index: 0, flags: 1, eax: 0x7c004121, ebx: 0x01c0003f, ecx: 0x0000003f, edx: 0x00000000 },
  { function: 0x4, index: 1, flags: 1, eax: 0x7c004122, ebx: 0x01c0003f, ecx: 0x0000003f, edx: 0x00000000 },
  { function: 0x4, index: 2, flags: 1, eax: 0x7c004143, ebx: 0x03c0003f, ecx: 0x000003ff, edx: 0x00000000 },
  { function: 0x4, index: 3, flags: 1, eax: 0x7c0fc163, ebx: 0x0280003f, ecx: 0x0000bfff, edx: 0x00000004 },
  { function: 0x4, index: 4, flags: 1, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x6, index: 0, flags: 0, eax: 0x00000004, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x7, index: 0, flags: 1, eax: 0x00000000, ebx: 0xd19f4fbb, ecx: 0x0000080c, edx: 0xbc000400 },
  { function: 0xa, index: 0, flags: 0, eax: 0x07300402, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000603 },
  // host x2APIC topology: SMT (2 threads, shift 1), core (48 logical, shift 6), end
  { function: 0xb, index: 0, flags: 1, eax: 0x00000001, ebx: 0x00000002, ecx: 0x00000100, edx: 0x0000001a },
  { function: 0xb, index: 1, flags: 1, eax: 0x00000006, ebx: 0x00000030, ecx: 0x00000201, edx: 0x0000001a },
  { function: 0xb, index: 2, flags: 1, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000002, edx: 0x0000001a },
  { function: 0xd, index: 0, flags: 1, eax: 0x000002e7, ebx: 0x00000a88, ecx: 0x00000a88, edx: 0x00000000 },
  { function: 0xd, index: 1, flags: 1, eax: 0x0000000f, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0xd, index: 2, flags: 1, eax: 0x00000100, ebx: 0x00000240, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000000, index: 0, flags: 0, eax: 0x80000008, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000001, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x00000121, edx: 0x2c100800 },
  { function: 0x80000002, index: 0, flags: 0, eax: 0x65746e49, ebx: 0x2952286c, ecx: 0x6f655820, edx: 0x2952286e },
  { function: 0x80000003, index: 0, flags: 0, eax: 0x6c6f4720, ebx: 0x32362064, ecx: 0x43203834, edx: 0x40205550 },
  { function: 0x80000004, index: 0, flags: 0, eax: 0x352e3220, ebx: 0x7a484730, ecx: 0x00000000, edx: 0x00000000 },
  { function: 0x80000006, index: 0, flags: 0, eax: 0x00000000, ebx: 0x00000000, ecx: 0x01006040, edx: 0x00000000 },
  { function: 0x80000008, index: 0, flags: 0, eax: 0x0000302e, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
  // KVM paravirt leaves: "KVMKVMKVM\0\0\0" and the feature bits
  { function: 0x40000000, index: 0, flags: 0, eax: 0x40000001, ebx: 0x4b4d564b, ecx: 0x564b4d56, edx: 0x0000004d },
  { function: 0x40000001, index: 0, flags: 0, eax: 0x01007afb, ebx: 0x00000000, ecx: 0x00000000, edx: 0x00000000 },
];
