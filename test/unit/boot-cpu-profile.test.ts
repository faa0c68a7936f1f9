// CPU profiles: under a baseline the guest's CPUID shows the level's features and nothing a host
// of that level may lack, so two such hosts can exchange the guest; a host below the level
// refuses to boot it, naming what it lacks.
import test from 'ava';

import { loadKernel } from '../../src/boot/boot';
import { buildCpuid } from '../../src/boot/cpuid';
import { featureBit } from '../../src/boot/cpu-features';
import { CpuProfileUnavailableError, applyCpuProfile, profileFeatures, type CpuProfile } from '../../src/boot/cpu-profile';
import { cpuCompatProblems } from '../../src/migration/cpu-compat';
import type { CpuidEntry } from '../../src/native/kvm';
import { AMD_EPYC_NESTED, INTEL_XEON } from './boot-cpuid-fixtures';
import { MiB, buildElf, memoryOf, pattern } from './boot-helpers';

function has(entries: readonly CpuidEntry[], name: string): boolean {
  const { word, bit } = featureBit(name);
  const e = entries.find((x) => x.function === word.leaf && x.index === word.subleaf);
  return e !== undefined && ((e[word.register] >>> bit) & 1) === 1;
}

function leaf(entries: readonly CpuidEntry[], fn: number, index = 0): CpuidEntry | undefined {
  return entries.find((e) => e.function === fn && e.index === index);
}

function without(entries: readonly CpuidEntry[], name: string): CpuidEntry[] {
  const { word, bit } = featureBit(name);
  return entries.map((e) =>
    e.function === word.leaf && e.index === word.subleaf ? { ...e, [word.register]: (e[word.register] & ~(1 << bit)) >>> 0 } : { ...e },
  );
}

const ABOVE_V3 = ['avx512f', 'avx512dq', 'avx512cd', 'avx512bw', 'avx512vl', 'xsave_opmask', 'xsave_zmm_hi256', 'xsave_hi16_zmm'];
/** On the Xeon and outside every level: must be hidden under any profile. */
const NOT_IN_ANY_LEVEL = ['pcid', 'aes', 'pclmulqdq', 'rdrand', 'vmx', 'fsgsbase', 'smep', 'erms', 'invpcid', 'rdseed', 'adx', 'smap', 'clflushopt', 'clwb', 'md_clear', 'spec_ctrl', 'arch_capabilities', 'spec_ctrl_ssbd', 'pdpe1gb', 'rdtscp', '3dnowprefetch', 'umip', 'pku'];

test('x86-64-v3: the level is there, everything above it and beside it is not', (t) => {
  t.true(ABOVE_V3.every((f) => has(buildCpuid(INTEL_XEON, 0, 2), f)), 'the host itself has AVX-512');
  const guest = buildCpuid(INTEL_XEON, 0, 2, { profile: 'x86-64-v3' });
  for (const f of profileFeatures('x86-64-v3')) t.true(has(guest, f), `has ${f}`);
  for (const f of [...ABOVE_V3, ...NOT_IN_ANY_LEVEL]) t.false(has(guest, f), `lacks ${f}`);
  // Platform bits and the ones Tern adds stay.
  for (const f of ['apic', 'pae', 'nx', 'x2apic', 'hypervisor', 'ht', 'tsc']) t.true(has(guest, f), `keeps ${f}`);
  t.is(leaf(guest, 0)!.eax, 0xd, 'basic leaves stop at 0xD');
  t.is(leaf(guest, 0x8000_0000)!.eax, 0x8000_0008, 'extended leaves stop at 0x80000008');
  t.is(leaf(guest, 0x7)!.eax, 0, 'no leaf 7 subleaf past 0');
  t.deepEqual([leaf(guest, 0xa)!.eax, leaf(guest, 0xa)!.edx], [0, 0], 'no PMU');
  t.is(leaf(guest, 0xd)!.eax, 0x7, 'XCR0 may hold x87, SSE and AVX only');
  t.is(leaf(guest, 0xd)!.ecx, 0x340, 'and the XSAVE area is sized for those');
  t.is(leaf(guest, 0xd, 1)!.eax, 0, 'no XSAVEOPT/XSAVEC/XSAVES');
  t.is(leaf(guest, 0xb, 1)!.ebx, 2, 'the topology leaf is still built');
  // KVM's paravirtual features are the host's KVM's.
  t.deepEqual(leaf(guest, 0x4000_0001), leaf(INTEL_XEON, 0x4000_0001));
});

test('x86-64-v2 hides AVX and XSAVE; v4 adds exactly the AVX-512 of its level', (t) => {
  const v2 = buildCpuid(INTEL_XEON, 0, 1, { profile: 'x86-64-v2' });
  for (const f of ['sse3', 'ssse3', 'sse4_1', 'sse4_2', 'popcnt', 'cx16', 'lahf_lm']) t.true(has(v2, f), f);
  for (const f of ['avx', 'avx2', 'fma', 'bmi1', 'bmi2', 'movbe', 'f16c', 'abm', 'xsave']) t.false(has(v2, f), f);
  t.is(leaf(v2, 0xd)!.eax, 0);

  const v4 = buildCpuid(INTEL_XEON, 0, 1, { profile: 'x86-64-v4' });
  for (const f of ABOVE_V3) t.true(has(v4, f), f);
  t.is(leaf(v4, 0xd)!.eax, 0xe7);
  for (const f of NOT_IN_ANY_LEVEL) t.false(has(v4, f), f);
});

test("'host' and no profile give the same CPUID as before", (t) => {
  t.deepEqual(buildCpuid(INTEL_XEON, 1, 2, { profile: 'host' }), buildCpuid(INTEL_XEON, 1, 2));
  t.deepEqual(applyCpuProfile(AMD_EPYC_NESTED, 'host'), AMD_EPYC_NESTED.map((e) => ({ ...e })));
});

test('a host lacking a feature of the level refuses, naming every missing one', (t) => {
  const noAvx2 = without(without(INTEL_XEON, 'avx2'), 'movbe');
  const err = t.throws(() => buildCpuid(noAvx2, 0, 1, { profile: 'x86-64-v3' }), { instanceOf: CpuProfileUnavailableError })!;
  t.is(err.message, "CPU profile x86-64-v3 needs features this host's CPU or KVM lacks: avx2, movbe");
  t.deepEqual(err.missing, ['avx2', 'movbe']);
  t.notThrows(() => buildCpuid(noAvx2, 0, 1, { profile: 'x86-64-v2' }), 'a lower level still boots');
  // The recorded nested EPYC reports no SSE3 family at all.
  const amd = t.throws(() => applyCpuProfile(AMD_EPYC_NESTED, 'x86-64-v2'), { instanceOf: CpuProfileUnavailableError })!;
  t.deepEqual(amd.missing, ['popcnt', 'sse3', 'sse4_1', 'sse4_2', 'ssse3']);
  t.notThrows(() => applyCpuProfile(AMD_EPYC_NESTED, 'x86-64'));
});

test('the boot refuses too: loadKernel with a profile the host cannot give', (t) => {
  const image = buildElf({ segments: [{ paddr: 0x1000000, data: pattern(0x1000, 1) }], pvhEntry: 0x1000000 });
  const boot = (supported: readonly CpuidEntry[], profile: CpuProfile) =>
    loadKernel(memoryOf(64 * MiB), { kernel: image, cmdline: '', vcpuCount: 2, memorySize: 64 * MiB, supportedCpuid: supported, cpuidOptions: { profile } });
  t.throws(() => boot(without(INTEL_XEON, 'avx512bw'), 'x86-64-v4'), { instanceOf: CpuProfileUnavailableError, message: /lacks: avx512bw$/ });
  const plan = boot(INTEL_XEON, 'x86-64-v3');
  t.is(plan.vcpus.length, 2);
  t.false(has(plan.vcpus[1].cpuid!, 'avx512f'));
});

test('two hosts sharing the level exchange a guest booted under it; without the profile they cannot', (t) => {
  // The least a host of the level can offer: exactly the profile's features, nothing more.
  const smallV3Host = applyCpuProfile(INTEL_XEON, 'x86-64-v3');
  const underProfile = buildCpuid(INTEL_XEON, 0, 2, { profile: 'x86-64-v3' });
  t.deepEqual(cpuCompatProblems({ guestCpuid: underProfile, hostCpuid: smallV3Host, guestMsrIndices: [], hostMsrIndices: [] }), []);
  const unfiltered = buildCpuid(INTEL_XEON, 0, 2);
  const names = cpuCompatProblems({ guestCpuid: unfiltered, hostCpuid: smallV3Host, guestMsrIndices: [], hostMsrIndices: [] }).map((p) => p.name);
  for (const f of ['avx512f', 'pcid', 'md_clear', 'max basic leaf']) t.true(names.includes(f), f);
});
