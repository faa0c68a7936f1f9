import test from 'ava';
import type { CpuidEntry } from '../../src/native/kvm';
import { CpuidBit, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, buildCpuid, cpuVendor, idBits } from '../../src/boot/cpuid';
import { AMD_EPYC_NESTED, INTEL_XEON } from './boot-cpuid-fixtures';

function leaf(entries: readonly CpuidEntry[], fn: number, index = 0): CpuidEntry {
  const e = entries.find((x) => x.function === fn && x.index === index);
  if (!e) throw new Error(`no leaf 0x${fn.toString(16)}.${index}`);
  return e;
}
const bits = (v: number, lo: number, width: number) => (v >>> lo) & ((1 << width) - 1);

test('idBits is ceil(log2 n)', (t) => {
  t.deepEqual([1, 2, 3, 4, 5, 8, 9, 255, 256].map(idBits), [0, 1, 2, 2, 3, 3, 4, 8, 8]);
});

test('vendor detection', (t) => {
  t.is(cpuVendor(INTEL_XEON), 'intel');
  t.is(cpuVendor(AMD_EPYC_NESTED), 'amd');
  t.is(cpuVendor([]), 'other');
});

test('buildCpuid does not modify its input and is deterministic', (t) => {
  const before = JSON.stringify(INTEL_XEON);
  const a = buildCpuid(INTEL_XEON, 1, 4);
  const b = buildCpuid(INTEL_XEON, 1, 4);
  t.is(JSON.stringify(INTEL_XEON), before);
  t.deepEqual(a, b);
});

test('leaf 1: APIC ID, logical processor count, HTT, hypervisor bit', (t) => {
  for (const [id, count, addressable] of [
    [0, 1, 1],
    [2, 4, 4],
    [4, 6, 8],
  ]) {
    const l1 = leaf(buildCpuid(INTEL_XEON, id, count), 1);
    t.is(bits(l1.ebx, 24, 8), id, 'initial APIC ID');
    t.is(bits(l1.ebx, 16, 8), addressable, 'addressable logical IDs');
    t.is(bits(l1.ebx, 0, 16), 0x0800, 'CLFLUSH size and brand index kept');
    t.truthy(l1.edx & CpuidBit.EDX_HTT);
    t.truthy((l1.ecx & CpuidBit.ECX_HYPERVISOR) >>> 0);
    t.is(l1.eax, 0x00050657);
  }
  const amd = leaf(buildCpuid(AMD_EPYC_NESTED, 1, 2), 1);
  t.is(bits(amd.ebx, 24, 8), 1);
  t.is(bits(amd.ebx, 16, 8), 2);
});

test('leaf 1: TSC deadline added when asked, kept when KVM reports it', (t) => {
  t.falsy(leaf(buildCpuid(INTEL_XEON, 0, 1), 1).ecx & CpuidBit.ECX_TSC_DEADLINE);
  t.truthy(leaf(buildCpuid(INTEL_XEON, 0, 1, { tscDeadline: true }), 1).ecx & CpuidBit.ECX_TSC_DEADLINE);
  t.truthy(leaf(buildCpuid(AMD_EPYC_NESTED, 0, 1), 1).ecx & CpuidBit.ECX_TSC_DEADLINE);
});

test('leaf 4: cores per package and threads sharing each cache', (t) => {
  const out = buildCpuid(INTEL_XEON, 3, 6); // 6 vCPUs -> 8 addressable IDs
  for (const idx of [0, 1, 2]) {
    const e = leaf(out, 4, idx);
    t.is(bits(e.eax, 26, 6), 7, `cores-1 in subleaf ${idx}`);
    t.is(bits(e.eax, 14, 12), 0, `L1/L2 are per core (subleaf ${idx})`);
    t.is(bits(e.eax, 0, 14), bits(INTEL_XEON.find((x) => x.function === 4 && x.index === idx)!.eax, 0, 14));
    t.is(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
  }
  const l3 = leaf(out, 4, 3);
  t.is(bits(l3.eax, 5, 3), 3);
  t.is(bits(l3.eax, 14, 12), 7, 'L3 shared by the whole package');
  t.is(bits(l3.eax, 26, 6), 7);
  t.deepEqual(leaf(out, 4, 4), INTEL_XEON.find((x) => x.function === 4 && x.index === 4));
  // one vCPU: nothing shared
  const one = buildCpuid(INTEL_XEON, 0, 1);
  t.is(bits(leaf(one, 4, 3).eax, 14, 12), 0);
  t.is(bits(leaf(one, 4, 3).eax, 26, 6), 0);
});

test('leaf 0xB: x2APIC topology per vCPU, replacing the host topology', (t) => {
  const count = 5;
  for (let id = 0; id < count; id++) {
    const out = buildCpuid(INTEL_XEON, id, count);
    const b = out.filter((e) => e.function === 0xb);
    t.is(b.length, 3);
    const [smt, core, end] = [leaf(out, 0xb, 0), leaf(out, 0xb, 1), leaf(out, 0xb, 2)];
    t.deepEqual(smt, { function: 0xb, index: 0, flags: 1, eax: 0, ebx: 1, ecx: 0x100, edx: id });
    t.deepEqual(core, { function: 0xb, index: 1, flags: 1, eax: 3, ebx: 5, ecx: 0x201, edx: id });
    t.deepEqual(end, { function: 0xb, index: 2, flags: 1, eax: 0, ebx: 0, ecx: 0x002, edx: id });
  }
});

test('leaf 0xB is synthesized when KVM reports a degenerate one (AMD fixture)', (t) => {
  const out = buildCpuid(AMD_EPYC_NESTED, 1, 2);
  const b = out.filter((e) => e.function === 0xb);
  t.deepEqual(
    b.map((e) => [e.index, e.eax, e.ebx, e.ecx, e.edx]),
    [
      [0, 0, 1, 0x100, 1],
      [1, 1, 2, 0x201, 1],
      [2, 0, 0, 0x002, 1],
    ],
  );
});

test('leaf 0x1F mirrors 0xB when present', (t) => {
  const withLeaf1f: CpuidEntry[] = [
    ...INTEL_XEON.map((e) => (e.function === 0 ? { ...e, eax: 0x1f } : e)),
    { function: 0x1f, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 0x1a },
    { function: 0x1f, index: 1, flags: 1, eax: 6, ebx: 0x30, ecx: 0x201, edx: 0x1a },
    { function: 0x1f, index: 2, flags: 1, eax: 0, ebx: 0, ecx: 0x002, edx: 0x1a },
  ];
  const out = buildCpuid(withLeaf1f, 2, 3);
  const f = out.filter((e) => e.function === 0x1f);
  t.deepEqual(
    f.map((e) => [e.index, e.eax, e.ebx, e.ecx, e.edx]),
    [
      [0, 0, 1, 0x100, 2],
      [1, 2, 3, 0x201, 2],
      [2, 0, 0, 0x002, 2],
    ],
  );
});

test('no leaf 0xB is added when the max basic leaf is below 0xB', (t) => {
  const small = INTEL_XEON.filter((e) => e.function !== 0xb).map((e) => (e.function === 0 ? { ...e, eax: 0xa } : e));
  t.false(buildCpuid(small, 0, 2).some((e) => e.function === 0xb));
});

test('AMD: 0x80000008 NC and ApicIdCoreIdSize, 0x8000001E extended APIC ID', (t) => {
  const out = buildCpuid(AMD_EPYC_NESTED, 2, 3);
  const l8 = leaf(out, 0x80000008);
  t.is(bits(l8.ecx, 0, 8), 2, 'NC = threads - 1');
  t.is(bits(l8.ecx, 12, 4), 2, 'ApicIdCoreIdSize = log2(4)');
  t.is(l8.eax, 0x00003030, 'address sizes kept');
  t.is(l8.ebx, 0x02001005);
  const l1e = leaf(out, 0x8000001e);
  t.is(l1e.eax, 2, 'extended APIC ID');
  t.is(bits(l1e.ebx, 0, 8), 2, 'core ID');
  t.is(bits(l1e.ebx, 8, 8), 0, 'one thread per core');
  t.is(l1e.ecx, 0, 'node 0 of 1');
  t.truthy(leaf(out, 0x80000001).ecx & CpuidBit.EXT_ECX_CMP_LEGACY);
  t.falsy(leaf(buildCpuid(AMD_EPYC_NESTED, 0, 1), 0x80000001).ecx & CpuidBit.EXT_ECX_CMP_LEGACY);
  t.truthy(leaf(out, 0x80000001).ecx & CpuidBit.EXT_ECX_TOPOEXT, 'TOPOEXT kept');
});

test('AMD: 0x8000001D cache sharing', (t) => {
  const out = buildCpuid(AMD_EPYC_NESTED, 0, 4);
  t.is(bits(leaf(out, 0x8000001d, 0).eax, 14, 12), 0, 'L1d per core');
  t.is(bits(leaf(out, 0x8000001d, 2).eax, 14, 12), 0, 'L2 per core');
  t.is(bits(leaf(out, 0x8000001d, 3).eax, 14, 12), 3, 'L3 shared by 4');
  t.is(bits(leaf(out, 0x8000001d, 3).eax, 0, 14), 0x0163, 'type/level bits kept');
  t.deepEqual(leaf(out, 0x8000001d, 4), leaf(AMD_EPYC_NESTED, 0x8000001d, 4));
});

test('Intel tables leave AMD-only leaves alone and vice versa', (t) => {
  const out = buildCpuid(INTEL_XEON, 1, 2);
  t.deepEqual(leaf(out, 0x80000008), leaf(INTEL_XEON, 0x80000008));
  t.deepEqual(leaf(out, 0x80000001), leaf(INTEL_XEON, 0x80000001));
});

test('KVM paravirt leaves and unrelated leaves pass through unchanged', (t) => {
  for (const fixture of [INTEL_XEON, AMD_EPYC_NESTED]) {
    const out = buildCpuid(fixture, 1, 2);
    const kvm = leaf(out, 0x40000000);
    const sig = Buffer.alloc(12);
    sig.writeUInt32LE(kvm.ebx, 0);
    sig.writeUInt32LE(kvm.ecx, 4);
    sig.writeUInt32LE(kvm.edx, 8);
    t.is(sig.toString('latin1'), 'KVMKVMKVM\0\0\0');
    t.deepEqual(leaf(out, 0x40000001), leaf(fixture, 0x40000001));
    for (const fn of [0x0, 0x7, 0xd, 0x80000000]) t.deepEqual(leaf(out, fn), leaf(fixture, fn));
    // everything not a topology leaf appears exactly as given
    const topo = new Set([0x1, 0x4, 0xb, 0x1f, 0x80000001, 0x80000008, 0x8000001d, 0x8000001e]);
    const untouched = (es: readonly CpuidEntry[]) => es.filter((e) => !topo.has(e.function));
    t.deepEqual(untouched(out), untouched(fixture));
  }
});

test('APIC IDs differ per vCPU across all topology leaves', (t) => {
  const ids = [0, 1, 2, 3].map((id) => {
    const out = buildCpuid(INTEL_XEON, id, 4);
    return [bits(leaf(out, 1).ebx, 24, 8), leaf(out, 0xb, 0).edx, leaf(out, 0xb, 1).edx];
  });
  t.deepEqual(ids, [
    [0, 0, 0],
    [1, 1, 1],
    [2, 2, 2],
    [3, 3, 3],
  ]);
});

test('invalid vCPU arguments throw', (t) => {
  t.throws(() => buildCpuid(INTEL_XEON, 2, 2), { instanceOf: RangeError });
  t.throws(() => buildCpuid(INTEL_XEON, 0, 0), { instanceOf: RangeError });
  t.throws(() => buildCpuid(INTEL_XEON, -1, 2), { instanceOf: RangeError });
});
