// Port I/O, MMIO and HLT exits of tiny 64-bit guests, handled in TypeScript.
import test from 'ava';

import { DebugPortEvents, debugPortDevice } from '../../src/devices';
import type { StoreEvent } from '../../src/state';
import { BusEvents, createStore, deviceEvents } from '../../src/state';
import { dispatchIoExit } from '../../src/vmm/io-exit';
import { EXIT_PORT, buildGuest, createTestVm, runVcpu } from './harness';

test('ring-3 guest writes a string to port 0x3f8 byte by byte', async (t) => {
  const vm = createTestVm({ guest: buildGuest('hello'), ring: 3 });
  try {
    let text = '';
    const { exits } = await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind === 'io' && exit.port === 0x3f8) {
        t.is(exit.direction, 'out');
        t.is(exit.size, 1);
        text += String.fromCharCode(exit.data);
      }
    });
    t.is(text, 'hello from ring 3\n');
    t.deepEqual(exits.map((e) => e.kind), [...Array(text.length + 1).fill('io'), 'stopped']);
    const sregs = vm.vcpu.getSregs();
    t.is(sregs.cs.dpl, 3, 'the guest ran at CPL 3');
  } finally {
    vm.close();
  }
});

test('port in returns the handler value; the guest echoes it with out (sizes 1, 2, 4)', async (t) => {
  const vm = createTestVm({ guest: buildGuest('echo'), ring: 3 });
  try {
    const values = { 1: [0x5a, 0x00, 0xff, 0x81], 2: [0x1234, 0xffff, 0x0001, 0xbeef], 4: [0xdeadbeef, 0x00000000, 0x80000001, 0x12345678] };
    const served: Record<number, number[]> = { 1: [], 2: [], 4: [] };
    const echoed: Record<number, number[]> = { 1: [], 2: [], 4: [] };
    const inPort = { 1: 0x510, 2: 0x512, 4: 0x514 } as const;
    const outPort = { 1: 0x511, 2: 0x513, 4: 0x515 } as const;
    await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind !== 'io' || exit.port === EXIT_PORT) return undefined;
      const size = exit.size;
      if (exit.direction === 'in') {
        t.is(exit.port, inPort[size]);
        const v = values[size][served[size].length];
        served[size].push(v);
        // The upper bits of a wide reply must not leak into a narrow read.
        return size === 4 ? v : v | 0x7fff0000;
      }
      t.is(exit.port, outPort[size]);
      echoed[size].push(exit.data);
      return undefined;
    });
    for (const size of [1, 2, 4] as const) {
      t.deepEqual(served[size], values[size]);
      t.deepEqual(echoed[size], values[size], `size ${size}`);
    }
  } finally {
    vm.close();
  }
});

test('MMIO to an address outside every memory slot reaches the handler', async (t) => {
  const vm = createTestVm({ guest: buildGuest('mmio'), ring: 3 });
  try {
    const writes: { address: bigint; size: number; data: bigint }[] = [];
    const reads: { address: bigint; size: number }[] = [];
    const outs: number[] = [];
    const replies = new Map<bigint, bigint>([
      [0xd0000004n, 0x89abcdefn],
      [0xd0000030n, 0xbeefn],
      [0xd0000008n, 0xfedcba9876543210n],
    ]);
    await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind === 'mmio') {
        if (exit.direction === 'write') {
          writes.push({ address: exit.address, size: exit.size, data: exit.data });
          return undefined;
        }
        reads.push({ address: exit.address, size: exit.size });
        return replies.get(exit.address) ?? 0n;
      }
      if (exit.kind === 'io' && exit.port === 0x515) outs.push(exit.data);
      return undefined;
    });
    t.deepEqual(writes, [
      { address: 0xd0000000n, size: 4, data: 0xcafef00dn },
      { address: 0xd0000010n, size: 1, data: 0x5an },
      { address: 0xd0000020n, size: 8, data: 0x0123456789abcdefn },
    ]);
    t.deepEqual(reads, [
      { address: 0xd0000004n, size: 4 },
      { address: 0xd0000030n, size: 2 },
      { address: 0xd0000008n, size: 8 },
    ]);
    t.deepEqual(outs, [0x89abcdef, 0xbeef, 0x76543210, 0xfedcba98]);
  } finally {
    vm.close();
  }
});

test('an 8-byte MMIO write reaches a device and an 8-byte read returns to the guest with all 64 bits', async (t) => {
  const store = createStore();
  // A device on an 8-byte MMIO range at 0xd0000040; 0xd0000048 belongs to nobody and floats high.
  store.dispatch(deviceEvents.added({ ...debugPortDevice({ id: 'post0' }), ranges: [{ space: 'mmio', base: 0xd000_0040, length: 8 }] }));
  const events: StoreEvent[] = [];
  const sub = store.events$.subscribe((e) => events.push(e));
  const vm = createTestVm({ guest: buildGuest('mmio64'), ring: 3 });
  try {
    const outs: number[] = [];
    await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind === 'mmio') return dispatchIoExit(store, exit, 0).value;
      if (exit.kind === 'io' && exit.port === 0x515) outs.push(exit.data);
      return undefined;
    });
    const written = events.find((e) => e.type === DebugPortEvents.RegisterWritten);
    t.like(written, { source: 'post0', payload: { space: 'mmio', offset: 0, size: 8 } });
    // A number would have arrived as 0xfedcba9876543000 (53 bits kept).
    t.is((written?.payload as { data: unknown }).data, 0xfedcba9876543210n);
    const read = events.find((e) => e.type === BusEvents.UnhandledAccess);
    t.like(read, { payload: { space: 'mmio', direction: 'read', address: 0xd000_0048, size: 8 } });
    t.deepEqual(outs, [0xffffffff, 0xffffffff], 'the guest read all 64 bits of the floating bus');
  } finally {
    sub.unsubscribe();
    vm.close();
  }
});

test("hlt gives a 'hlt' exit without an in-kernel irqchip, and the guest continues after it", async (t) => {
  const guest = buildGuest('hlt');
  const vm = createTestVm({ guest, ring: 0, irqchip: false });
  try {
    let ripAtHlt = -1n;
    const { exits } = await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind === 'hlt') ripAtHlt = vm.vcpu.getRegs().rip;
      return undefined;
    });
    t.deepEqual(exits.map((e) => e.kind), ['hlt', 'io', 'stopped']);
    t.is(ripAtHlt, BigInt(guest.symbols.after_hlt), 'rip points past hlt while the exit is handled');
  } finally {
    vm.close();
  }
});

test("returning 'stop' from a hlt exit ends the vCPU thread", async (t) => {
  const vm = createTestVm({ guest: buildGuest('hlt'), ring: 0 });
  try {
    const { exits } = await runVcpu(vm.vcpu, (exit) => (exit.kind === 'hlt' ? 'stop' : undefined));
    t.deepEqual(exits.map((e) => e.kind), ['hlt', 'stopped']);
  } finally {
    vm.close();
  }
});

test("a triple fault ends the vCPU with 'shutdown' then 'stopped' (ring 3 and ring 0)", async (t) => {
  for (const ring of [3, 0] as const) {
    const vm = createTestVm({ guest: buildGuest('fault'), ring });
    try {
      const { exits } = await runVcpu(vm.vcpu);
      t.deepEqual(exits, [{ kind: 'shutdown' }, { kind: 'stopped' }], `ring ${ring}`);
    } finally {
      vm.close();
    }
  }
});

test('string I/O (rep insw / rep outsb) arrives as one handler call per element', async (t) => {
  const vm = createTestVm({ guest: buildGuest('string'), ring: 3 });
  try {
    const words = [0x1111, 0xa2a2, 0x0303, 0xfffe];
    let next = 0;
    let text = '';
    await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind !== 'io') return undefined;
      if (exit.direction === 'in' && exit.port === 0x512 && exit.size === 2) return words[next++];
      if (exit.direction === 'out' && exit.port === 0x3f8) text += String.fromCharCode(exit.data);
      return undefined;
    });
    t.is(next, 4);
    t.deepEqual([0, 1, 2, 3].map((i) => vm.mem.readU16(0x190000 + 2 * i)), words);
    t.is(text, 'rep!');
  } finally {
    vm.close();
  }
});
