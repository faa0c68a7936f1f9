// Per-vCPU CPUID from KVM_GET_SUPPORTED_CPUID. The topology presented is one socket with
// vcpuCount cores of one thread each; vCPU i has (x2)APIC ID i. Every leaf that encodes
// topology is rewritten to say the same thing, because Linux cross-checks them (leaf 1,
// 4, 0xB/0x1F on Intel; 0x80000008, 0x8000001D/1E and 0xB on AMD).

import type { CpuidEntry } from '../native/kvm';
import { applyCpuProfile, type CpuProfile } from './cpu-profile';

/** kvm_cpuid_entry2.flags: the index (ECX subleaf) is significant. */
export const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;

export const CpuidBit = {
  /** leaf 1 ECX */
  ECX_X2APIC: 1 << 21,
  ECX_TSC_DEADLINE: 1 << 24,
  ECX_HYPERVISOR: 1 << 31,
  /** leaf 1 EDX */
  EDX_APIC: 1 << 9,
  EDX_HTT: 1 << 28,
  /** leaf 0x80000001 ECX */
  EXT_ECX_CMP_LEGACY: 1 << 1,
  EXT_ECX_TOPOEXT: 1 << 22,
} as const;

/** Level types in CPUID 0xB / 0x1F ECX[15:8]. */
export const TopologyLevel = { INVALID: 0, SMT: 1, CORE: 2 } as const;

export type CpuVendor = 'intel' | 'amd' | 'other';

export interface CpuidOptions {
  /**
   * Advertise the TSC-deadline timer (leaf 1 ECX[24]; never cleared). KVM emulates it with the in-kernel
   * LAPIC but leaves it out of KVM_GET_SUPPORTED_CPUID; set when KVM_CAP_TSC_DEADLINE_TIMER.
   */
  tscDeadline?: boolean;
  /**
   * Reduce the features to a named baseline (src/boot/cpu-profile.ts) so hosts sharing it can
   * exchange the guest; 'host' or absent: everything KVM supports. Throws
   * CpuProfileUnavailableError when this host lacks a feature of the baseline.
   */
  profile?: CpuProfile;
}

/** Bits needed to hold IDs 0..n-1 (0 for n = 1). */
export function idBits(n: number): number {
  let bits = 0;
  while (1 << bits < n) bits++;
  return bits;
}

function vendorString(e: CpuidEntry): string {
  const b = Buffer.alloc(12);
  b.writeUInt32LE(e.ebx >>> 0, 0);
  b.writeUInt32LE(e.edx >>> 0, 4);
  b.writeUInt32LE(e.ecx >>> 0, 8);
  return b.toString('latin1');
}

export function cpuVendor(entries: readonly CpuidEntry[]): CpuVendor {
  const leaf0 = entries.find((e) => e.function === 0);
  if (!leaf0) return 'other';
  const v = vendorString(leaf0);
  if (v === 'GenuineIntel') return 'intel';
  if (v === 'AuthenticAMD' || v === 'HygonGenuine') return 'amd';
  return 'other';
}

/** Set bits [lo, lo+width) of `reg` to `value` (clamped to the field). */
function setField(reg: number, lo: number, width: number, value: number): number {
  const mask = width >= 32 ? 0xffff_ffff : ((1 << width) - 1) >>> 0;
  const v = Math.min(value, mask);
  return ((reg & ~(mask << lo)) | ((v & mask) << lo)) >>> 0;
}

function topologyLeaf(fn: number, vcpuId: number, vcpuCount: number): CpuidEntry[] {
  const coreShift = idBits(vcpuCount);
  const mk = (index: number, eax: number, ebx: number, type: number): CpuidEntry => ({
    function: fn,
    index,
    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    eax,
    ebx,
    ecx: ((type << 8) | index) >>> 0,
    edx: vcpuId >>> 0,
  });
  return [
    // SMT: one thread per core, so nothing to shift off to reach the core ID.
    mk(0, 0, 1, TopologyLevel.SMT),
    // Core: all vCPUs of the package; shifting the APIC ID by coreShift gives the package ID.
    mk(1, coreShift, Math.min(vcpuCount, 0xffff), TopologyLevel.CORE),
    mk(2, 0, 0, TopologyLevel.INVALID),
  ];
}

/**
 * The CPUID table for vCPU `vcpuId` of `vcpuCount`, from KVM's supported entries. Pure: the
 * input is not modified. Leaves KVM reports are kept (including the 0x40000000 paravirt
 * range with its "KVMKVMKVM" signature) except for the topology fields rewritten here.
 */
export function buildCpuid(
  supported: readonly CpuidEntry[],
  vcpuId: number,
  vcpuCount: number,
  opts: CpuidOptions = {},
): CpuidEntry[] {
  if (!Number.isInteger(vcpuCount) || vcpuCount < 1) throw new RangeError(`invalid vCPU count ${vcpuCount}`);
  if (!Number.isInteger(vcpuId) || vcpuId < 0 || vcpuId >= vcpuCount) {
    throw new RangeError(`vCPU id ${vcpuId} outside 0..${vcpuCount - 1}`);
  }
  const table = opts.profile ? applyCpuProfile(supported, opts.profile) : supported;
  const vendor = cpuVendor(table);
  const coreShift = idBits(vcpuCount);
  const addressable = 1 << coreShift;
  const maxBasic = table.find((e) => e.function === 0)?.eax ?? 0;

  const out: CpuidEntry[] = [];
  let sawLeafB = false;
  let sawLeaf1F = false;

  for (const src of table) {
    const e: CpuidEntry = { ...src };
    switch (e.function) {
      case 0x1: {
        e.ebx = setField(e.ebx, 24, 8, vcpuId & 0xff); // initial APIC ID
        e.ebx = setField(e.ebx, 16, 8, Math.min(addressable, 0xff)); // addressable logical IDs
        e.edx = (e.edx | CpuidBit.EDX_HTT) >>> 0;
        e.ecx = (e.ecx | CpuidBit.ECX_HYPERVISOR) >>> 0;
        if (opts.tscDeadline) e.ecx = (e.ecx | CpuidBit.ECX_TSC_DEADLINE) >>> 0;
        break;
      }
      case 0x4: {
        // Deterministic cache parameters; type 0 (EAX[4:0]) ends the list and stays zero.
        if ((e.eax & 0x1f) !== 0) {
          const level = (e.eax >>> 5) & 0x7;
          e.eax = setField(e.eax, 26, 6, addressable - 1); // cores per package - 1
          e.eax = setField(e.eax, 14, 12, level >= 3 ? addressable - 1 : 0); // threads sharing - 1
        }
        break;
      }
      case 0xb:
        if (!sawLeafB) out.push(...topologyLeaf(0xb, vcpuId, vcpuCount));
        sawLeafB = true;
        continue;
      case 0x1f:
        if (!sawLeaf1F) out.push(...topologyLeaf(0x1f, vcpuId, vcpuCount));
        sawLeaf1F = true;
        continue;
      case 0x8000_0001:
        if (vendor === 'amd') {
          // CmpLegacy: HTT counts cores, not threads (matches one thread per core).
          e.ecx = vcpuCount > 1 ? (e.ecx | CpuidBit.EXT_ECX_CMP_LEGACY) >>> 0 : (e.ecx & ~CpuidBit.EXT_ECX_CMP_LEGACY) >>> 0;
        }
        break;
      case 0x8000_0008:
        if (vendor === 'amd') {
          e.ecx = setField(e.ecx, 0, 8, vcpuCount - 1); // NC: threads in package - 1
          e.ecx = setField(e.ecx, 12, 4, coreShift); // ApicIdCoreIdSize
        }
        break;
      case 0x8000_001d: {
        // AMD cache topology; type 0 ends the list.
        if ((e.eax & 0x1f) !== 0) {
          const level = (e.eax >>> 5) & 0x7;
          e.eax = setField(e.eax, 14, 12, level >= 3 ? vcpuCount - 1 : 0); // NumSharingCache - 1
        }
        break;
      }
      case 0x8000_001e:
        if (vendor === 'amd') {
          e.eax = vcpuId >>> 0; // extended APIC ID
          e.ebx = setField(0, 0, 8, vcpuId & 0xff); // core ID; ThreadsPerCore - 1 = 0
          e.ecx = 0; // node 0, one node per package
          e.edx = 0;
        }
        break;
      default:
        break;
    }
    out.push(e);
  }

  if (!sawLeafB && maxBasic >= 0xb) out.push(...topologyLeaf(0xb, vcpuId, vcpuCount));
  return out;
}

/** Whether two CPUIDs are entry for entry the same. */
export function sameCpuid(a: readonly CpuidEntry[], b: readonly CpuidEntry[]): boolean {
  return (
    a.length === b.length &&
    a.every((x, i) => {
      const y = b[i];
      return x.function === y.function && x.index === y.index && x.flags === y.flags && x.eax === y.eax && x.ebx === y.ebx && x.ecx === y.ecx && x.edx === y.edx;
    })
  );
}
