// The Vmm class driven in-process with the tiny PVH kernel: boot, pause/resume with every
// vCPU's state saved in the store, the lifecycle event order, and refused transitions.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { VmConfig } from '../../src/config/vm-config';
import { type Serial16550aState, serialInputEvent } from '../../src/devices/serial-16550a';
import { InvalidTransitionError, VmEvents, decodeU64 } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { mappingsNamed, sleep, waitUntil } from './harness';
import {
  TINY_KERNEL_DIRTY_BASE,
  TINY_KERNEL_DIRTY_PAGES,
  TINY_KERNEL_LOAD_ADDRESS,
  TINY_KERNEL_MAGIC,
  TinyKernelStatus,
  buildTinyKernel,
  countsIn,
} from './tiny-kernel';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-vmm-lifecycle-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

async function config(name: string, vcpus: number): Promise<VmConfig & { serial: { mode: 'File'; file: string } }> {
  return {
    payload: { kernel: await buildTinyKernel(), cmdline: `lifecycle ${name}` },
    cpus: { boot_vcpus: vcpus, max_vcpus: vcpus },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: path.join(tmp, `${name}.serial`) },
    console: { mode: 'Off' },
  };
}

const guestCount = (vmm: Vmm): number => vmm.guestMemory()?.readU32(TinyKernelStatus.COUNT) ?? -1;
const txBytes = (vmm: Vmm): number => (vmm.state.devices.instances.serial0 as Serial16550aState).txBytes;

test.serial('boot, pause saves every vCPU and stops the guest, resume continues; events in order; state is JSON', async (t) => {
  const cfg = await config('pause', 2);
  const vmm = new Vmm({ log: silentLogger() });
  const vmEvents: string[] = [];
  const sub = vmm.store.events$.subscribe((e) => {
    if (e.type.startsWith('[VM]')) vmEvents.push(e.type);
  });
  try {
    t.is(vmm.guestMemory(), undefined, 'no RAM before boot');
    await vmm.create(cfg);
    await vmm.boot();
    t.is(vmm.state.vm.status, 'Running');

    await waitUntil('the guest has initialised', () => vmm.guestMemory()!.readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC);
    const c0 = guestCount(vmm);
    await waitUntil('the counter in RAM advances by 3', () => guestCount(vmm) >= c0 + 3);

    // A live store (devices, bus, config) survives JSON unchanged.
    t.deepEqual(JSON.parse(JSON.stringify(vmm.state)), vmm.state);

    await vmm.pause();
    t.is(vmm.state.vm.status, 'Paused');
    const saved = vmm.state.vcpus.saved;
    t.deepEqual(Object.keys(saved).sort(), ['0', '1']);
    const rip0 = Number(decodeU64(saved['0'].regs.rip));
    t.true(rip0 >= TINY_KERNEL_LOAD_ADDRESS && rip0 < TINY_KERNEL_LOAD_ADDRESS + 0x1000, `vCPU 0 rip 0x${rip0.toString(16)} is in the kernel`);
    t.true([0, 3].includes(saved['0'].mpState), `the boot vCPU is RUNNABLE or HALTED, not ${saved['0'].mpState}`);
    t.is(saved['1'].mpState, 1, 'the AP still waits for INIT/SIPI (KVM_MP_STATE_UNINITIALIZED)');
    for (const id of ['0', '1']) {
      t.true(saved[id].msrs.length > 0 && saved[id].cpuid.length > 0 && saved[id].lapic.length > 0, `vCPU ${id} state is complete`);
    }

    const pausedCount = guestCount(vmm);
    const pausedTx = txBytes(vmm);
    const pausedFile = fs.readFileSync(cfg.serial.file, 'latin1');
    await sleep(1000);
    t.is(guestCount(vmm), pausedCount, 'the counter does not move while paused');
    t.is(txBytes(vmm), pausedTx, 'no serial output while paused');
    t.is(fs.readFileSync(cfg.serial.file, 'latin1'), pausedFile, 'the serial file does not grow while paused');

    // Paused with saved vCPUs: the whole state still round-trips through JSON.
    t.deepEqual(JSON.parse(JSON.stringify(vmm.state)), vmm.state);

    await vmm.resume();
    t.is(vmm.state.vm.status, 'Running');
    await waitUntil('the counter advances after resume', () => guestCount(vmm) >= pausedCount + 2);
    await waitUntil('serial output advances after resume', () => txBytes(vmm) > pausedTx);

    const out = fs.readFileSync(cfg.serial.file, 'latin1');
    t.true(out.startsWith('TINY-KERNEL-BOOT\nCMDLINE lifecycle pause\nCOUNT 0\n'), out.slice(0, 200));
    const counts = countsIn(out);
    t.deepEqual(counts, counts.map((_, i) => i), 'COUNT lines are consecutive across the pause');

    t.deepEqual(vmEvents, [
      VmEvents.Created,
      VmEvents.Booting,
      VmEvents.Booted,
      VmEvents.Pausing,
      VmEvents.Paused,
      VmEvents.Resuming,
      VmEvents.Resumed,
    ]);
  } finally {
    sub.unsubscribe();
    await vmm.close();
  }
});

test.serial('a health report samples where each vCPU is without pausing the VM, and a pause that meets a sampling still holds', async (t) => {
  const cfg = await config('sample', 2);
  const vmm = new Vmm({ log: silentLogger() });
  const vmEvents: string[] = [];
  const sub = vmm.store.events$.subscribe((e) => vmEvents.push(e.type));
  try {
    t.deepEqual(await vmm.sampleVcpus(), { notSampled: 'no VM is running' });
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the counter runs', () => guestCount(vmm) >= 1);
    const events = vmEvents.length;
    const sampled = await vmm.sampleVcpus();
    if (!('samples' in sampled)) return t.fail(sampled.notSampled);
    t.is(sampled.samples.length, 2);
    t.is(sampled.samples[0].length, 5);
    t.true(sampled.samples[0].every((s) => s.cpl === 0 && Number(s.rip) >= TINY_KERNEL_LOAD_ADDRESS && Number(s.rip) < TINY_KERNEL_LOAD_ADDRESS + 0x1000), JSON.stringify(sampled.samples[0]));
    t.true(sampled.samples[1].every((s) => s.mpState === 'uninitialized'), 'the AP still waits for INIT/SIPI');
    t.is(vmEvents.length, events, 'sampling records nothing in the store');
    // Two reports asked for at once share one sampling.
    const [a, b] = await Promise.all([vmm.sampleVcpus(), vmm.sampleVcpus()]);
    t.true('samples' in a && a.samples[0].length === 5, JSON.stringify(a).slice(0, 200));
    t.deepEqual(b, a);
    t.is(vmm.state.vm.status, 'Running');
    const c = guestCount(vmm);
    await waitUntil('the guest counts on after the sampling', () => guestCount(vmm) >= c + 2);

    // A pause asked for while a sampling has the vCPUs parked: the sampling ends early and
    // the pause holds (the sampling must not resume what the pause parked).
    const sampling = vmm.sampleVcpus();
    await vmm.pause();
    const late = await sampling;
    t.true('samples' in late && late.samples[0].length < 5, JSON.stringify(late).slice(0, 200));
    const pausedCount = guestCount(vmm);
    await sleep(500);
    t.is(guestCount(vmm), pausedCount, 'the counter does not move while paused');
    t.deepEqual(await vmm.sampleVcpus(), { notSampled: 'no VM is running' });
    await vmm.resume();
    await waitUntil('the counter advances after resume', () => guestCount(vmm) >= pausedCount + 2);
  } finally {
    sub.unsubscribe();
    await vmm.close();
  }
});

test.serial('lifecycle actions that do not fit the state are refused with InvalidTransitionError', async (t) => {
  const vmm = new Vmm({ log: silentLogger() });
  try {
    await t.throwsAsync(vmm.boot(), { instanceOf: InvalidTransitionError }, 'boot before create');
    const cfg = await config('refuse', 1);
    await vmm.create(cfg);
    await t.throwsAsync(vmm.create(cfg), { instanceOf: InvalidTransitionError }, 'create twice');
    await t.throwsAsync(vmm.pause(), { instanceOf: InvalidTransitionError }, 'pause before boot');
    await vmm.boot();
    const seq = vmm.store.seq;
    await t.throwsAsync(vmm.resume(), { instanceOf: InvalidTransitionError }, 'resume while Running');
    await t.throwsAsync(vmm.boot(), { instanceOf: InvalidTransitionError }, 'boot while Running');
    t.is(vmm.store.seq, seq, 'refused events are not recorded');
    t.is(vmm.state.vm.status, 'Running');
    await vmm.pause();
    await t.throwsAsync(vmm.pause(), { instanceOf: InvalidTransitionError }, 'pause while Paused');
    await t.throwsAsync(vmm.reboot(), { instanceOf: InvalidTransitionError }, 'reboot while Paused');
    await vmm.resume();
    await waitUntil('the guest runs after resume', () => guestCount(vmm) >= 1);
    await vmm.shutdown();
    t.is(vmm.state.vm.status, 'Shutdown');
    t.is(vmm.guestMemory(), undefined, 'the machine is gone after shutdown');
    await t.throwsAsync(vmm.resume(), { instanceOf: InvalidTransitionError }, 'resume after shutdown');
  } finally {
    await vmm.close();
  }
});

test.serial('bytes put in the UART through the store reach the guest by polling; "d" writes its pages', async (t) => {
  const cfg = await config('dirty', 1);
  const vmm = new Vmm({ log: silentLogger() });
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the counter runs', () => guestCount(vmm) >= 2);
    // Dispatched straight to the store, the byte raises no interrupt: the guest's
    // per-tick LSR poll must find it.
    vmm.store.dispatch(serialInputEvent('serial0', [0x64]));
    await waitUntil('the guest answers DIRTY', () => /^DIRTY \d+\n/m.test(fs.readFileSync(cfg.serial.file, 'latin1')));
    const n = Number(/^DIRTY (\d+)\n/m.exec(fs.readFileSync(cfg.serial.file, 'latin1'))![1]);
    const mem = vmm.guestMemory()!;
    for (let page = 0; page < TINY_KERNEL_DIRTY_PAGES; page++) {
      const v = mem.readU32(TINY_KERNEL_DIRTY_BASE + page * 4096);
      if (v !== n) return t.fail(`page ${page} holds ${v}, expected ${n}`);
    }
    t.is(mem.readU32(TINY_KERNEL_DIRTY_BASE + TINY_KERNEL_DIRTY_PAGES * 4096), 0, 'nothing past the last page');
    t.is(mem.readU32(TinyKernelStatus.RX_IRQS), 0, 'no RX interrupt was raised');
  } finally {
    await vmm.close();
  }
});

// Guest RAM asks for transparent huge pages (MADV_HUGEPAGE, the mapping's "hg" flag) unless the
// config says thp=off, as in Cloud Hypervisor; whether the host grants them is its shmem_enabled.
test.serial('guest RAM is advised to use transparent huge pages, unless the config says thp=off', async (t) => {
  const ram = () => mappingsNamed('/memfd:tern-ram (deleted)');
  for (const thp of [undefined, true, false]) {
    const cfg = await config(`thp-${String(thp)}`, 1);
    const vmm = new Vmm({ log: silentLogger() });
    // (earlier VMs' mappings may linger until their ArrayBuffers are collected)
    const before = new Set(ram().map((m) => m.range));
    try {
      await vmm.create({ ...cfg, memory: { size: 64 << 20, ...(thp !== undefined && { thp }) } });
      await vmm.boot();
      const mine = ram().filter((m) => !before.has(m.range));
      t.is(mine.length, 1, `thp=${String(thp)}: one RAM mapping, not ${JSON.stringify(mine)}`);
      t.is(mine[0].flags.includes('hg'), thp !== false, `thp=${String(thp)}: VmFlags ${mine[0].flags.join(' ')}`);
    } finally {
      await vmm.shutdownVmm();
    }
  }
});
