// A vCPU's complete state read out of KVM at a pause (what the store records) and set back into
// a new vCPU (restore, migration). The order of the setters matters and is KVM's, not ours.
import type { Logger } from 'pino';
import { readMsrs, writeMsrs, type CpuidEntry, type NativeVcpu } from '../native/kvm';
import type { NativeVcpuState } from '../state/codec';

/** Everything KVM holds for a parked vCPU, plus the CPUID it was given. */
export function readVcpuState(vcpu: NativeVcpu, msrIndices: readonly number[], cpuid: CpuidEntry[]): NativeVcpuState {
  // KVM_KVMCLOCK_CTRL tells the guest the pause was the host's doing (no soft-lockup report).
  vcpu.kvmclockCtrl();
  return {
    regs: vcpu.getRegs(),
    sregs: vcpu.getSregs(),
    fpu: vcpu.getFpu(),
    msrs: readMsrs(vcpu, msrIndices).entries,
    xsave: vcpu.getXsave(),
    xcrs: vcpu.getXcrs(),
    lapic: vcpu.getLapic(),
    vcpuEvents: vcpu.getVcpuEvents(),
    debugRegs: vcpu.getDebugRegs(),
    mpState: vcpu.getMpState(),
    cpuid,
  };
}

/** Set a saved state into a new vCPU. */
export function writeVcpuState(vcpu: NativeVcpu, s: NativeVcpuState, log: Logger): void {
  // CPUID first: it decides which MSRs and xsave features KVM accepts.
  vcpu.setCpuid(s.cpuid);
  vcpu.setSregs(s.sregs);
  vcpu.setRegs(s.regs);
  vcpu.setFpu(s.fpu);
  vcpu.setXsave(s.xsave);
  vcpu.setXcrs(s.xcrs);
  vcpu.setLapic(s.lapic);
  // Every MSR this KVM takes is set, the ones it rejects are skipped (a performance counter
  // this host's PMU lacks, a value its KVM refuses): one line per vCPU names them all.
  const { set, rejected } = writeMsrs(vcpu, s.msrs);
  if (rejected.length > 0) {
    log.warn({ vcpu: vcpu.id, set, wanted: s.msrs.length, rejected: rejected.map((i) => `0x${i.toString(16)}`) }, 'KVM rejected saved MSRs');
  }
  vcpu.setVcpuEvents(s.vcpuEvents);
  vcpu.setDebugRegs(s.debugRegs);
  vcpu.setMpState(s.mpState);
}
