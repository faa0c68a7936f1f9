// Restoring MSRs on a KVM that rejects some of them: every MSR after a rejected one is still
// set, and the rejected indices are reported, so a guest moved to a host whose KVM lacks one
// MSR keeps all the others.
import test from 'ava';

import { native, writeMsrs, type MsrEntry } from '../../src/native/kvm';

const IA32_SYSENTER_CS = 0x174;
const IA32_SYSENTER_ESP = 0x175;
const IA32_SYSENTER_EIP = 0x176;
// SYSENTER_ESP/EIP values fit in 32 bits: KVM keeps only the low half on AMD CPUs, whose
// SYSENTER MSRs are 32-bit.
const IA32_CR_PAT = 0x277;
/** Indices no KVM implements (unused, reserved ranges). */
const NO_SUCH_MSR_A = 0x0000_2fff;
const NO_SUCH_MSR_B = 0x4b56_4dff;

function bareVcpu() {
  const kvm = native().openKvm();
  const vm = kvm.createVm();
  const vcpu = vm.createVcpu(0);
  vcpu.setCpuid(kvm.supportedCpuid());
  return {
    kvm,
    vcpu,
    close() {
      vcpu.close();
      vm.close();
      kvm.close();
    },
  };
}

test('MSRs after a rejected one are still set, and the rejected indices are reported', (t) => {
  const m = bareVcpu();
  try {
    t.false(m.kvm.msrIndexList().includes(NO_SUCH_MSR_A), 'the unknown index is not one KVM lists');
    const entries: MsrEntry[] = [
      { index: IA32_SYSENTER_CS, data: 0x10n },
      { index: NO_SUCH_MSR_A, data: 1n },
      { index: IA32_SYSENTER_ESP, data: 0x1234_5000n },
      { index: IA32_SYSENTER_EIP, data: 0x0abc_d000n },
      { index: NO_SUCH_MSR_B, data: 1n },
      { index: IA32_CR_PAT, data: 0x0007_0406_0007_0406n },
    ];
    // What KVM_SET_MSRS itself does: it stops at the first MSR it rejects.
    t.is(m.vcpu.setMsrs(entries), 1);
    t.not(m.vcpu.getMsrs([IA32_SYSENTER_ESP])[0].data, 0x1234_5000n, 'one call leaves the rest unset');

    t.deepEqual(writeMsrs(m.vcpu, entries), { set: 4, rejected: [NO_SUCH_MSR_A, NO_SUCH_MSR_B] });
    const back = m.vcpu.getMsrs([IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP, IA32_CR_PAT]);
    t.deepEqual(
      back.map((e) => [e.index, e.data]),
      [
        [IA32_SYSENTER_CS, 0x10n],
        [IA32_SYSENTER_ESP, 0x1234_5000n],
        [IA32_SYSENTER_EIP, 0x0abc_d000n],
        [IA32_CR_PAT, 0x0007_0406_0007_0406n],
      ],
    );
  } finally {
    m.close();
  }
});

test('a rejected last MSR and an all-accepted list', (t) => {
  const m = bareVcpu();
  try {
    t.deepEqual(writeMsrs(m.vcpu, [{ index: IA32_SYSENTER_CS, data: 0x23n }, { index: NO_SUCH_MSR_A, data: 0n }]), {
      set: 1,
      rejected: [NO_SUCH_MSR_A],
    });
    t.deepEqual(writeMsrs(m.vcpu, [{ index: IA32_SYSENTER_CS, data: 0x8n }]), { set: 1, rejected: [] });
    t.is(m.vcpu.getMsrs([IA32_SYSENTER_CS])[0].data, 0x8n);
    t.deepEqual(writeMsrs(m.vcpu, []), { set: 0, rejected: [] });
  } finally {
    m.close();
  }
});
