// Initial vCPU state that does not depend on the kernel format: empty register file, FPU
// defaults, and the LAPIC local-interrupt wiring firmware would have set up.

import type { Fpu, Regs } from '../native/kvm';

/** All general registers zero, RFLAGS with only the always-one bit 1 set. */
export function emptyRegs(): Regs {
  return {
    rax: 0n, rbx: 0n, rcx: 0n, rdx: 0n,
    rsi: 0n, rdi: 0n, rsp: 0n, rbp: 0n,
    r8: 0n, r9: 0n, r10: 0n, r11: 0n,
    r12: 0n, r13: 0n, r14: 0n, r15: 0n,
    rip: 0n, rflags: 0x2n,
  };
}

/** fpr[8][16] + xmm[16][16] in struct kvm_fpu. */
export const FPU_REGISTERS_SIZE = 8 * 16 + 16 * 16;

/** FNINIT state: FCW 0x37f (all exceptions masked, 64-bit precision); MXCSR 0x1f80 (SSE exceptions masked). */
export function initialFpu(): Fpu {
  return {
    fcw: 0x37f,
    fsw: 0,
    ftwx: 0,
    last_opcode: 0,
    last_ip: 0n,
    last_dp: 0n,
    mxcsr: 0x1f80,
    registers: Buffer.alloc(FPU_REGISTERS_SIZE).toString('base64'),
  };
}

/** struct kvm_lapic_state is the 1 KiB APIC register page. */
export const KVM_LAPIC_STATE_SIZE = 1024;
export const APIC_LVT_LINT0 = 0x350;
export const APIC_LVT_LINT1 = 0x360;
/** LVT delivery mode field, bits 10:8. */
export const APIC_DELIVERY_MODE_MASK = 0x700;
export const APIC_MODE_FIXED = 0x0;
export const APIC_MODE_NMI = 0x4;
export const APIC_MODE_EXTINT = 0x7;

export type LapicDeliveryMode = 'fixed' | 'nmi' | 'extint';

const MODE_VALUE: Record<LapicDeliveryMode, number> = {
  fixed: APIC_MODE_FIXED,
  nmi: APIC_MODE_NMI,
  extint: APIC_MODE_EXTINT,
};

/** LINT0 carries the 8259's INTR (virtual wire), LINT1 the NMI line. */
export const BOOT_LAPIC_LINT = { lint0: 'extint', lint1: 'nmi' } as const satisfies Record<string, LapicDeliveryMode>;

function withDeliveryMode(reg: number, mode: number): number {
  return ((reg & ~APIC_DELIVERY_MODE_MASK) | (mode << 8)) >>> 0;
}

/**
 * Patch a KVM_GET_LAPIC blob (base64 of struct kvm_lapic_state) so LINT0 delivers ExtINT
 * and LINT1 delivers NMI. Only the delivery-mode bits change; mask and the rest stay.
 */
export function patchLapicLint(
  lapicBase64: string,
  modes: { lint0: LapicDeliveryMode; lint1: LapicDeliveryMode } = BOOT_LAPIC_LINT,
): string {
  const buf = Buffer.from(lapicBase64, 'base64');
  if (buf.length !== KVM_LAPIC_STATE_SIZE) {
    throw new RangeError(`LAPIC state is ${buf.length} bytes, expected ${KVM_LAPIC_STATE_SIZE}`);
  }
  buf.writeUInt32LE(withDeliveryMode(buf.readUInt32LE(APIC_LVT_LINT0), MODE_VALUE[modes.lint0]), APIC_LVT_LINT0);
  buf.writeUInt32LE(withDeliveryMode(buf.readUInt32LE(APIC_LVT_LINT1), MODE_VALUE[modes.lint1]), APIC_LVT_LINT1);
  return buf.toString('base64');
}
