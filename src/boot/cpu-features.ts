// Names of the CPUID feature bits a guest can see and rely on, by the words they live in. Used
// to say which feature a destination host lacks ("avx512f", not "leaf 7 ebx bit 16") and to
// define the baseline CPU models. Names follow Linux's /proc/cpuinfo flags where it has one.
import type { CpuidEntry } from '../native/kvm';

export type CpuidRegister = 'eax' | 'ebx' | 'ecx' | 'edx';

/** One 32-bit register of one CPUID (sub)leaf whose bits are independent features. */
export interface FeatureWord {
  leaf: number;
  subleaf: number;
  register: CpuidRegister;
  /** feature name by bit number; bits without a name are reported by position */
  names: Readonly<Record<number, string>>;
}

const LEAF1_ECX: Record<number, string> = {
  0: 'sse3', 1: 'pclmulqdq', 2: 'dtes64', 3: 'monitor', 4: 'ds_cpl', 5: 'vmx', 6: 'smx', 7: 'est',
  8: 'tm2', 9: 'ssse3', 10: 'cid', 11: 'sdbg', 12: 'fma', 13: 'cx16', 14: 'xtpr', 15: 'pdcm',
  17: 'pcid', 18: 'dca', 19: 'sse4_1', 20: 'sse4_2', 21: 'x2apic', 22: 'movbe', 23: 'popcnt',
  24: 'tsc_deadline_timer', 25: 'aes', 26: 'xsave', 27: 'osxsave', 28: 'avx', 29: 'f16c', 30: 'rdrand',
  31: 'hypervisor',
};

const LEAF1_EDX: Record<number, string> = {
  0: 'fpu', 1: 'vme', 2: 'de', 3: 'pse', 4: 'tsc', 5: 'msr', 6: 'pae', 7: 'mce', 8: 'cx8', 9: 'apic',
  11: 'sep', 12: 'mtrr', 13: 'pge', 14: 'mca', 15: 'cmov', 16: 'pat', 17: 'pse36', 18: 'pn',
  19: 'clflush', 21: 'ds', 22: 'acpi', 23: 'mmx', 24: 'fxsr', 25: 'sse', 26: 'sse2', 27: 'ss',
  28: 'ht', 29: 'tm', 30: 'ia64', 31: 'pbe',
};

const LEAF7_EBX: Record<number, string> = {
  0: 'fsgsbase', 1: 'tsc_adjust', 2: 'sgx', 3: 'bmi1', 4: 'hle', 5: 'avx2', 6: 'fdp_excptn_only',
  7: 'smep', 8: 'bmi2', 9: 'erms', 10: 'invpcid', 11: 'rtm', 12: 'cqm', 13: 'zero_fcs_fds', 14: 'mpx',
  15: 'rdt_a', 16: 'avx512f', 17: 'avx512dq', 18: 'rdseed', 19: 'adx', 20: 'smap', 21: 'avx512ifma',
  22: 'pcommit', 23: 'clflushopt', 24: 'clwb', 25: 'intel_pt', 26: 'avx512pf', 27: 'avx512er',
  28: 'avx512cd', 29: 'sha_ni', 30: 'avx512bw', 31: 'avx512vl',
};

const LEAF7_ECX: Record<number, string> = {
  0: 'prefetchwt1', 1: 'avx512vbmi', 2: 'umip', 3: 'pku', 4: 'ospke', 5: 'waitpkg', 6: 'avx512_vbmi2',
  7: 'shstk', 8: 'gfni', 9: 'vaes', 10: 'vpclmulqdq', 11: 'avx512_vnni', 12: 'avx512_bitalg', 13: 'tme',
  14: 'avx512_vpopcntdq', 16: 'la57', 22: 'rdpid', 24: 'bus_lock_detect', 25: 'cldemote', 27: 'movdiri',
  28: 'movdir64b', 29: 'enqcmd', 30: 'sgx_lc', 31: 'pks',
};

const LEAF7_EDX: Record<number, string> = {
  2: 'avx512_4vnniw', 3: 'avx512_4fmaps', 4: 'fsrm', 5: 'uintr', 8: 'avx512_vp2intersect', 9: 'srbds_ctrl',
  10: 'md_clear', 11: 'rtm_always_abort', 13: 'tsx_force_abort', 14: 'serialize', 15: 'hybrid_cpu',
  16: 'tsxldtrk', 18: 'pconfig', 19: 'arch_lbr', 20: 'ibt', 22: 'amx_bf16', 23: 'avx512_fp16',
  24: 'amx_tile', 25: 'amx_int8', 26: 'spec_ctrl', 27: 'intel_stibp', 28: 'flush_l1d',
  29: 'arch_capabilities', 30: 'core_capabilities', 31: 'spec_ctrl_ssbd',
};

const LEAF7_1_EAX: Record<number, string> = {
  4: 'avx_vnni', 5: 'avx512_bf16', 7: 'cmpccxadd', 10: 'fzrm', 11: 'fsrs', 12: 'fsrc', 21: 'amx_fp16',
  23: 'avx_ifma', 26: 'lam',
};

/** XSAVE state components (XCR0 bits) the guest may enable. */
const LEAF_D_EAX: Record<number, string> = {
  0: 'xsave_x87', 1: 'xsave_sse', 2: 'xsave_avx', 3: 'xsave_bndregs', 4: 'xsave_bndcsr',
  5: 'xsave_opmask', 6: 'xsave_zmm_hi256', 7: 'xsave_hi16_zmm', 9: 'xsave_pkru', 17: 'xsave_xtilecfg',
  18: 'xsave_xtiledata',
};

const LEAF_D_1_EAX: Record<number, string> = { 0: 'xsaveopt', 1: 'xsavec', 2: 'xgetbv1', 3: 'xsaves', 4: 'xfd' };

const EXT1_ECX: Record<number, string> = {
  0: 'lahf_lm', 1: 'cmp_legacy', 2: 'svm', 3: 'extapic', 4: 'cr8_legacy', 5: 'abm', 6: 'sse4a',
  7: 'misalignsse', 8: '3dnowprefetch', 9: 'osvw', 10: 'ibs', 11: 'xop', 12: 'skinit', 13: 'wdt',
  15: 'lwp', 16: 'fma4', 17: 'tce', 19: 'nodeid_msr', 21: 'tbm', 22: 'topoext', 23: 'perfctr_core',
  24: 'perfctr_nb', 26: 'bpext', 27: 'ptsc', 28: 'perfctr_llc', 29: 'mwaitx',
};

const EXT1_EDX: Record<number, string> = {
  11: 'syscall', 19: 'mp', 20: 'nx', 22: 'mmxext', 25: 'fxsr_opt', 26: 'pdpe1gb', 27: 'rdtscp', 29: 'lm',
  30: '3dnowext', 31: '3dnow',
};

/** KVM's paravirtual features (Documentation/virt/kvm/x86/cpuid.rst). */
const KVM_FEATURES_EAX: Record<number, string> = {
  0: 'kvmclock', 1: 'kvm_nopiodelay', 2: 'kvm_mmu', 3: 'kvmclock2', 4: 'kvm_async_pf', 5: 'kvm_steal_time',
  6: 'kvm_pv_eoi', 7: 'kvm_pv_unhalt', 9: 'kvm_pv_tlb_flush', 10: 'kvm_async_pf_vmexit', 11: 'kvm_pv_send_ipi',
  12: 'kvm_poll_control', 13: 'kvm_pv_sched_yield', 14: 'kvm_async_pf_int', 15: 'kvm_msi_ext_dest_id',
  16: 'kvm_hc_map_gpa_range', 17: 'kvm_migration_control', 24: 'kvmclock_stable_bit',
};

/**
 * The words whose bits are features a guest may test once and then use: the ones Cloud
 * Hypervisor and QEMU compare before a migration (leaves 1, 7.0, 7.1, 0xD.0, 0xD.1,
 * 0x80000001, and KVM's 0x40000001).
 */
export const FEATURE_WORDS: readonly FeatureWord[] = [
  { leaf: 0x1, subleaf: 0, register: 'ecx', names: LEAF1_ECX },
  { leaf: 0x1, subleaf: 0, register: 'edx', names: LEAF1_EDX },
  { leaf: 0x7, subleaf: 0, register: 'ebx', names: LEAF7_EBX },
  { leaf: 0x7, subleaf: 0, register: 'ecx', names: LEAF7_ECX },
  { leaf: 0x7, subleaf: 0, register: 'edx', names: LEAF7_EDX },
  { leaf: 0x7, subleaf: 1, register: 'eax', names: LEAF7_1_EAX },
  { leaf: 0xd, subleaf: 0, register: 'eax', names: LEAF_D_EAX },
  { leaf: 0xd, subleaf: 0, register: 'edx', names: {} },
  { leaf: 0xd, subleaf: 1, register: 'eax', names: LEAF_D_1_EAX },
  { leaf: 0x8000_0001, subleaf: 0, register: 'ecx', names: EXT1_ECX },
  { leaf: 0x8000_0001, subleaf: 0, register: 'edx', names: EXT1_EDX },
  { leaf: 0x4000_0001, subleaf: 0, register: 'eax', names: KVM_FEATURES_EAX },
];

/** Where one named feature bit lives. */
export interface FeatureBit {
  word: FeatureWord;
  bit: number;
}

/** "leaf 0x7.0 ebx bit 16" */
export function bitPosition(word: FeatureWord, bit: number): string {
  return `leaf 0x${word.leaf.toString(16)}.${word.subleaf} ${word.register} bit ${bit}`;
}

/** The feature's name, or its position when it has none. */
export function featureName(word: FeatureWord, bit: number): string {
  return word.names[bit] ?? bitPosition(word, bit);
}

const byName = new Map<string, FeatureBit>();
for (const word of FEATURE_WORDS) {
  for (const [bit, name] of Object.entries(word.names)) byName.set(name, { word, bit: Number(bit) });
}

/** The feature bit called `name`; throws for a name no word defines (a typo in a table). */
export function featureBit(name: string): FeatureBit {
  const f = byName.get(name);
  if (!f) throw new Error(`unknown CPUID feature name '${name}'`);
  return f;
}

/** The entry for CPUID(leaf, subleaf); KVM lists leaves without subleaves at index 0. */
export function findCpuidEntry(entries: readonly CpuidEntry[], leaf: number, subleaf: number): CpuidEntry | undefined {
  return entries.find((e) => e.function === leaf && e.index === subleaf);
}

/** The value of one feature word in a CPUID table (0 when the leaf is absent). */
export function featureWordValue(entries: readonly CpuidEntry[], word: FeatureWord): number {
  const e = findCpuidEntry(entries, word.leaf, word.subleaf);
  return e ? e[word.register] >>> 0 : 0;
}
