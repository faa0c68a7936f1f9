// ioctl failures surface as JS errors naming the ioctl and errno; eventfd, ioeventfd,
// irqfd and GSI routing plumbing.
import test from 'ava';

import { EventFdFlags, native } from '../../src/native/kvm';
import { buildGuest, createTestVm, runVcpu } from './harness';

test('an overlapping memory slot fails with an error naming KVM_SET_USER_MEMORY_REGION', (t) => {
  const vm = createTestVm({ ring: 3, memSize: 4 * 1024 * 1024 });
  try {
    const err = t.throws(() => vm.vm.addMemorySlot({ slot: 1, guestAddress: 0x20_0000n, size: 0x10_0000 }));
    t.regex(err?.message ?? '', /^KVM_SET_USER_MEMORY_REGION failed: .+ \(EEXIST\)$/);
    t.is((err as NodeJS.ErrnoException).code, 'EEXIST');
    // The failed slot left nothing behind: the same slot id works at a free address.
    const ok = vm.vm.addMemorySlot({ slot: 1, guestAddress: 0x1000_0000n, size: 0x10_0000 });
    t.is(ok.guestAddress, 0x1000_0000n);
    t.throws(() => vm.vm.addMemorySlot({ slot: 1, guestAddress: 0x2000_0000n, size: 0x1000 }), { code: 'EEXIST' });
    t.throws(() => vm.vm.addMemorySlot({ slot: 2, guestAddress: 0x3000_0000n, size: 100 }), { code: 'EINVAL' });
  } finally {
    vm.close();
  }
});

test('other ioctl errors carry the ioctl name and errno code', (t) => {
  const vm = createTestVm({ ring: 3, irqchip: false });
  try {
    t.throws(() => vm.vm.createVcpu(0), { code: 'EEXIST', message: /^KVM_CREATE_VCPU failed: / });
    t.throws(() => vm.vm.getIrqchip(0), { code: 'ENXIO', message: /^KVM_GET_IRQCHIP failed: / });
    t.throws(() => vm.vcpu.setLapic('AAAA'), { instanceOf: TypeError, message: /expected 1024 bytes/ });
    t.throws(() => vm.vcpu.setRegs({} as never), { instanceOf: TypeError });
    t.is(vm.vcpu.kvmclockCtrl(), false, 'guest never enabled kvmclock');
    t.throws(() => native().openKvm('/nonexistent/kvm'), { code: 'ENOENT', message: /^open \/nonexistent\/kvm failed/ });
  } finally {
    vm.close();
  }
  t.throws(() => vm.vm.getClock(), { code: 'EBADF', message: 'VM is closed' });
  t.throws(() => vm.vcpu.getRegs(), { code: 'EBADF' });
});

test('eventfd helpers: counter semantics and non-blocking read', (t) => {
  const n = native();
  const fd = n.eventfd();
  try {
    t.is(n.eventfdRead(fd), null);
    n.eventfdWrite(fd, 5n);
    n.eventfdWrite(fd, 2n);
    t.is(n.eventfdRead(fd), 7n);
    t.is(n.eventfdRead(fd), null);
  } finally {
    n.closeFd(fd);
  }
  const sem = n.eventfd(2, EventFdFlags.SEMAPHORE | EventFdFlags.NONBLOCK | EventFdFlags.CLOEXEC);
  t.is(n.eventfdRead(sem), 1n);
  t.is(n.eventfdRead(sem), 1n);
  t.is(n.eventfdRead(sem), null);
  n.closeFd(sem);
  t.throws(() => n.eventfdRead(sem), { code: 'EBADF' });
});

test('a PIO ioeventfd absorbs guest writes without exits to the handler', async (t) => {
  const vm = createTestVm({ guest: buildGuest('hello'), ring: 3, irqchip: true });
  const n = native();
  const fd = n.eventfd();
  try {
    vm.vm.ioeventfd(fd, 0x3f8n, 1, { pio: true });
    const { exits } = await runVcpu(vm.vcpu);
    t.deepEqual(exits.map((e) => e.kind), ['io', 'stopped'], 'only the exit-port write reached user space');
    t.is(n.eventfdRead(fd), BigInt('hello from ring 3\n'.length));
    vm.vm.ioeventfd(fd, 0x3f8n, 1, { pio: true, deassign: true });
    t.throws(() => vm.vm.ioeventfd(fd, 0x3f8n, 1, { pio: true, deassign: true }), { message: /^KVM_IOEVENTFD failed/ });
  } finally {
    n.closeFd(fd);
    vm.close();
  }
});

test('irqfd, GSI routing and irq lines are accepted by an in-kernel irqchip', (t) => {
  const vm = createTestVm({ ring: 3, irqchip: true });
  const n = native();
  const fd = n.eventfd();
  try {
    vm.vm.setGsiRouting([
      ...Array.from({ length: 16 }, (_, i) => ({ gsi: i, type: 'irqchip' as const, irqchip: i < 8 ? 0 : 1, pin: i % 8 })),
      ...Array.from({ length: 24 }, (_, i) => ({ gsi: i, type: 'irqchip' as const, irqchip: 2, pin: i })),
      { gsi: 24, type: 'msi', addressLo: 0xfee00000, addressHi: 0, data: 0x41 },
    ]);
    vm.vm.irqfd(fd, 24);
    n.eventfdWrite(fd, 1n);
    vm.vm.irqfd(fd, 24, { deassign: true });
    vm.vm.irqLine(4, 1);
    vm.vm.irqLine(4, 0);
    t.throws(() => vm.vm.setGsiRouting([{ gsi: 1, type: 'bogus' as never }]), { instanceOf: TypeError });
    t.pass();
  } finally {
    n.closeFd(fd);
    vm.close();
  }
});
