// Lab tier: vm.power-button against a real Linux guest. Pressing the button over the API must
// answer 204, reach the guest as an ACPI interrupt, and appear in the event monitor as
// "vm power-button". Skipped until the VMM has its ACPI power button (Vmm.powerButton).
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { TernClient } from '../../src/api/client';
import { Vmm } from '../../src/vmm/vmm';
import { GuestProcess, fixture } from './guest-process';

const BOOT_TIMEOUT = 180_000;
const hasPowerButton = typeof (Vmm.prototype as unknown as { powerButton?: unknown }).powerButton === 'function';

// Prints the guest's ACPI interrupt count (SCI or GED, whichever carries the button) each second.
const GUEST_CMD = [
  'while :; do',
  "  echo ACPI-IRQS $(grep -i acpi /proc/interrupts | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i} END {print s + 0}')",
  '  sleep 1',
  'done',
].join('\n');

const cmdline = `console=ttyS0 quiet panic=-1 tern.cmd64=${Buffer.from(GUEST_CMD).toString('base64')}`;

const title = 'vm.power-button: 204, the guest takes an ACPI interrupt, the monitor reports vm power-button';
(hasPowerButton ? test.serial : test.serial.skip)(hasPowerButton ? title : `${title} (skipped: this build has no Vmm.powerButton yet)`, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-power-button-'));
  const socket = path.join(dir, 'api.sock');
  const monitor = path.join(dir, 'events.json');
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', cmdline,
    '--memory', 'size=256M', '--serial', 'tty', '--api-socket', socket, '--event-monitor', `path=${monitor}`,
  ]);
  const client = new TernClient(socket);
  try {
    const first = await vm.waitFor(/ACPI-IRQS (\d+)\r?\n/, BOOT_TIMEOUT);
    const before = Number(first[1]);
    const from = vm.output.length;
    await client.powerButton();
    const deadline = Date.now() + 60_000;
    let after = before;
    while (after <= before && Date.now() < deadline) {
      const m = await vm.waitFor(/ACPI-IRQS (\d+)\r?\n/, 60_000, vm.output.length);
      after = Number(m[1]);
    }
    t.true(after > before, `ACPI interrupts ${before} -> ${after} (output since the press: ${vm.output.slice(from, from + 500)})`);
    const events = fs.readFileSync(monitor, 'utf8').split('\n\n').filter(Boolean).map((b) => JSON.parse(b));
    t.true(events.some((e) => e.source === 'vm' && e.event === 'power-button'), JSON.stringify(events));
    await client.shutdownVmm();
    t.is((await vm.exit(60_000)).code, 0);
  } finally {
    client.close();
    vm.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
