// What a guest (or a failing host) can do to the VMM around its lifecycle, with the tiny PVH
// kernel in-process: floods of guest-triggered log lines, failed reboots and resumes, guest
// stops that arrive while the VM is being paused, a serial file at its cap; and the ACPI
// tables the guest is given, which describe only the devices it has.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { ACPI_TABLES_END, ACPI_TABLES_START } from '../../src/boot/layout';
import type { VmConfig } from '../../src/config/vm-config';
import { I8042Events } from '../../src/devices/i8042';
import { serialInputEvent } from '../../src/devices/serial-16550a';
import { VmmApi } from '../../src/api/vmm-api';
import { ApiError } from '../../src/api/errors';
import { stateChecksum } from '../../src/migration/snapshot';
import { InvalidTransitionError, VmEvents } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { capturingLogger, sleep, waitUntil } from './harness';
import { TINY_KERNEL_MAGIC, TinyKernelCommand, TinyKernelStatus, buildTinyKernel } from './tiny-kernel';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-guest-faults-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

async function config(name: string, kernel?: string): Promise<VmConfig & { serial: { mode: 'File'; file: string } }> {
  return {
    payload: { kernel: kernel ?? (await buildTinyKernel()), cmdline: `faults ${name}` },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: path.join(tmp, `${name}.serial`) },
    console: { mode: 'Off' },
  };
}

const serialText = (cfg: { serial: { file: string } }): string => fs.readFileSync(cfg.serial.file, 'latin1');
/** The guest's main loop runs (its UART is set up, so input is no longer cleared away). */
const guestReady = (vmm: Vmm): boolean =>
  vmm.guestMemory()?.readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC && vmm.guestMemory()!.readU32(TinyKernelStatus.COUNT) >= 1;

function send(vmm: Vmm, command: string): void {
  vmm.store.dispatch(serialInputEvent('serial0', Buffer.from(command, 'latin1')));
}

test.serial('1000 guest sleep requests log a few rate-limited lines, not one per exit', async (t) => {
  const cfg = await config('sleep-flood');
  const { log, lines } = capturingLogger();
  const vmm = new Vmm({ log });
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the guest has initialised', () => guestReady(vmm));
    send(vmm, TinyKernelCommand.SLEEP_REQUESTS);
    await waitUntil('the guest has made its requests', () => serialText(cfg).includes('SLEPT'));
    const sleepLines = lines.filter((l) => l.msg.includes('sleep state'));
    t.true(sleepLines.length >= 1, 'the first request is logged');
    t.true(sleepLines.length <= 12, `${sleepLines.length} lines for 1000 requests`);
    t.is(vmm.state.vm.status, 'Running', 'the guest runs on');
  } finally {
    await vmm.close();
  }
});

test.serial('a reboot whose kernel has disappeared leaves the VM Shutdown, and vm.info says so', async (t) => {
  const kernel = path.join(tmp, 'vanishing-kernel.elf');
  fs.copyFileSync(await buildTinyKernel(), kernel);
  const cfg = await config('vanishing', kernel);
  const vmm = new Vmm({ log: silentLogger() });
  const api = new VmmApi(vmm);
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the guest runs', () => guestReady(vmm));
    fs.rmSync(kernel);

    const err = await t.throwsAsync(api.reboot(), { instanceOf: ApiError });
    t.is(err?.status, 500);
    t.regex(err!.message, /cannot read kernel/);
    t.is(api.info().state, 'Shutdown', 'no machine runs, and vm.info does not claim one does');
    t.is(vmm.guestMemory(), undefined);
    t.is(vmm.state.vm.lastFailure?.operation, 'Rebooting');
    // vm.pause is refused by the state machine, not a TypeError on a missing machine.
    await t.throwsAsync(vmm.pause(), { instanceOf: InvalidTransitionError });

    // Put the kernel back: the VM boots again.
    fs.copyFileSync(await buildTinyKernel(), kernel);
    await api.boot();
    t.is(api.info().state, 'Running');
    await waitUntil('the guest runs again', () => guestReady(vmm));
  } finally {
    await vmm.close();
  }
});

test.serial('a guest reset whose reboot fails (the kernel is gone) leaves the VM Shutdown', async (t) => {
  const kernel = path.join(tmp, 'vanishing-kernel-2.elf');
  fs.copyFileSync(await buildTinyKernel(), kernel);
  const cfg = await config('vanishing-guest', kernel);
  const vmm = new Vmm({ log: silentLogger() });
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the guest runs', () => guestReady(vmm));
    fs.rmSync(kernel);
    send(vmm, TinyKernelCommand.ACPI_RESET);
    await waitUntil('the failed reboot is recorded', () => vmm.state.vm.lastFailure?.operation === 'Rebooting');
    t.is(vmm.state.vm.status, 'Shutdown');
    t.is(vmm.state.vm.pending, null);
  } finally {
    await vmm.close();
  }
});

test.serial('a guest reset that arrives during a pause is carried out by the resume; later stops still count', async (t) => {
  const cfg = await config('deferred-reset');
  const vmm = new Vmm({ log: silentLogger() });
  const vmEventTypes: string[] = [];
  let pause: Promise<void> | undefined;
  const sub = vmm.store.events$.subscribe((e) => {
    if (e.type.startsWith('[VM]')) vmEventTypes.push(e.type);
    // The pause starts the moment the guest writes the i8042 reset command, before the VMM
    // has acted on it.
    if (e.type === I8042Events.RegisterWritten && (e.payload as { data: number }).data === 0xfe && !pause) pause = vmm.pause();
  });
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the guest runs', () => guestReady(vmm));
    send(vmm, TinyKernelCommand.I8042_RESET);
    await waitUntil('the pause has started', () => pause !== undefined);
    await pause;
    await sleep(200);
    t.is(vmm.state.vm.status, 'Paused', 'the pause holds: the reset waits');
    t.like(vmm.state.vm.guestStop, { action: 'reboot', reason: 'reset', detail: 'i8042' });
    t.is(vmm.state.vm.rebootCount, 0);

    await vmm.resume();
    await waitUntil('the reset is carried out', () => vmm.state.vm.rebootCount === 1);
    t.is(vmm.state.vm.status, 'Running');
    t.is(vmm.state.vm.guestStop, null);
    // The stop is recorded while the pause is under way (just before or after Paused), and
    // carried out only after the resume.
    const fromPause = vmEventTypes.slice(vmEventTypes.indexOf(VmEvents.Pausing));
    t.true(fromPause.indexOf(VmEvents.GuestStopRequested) < fromPause.indexOf(VmEvents.Resuming));
    t.deepEqual(fromPause.filter((e) => e !== VmEvents.GuestStopRequested).slice(0, 6), [
      VmEvents.Pausing,
      VmEvents.Paused,
      VmEvents.Resuming,
      VmEvents.Resumed,
      VmEvents.Rebooting,
      VmEvents.Rebooted,
    ]);
    await waitUntil('the rebooted guest runs', () => guestReady(vmm));

    // The next guest stop is not swallowed by a latch left from the first.
    send(vmm, TinyKernelCommand.POWEROFF);
    await waitUntil('the guest powers off', () => vmm.state.vm.status === 'Shutdown');
  } finally {
    sub.unsubscribe();
    await vmm.close();
  }
});

test.serial('a resume whose KVM clock call fails leaves the VM Paused, not Resuming forever', async (t) => {
  const cfg = await config('bad-clock');
  const snapDir = path.join(tmp, 'bad-clock-snapshot');
  const vmm = new Vmm({ log: silentLogger() });
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the guest runs', () => guestReady(vmm));
    await vmm.pause();
    await vmm.snapshot(`file://${snapDir}`);
  } finally {
    await vmm.close();
  }
  // A kvmclock that does not fit KVM's 64-bit field: the state's schema refuses it at restore,
  // before KVM_SET_CLOCK could.
  const file = path.join(snapDir, 'state.json');
  const original = fs.readFileSync(file);
  const env = JSON.parse(original.toString('utf8'));
  env.state.kvm.saved.clock = '0x10000000000000000';
  env.checksum = stateChecksum(env.state);
  fs.writeFileSync(file, JSON.stringify(env));
  const refused = new Vmm({ log: silentLogger() });
  try {
    const err = await t.throwsAsync(new VmmApi(refused).restore({ source_url: `file://${snapDir}` }), { instanceOf: ApiError });
    t.is(err?.status, 500);
    t.regex(err?.message ?? '', /slice 'kvm' field \/saved/);
    t.is(refused.state.vm.status, 'NotCreated');
  } finally {
    await refused.close();
  }
  fs.writeFileSync(file, original);

  const restored = new Vmm({ log: silentLogger() });
  const api = new VmmApi(restored);
  try {
    await api.restore({ source_url: `file://${snapDir}` });
    t.is(api.info().state, 'Paused');
    // No saved clock can make KVM_SET_CLOCK fail any more, yet the ioctl can still fail: the
    // failure is injected in front of the native VM object the machine calls.
    const machine = (restored as unknown as { machine: { vm: object } }).machine;
    machine.vm = new Proxy(machine.vm, {
      get(target, prop) {
        if (prop === 'setClock') {
          return () => {
            throw new Error('KVM_SET_CLOCK: Invalid argument');
          };
        }
        const v = Reflect.get(target, prop);
        return typeof v === 'function' ? v.bind(target) : v;
      },
    });
    const err = await t.throwsAsync(api.resume(), { instanceOf: ApiError });
    t.is(err?.status, 500);
    t.is(restored.state.vm.status, 'Paused');
    t.is(restored.state.vm.pending, null, 'not stuck Resuming');
    t.is(api.info().state, 'Paused');
    t.is(restored.state.vm.lastFailure?.operation, 'Resuming');
    // The VM is still in a state every action knows: it can be shut down.
    await api.shutdown();
    t.is(api.info().state, 'Shutdown');
  } finally {
    await restored.close();
  }
});

test.serial('a serial file stops at its cap while the guest runs on; vm.counters counts the dropped bytes', async (t) => {
  const cfg = await config('serial-cap');
  const vmm = new Vmm({ log: silentLogger(), serialFileMaxBytes: 200 });
  const api = new VmmApi(vmm);
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the guest has counted past the cap', () => (vmm.guestMemory()?.readU32(TinyKernelStatus.COUNT) ?? 0) >= 30);
    await waitUntil('the dropped bytes are counted', () => {
      const c = api.counters().serial0;
      return c.tx_dropped > 0 && c.tx_bytes === c.tx_dropped + 200;
    });
    t.is(fs.statSync(cfg.serial.file).size, 200);
    t.is(vmm.state.vm.status, 'Running');
  } finally {
    await vmm.close();
  }
});

test.serial('the DSDT a booted VM gets describes COM1 only when it has a serial port', async (t) => {
  const acpiWindow = (vmm: Vmm): Buffer => Buffer.from(vmm.guestMemory()!.read(ACPI_TABLES_START, ACPI_TABLES_END - ACPI_TABLES_START));
  for (const mode of ['Off', 'File'] as const) {
    const cfg = await config(`dsdt-${mode}`);
    const vmm = new Vmm({ log: silentLogger() });
    try {
      await vmm.create({ ...cfg, serial: mode === 'Off' ? { mode } : cfg.serial });
      await vmm.boot();
      const tables = acpiWindow(vmm);
      t.true(tables.includes(Buffer.from('DSDT')) && tables.includes(Buffer.from('PS2K')), `${mode}: the DSDT is there`);
      t.is(tables.includes(Buffer.from('COM1')), mode !== 'Off', `--serial ${mode.toLowerCase()}`);
    } finally {
      await vmm.close();
    }
  }
});
