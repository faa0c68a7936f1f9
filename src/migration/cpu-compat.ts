// Can this host run a guest that was started elsewhere? A guest reads CPUID once, at boot, and
// from then on uses every feature it was told about: moved to a host that lacks one, it takes
// #UD or #GP the first time it uses it, possibly long after the move. So before a restored or
// migrated guest runs, every feature it was given must be one this host's KVM can give, every
// leaf it may read must exist here, and the MSRs it carries must be ones this KVM keeps.
import { FEATURE_WORDS, bitPosition, featureName, featureWordValue, findCpuidEntry, type FeatureWord } from '../boot/cpu-features';
import type { CpuidEntry, NativeKvm } from '../native/kvm';
import type { NativeVcpuState } from '../state/codec';
import { TernStateError } from '../state/errors';

export interface CpuProblem {
  kind: 'feature' | 'leaf' | 'msr';
  /** the feature's name ("avx512f"), the leaf range ("max basic leaf") or the MSR ("MSR 0x48") */
  name: string;
  /** one line a person can act on */
  message: string;
}

export interface CpuCompatInput {
  /** the CPUID the guest was given: the `cpuid` saved with its vCPU state */
  guestCpuid: readonly CpuidEntry[];
  /** the indices of the MSRs the guest's saved vCPU state carries */
  guestMsrIndices: readonly number[];
  /** this host's KVM_GET_SUPPORTED_CPUID */
  hostCpuid: readonly CpuidEntry[];
  /** this host's KVM_GET_MSR_INDEX_LIST */
  hostMsrIndices: readonly number[];
}

/**
 * Bits not compared, by word. They are not features a host may lack:
 * - osxsave (1 ECX[27]) and ospke (7.0 ECX[4]) mirror the guest's own CR4 (KVM keeps them in
 *   step); whether the host has XSAVE and PKU at all is xsave and pku, which are compared.
 * - hypervisor (1 ECX[31]), ht (1 EDX[28]) and cmp_legacy (0x80000001 ECX[1]) are set by Tern's
 *   CPUID builder on every host (src/boot/cpuid.ts), whatever KVM reports.
 * - tsc_deadline_timer (1 ECX[24]): KVM's in-kernel LAPIC emulates it on every host, though
 *   KVM_GET_SUPPORTED_CPUID leaves it out on some.
 */
const NOT_COMPARED: ReadonlyMap<string, number> = new Map([
  ['1.0.ecx', (1 << 27) | (1 << 31) | (1 << 24)],
  ['1.0.edx', 1 << 28],
  ['7.0.ecx', 1 << 4],
  [`${0x8000_0001}.0.ecx`, 1 << 1],
]);

function ignoredBits(word: FeatureWord): number {
  return NOT_COMPARED.get(`${word.leaf}.${word.subleaf}.${word.register}`) ?? 0;
}

/**
 * AMD CPUs repeat leaf 1 EDX's bits 0-9, 12-17, 23 and 24 in 0x80000001 EDX, and KVM reports the
 * copies only on AMD hosts. A guest learns those features from leaf 1 (Linux keeps no separate
 * flag for a copy), so a copy counts as provided when the host has the leaf 1 original.
 */
const AMD_LEAF1_EDX_ALIASES = 0x0183_f3ff;
const LEAF1_EDX_WORD = FEATURE_WORDS.find((w) => w.leaf === 0x1 && w.register === 'edx')!;

function providedBits(hostCpuid: readonly CpuidEntry[], word: FeatureWord): number {
  const own = featureWordValue(hostCpuid, word);
  if (word.leaf !== 0x8000_0001 || word.register !== 'edx') return own;
  return (own | (featureWordValue(hostCpuid, LEAF1_EDX_WORD) & AMD_LEAF1_EDX_ALIASES)) >>> 0;
}

/** A copied bit is named after its leaf 1 original. */
function bitName(word: FeatureWord, bit: number): string {
  if (word.leaf === 0x8000_0001 && word.register === 'edx' && AMD_LEAF1_EDX_ALIASES & (1 << bit) && !word.names[bit]) {
    return featureName(LEAF1_EDX_WORD, bit);
  }
  return featureName(word, bit);
}

/**
 * Performance-monitoring counters and their controls, which a guest may carry and this host's
 * KVM may not list. They are harmless to drop: KVM lists as many counters as the host's PMU
 * has, so hosts of one fleet often differ here, and a counter that is not restored only loses
 * the count a profiler was taking. A guest that keeps programming a counter this host lacks
 * gets a #GP on that WRMSR, which Linux's perf reports and survives. Every other MSR holds
 * state the guest's correctness depends on (syscall entry points, PAT, TSC, kvmclock, speculation
 * controls...) and must be restorable.
 */
const DROPPABLE_MSR_RANGES: readonly (readonly [number, number])[] = [
  [0xc1, 0xc8], // IA32_PMC0..7
  [0x186, 0x18d], // IA32_PERFEVTSEL0..7
  [0x309, 0x30f], // IA32_FIXED_CTR0..
  [0x38d, 0x390], // IA32_FIXED_CTR_CTRL, IA32_PERF_GLOBAL_STATUS/CTRL/OVF_CTRL
  [0x4c1, 0x4c8], // IA32_A_PMC0..7 (full-width writes)
  [0xc000_0300, 0xc000_0303], // AMD PerfMonV2 global control and status
  [0xc001_0000, 0xc001_0007], // AMD legacy PERF_CTL0..3 / PERF_CTR0..3
  [0xc001_0200, 0xc001_020b], // AMD core PERF_CTL/PERF_CTR 0..5
];

export function isDroppableMsr(index: number): boolean {
  return DROPPABLE_MSR_RANGES.some(([lo, hi]) => index >= lo && index <= hi);
}

const hex = (n: number) => `0x${n.toString(16)}`;

function maxLeaf(entries: readonly CpuidEntry[], base: number): number | undefined {
  const e = findCpuidEntry(entries, base, 0);
  return e ? e.eax >>> 0 : undefined;
}

/** Every reason this host cannot run the guest as given; empty when it can. */
export function cpuCompatProblems(input: CpuCompatInput): CpuProblem[] {
  const problems: CpuProblem[] = [];
  const { guestCpuid, hostCpuid } = input;

  for (const [base, what] of [
    [0x0, 'max basic leaf'],
    [0x8000_0000, 'max extended leaf'],
  ] as const) {
    const guest = maxLeaf(guestCpuid, base);
    const host = maxLeaf(hostCpuid, base) ?? 0;
    if (guest !== undefined && guest > host) {
      problems.push({
        kind: 'leaf',
        name: what,
        message: `${what} ${hex(guest)}: this host's KVM reports ${hex(host)}`,
      });
    }
  }

  for (const word of FEATURE_WORDS) {
    if (!findCpuidEntry(guestCpuid, word.leaf, word.subleaf)) continue;
    const missing = (featureWordValue(guestCpuid, word) & ~providedBits(hostCpuid, word) & ~ignoredBits(word)) >>> 0;
    for (let bit = 0; bit < 32; bit++) {
      if (!(missing & (1 << bit))) continue;
      const name = bitName(word, bit);
      problems.push({
        kind: 'feature',
        name,
        message: name === bitPosition(word, bit) ? `feature ${name}` : `feature ${name} (${bitPosition(word, bit)})`,
      });
    }
  }

  const hostMsrs = new Set(input.hostMsrIndices);
  for (const index of input.guestMsrIndices) {
    if (hostMsrs.has(index) || isDroppableMsr(index)) continue;
    problems.push({ kind: 'msr', name: `MSR ${hex(index)}`, message: `MSR ${hex(index)} is not one this host's KVM saves and restores` });
  }
  return problems;
}

/** How many problems the error message spells out; the error's `problems` has them all. */
const MESSAGE_PROBLEMS = 24;

/** The guest needs CPU features, CPUID leaves or MSRs this host's CPU or KVM does not have. */
export class CpuIncompatibleError extends TernStateError {
  constructor(readonly problems: readonly CpuProblem[]) {
    const shown = problems.slice(0, MESSAGE_PROBLEMS).map((p) => p.message);
    const more = problems.length > MESSAGE_PROBLEMS ? `; and ${problems.length - MESSAGE_PROBLEMS} more` : '';
    super('CpuIncompatible', `this host cannot run the guest's CPU: ${shown.join('; ')}${more}`);
  }
}

/** Throw CpuIncompatibleError when cpuCompatProblems finds any. */
export function checkCpuCompat(input: CpuCompatInput): void {
  const problems = cpuCompatProblems(input);
  if (problems.length > 0) throw new CpuIncompatibleError(problems);
}

/** Check a saved vCPU state (what a snapshot or migration stream carries) against this host's KVM. */
export function checkVcpuFitsHost(kvm: Pick<NativeKvm, 'supportedCpuid' | 'msrIndexList'>, saved: Pick<NativeVcpuState, 'cpuid' | 'msrs'>): void {
  checkCpuCompat({
    guestCpuid: saved.cpuid,
    guestMsrIndices: saved.msrs.map((m) => m.index),
    hostCpuid: kvm.supportedCpuid(),
    hostMsrIndices: kvm.msrIndexList(),
  });
}
