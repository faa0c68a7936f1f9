// After a real Linux boot, the whole store (VM config, every device, every vCPU's saved
// state) survives JSON.stringify/parse unchanged, and pausing really stops the guest.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { waitForFileText } from '../support/processes';
import { Vmm } from '../../src/vmm/vmm';
import { silentLogger } from '../../src/util/log';
import { guestCmdline } from '../lab/qemu-peer';
import { fixture } from './guest-process';



test('a booted Linux guest: pause stops it, the store round-trips through JSON, resume continues', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-state-'));
  const serial = path.join(dir, 'serial.log');
  const vmm = new Vmm({ log: silentLogger() });
  try {
    await vmm.create({
      payload: {
        kernel: fixture('vmlinux'),
        initramfs: fixture('initramfs.img'),
        cmdline: guestCmdline({ cmd: 'i=0; while true; do i=$((i+1)); echo TICK-$i; sleep 0.2; done' }),
      },
      cpus: { boot_vcpus: 2, max_vcpus: 2 },
      memory: { size: 256 * 1024 * 1024 },
      serial: { mode: 'File', file: serial },
      console: { mode: 'Off' },
    });
    await vmm.boot();
    await waitForFileText(serial, /TICK-3\b/, 180_000);

    await vmm.pause();
    const paused = fs.readFileSync(serial, 'latin1');
    await new Promise((r) => setTimeout(r, 2000));
    t.is(fs.readFileSync(serial, 'latin1'), paused, 'no guest output while paused');

    const state = vmm.state;
    t.is(state.vm.status, 'Paused');
    t.deepEqual(Object.keys(state.vcpus.saved).sort(), ['0', '1']);
    t.truthy(state.devices.instances.serial0);
    t.deepEqual(JSON.parse(JSON.stringify(state)), state);

    const ticks = (paused.match(/TICK-(\d+)/g) ?? []).length;
    await vmm.resume();
    await waitForFileText(serial, new RegExp(`TICK-${ticks + 3}\\b`), 60_000);
    t.pass();
  } finally {
    await vmm.close().catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
