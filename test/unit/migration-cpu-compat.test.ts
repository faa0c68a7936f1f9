// Whether a guest's CPU fits a host: every CPUID feature it was given, the leaves it may read
// and the MSRs it carries, checked against the host's KVM tables, each problem named.
import test from 'ava';

import { buildCpuid } from '../../src/boot/cpuid';
import {
  CpuIncompatibleError,
  checkCpuCompat,
  checkVcpuFitsHost,
  cpuCompatProblems,
  type CpuCompatInput,
} from '../../src/migration/cpu-compat';
import type { CpuidEntry } from '../../src/native/kvm';
import { TernStateError } from '../../src/state/errors';
import { AMD_EPYC_NESTED, INTEL_XEON } from './boot-cpuid-fixtures';

function withBits(entries: readonly CpuidEntry[], fn: number, index: number, reg: 'eax' | 'ebx' | 'ecx' | 'edx', bits: number): CpuidEntry[] {
  return entries.map((e) => (e.function === fn && e.index === index ? { ...e, [reg]: (e[reg] | bits) >>> 0 } : { ...e }));
}

function input(guestCpuid: readonly CpuidEntry[], hostCpuid: readonly CpuidEntry[], msrs: { guest?: number[]; host?: number[] } = {}): CpuCompatInput {
  return { guestCpuid, hostCpuid, guestMsrIndices: msrs.guest ?? [], hostMsrIndices: msrs.host ?? [] };
}

const names = (i: CpuCompatInput) => cpuCompatProblems(i).map((p) => p.name);

test('a guest booted on a host fits that host, with every vCPU count and the TSC-deadline bit Tern adds', (t) => {
  for (const host of [INTEL_XEON, AMD_EPYC_NESTED]) {
    for (const [id, count] of [[0, 1], [3, 4]]) {
      t.deepEqual(cpuCompatProblems(input(buildCpuid(host, id, count, { tscDeadline: true }), host)), []);
    }
  }
});

test('an Intel guest on the AMD host: every missing feature named, and the leaves it lacks', (t) => {
  const got = names(input(buildCpuid(INTEL_XEON, 0, 2), AMD_EPYC_NESTED));
  for (const expected of ['avx512f', 'avx512dq', 'avx512cd', 'avx512bw', 'avx512vl', 'avx2', 'bmi2', 'sse4_2', 'avx', 'xsave', 'pcid', 'abm', 'rdtscp', 'md_clear', 'xsave_opmask', 'xsave_zmm_hi256', 'xsaves', 'max basic leaf']) {
    t.true(got.includes(expected), `${expected} in ${got.join(',')}`);
  }
  // The hypervisor and HTT bits Tern sets, and osxsave (which follows the guest's CR4), are
  // never a host's to lack.
  for (const never of ['hypervisor', 'ht', 'osxsave', 'x2apic', 'tsc_adjust', 'clflushopt']) t.false(got.includes(never), never);
  const leaf = cpuCompatProblems(input(buildCpuid(INTEL_XEON, 0, 1), AMD_EPYC_NESTED)).find((p) => p.kind === 'leaf');
  t.is(leaf?.message, 'max basic leaf 0x16: this host\'s KVM reports 0xd');
});

test('an AMD guest on the Intel host lacks the extended leaves up to 0x80000021', (t) => {
  const problems = cpuCompatProblems(input(buildCpuid(AMD_EPYC_NESTED, 0, 1), INTEL_XEON));
  t.deepEqual(problems.filter((p) => p.kind === 'leaf').map((p) => p.message), ['max extended leaf 0x80000021: this host\'s KVM reports 0x80000008']);
  // AMD repeats leaf 1 EDX in 0x80000001 EDX; Intel's KVM reports only the originals, which the
  // guest reads. AMD's own bits there still count.
  const ext = problems.filter((p) => p.message.includes('leaf 0x80000001.0 edx'));
  t.deepEqual(ext.map((p) => p.name), ['mmxext', 'fxsr_opt']);
  const noFpu = INTEL_XEON.map((e) => (e.function === 1 ? { ...e, edx: (e.edx & ~1) >>> 0 } : e));
  t.true(
    cpuCompatProblems(input(buildCpuid(AMD_EPYC_NESTED, 0, 1), noFpu)).some((p) => p.message === 'feature fpu (leaf 0x80000001.0 edx bit 0)'),
    'a copy whose original the host lacks is named after it',
  );
});

test('a feature bit without a name is reported by its position; named ones with both', (t) => {
  const guest = withBits(withBits(INTEL_XEON, 7, 0, 'ecx', 1 << 15), 7, 0, 'ebx', 1 << 16);
  const host = INTEL_XEON.map((e) => (e.function === 7 && e.index === 0 ? { ...e, ebx: (e.ebx & ~(1 << 16)) >>> 0 } : e));
  t.deepEqual(
    cpuCompatProblems(input(guest, host)).map((p) => p.message),
    ['feature avx512f (leaf 0x7.0 ebx bit 16)', 'feature leaf 0x7.0 ecx bit 15'],
  );
});

test('KVM paravirtual features and leaf 7.1 are compared too', (t) => {
  const guest = withBits(INTEL_XEON, 0x4000_0001, 0, 'eax', 1 << 15).concat([
    { function: 7, index: 1, flags: 1, eax: 1 << 4, ebx: 0, ecx: 0, edx: 0 },
  ]);
  const host = INTEL_XEON.map((e) => (e.function === 0x4000_0001 ? { ...e, eax: (e.eax & ~(1 << 15)) >>> 0 } : e));
  t.deepEqual(names(input(guest, host)), ['avx_vnni', 'kvm_msi_ext_dest_id']);
});

test('saved MSRs this KVM does not list are problems, except performance counters', (t) => {
  const guest = buildCpuid(INTEL_XEON, 0, 1);
  const problems = cpuCompatProblems(
    input(guest, INTEL_XEON, { guest: [0x10, 0x174, 0xc1, 0x186, 0x38f, 0xc001_0201, 0x48, 0x4b56_4d05], host: [0x10, 0x174] }),
  );
  t.deepEqual(problems.map((p) => p.message), [
    "MSR 0x48 is not one this host's KVM saves and restores",
    "MSR 0x4b564d05 is not one this host's KVM saves and restores",
  ]);
});

test('CpuIncompatibleError: a TernStateError with code CpuIncompatible naming the problems', (t) => {
  const err = t.throws(() => checkCpuCompat(input(buildCpuid(INTEL_XEON, 0, 1), AMD_EPYC_NESTED, { guest: [0x48], host: [] })), {
    instanceOf: CpuIncompatibleError,
  })!;
  t.true(err instanceof TernStateError);
  t.is(err.code, 'CpuIncompatible');
  t.is(err.name, 'CpuIncompatibleError');
  t.regex(err.message, /^this host cannot run the guest's CPU: max basic leaf 0x16: this host's KVM reports 0xd; feature sse3 \(leaf 0x1\.0 ecx bit 0\);/);
  t.regex(err.message, /; and \d+ more$/, 'a long list is cut short in the message');
  t.true(err.problems.some((p) => p.name === 'MSR 0x48'), 'the error keeps every problem');
  t.notThrows(() => checkCpuCompat(input(buildCpuid(INTEL_XEON, 0, 1), INTEL_XEON)));
});

test('checkVcpuFitsHost reads the host tables from KVM and the guest from its saved vCPU state', (t) => {
  const kvm = { supportedCpuid: () => [...AMD_EPYC_NESTED], msrIndexList: () => [0x10] };
  const saved = { cpuid: buildCpuid(AMD_EPYC_NESTED, 0, 1), msrs: [{ index: 0x10, data: 1n }] };
  t.notThrows(() => checkVcpuFitsHost(kvm, saved));
  const err = t.throws(() => checkVcpuFitsHost(kvm, { ...saved, cpuid: withBits(saved.cpuid, 7, 0, 'ebx', 1 << 5), msrs: [{ index: 0x3a, data: 0n }] }), {
    instanceOf: CpuIncompatibleError,
  })!;
  t.deepEqual(err.problems.map((p) => p.name), ['avx2', 'MSR 0x3a']);
});
