// Lab tier, the API issue's acceptance run: tern started with only an API socket and an event
// monitor; tern-remote creates the VM from a VmConfig JSON file, boots it, reads info, pauses
// (serial output stops), resumes (it continues), presses the power button (the guest powers off
// and the VMM reports Shutdown), then ends the VMM. The monitor file and a vmm.events subscriber
// that connected before the boot must hold the same events, in order.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { firstValueFrom, toArray } from 'rxjs';
import { TernClient } from '../../src/api/client';
import { ternRemote, waitForFileText } from '../support/processes';
import { GuestProcess, fixture } from './guest-process';

const BOOT_TIMEOUT = 240_000;

test('tern-remote drives a Linux guest through create, boot, info, pause, resume, power-button, shutdown-vmm', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-accept-'));
  const socket = path.join(dir, 'api.sock');
  const monitor = path.join(dir, 'events.json');
  const serial = path.join(dir, 'serial.log');
  const vmm = GuestProcess.tern(['--api-socket', socket, '--event-monitor', `path=${monitor}`, '--no-shutdown']);
  const client = new TernClient(socket);
  try {
    // The VMM waits for API calls: ping answers once the socket is up.
    const deadline = Date.now() + 60_000;
    for (;;) {
      try {
        await client.ping();
        break;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    const streamed = firstValueFrom(client.events().pipe(toArray()));
    // If a step below fails, the stream ends with the VMM: that must not go unhandled.
    streamed.catch(() => undefined);

    const config = {
      payload: {
        kernel: fixture('vmlinux'),
        initramfs: fixture('initramfs.img'),
        cmdline: 'console=ttyS0 quiet panic=-1 tern.cmd="i=0; while :; do i=$((i+1)); echo TICK-$i; sleep 0.2; done"',
      },
      cpus: { boot_vcpus: 1, max_vcpus: 1 },
      memory: { size: 256 * 1024 * 1024 },
      serial: { mode: 'File', file: serial },
      console: { mode: 'Off' },
    };
    const configFile = path.join(dir, 'vm.json');
    fs.writeFileSync(configFile, JSON.stringify(config));
    await ternRemote(socket, 'create', configFile);
    await ternRemote(socket, 'boot');
    const info = JSON.parse(await ternRemote(socket, 'info'));
    t.is(info.state, 'Running');
    t.is(info.config.payload.kernel, config.payload.kernel);
    await waitForFileText(serial, /TICK-3\b/, BOOT_TIMEOUT);

    await ternRemote(socket, 'pause');
    const paused = fs.readFileSync(serial, 'latin1');
    await new Promise((r) => setTimeout(r, 2000));
    t.is(fs.readFileSync(serial, 'latin1'), paused, 'serial output stops while paused');
    t.is(JSON.parse(await ternRemote(socket, 'info')).state, 'Paused');
    await ternRemote(socket, 'resume');
    await waitForFileText(serial, /TICK-\d+/, 60_000, paused.length);

    await ternRemote(socket, 'power-button');
    const shutdownDeadline = Date.now() + 120_000;
    while (JSON.parse(await ternRemote(socket, 'info')).state !== 'Shutdown') {
      if (Date.now() > shutdownDeadline) t.fail('the guest did not power off after the power button');
      await new Promise((r) => setTimeout(r, 500));
    }
    await ternRemote(socket, 'shutdown-vmm');
    t.is((await vmm.exit(60_000)).code, 0);

    const expected = [
      'vmm:starting', 'vm:booting', 'vm:booted', 'vm:pausing', 'vm:paused', 'vm:resuming', 'vm:resumed',
      'vm:power-button', 'vm:shutdown', 'vm:deleted', 'vmm:shutdown',
    ];
    const fromFile = fs.readFileSync(monitor, 'utf8').split('\n\n').filter((b) => b.trim()).map((b) => JSON.parse(b))
      .map((e) => `${e.source}:${e.event}`);
    t.deepEqual(fromFile, expected);
    const fromStream = (await streamed).map((e) => `${e.source}:${e.event}`);
    t.deepEqual(fromStream, expected.slice(1), 'the subscriber saw everything from the boot on');
  } finally {
    client.close();
    vmm.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
