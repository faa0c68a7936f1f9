// What this machine's KVM can do, found out rather than assumed. Three kinds exist:
// - no usable /dev/kvm: only tests that need no KVM run here; the rest go to the nested lab;
// - a /dev/kvm that runs small guests but cannot boot Linux (shadow paging, no vmx/svm flag):
//   KVM tests run here, Linux guests in the lab;
// - hardware virtualization (vmx/svm): everything runs here.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { hostHasHardwareVirt } from '../lab/lab';

export type KvmKind = 'none' | 'kvm' | 'hardware';

export interface MachineKind {
  kvm: KvmKind;
  /** Why /dev/kvm is not used, when kvm is 'none'. */
  reason?: string;
}

const ADDON = path.resolve(__dirname, '..', '..', '..', 'build', 'Release', 'tern_native.node');

// Opens /dev/kvm, creates a VM with one vCPU, and closes them again. Run in a child process: a
// broken KVM must cost this probe, not the test runner.
const PROBE = `
const n = require(${JSON.stringify(ADDON)});
const kvm = n.openKvm();
const vm = kvm.createVm();
const vcpu = vm.createVcpu(0);
vcpu.close(); vm.close(); kvm.close();
process.stdout.write('KVM-OK');
`;

/**
 * Probe this machine. TERN_TEST_KVM=none|kvm|hardware forces an answer (to run the lab path on
 * a machine that has KVM, for instance).
 */
export function probeMachine(): MachineKind {
  const forced = process.env.TERN_TEST_KVM;
  if (forced === 'none' || forced === 'kvm' || forced === 'hardware') return { kvm: forced, reason: `TERN_TEST_KVM=${forced}` };
  const r = spawnSync(process.execPath, ['-e', PROBE], { encoding: 'utf8', timeout: 30_000 });
  if (r.stdout !== 'KVM-OK') {
    const why = (r.stderr || r.error?.message || `exit ${String(r.status)}`).trim().split('\n').find((l) => /Error|ENOENT|EACCES|errno/.test(l)) ?? 'the probe failed';
    return { kvm: 'none', reason: why.slice(0, 200) };
  }
  return { kvm: hostHasHardwareVirt() ? 'hardware' : 'kvm' };
}
