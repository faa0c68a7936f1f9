// The KVM objects check every number they are given before acting on it: a value that is not
// an integer, is negative, or does not fit the kernel field it fills throws an error naming the
// argument, and nothing reaches KVM.
import test from 'ava';

import { buildGuest, createTestVm, runVcpu } from './harness';

const BAD: [unknown, typeof TypeError | typeof RangeError][] = [
  [NaN, TypeError],
  [1.5, TypeError],
  ['1', TypeError],
  [undefined, TypeError],
  [-1, RangeError],
  [1e300, RangeError],
  [2 ** 32 + 1, RangeError],
  [-1n, RangeError],
];

test('addMemorySlot: a slot number of 2^32+1 is refused, not taken as slot 1', (t) => {
  const vm = createTestVm({ ring: 3, memSize: 4 * 1024 * 1024 });
  try {
    // Truncated to 32 bits this was slot 1, at a free address: it would have been created.
    const err = t.throws(() => vm.vm.addMemorySlot({ slot: 2 ** 32 + 1, guestAddress: 0x1000_0000n, size: 0x1000 }), {
      instanceOf: RangeError,
    });
    t.is(err?.message, "'slot' must be in 0..4294967295, got 4294967297");
    for (const [bad, type] of BAD) {
      t.throws(() => vm.vm.addMemorySlot({ slot: bad as number, guestAddress: 0x1000_0000n, size: 0x1000 }), { instanceOf: type, message: /^'slot' must/ });
      // 2^32+1 is a size in range (refused below for not being page-aligned).
      if (bad !== 2 ** 32 + 1) {
        t.throws(() => vm.vm.addMemorySlot({ slot: 1, guestAddress: 0x1000_0000n, size: bad as number }), { instanceOf: type, message: /^'size' must/ });
      }
    }
    t.throws(() => vm.vm.addMemorySlot({ slot: 1, guestAddress: -0x1000n, size: 0x1000 }), { instanceOf: RangeError, message: /^'guestAddress' must/ });
    t.throws(() => vm.vm.addMemorySlot({ slot: 1, guestAddress: 0x1000_0000n, size: 0x1000, fromFd: 2 ** 32 }), {
      instanceOf: RangeError,
      message: /^'fromFd' must be in 0\.\.2147483647/,
    });
    // None of those created slot 1.
    t.is(vm.vm.addMemorySlot({ slot: 1, guestAddress: 0x1000_0000n, size: 0x1000 }).slot, 1);
    t.throws(() => vm.vm.getDirtyBitmap(2 ** 32 + 1), { instanceOf: RangeError, message: /^slot must be in 0\.\.4294967295/ });
  } finally {
    vm.close();
  }
});

test('VM and vCPU calls name the argument that is not an integer in range', (t) => {
  const vm = createTestVm({ ring: 3, irqchip: true });
  try {
    for (const [bad, type] of BAD) {
      const what = String(bad);
      t.throws(() => vm.vm.createVcpu(bad as number), { instanceOf: type, message: /^id (must|is missing)/ }, what);
      t.throws(() => vm.vm.irqLine(bad as number, 1), { instanceOf: type, message: /^irq (must|is missing)/ }, what);
      t.throws(() => vm.vm.irqfd(bad as number, 4), { instanceOf: type, message: /^fd (must|is missing)/ }, what);
      t.throws(() => vm.vcpu.setMpState(bad as number), { instanceOf: type, message: /^setMpState: state (must|is missing)/ }, what);
      t.throws(() => vm.vcpu.getMsrs([0x10, bad as number]), { instanceOf: type, message: /^getMsrs: index 1 must/ }, what);
    }
    t.throws(() => vm.vm.irqLine(4, 2 as 1), { instanceOf: RangeError, message: /^level must be in 0\.\.1, got 2$/ });
    t.throws(() => vm.vm.ioeventfd(3, 0x600n, 16), { instanceOf: RangeError, message: /^len must be in 0\.\.8/ });
    t.throws(() => vm.vm.setClock(-5n), { instanceOf: RangeError, message: /^clock must/ });
    t.throws(() => vm.vm.setGsiRouting(new Array(5000).fill({ gsi: 0, type: 'irqchip', irqchip: 0, pin: 0 })), {
      instanceOf: RangeError,
      message: /^setGsiRouting: at most 4096 routes, got 5000$/,
    });
    t.throws(() => vm.vcpu.setCpuid(new Array(2 ** 32 - 1)), { instanceOf: RangeError, message: /^setCpuid: at most 4096 entries/ });

    // Register and segment fields are checked against their own widths.
    const regs = vm.vcpu.getRegs();
    t.throws(() => vm.vcpu.setRegs({ ...regs, rip: 2n ** 64n }), { instanceOf: RangeError, message: /^'rip' must be in 0\.\.18446744073709551615/ });
    t.throws(() => vm.vcpu.setRegs({ ...regs, rax: 2 ** 53 as unknown as bigint }), { instanceOf: RangeError, message: /pass a bigint/ });
    const sregs = vm.vcpu.getSregs();
    t.throws(() => vm.vcpu.setSregs({ ...sregs, cs: { ...sregs.cs, selector: 0x10008 } }), { instanceOf: RangeError, message: /^'selector' must be in 0\.\.65535, got 65544$/ });
    t.throws(() => vm.vcpu.setSregs({ ...sregs, gdt: { ...sregs.gdt, limit: 0x1ffff } }), { instanceOf: RangeError, message: /^'limit' must be in 0\.\.65535/ });
    t.throws(() => vm.vcpu.setSregs({ ...sregs, cs: { ...sregs.cs, dpl: 256 } }), { instanceOf: RangeError, message: /^'dpl' must be in 0\.\.255/ });
    t.deepEqual(vm.vcpu.getSregs(), sregs, 'no refused call changed the segment registers');
    t.deepEqual(vm.vcpu.getRegs(), regs);
    const fpu = vm.vcpu.getFpu();
    t.throws(() => vm.vcpu.setFpu({ ...fpu, fcw: 0x1037f }), { instanceOf: RangeError, message: /^'fcw' must be in 0\.\.65535/ });
    t.throws(() => vm.vcpu.setMsrs([{ index: 2 ** 32 + 0x10, data: 1n }]), { instanceOf: RangeError, message: /^'index' must be in 0\.\.4294967295/ });
    t.throws(() => vm.kvm.checkExtension(2 ** 32 + 1), { instanceOf: RangeError, message: /^cap must be in 0\.\.4294967295/ });
  } finally {
    vm.close();
  }
});

test('an exit handler value no register can hold stops the vCPU with an error naming it', async (t) => {
  for (const [bad, message] of [
    [-1, /return value must be in 0\.\.18446744073709551615, got a negative number/],
    [2 ** 64, /return value must be in .*above 2\^53-1/],
    [0.5, /return value must be an integer, got a fraction/],
  ] as const) {
    const vm = createTestVm({ guest: buildGuest('echo'), ring: 3 });
    try {
      const { exits } = await runVcpu(vm.vcpu, (exit) => (exit.kind === 'io' && exit.direction === 'in' ? bad : undefined));
      // Before, -1 became 0xff.. and 0.5 became 0: the guest read a value nobody chose.
      t.deepEqual(exits.map((e) => e.kind), ['io', 'error', 'stopped'], String(bad));
      const error = exits[1] as { kind: 'error'; message: string };
      t.regex(error.message, message);
    } finally {
      vm.close();
    }
  }
});
