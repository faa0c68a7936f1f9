// JSON-safe forms of the native vCPU structures. The addon speaks bigint for 64-bit values;
// the store holds only JSON, so each bigint becomes a hex string ("0x1f", "-0x1" if ever
// negative) that decodes to the identical bigint. Fields are listed explicitly because a
// string alone cannot say whether it was a bigint (Fpu.registers is base64, for one).
import type { CpuidEntry, DTable, Fpu, MsrEntry, Regs, Segment, Sregs } from '../native/kvm';
import { TernStateError } from './errors';

export class CodecError extends TernStateError {
  constructor(message: string) {
    super('InvalidVcpuState', message);
  }
}

const HEX = /^-?0x[0-9a-f]+$/;

export function encodeU64(v: bigint): string {
  if (typeof v !== 'bigint') throw new CodecError(`expected a bigint, got ${typeof v}`);
  return v < 0n ? `-0x${(-v).toString(16)}` : `0x${v.toString(16)}`;
}

export function decodeU64(s: string, what = 'value'): bigint {
  if (typeof s !== 'string' || !HEX.test(s)) throw new CodecError(`${what}: '${String(s)}' is not a hex bigint string`);
  return s[0] === '-' ? -BigInt(s.slice(1)) : BigInt(s);
}

type Bigints<T, K extends keyof T> = Omit<T, K> & { [P in K]: string };

export const REGS_KEYS = [
  'rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp',
  'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15',
  'rip', 'rflags',
] as const satisfies readonly (keyof Regs)[];

const SEGMENT_NUMBER_KEYS = ['limit', 'selector', 'type', 'present', 'dpl', 'db', 's', 'l', 'g', 'avl', 'unusable'] as const satisfies readonly (keyof Segment)[];
const SEGMENT_NAMES = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const satisfies readonly (keyof Sregs)[];
const DTABLE_NAMES = ['gdt', 'idt'] as const satisfies readonly (keyof Sregs)[];
const SREGS_BIGINT_KEYS = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apic_base'] as const satisfies readonly (keyof Sregs)[];
const FPU_NUMBER_KEYS = ['fcw', 'fsw', 'ftwx', 'last_opcode', 'mxcsr'] as const satisfies readonly (keyof Fpu)[];

export type RegsJson = { [K in keyof Regs]: string };
export type SegmentJson = Bigints<Segment, 'base'>;
export type DTableJson = Bigints<DTable, 'base'>;
export type SregsJson = {
  [K in (typeof SEGMENT_NAMES)[number]]: SegmentJson;
} & {
  [K in (typeof DTABLE_NAMES)[number]]: DTableJson;
} & {
  [K in (typeof SREGS_BIGINT_KEYS)[number]]: string;
} & { interrupt_bitmap: string[] };
export type FpuJson = Bigints<Fpu, 'last_ip' | 'last_dp'>;
export type MsrEntryJson = Bigints<MsrEntry, 'data'>;

function num(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new CodecError(`${what}: expected a number`);
  return v;
}

function str(v: unknown, what: string): string {
  if (typeof v !== 'string') throw new CodecError(`${what}: expected a string`);
  return v;
}

function obj(v: unknown, what: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null) throw new CodecError(`${what}: expected an object`);
  return v as Record<string, unknown>;
}

export function encodeRegs(r: Regs): RegsJson {
  const out = {} as RegsJson;
  for (const k of REGS_KEYS) out[k] = encodeU64(r[k]);
  return out;
}

export function decodeRegs(j: RegsJson): Regs {
  const o = obj(j, 'regs');
  const out = {} as Regs;
  for (const k of REGS_KEYS) out[k] = decodeU64(o[k] as string, `regs.${k}`);
  return out;
}

function encodeSegment(s: Segment): SegmentJson {
  const out = { base: encodeU64(s.base) } as SegmentJson;
  for (const k of SEGMENT_NUMBER_KEYS) out[k] = s[k];
  return out;
}

function decodeSegment(j: SegmentJson, what: string): Segment {
  const o = obj(j, what);
  const out = { base: decodeU64(o.base as string, `${what}.base`) } as Segment;
  for (const k of SEGMENT_NUMBER_KEYS) out[k] = num(o[k], `${what}.${k}`);
  return out;
}

export function encodeSregs(s: Sregs): SregsJson {
  const out = {} as Record<string, unknown>;
  for (const k of SEGMENT_NAMES) out[k] = encodeSegment(s[k]);
  for (const k of DTABLE_NAMES) out[k] = { base: encodeU64(s[k].base), limit: s[k].limit };
  for (const k of SREGS_BIGINT_KEYS) out[k] = encodeU64(s[k]);
  out.interrupt_bitmap = s.interrupt_bitmap.map(encodeU64);
  return out as SregsJson;
}

export function decodeSregs(j: SregsJson): Sregs {
  const o = obj(j, 'sregs');
  const out = {} as Record<string, unknown>;
  for (const k of SEGMENT_NAMES) out[k] = decodeSegment(o[k] as SegmentJson, `sregs.${k}`);
  for (const k of DTABLE_NAMES) {
    const t = obj(o[k], `sregs.${k}`);
    out[k] = { base: decodeU64(t.base as string, `sregs.${k}.base`), limit: num(t.limit, `sregs.${k}.limit`) };
  }
  for (const k of SREGS_BIGINT_KEYS) out[k] = decodeU64(o[k] as string, `sregs.${k}`);
  if (!Array.isArray(o.interrupt_bitmap)) throw new CodecError('sregs.interrupt_bitmap: expected an array');
  out.interrupt_bitmap = o.interrupt_bitmap.map((w, i) => decodeU64(w as string, `sregs.interrupt_bitmap[${i}]`));
  return out as unknown as Sregs;
}

export function encodeFpu(f: Fpu): FpuJson {
  const out = { last_ip: encodeU64(f.last_ip), last_dp: encodeU64(f.last_dp), registers: f.registers } as FpuJson;
  for (const k of FPU_NUMBER_KEYS) out[k] = f[k];
  return out;
}

export function decodeFpu(j: FpuJson): Fpu {
  const o = obj(j, 'fpu');
  const out = {
    last_ip: decodeU64(o.last_ip as string, 'fpu.last_ip'),
    last_dp: decodeU64(o.last_dp as string, 'fpu.last_dp'),
    registers: str(o.registers, 'fpu.registers'),
  } as Fpu;
  for (const k of FPU_NUMBER_KEYS) out[k] = num(o[k], `fpu.${k}`);
  return out;
}

export function encodeMsrs(entries: readonly MsrEntry[]): MsrEntryJson[] {
  return entries.map((e) => ({ index: e.index, data: encodeU64(e.data) }));
}

export function decodeMsrs(entries: readonly MsrEntryJson[]): MsrEntry[] {
  if (!Array.isArray(entries)) throw new CodecError('msrs: expected an array');
  return entries.map((e, i) => {
    const o = obj(e, `msrs[${i}]`);
    return { index: num(o.index, `msrs[${i}].index`), data: decodeU64(o.data as string, `msrs[${i}].data`) };
  });
}

/** Everything the VMM reads from a vCPU to save it, in native form. */
export interface NativeVcpuState {
  regs: Regs;
  sregs: Sregs;
  fpu: Fpu;
  msrs: MsrEntry[];
  /** base64 of the raw kernel structs */
  xsave: string;
  xcrs: string;
  lapic: string;
  vcpuEvents: string;
  debugRegs: string;
  mpState: number;
  cpuid: CpuidEntry[];
}

/** The same, as plain JSON for the store (`vcpus` slice). */
export interface SavedVcpuState {
  regs: RegsJson;
  sregs: SregsJson;
  fpu: FpuJson;
  msrs: MsrEntryJson[];
  xsave: string;
  xcrs: string;
  lapic: string;
  vcpuEvents: string;
  debugRegs: string;
  mpState: number;
  cpuid: CpuidEntry[];
}

const OPAQUE_KEYS = ['xsave', 'xcrs', 'lapic', 'vcpuEvents', 'debugRegs'] as const;

/**
 * A vCPU state of the right shape with every value zero (and `msrIndices` as its MSRs): what a
 * rehearsal of the save path encodes while the real vCPUs still run and cannot be read.
 */
export function standInVcpuState(msrIndices: readonly number[]): NativeVcpuState {
  const segment = () => ({ base: 0n, ...Object.fromEntries(SEGMENT_NUMBER_KEYS.map((k) => [k, 0])) }) as Segment;
  const sregs = {
    ...Object.fromEntries(SEGMENT_NAMES.map((k) => [k, segment()])),
    ...Object.fromEntries(DTABLE_NAMES.map((k) => [k, { base: 0n, limit: 0 }])),
    ...Object.fromEntries(SREGS_BIGINT_KEYS.map((k) => [k, 0n])),
    interrupt_bitmap: [0n, 0n, 0n, 0n],
  } as unknown as Sregs;
  return {
    regs: Object.fromEntries(REGS_KEYS.map((k) => [k, 0n])) as unknown as Regs,
    sregs,
    fpu: { ...Object.fromEntries(FPU_NUMBER_KEYS.map((k) => [k, 0])), last_ip: 0n, last_dp: 0n, registers: '' } as Fpu,
    msrs: msrIndices.map((index) => ({ index, data: 0n })),
    ...(Object.fromEntries(OPAQUE_KEYS.map((k) => [k, ''])) as Record<(typeof OPAQUE_KEYS)[number], string>),
    mpState: 0,
    cpuid: [],
  };
}
const CPUID_KEYS = ['function', 'index', 'flags', 'eax', 'ebx', 'ecx', 'edx'] as const satisfies readonly (keyof CpuidEntry)[];

function copyCpuid(entries: readonly CpuidEntry[], what: string): CpuidEntry[] {
  if (!Array.isArray(entries)) throw new CodecError(`${what}: expected an array`);
  return entries.map((e, i) => {
    const o = obj(e, `${what}[${i}]`);
    const out = {} as CpuidEntry;
    for (const k of CPUID_KEYS) out[k] = num(o[k], `${what}[${i}].${k}`);
    return out;
  });
}

/** A vCPU's CPUID in the store's form (plain entries, each field checked). */
export function encodeCpuid(entries: readonly CpuidEntry[]): CpuidEntry[] {
  return copyCpuid(entries, 'cpuid');
}

/** `cpuid`: the CPUID already in the store's form (encodeCpuid), taken as it is. */
export function encodeVcpuState(s: NativeVcpuState, cpuid?: CpuidEntry[]): SavedVcpuState {
  return {
    regs: encodeRegs(s.regs),
    sregs: encodeSregs(s.sregs),
    fpu: encodeFpu(s.fpu),
    msrs: encodeMsrs(s.msrs),
    xsave: s.xsave,
    xcrs: s.xcrs,
    lapic: s.lapic,
    vcpuEvents: s.vcpuEvents,
    debugRegs: s.debugRegs,
    mpState: s.mpState,
    cpuid: cpuid ?? encodeCpuid(s.cpuid),
  };
}

export function decodeVcpuState(j: SavedVcpuState): NativeVcpuState {
  const o = obj(j, 'vcpu state');
  const out = {
    regs: decodeRegs(o.regs as RegsJson),
    sregs: decodeSregs(o.sregs as SregsJson),
    fpu: decodeFpu(o.fpu as FpuJson),
    msrs: decodeMsrs(o.msrs as MsrEntryJson[]),
    mpState: num(o.mpState, 'mpState'),
    cpuid: copyCpuid(o.cpuid as CpuidEntry[], 'cpuid'),
  } as NativeVcpuState;
  for (const k of OPAQUE_KEYS) out[k] = str(o[k], k);
  return out;
}
