// Keeps the lab kernel from rewriting its own code while tests create and destroy VMs.
//
// The lab froze now and then with both of its CPUs stuck for good: one in KVM's vCPU creation,
// inside static_key_slow_inc -> jump_label_update -> text_poke_bp_batch, waiting for the other
// CPU to acknowledge its code-sync IPI; the other, interrupts off, at one instruction in
// __schedule: the static branch of preempt_notifier_key, which KVM flips when the first VM is
// created and the last destroyed. A second later every register of both is unchanged, while
// QEMU itself still answers. Multi-threaded TCG livelocks on this cross-CPU live patching of
// code that the other CPU is executing. A loop that only creates and destroys VMs froze the lab
// within two minutes.
//
// KVM flips static keys (0 -> 1 or back, each a live code patch) as VMs come and go:
// preempt_notifier_key (any VM), kvm_has_noapic_vcpu (a vCPU without an in-kernel LAPIC),
// apic_sw_disabled and apic_hw_disabled (a LAPIC that is software- or hardware-disabled, as
// every vCPU's is at reset). This process holds a VM with a vCPU of each kind, so no test's VM
// moves any of those counts across zero. The lab's init starts it while the lab still runs on
// one CPU, where patching needs no cross-CPU sync, and only then brings the other CPUs up.
// It changes nothing a test can observe in its own VMs.
//
//   node kvm-keeper.js [READY_FILE]   (READY_FILE is created once the keys are held)
import { writeFileSync } from 'node:fs';
import { native } from '../../src/native/kvm';

const MSR_IA32_APICBASE = 0x1b;
const APIC_DEFAULT_BASE = 0xfee0_0000n;

const kvm = native().openKvm();
// A vCPU without an in-kernel LAPIC: kvm_has_noapic_vcpu.
const noApicVm = kvm.createVm();
const noApicVcpu = noApicVm.createVcpu(0);
// A vCPU with an in-kernel LAPIC that never runs: software-disabled as at reset
// (apic_sw_disabled), and hardware-disabled too once APIC_BASE's enable bit is clear
// (apic_hw_disabled).
const apicVm = kvm.createVm();
apicVm.setTssAddr(0xfeffd000);
apicVm.setIdentityMapAddr(0xfeffc000n);
apicVm.createIrqchip();
const apicVcpu = apicVm.createVcpu(0);
apicVcpu.setMsrs([{ index: MSR_IA32_APICBASE, data: APIC_DEFAULT_BASE }]);

const release = () => {
  apicVcpu.close();
  apicVm.close();
  noApicVcpu.close();
  noApicVm.close();
  kvm.close();
  process.exit(0);
};
process.on('SIGTERM', release);
process.on('SIGINT', release);
process.stdout.write('kvm-keeper: holding KVM\'s static keys\n');
if (process.argv[2]) writeFileSync(process.argv[2], `${process.pid}\n`);
setInterval(() => undefined, 1 << 30);
