// Save/restore surface: every vCPU and VM state getter survives JSON and set(get()) is
// accepted and leaves the state unchanged.
import test from 'ava';

import { readMsrs } from '../../src/native/kvm';
import { decodeVcpuState, encodeVcpuState, NativeVcpuState } from '../../src/state/codec';
import { TestVm, buildGuest, createTestVm, sleep } from './harness';

const FLAG = 0x19_0000;
const IA32_TSC = 0x10;
/** Hyper-V synthetic MSRs that count time (Hyper-V TLFS): vCPU run time, partition reference time. */
const HV_X64_MSR_VP_RUNTIME = 0x4000_0010;
const HV_X64_MSR_TIME_REF_COUNT = 0x4000_0020;

/** struct kvm_pit_state2 with the s64 count_load_time of its three 24-byte channels zeroed. */
function withoutLoadTimes(pitB64: string): Buffer {
  const b = Buffer.from(pitB64, 'base64');
  for (let ch = 0; ch < 3; ch++) b.fill(0, ch * 24 + 16, ch * 24 + 24);
  return b;
}

function jsonRoundTrip<T>(v: T): T {
  return JSON.parse(JSON.stringify(v)) as T;
}

async function pausedSpinVm(): Promise<{ vm: TestVm; exits: string[]; waitFor(kind: string): Promise<void> }> {
  const vm = createTestVm({ guest: buildGuest('spin'), ring: 3, irqchip: true, regs: { rdi: BigInt(FLAG) } });
  const exits: string[] = [];
  let waiting: { kind: string; resolve: () => void } | undefined;
  vm.vcpu.start((e) => {
    exits.push(e.kind);
    if (waiting?.kind === e.kind) waiting.resolve();
    return e.kind === 'io' && e.port === 0x501 ? 'stop' : undefined;
  });
  const waitFor = (kind: string) => new Promise<void>((resolve) => { waiting = { kind, resolve }; });
  await sleep(30);
  const paused = waitFor('paused');
  vm.vcpu.requestPause();
  await paused;
  return { vm, exits, waitFor };
}

test('vCPU state survives JSON and set(get()) round trips', async (t) => {
  const { vm, exits, waitFor } = await pausedSpinVm();
  try {
    const v = vm.vcpu;
    const { entries: msrs, skipped } = readMsrs(v, vm.kvm.msrIndexList());
    t.true(msrs.length > 10, `read ${msrs.length} MSRs`);
    if (skipped.length) t.log(`unreadable MSRs skipped: ${skipped.map((i) => '0x' + i.toString(16)).join(' ')}`);

    const state: NativeVcpuState = {
      regs: v.getRegs(),
      sregs: v.getSregs(),
      fpu: v.getFpu(),
      msrs,
      xsave: v.getXsave(),
      xcrs: v.getXcrs(),
      lapic: v.getLapic(),
      vcpuEvents: v.getVcpuEvents(),
      debugRegs: v.getDebugRegs(),
      mpState: v.getMpState(),
      cpuid: vm.kvm.supportedCpuid(),
    };
    const restored = decodeVcpuState(jsonRoundTrip(encodeVcpuState(state)));
    t.deepEqual(restored, state, 'JSON round trip is exact');
    t.is(Buffer.from(state.xsave, 'base64').length, Math.max(4096, vm.kvm.checkExtension(208)));
    t.is(Buffer.from(state.lapic, 'base64').length, 1024);

    v.setRegs(restored.regs);
    v.setSregs(restored.sregs);
    v.setFpu(restored.fpu);
    v.setXsave(restored.xsave);
    v.setXcrs(restored.xcrs);
    t.is(v.setMsrs(restored.msrs), restored.msrs.length, 'every readable MSR is writable');
    v.setLapic(restored.lapic);
    v.setMpState(restored.mpState);
    v.setVcpuEvents(restored.vcpuEvents);
    v.setDebugRegs(restored.debugRegs);

    t.deepEqual(v.getRegs(), state.regs);
    t.deepEqual(v.getSregs(), state.sregs);
    t.deepEqual(v.getFpu(), state.fpu);
    t.is(v.getXsave(), state.xsave);
    t.is(v.getXcrs(), state.xcrs);
    t.is(v.getLapic(), state.lapic);
    t.is(v.getMpState(), state.mpState);
    t.is(v.getVcpuEvents(), state.vcpuEvents);
    t.is(v.getDebugRegs(), state.debugRegs);
    // Counters of time run on: the TSC, and where KVM offers Hyper-V's enlightenments, its
    // partition reference time and vCPU run time. Every other MSR must read back as written.
    const running = new Set([IA32_TSC, HV_X64_MSR_VP_RUNTIME, HV_X64_MSR_TIME_REF_COUNT]);
    const again = readMsrs(v, msrs.map((m) => m.index)).entries;
    t.deepEqual(again.filter((m) => !running.has(m.index)), msrs.filter((m) => !running.has(m.index)));

    // A changed value really lands.
    v.setRegs({ ...state.regs, r15: 0x1234_5678_9abc_def0n });
    t.is(v.getRegs().r15, 0x1234_5678_9abc_def0n);
    v.setRegs(state.regs);

    // The restored vCPU still runs: release the loop and let it finish.
    vm.mem.writeU8(FLAG, 1);
    const stopped = waitFor('stopped');
    v.resume();
    await stopped;
    t.deepEqual(exits, ['paused', 'io', 'io', 'stopped']);
  } finally {
    vm.vcpu.stop();
    await sleep(10);
    vm.close();
  }
});

test('VM state (irqchip, PIT, clock) survives JSON and set(get()) round trips', async (t) => {
  const vm = createTestVm({ ring: 3, irqchip: true });
  try {
    const chips = [0, 1, 2].map((c) => vm.vm.getIrqchip(c));
    const pit = vm.vm.getPit2();
    const clock = vm.vm.getClock();
    const saved = jsonRoundTrip({ chips, pit, clock: { clock: clock.clock.toString(), flags: clock.flags } });
    t.deepEqual(saved.chips, chips);
    t.is(saved.pit, pit);

    saved.chips.forEach((b64, c) => vm.vm.setIrqchip(c, b64));
    vm.vm.setPit2(saved.pit);
    const target = BigInt(saved.clock.clock) + 5_000_000_000n;
    vm.vm.setClock(target);

    t.deepEqual([0, 1, 2].map((c) => vm.vm.getIrqchip(c)), chips);
    // KVM_SET_PIT2 rebases each channel's count_load_time (host ktime); all else is equal.
    t.deepEqual(withoutLoadTimes(vm.vm.getPit2()), withoutLoadTimes(pit));
    const now = vm.vm.getClock().clock;
    t.true(now >= target && now < target + 1_000_000_000n, `clock ${now} follows the value set (${target})`);
  } finally {
    vm.close();
  }
});
