// CPU profiles: the guest's CPUID reduced to a named baseline, so that every host offering the
// baseline can run the guest and take it over in a migration. The baselines are the x86-64
// microarchitecture levels of the x86-64 psABI (x86-64, -v2, -v3, -v4), which name the
// instruction-set features compilers and distributions target. 'host' (the default) gives the
// guest everything this host's KVM supports.
//
// Under a profile the guest sees, in the feature words Tern compares before taking a guest
// (src/boot/cpu-features.ts):
// - the level's features, which the host must have (else the boot is refused, naming them);
// - the platform features every x86-64 CPU and KVM have (paging, APIC, MSRs, NX...), when the
//   host reports them;
// - KVM's paravirtual features (leaf 0x40000001) as this host's KVM reports them: they follow
//   the host's kernel, not its CPU.
// Everything else is hidden: newer instructions, and also the protection and speculation-control
// features (smep, smap, pcid, spec_ctrl, ssbd, md_clear, arch_capabilities...), which CPUs of one
// level do not all have. The basic leaves stop at 0xD and the extended ones at 0x80000008; the
// guest sees no performance-monitoring unit (leaf 0xA) and no invariant-TSC/power leaf
// (0x80000007), which differ between hosts of one level. Vendor, family, model and brand string
// stay the host's.
import type { CpuidEntry } from '../native/kvm';
import { BootError } from './errors';
import { FEATURE_WORDS, featureBit, findCpuidEntry, featureWordValue, type FeatureWord } from './cpu-features';

/** Profile names, as `--cpus profile=` and `cpus.tern_profile` take them. */
export const CPU_PROFILES = ['host', 'x86-64', 'x86-64-v2', 'x86-64-v3', 'x86-64-v4'] as const;
export type CpuProfile = (typeof CPU_PROFILES)[number];

export function isCpuProfile(name: string): name is CpuProfile {
  return (CPU_PROFILES as readonly string[]).includes(name);
}

/** The x86-64 psABI levels; each includes the ones before it. */
const LEVEL_FEATURES: Record<Exclude<CpuProfile, 'host'>, readonly string[]> = {
  'x86-64': ['cmov', 'cx8', 'fpu', 'fxsr', 'mmx', 'sse', 'sse2', 'syscall', 'lm'],
  'x86-64-v2': ['cx16', 'lahf_lm', 'popcnt', 'sse3', 'sse4_1', 'sse4_2', 'ssse3'],
  // LZCNT is CPUID's "abm" bit; AVX needs the OS to save YMM state, hence XSAVE and its components.
  'x86-64-v3': ['avx', 'avx2', 'bmi1', 'bmi2', 'f16c', 'fma', 'abm', 'movbe', 'xsave', 'xsave_x87', 'xsave_sse', 'xsave_avx'],
  'x86-64-v4': ['avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl', 'xsave_opmask', 'xsave_zmm_hi256', 'xsave_hi16_zmm'],
};

const LEVEL_ORDER = ['x86-64', 'x86-64-v2', 'x86-64-v3', 'x86-64-v4'] as const;

/**
 * Kept when the host reports them, not required: features of every x86-64 CPU that are
 * platform rather than instruction set, the ones KVM emulates on every host (x2apic,
 * tsc_deadline_timer), and the bits that mirror the guest's own state or Tern's topology
 * (osxsave, ht, hypervisor).
 */
const PLATFORM_FEATURES: readonly string[] = [
  'vme', 'de', 'pse', 'tsc', 'msr', 'pae', 'mce', 'apic', 'sep', 'mtrr', 'pge', 'mca', 'pat', 'pse36',
  'clflush', 'ht', 'nx', 'x2apic', 'tsc_deadline_timer', 'hypervisor', 'osxsave',
];

/** The leaf whose words pass through unchanged: KVM's own paravirtual features. */
const KVM_FEATURES_LEAF = 0x4000_0001;
const MAX_BASIC_LEAF = 0xd;
const MAX_EXTENDED_LEAF = 0x8000_0008;
const HYPERVISOR_RANGE = [0x4000_0000, 0x4fff_ffff] as const;
/** XSAVE legacy area (512) plus header (64): the smallest XSAVE image. */
const XSAVE_LEGACY_AND_HEADER = 576;

/** The features a profile requires of the host: its level and every level below. */
export function profileFeatures(profile: Exclude<CpuProfile, 'host'>): string[] {
  const upTo = LEVEL_ORDER.indexOf(profile);
  return LEVEL_ORDER.slice(0, upTo + 1).flatMap((l) => LEVEL_FEATURES[l]);
}

/** The host's KVM cannot give a guest every feature of the profile it was asked for. */
export class CpuProfileUnavailableError extends BootError {
  constructor(
    readonly profile: CpuProfile,
    readonly missing: readonly string[],
  ) {
    super(`CPU profile ${profile} needs features this host's CPU or KVM lacks: ${missing.join(', ')}`);
    this.name = 'CpuProfileUnavailableError';
  }
}

const wordKey = (leaf: number, subleaf: number, register: string) => `${leaf}.${subleaf}.${register}`;

function allowedMasks(names: readonly string[]): Map<string, number> {
  const masks = new Map<string, number>();
  for (const name of names) {
    const { word, bit } = featureBit(name);
    const k = wordKey(word.leaf, word.subleaf, word.register);
    masks.set(k, ((masks.get(k) ?? 0) | (1 << bit)) >>> 0);
  }
  return masks;
}

function isFeatureWordOf(word: FeatureWord, e: CpuidEntry): boolean {
  return word.leaf === e.function && word.subleaf === e.index;
}

/**
 * KVM's supported CPUID reduced to `profile`, for buildCpuid to build each vCPU's table from.
 * Pure. Throws CpuProfileUnavailableError when the host lacks a feature of the profile's level.
 */
export function applyCpuProfile(supported: readonly CpuidEntry[], profile: CpuProfile): CpuidEntry[] {
  if (profile === 'host') return supported.map((e) => ({ ...e }));
  const required = profileFeatures(profile);
  const missing = required.filter((name) => {
    const { word, bit } = featureBit(name);
    return !(featureWordValue(supported, word) & (1 << bit));
  });
  if (missing.length > 0) throw new CpuProfileUnavailableError(profile, missing);

  const allowed = allowedMasks([...required, ...PLATFORM_FEATURES]);
  const xcr0Allowed = allowed.get(wordKey(0xd, 0, 'eax')) ?? 0;
  const out: CpuidEntry[] = [];
  for (const src of supported) {
    const fn = src.function;
    const inHypervisorRange = fn >= HYPERVISOR_RANGE[0] && fn <= HYPERVISOR_RANGE[1];
    if (!inHypervisorRange && fn > MAX_BASIC_LEAF && fn < 0x8000_0000) continue;
    if (fn > MAX_EXTENDED_LEAF && !inHypervisorRange) continue;
    // Leaf 7 subleaves past 0 hold only features no level includes.
    if (fn === 0x7 && src.index > 0) continue;
    // XSAVE component leaves of components the guest cannot enable.
    if (fn === 0xd && src.index >= 2 && !(xcr0Allowed & (1 << src.index))) continue;

    const e: CpuidEntry = { ...src };
    if (fn !== KVM_FEATURES_LEAF) {
      for (const word of FEATURE_WORDS) {
        if (isFeatureWordOf(word, e)) e[word.register] = (e[word.register] & (allowed.get(wordKey(word.leaf, word.subleaf, word.register)) ?? 0)) >>> 0;
      }
    }
    switch (fn) {
      case 0x0:
        e.eax = Math.min(e.eax >>> 0, MAX_BASIC_LEAF);
        break;
      case 0x7:
        e.eax = 0; // no subleaf past 0
        break;
      case 0xa: // no performance-monitoring unit
      case 0x8000_0007: // no invariant TSC or power-management claims
        e.eax = e.ebx = e.ecx = e.edx = 0;
        break;
      case 0xd:
        if (e.index === 0) e.ecx = xsaveSize(supported, e.eax);
        // No XSAVES/XSAVEC: no supervisor state components and no compacted size to report.
        if (e.index === 1) e.ebx = e.ecx = e.edx = 0;
        break;
      case 0x8000_0000:
        e.eax = Math.min(e.eax >>> 0, MAX_EXTENDED_LEAF);
        break;
      case 0x8000_0008:
        e.ebx = 0; // AMD's extended feature flags (speculation controls, clzero, wbnoinvd...)
        break;
      default:
        break;
    }
    out.push(e);
  }
  return out;
}

/** The XSAVE area size the components in `xcr0` need (CPUID 0xD.0 ECX for that set). */
function xsaveSize(supported: readonly CpuidEntry[], xcr0: number): number {
  let size = XSAVE_LEGACY_AND_HEADER;
  for (let i = 2; i < 32; i++) {
    if (!(xcr0 & (1 << i))) continue;
    const c = findCpuidEntry(supported, 0xd, i);
    if (c) size = Math.max(size, (c.ebx >>> 0) + (c.eax >>> 0));
  }
  return size;
}
