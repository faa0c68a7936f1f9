import test from 'ava';
import { Msr, bootMsrs } from '../../src/boot/msrs';
import {
  APIC_LVT_LINT0,
  APIC_LVT_LINT1,
  FPU_REGISTERS_SIZE,
  KVM_LAPIC_STATE_SIZE,
  emptyRegs,
  initialFpu,
  patchLapicLint,
} from '../../src/boot/vcpu-init';

test('boot MSRs: fast strings, MTRRs enabled with write-back default, syscall MSRs and TSC zero', (t) => {
  const msrs = new Map(bootMsrs().map((m) => [m.index, m.data]));
  t.is(msrs.get(0x1a0), 1n, 'IA32_MISC_ENABLE.FAST_STRING');
  t.is(msrs.get(0x2ff), 0x806n, 'MTRRdefType: E | WB');
  for (const idx of [0x10, 0x174, 0x175, 0x176, 0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000102]) {
    t.is(msrs.get(idx), 0n, `MSR 0x${idx.toString(16)}`);
  }
  t.is(msrs.size, 11);
  t.is(Msr.KERNEL_GS_BASE, 0xc0000102);
  t.not(bootMsrs(), bootMsrs(), 'a fresh list each call');
});

test('initial FPU: FCW 0x37f, MXCSR 0x1f80, registers zero', (t) => {
  const f = initialFpu();
  t.is(f.fcw, 0x37f);
  t.is(f.mxcsr, 0x1f80);
  t.is(f.fsw, 0);
  t.is(f.ftwx, 0);
  const regs = Buffer.from(f.registers, 'base64');
  t.is(regs.length, FPU_REGISTERS_SIZE);
  t.is(FPU_REGISTERS_SIZE, 384);
  t.true(regs.every((b) => b === 0));
});

test('empty regs: all zero, RFLAGS bit 1', (t) => {
  const r = emptyRegs();
  t.is(r.rflags, 2n);
  for (const [k, v] of Object.entries(r)) if (k !== 'rflags') t.is(v, 0n, k);
});

test('LAPIC patch: LINT0 ExtINT, LINT1 NMI, only the delivery-mode bits change', (t) => {
  const blob = Buffer.alloc(KVM_LAPIC_STATE_SIZE);
  for (let i = 0; i < blob.length; i++) blob[i] = (i * 31) & 0xff;
  blob.writeUInt32LE(0x0001_0000, APIC_LVT_LINT0); // masked, fixed, vector 0 (reset state)
  blob.writeUInt32LE(0x0001_0700 | 0x2a, APIC_LVT_LINT1); // masked, ExtINT, vector 0x2a
  const out = Buffer.from(patchLapicLint(blob.toString('base64')), 'base64');
  t.is(out.readUInt32LE(APIC_LVT_LINT0), 0x0001_0700);
  t.is(out.readUInt32LE(APIC_LVT_LINT1), 0x0001_042a);
  for (let i = 0; i < out.length; i++) {
    if (i >= APIC_LVT_LINT0 && i < APIC_LVT_LINT0 + 4) continue;
    if (i >= APIC_LVT_LINT1 && i < APIC_LVT_LINT1 + 4) continue;
    if (out[i] !== blob[i]) t.fail(`byte 0x${i.toString(16)} changed`);
  }
  t.is(APIC_LVT_LINT0, 0x350);
  t.is(APIC_LVT_LINT1, 0x360);
  const custom = Buffer.from(patchLapicLint(blob.toString('base64'), { lint0: 'fixed', lint1: 'extint' }), 'base64');
  t.is(custom.readUInt32LE(APIC_LVT_LINT0), 0x0001_0000);
  t.is(custom.readUInt32LE(APIC_LVT_LINT1), 0x0001_072a);
});

test('LAPIC patch rejects a blob of the wrong size', (t) => {
  t.throws(() => patchLapicLint(Buffer.alloc(1000).toString('base64')), { instanceOf: RangeError });
});
