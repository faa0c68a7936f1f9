// Lab tier: vm.power-button against a real Linux guest. Pressing the button over the API must
// answer 204, reach the guest as the GED's ACPI interrupt, which the button driver turns into
// KEY_POWER and the fixture's acpid into `poweroff -f`; the VM then shuts down, and the event
// monitor reports "vm power-button" followed by "vm shutdown".
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { TernClient } from '../../src/api/client';
import { GuestProcess, fixture } from './guest-process';
import { monitorSeconds, readMonitorFile, type MonitorRecord } from '../support/monitor-file';

const BOOT_TIMEOUT = 180_000;

// Reports whether the GED's interrupt is registered and acpid runs, then prints the guest's
// ACPI interrupt count each second until the press powers it off.
const GUEST_CMD = [
  'echo GED-IRQ $(grep -c ACPI:Ged /proc/interrupts) ACPID $(pidof acpid >/dev/null && echo up || echo down)',
  'while :; do',
  "  echo ACPI-IRQS $(grep -i acpi /proc/interrupts | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i} END {print s + 0}')",
  '  sleep 1',
  'done',
].join('\n');

const cmdline = `console=ttyS0 quiet panic=-1 tern.cmd64=${Buffer.from(GUEST_CMD).toString('base64')}`;

const seconds = monitorSeconds;

const title = 'vm.power-button: 204, the guest takes the GED interrupt and powers off, the monitor reports power-button then shutdown';
test.serial(title, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-power-button-'));
  const socket = path.join(dir, 'api.sock');
  const monitor = path.join(dir, 'events.json');
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', cmdline,
    '--memory', 'size=256M', '--serial', 'tty', '--console', 'off', '--api-socket', socket, '--event-monitor', `path=${monitor}`, '--no-shutdown',
  ]);
  const client = new TernClient(socket);
  try {
    const ready = await vm.waitFor(/GED-IRQ (\d+) ACPID (\w+)\r?\n/, BOOT_TIMEOUT);
    t.is(ready[1], '1', 'the GED driver registered its interrupt');
    t.is(ready[2], 'up', 'acpid runs (fixtures older than the acpid /init? bash scripts/guest-fixtures.sh)');
    await vm.waitFor(/ACPI-IRQS (\d+)\r?\n/, 30_000);
    const from = vm.output.length;
    const pressedAt = Date.now();
    await client.powerButton(); // rejects unless 204
    await vm.waitFor(/tern-acpid: power button/, 60_000, from);
    const handledAt = Date.now();

    // The guest's poweroff reaches the VMM as an S5 write: the VM is Shutdown, the VMM stays.
    const deadline = Date.now() + 60_000;
    let events = readMonitorFile(monitor);
    while (!events.some((e) => e.source === 'vm' && e.event === 'shutdown') && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
      events = readMonitorFile(monitor);
    }
    const shutdownSeenAt = Date.now();
    const press = events.find((e) => e.source === 'vm' && e.event === 'power-button');
    const shutdown = events.find((e) => e.source === 'vm' && e.event === 'shutdown');
    t.truthy(press, JSON.stringify(events));
    t.truthy(shutdown, `no vm shutdown; output since the press: ${vm.output.slice(from, from + 2000)}`);
    t.is((await client.info()).state, 'Shutdown');
    if (press && shutdown) {
      t.true(events.indexOf(press) < events.indexOf(shutdown), 'the press comes before the shutdown');
      t.log(
        `press -> VM Shutdown: ${((seconds(shutdown) - seconds(press)) * 1000).toFixed(0)} ms (VMM clock); ` +
          `API call -> acpid marker on the console: ${handledAt - pressedAt} ms; ` +
          `API call -> shutdown seen in the monitor: ${shutdownSeenAt - pressedAt} ms`,
      );
    }
    t.notRegex(vm.output, /TERN-GUEST-EXIT/, 'acpid powered off, not /init after its command');
    t.notRegex(vm.output, /tern-init: (module (button|evdev)\.ko|acpid) failed/);
    await client.shutdownVmm();
    t.is((await vm.exit(60_000)).code, 0);
  } finally {
    client.close();
    vm.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
