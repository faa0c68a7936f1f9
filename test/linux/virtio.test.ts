// Lab tier: virtio devices on PCI under a real Debian kernel. The guest's own virtio_pci driver
// finds the functions, negotiates, sets up its queues with MSI-X, and reads through them.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { guestCmdline } from '../lab/qemu-peer';
import { readMonitorFile } from '../support/monitor-file';
import { GuestProcess, fixture } from './guest-process';

const BOOT_TIMEOUT = 240_000;
const MIB = 1024 * 1024;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-linux-virtio-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

// What the guest checks: the PCI function Linux found, the hwrng it registered, 1 MiB read
// whole, and two reads that differ and do not compress (entropy, not a constant).
const RNG_PROBE = [
  'for d in /sys/bus/pci/devices/*; do echo "PCIDEV $(cat $d/vendor) $(cat $d/device) $(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null)"; done',
  'echo "RNGCUR $(cat /sys/class/misc/hw_random/rng_current)"',
  'echo "RNGBYTES $(head -c 1048576 /dev/hwrng | wc -c)"',
  'echo "RNGSUMS $(head -c 4096 /dev/hwrng | md5sum | cut -c1-32) $(head -c 4096 /dev/hwrng | md5sum | cut -c1-32)"',
  'echo "RNGGZ $(head -c 65536 /dev/hwrng | gzip -c | wc -c)"',
  'grep -i virtio /proc/interrupts | head -4',
].join('; ');

test.serial('virtio-rng: the guest finds the PCI function, its hwrng gives 1 MiB of entropy, the monitor reports the activation', async (t) => {
  const monitor = path.join(tmp, 'rng.events');
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'),
    '--cmdline', guestCmdline({ cmd: RNG_PROBE }),
    '--cpus', 'boot=1', '--memory', 'size=256M', '--serial', 'tty',
    '--rng', 'src=/dev/urandom', '--event-monitor', `path=${monitor}`,
  ]);
  try {
    const { code } = await vm.exit(BOOT_TIMEOUT);
    t.is(code, 0, `${vm.output.slice(-3000)}\n${vm.stderr.slice(-2000)}`);
    const out = vm.output;
    t.regex(out, /^PCIDEV 0x1af4 0x1044 virtio-pci\r?$/m, 'Linux bound virtio-pci to the entropy device');
    t.regex(out, /^RNGCUR virtio_rng\.0\r?$/m);
    t.is(Number(/^RNGBYTES (\d+)/m.exec(out)?.[1]), MIB, 'all of 1 MiB read');
    const sums = /^RNGSUMS ([0-9a-f]{32}) ([0-9a-f]{32})/m.exec(out);
    t.truthy(sums, out.slice(-2000));
    t.not(sums![1], sums![2], 'two reads differ');
    t.true(Number(/^RNGGZ (\d+)/m.exec(out)?.[1]) > 65000, 'entropy does not compress');
    t.regex(out, /virtio\d+-(config|requests)/, 'MSI-X vectors of the device in /proc/interrupts');
    const events = readMonitorFile(monitor).map((e) => `${e.source}:${e.event}:${e.properties?.id ?? ''}`);
    t.true(events.includes('virtio-device:activated:__rng'), events.join(' '));
  } finally {
    vm.kill();
  }
});
