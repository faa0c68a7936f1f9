// vCPU exits and device effects that end the guest's run: what each means for the machine
// (Linux relies on a triple fault resetting the PC as a last resort, as a real one does).
import type { Effect } from '../devices/device';
import type { VcpuExit } from '../native/kvm';

/** Why a machine stopped running on its own. */
export type MachineStop =
  | { reason: 'poweroff'; source: string }
  | { reason: 'reset'; source: string }
  | { reason: 'panic'; source: string }
  | { reason: 'fatal'; message: string };

// KVM_SYSTEM_EVENT_*
const SYSTEM_EVENT_SHUTDOWN = 1;
const SYSTEM_EVENT_RESET = 2;
const SYSTEM_EVENT_CRASH = 3;

/** The stop a vCPU exit asks for, or undefined for exits that are not stops. */
export function stopForExit(vcpu: number, exit: VcpuExit): MachineStop | undefined {
  switch (exit.kind) {
    case 'shutdown':
      return { reason: 'reset', source: `vcpu${vcpu} triple fault` };
    case 'system_event':
      if (exit.type === SYSTEM_EVENT_RESET) return { reason: 'reset', source: 'system event' };
      if (exit.type === SYSTEM_EVENT_SHUTDOWN) return { reason: 'poweroff', source: 'system event' };
      if (exit.type === SYSTEM_EVENT_CRASH) return { reason: 'panic', source: 'kvm crash system event' };
      return { reason: 'fatal', message: `guest crash (system event ${exit.type})` };
    case 'fail_entry':
      return { reason: 'fatal', message: `vCPU ${vcpu}: KVM entry failed, hardware reason 0x${exit.reason.toString(16)}` };
    case 'internal_error':
      return { reason: 'fatal', message: `vCPU ${vcpu}: KVM internal error, suberror ${exit.suberror}` };
    case 'error':
      return { reason: 'fatal', message: `vCPU ${vcpu}: ${exit.message}` };
    case 'unknown':
      return { reason: 'fatal', message: `vCPU ${vcpu}: unhandled KVM exit reason ${exit.reason}` };
    default:
      return undefined;
  }
}

/** The stop a device effect asks for (a guest poweroff or reset through a device), if any. */
export function stopForEffect(e: Effect): MachineStop | undefined {
  if (e.type === 'vm.reset') return { reason: 'reset', source: e.source };
  if (e.type === 'vm.poweroff') return { reason: 'poweroff', source: e.source };
  return undefined;
}
