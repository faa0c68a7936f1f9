import test from 'ava';
import {
  CodecError,
  decodeFpu,
  decodeMsrs,
  decodeRegs,
  decodeSregs,
  decodeU64,
  decodeVcpuState,
  encodeFpu,
  encodeMsrs,
  encodeRegs,
  encodeSregs,
  encodeU64,
  encodeVcpuState,
  standInVcpuState,
} from '../../src/state/codec';
import { SavedVcpuStateSchema } from '../../src/state/slices/vcpus';
import { Value } from '@sinclair/typebox/value';
import { isJsonSafe } from '../../src/state/json';
import { nativeVcpu } from './state-fixtures';

const roundTrip = <T>(v: T): T => JSON.parse(JSON.stringify(v));

test('u64 values round-trip exactly, including ones a number cannot hold', (t) => {
  for (const v of [0n, 1n, (1n << 53n) + 1n, 1n << 63n, (1n << 64n) - 1n, -1n]) {
    t.is(decodeU64(roundTrip(encodeU64(v))), v);
  }
  t.is(encodeU64(0xffn), '0xff');
  t.throws(() => decodeU64('12'), { instanceOf: CodecError });
  t.throws(() => decodeU64('0x'), { instanceOf: CodecError });
  t.throws(() => encodeU64(5 as never), { instanceOf: CodecError });
});

test('Regs, Sregs, Fpu and MSRs survive JSON', (t) => {
  const n = nativeVcpu(3);
  t.deepEqual(decodeRegs(roundTrip(encodeRegs(n.regs))), n.regs);
  t.deepEqual(decodeSregs(roundTrip(encodeSregs(n.sregs))), n.sregs);
  t.deepEqual(decodeFpu(roundTrip(encodeFpu(n.fpu))), n.fpu);
  t.deepEqual(decodeMsrs(roundTrip(encodeMsrs(n.msrs))), n.msrs);
});

test('a whole vCPU state is plain JSON and round-trips', (t) => {
  const n = nativeVcpu(0);
  const saved = encodeVcpuState(n);
  t.true(isJsonSafe(saved));
  t.is(saved.regs.rax, '0xffffffffffffffff');
  t.is(saved.fpu.registers, 'AAAA', 'base64 strings stay as they are');
  t.deepEqual(decodeVcpuState(roundTrip(saved)), n);
});

test('missing or malformed fields are reported', (t) => {
  const saved = roundTrip(encodeVcpuState(nativeVcpu(0))) as any;
  delete saved.regs.rip;
  t.throws(() => decodeVcpuState(saved), { instanceOf: CodecError, message: /regs\.rip/ });
  const other = roundTrip(encodeVcpuState(nativeVcpu(0))) as any;
  other.sregs.cs.limit = 'big';
  t.throws(() => decodeVcpuState(other), { instanceOf: CodecError, message: /sregs\.cs\.limit/ });
});

// A migration source rehearses its pause on a stand-in vCPU state: it must have every field a
// real one has, in the same form, or the rehearsal would compile other code than the pause runs.
test('the stand-in vCPU state has the shape of a real one, field for field', (t) => {
  const real = encodeVcpuState(nativeVcpu(0));
  const standIn = encodeVcpuState(standInVcpuState(real.msrs.map((m) => m.index)), real.cpuid);
  const shape = (v: unknown): unknown =>
    Array.isArray(v) ? v.slice(0, 1).map(shape) : v && typeof v === 'object' ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, shape(x)])) : typeof v;
  t.deepEqual(shape(standIn), shape(real));
  t.deepEqual(standIn.msrs.map((m) => m.index), real.msrs.map((m) => m.index));
  t.deepEqual(decodeVcpuState(standIn).regs.rip, 0n);
  t.true(isJsonSafe(standIn));
  // (its opaque blobs are empty, which the schema allows; every other field passes as it is)
  t.true(Value.Check(SavedVcpuStateSchema, standIn), [...Value.Errors(SavedVcpuStateSchema, standIn)].map((e) => `${e.path}: ${e.message}`).join('; '));
});
