// Lab tier: virtio devices on PCI under a real Debian kernel. The guest's own virtio_pci driver
// finds the functions, negotiates, sets up its queues with MSI-X, and reads through them.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { guestCmdline } from '../lab/qemu-peer';
import { readMonitorFile } from '../support/monitor-file';
import { ternRemote, waitForPath } from '../support/processes';
import { GuestProcess, fixture } from './guest-process';

const BOOT_TIMEOUT = 240_000;
/**
 * The guests here take tens of thousands of interrupts. Under the nested lab's emulated SVM, a
 * guest given the host's whole CPUID now and then stops in a loop of page faults at a kernel
 * address with an L1 physical address in its CR3 (the emulation's fault: neither QEMU's guest
 * with `-cpu host` nor ours under a profile did, over tens of MiB of entropy each), so
 * these guests run under a CPU profile, a configuration users have too.
 */
const CPUS = 'boot=1,profile=x86-64-v2';
const MIB = 1024 * 1024;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-linux-virtio-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

// What the guest checks: the PCI function Linux found, the hwrng it registered, 64 KiB read
// whole, and two reads that differ and do not compress (entropy, not a constant). Linux asks
// for 64 bytes per request, one kick and one interrupt each: a MiB is 16,384 round trips,
// 31 to 55 s in the nested lab (QEMU's: 7 to 12 s), and one CI run spent this test's whole
// 240 s in it. A few thousand round trips show the device works as well.
const RNG_PROBE = [
  'for d in /sys/bus/pci/devices/*; do echo "PCIDEV $(cat $d/vendor) $(cat $d/device) $(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null)"; done',
  'echo "RNGCUR $(cat /sys/class/misc/hw_random/rng_current)"',
  // (one 64 KiB read, counted and then compressed: each read of the device is slow in the lab)
  'head -c 65536 /dev/hwrng > /tmp/rng',
  'echo "RNGBYTES $(wc -c < /tmp/rng)"',
  'echo "RNGSUMS $(head -c 4096 /dev/hwrng | md5sum | cut -c1-32) $(head -c 4096 /dev/hwrng | md5sum | cut -c1-32)"',
  'echo "RNGGZ $(gzip -c /tmp/rng | wc -c)"',
  'grep -i virtio /proc/interrupts | head -4',
].join('; ');

test.serial('virtio-rng: the guest finds the PCI function, its hwrng gives 64 KiB of entropy, the monitor reports the activation', async (t) => {
  const monitor = path.join(tmp, 'rng.events');
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'),
    '--cmdline', guestCmdline({ cmd: RNG_PROBE }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', 'tty', '--console', 'off',
    '--rng', 'src=/dev/urandom', '--event-monitor', `path=${monitor}`,
  ]);
  try {
    const { code } = await vm.exit(BOOT_TIMEOUT);
    t.is(code, 0, `${vm.output.slice(-3000)}\n${vm.stderr.slice(-2000)}`);
    const out = vm.output;
    t.regex(out, /^PCIDEV 0x1af4 0x1044 virtio-pci\r?$/m, 'Linux bound virtio-pci to the entropy device');
    t.regex(out, /^RNGCUR virtio_rng\.0\r?$/m);
    t.is(Number(/^RNGBYTES (\d+)/m.exec(out)?.[1]), 64 * 1024, 'all of 64 KiB read');
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

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const md5 = (b: Uint8Array) => createHash('md5').update(b).digest('hex');

// The guest mounts the ext4 disk and writes to it, checks the read-only disk refuses writes,
// and writes raw data to the qcow2 disk, reading it back past its page cache.
const DISK_PROBE = [
  'mkdir -p /mnt/d',
  'mount -t ext4 /dev/vda /mnt/d && echo hello-from-tern > /mnt/d/hello.txt && head -c 4194304 /dev/urandom > /mnt/d/blob && echo "BLOB $(md5sum /mnt/d/blob | cut -c1-32)" && umount /mnt/d && echo EXT4-DONE',
  'echo "VDA-SERIAL $(cat /sys/block/vda/serial)"',
  'echo "VDB-RO $(cat /sys/block/vdb/ro)"',
  'echo "VDB-SUM $(md5sum /dev/vdb | cut -c1-32)"',
  'dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; echo "VDB-WRITE $?"',
  'head -c 8388608 /dev/urandom > /tmp/x; echo "QC-SUM $(md5sum /tmp/x | cut -c1-32)"',
  'dd if=/tmp/x of=/dev/vdc bs=1M 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches',
  'echo "QC-BACK $(head -c 8388608 /dev/vdc | md5sum | cut -c1-32)"',
].join('; ');

test.serial('virtio-blk: an ext4 raw disk, a read-only disk and a qcow2 disk, written by the guest and checked by the host', async (t) => {
  const raw = path.join(tmp, 'raw.img');
  const ro = path.join(tmp, 'ro.img');
  const qcow = path.join(tmp, 'disk.qcow2');
  fs.writeFileSync(raw, Buffer.alloc(0));
  fs.truncateSync(raw, 64 * MIB);
  sh('mkfs.ext4', ['-q', '-F', raw]);
  const roBytes = Buffer.alloc(8 * MIB);
  for (let i = 0; i < roBytes.length; i += 4) roBytes.writeUInt32LE(i * 2654435761 >>> 0, i);
  fs.writeFileSync(ro, roBytes);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '64M']);

  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'),
    '--cmdline', guestCmdline({ cmd: DISK_PROBE }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', 'tty', '--console', 'off',
    '--disk', `path=${raw},serial=tern-raw-0`, `path=${ro},readonly=on`, `path=${qcow},image_type=qcow2`,
  ]);
  try {
    const { code } = await vm.exit(BOOT_TIMEOUT);
    const out = vm.output;
    t.is(code, 0, `${out.slice(-3000)}\n${vm.stderr.slice(-2000)}`);
    t.regex(out, /^EXT4-DONE\r?$/m, out.slice(-3000));
    t.regex(out, /^VDA-SERIAL tern-raw-0\r?$/m, 'GET_ID answers the serial');
    // The host sees what the guest wrote, and the file system is clean.
    t.is(sh('debugfs', ['-R', 'cat /hello.txt', raw]).trim(), 'hello-from-tern');
    const dumped = path.join(tmp, 'blob');
    sh('debugfs', ['-R', `dump /blob ${dumped}`, raw]);
    t.is(md5(fs.readFileSync(dumped)), /^BLOB ([0-9a-f]{32})/m.exec(out)?.[1] ?? 'no BLOB line');
    t.notThrows(() => sh('fsck.ext4', ['-n', '-f', raw]), 'fsck finds nothing');
    // The read-only disk reads as the host wrote it, refuses the guest's write, and is unchanged.
    t.regex(out, /^VDB-RO 1\r?$/m);
    t.is(/^VDB-SUM ([0-9a-f]{32})/m.exec(out)?.[1], md5(roBytes));
    t.regex(out, /^VDB-WRITE [1-9]\d*\r?$/m, 'dd to the read-only disk fails');
    t.is(md5(fs.readFileSync(ro)), md5(roBytes));
    // The qcow2 image holds what the guest wrote and qemu-img finds it clean.
    const qcSum = /^QC-SUM ([0-9a-f]{32})/m.exec(out)?.[1] ?? 'no QC-SUM line';
    t.is(/^QC-BACK ([0-9a-f]{32})/m.exec(out)?.[1], qcSum, 'the guest reads back what it wrote');
    const check = JSON.parse(sh('qemu-img', ['check', '--output=json', qcow])) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
    t.is(check.corruptions ?? 0, 0);
    t.is(check['check-errors'] ?? 0, 0);
    const converted = path.join(tmp, 'qcow.raw');
    sh('qemu-img', ['convert', '-O', 'raw', qcow, converted]);
    t.is(md5(fs.readFileSync(converted).subarray(0, 8 * MIB)), qcSum, 'qemu-img reads the guest\'s data from the qcow2 image');
  } finally {
    vm.kill();
  }
});


// hvc0 carries a shell: the serial port writes to a file, the console is tern's own stdin and
// stdout, and what is typed there reaches the guest's shell on hvc0 and is answered there.
const HVC_SHELL = 'echo "HVC-DEV $(cat /sys/class/tty/hvc0/dev)"; echo HVC-READY > /dev/hvc0; exec sh -i </dev/hvc0 >/dev/hvc0 2>&1';

test.serial('virtio-console: a shell on hvc0 answers what is typed on the console, the serial port writes elsewhere', async (t) => {
  const serial = path.join(tmp, 'hvc.serial');
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', guestCmdline({ cmd: HVC_SHELL }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', `file=${serial}`, '--console', 'tty',
  ]);
  try {
    await vm.waitFor(/HVC-READY/, BOOT_TIMEOUT);
    vm.type('echo "HVC-$((6*7))"\n');
    await vm.waitFor(/HVC-42/, 60_000);
    // More input at once than one receive buffer holds (Linux posts them a page each): ten
    // lines of 1000 bytes into a file, ended by Ctrl-D, all arrive.
    // (typed once cat runs, so the shell's line editor reads none of it)
    const from = vm.output.length;
    vm.type('echo "CAT-$((1+1))"; cat > /tmp/in; echo "LEN-$(wc -c < /tmp/in)"\n');
    await vm.waitFor(/CAT-2/, 60_000, from);
    vm.type(`${'x'.repeat(999)}\n`.repeat(10) + '\x04');
    await vm.waitFor(/LEN-10000/, 60_000);
    vm.type('poweroff -f\n');
    const { code } = await vm.exit(BOOT_TIMEOUT);
    t.is(code, 0);
    const serialText = fs.readFileSync(serial, 'latin1');
    t.regex(serialText, /HVC-DEV \d+:\d+/, 'the guest registered hvc0; ttyS0 wrote to the serial file');
    t.notRegex(vm.output, /TERN-GUEST-USERSPACE/, 'the serial port\'s output is not on the console');
  } finally {
    vm.kill();
  }
});

/** Read the pty slave `fd` (non-blocking) until `re` matches what came; returns all of it. */
async function readPtyUntil(fd: number, re: RegExp, timeoutMs: number): Promise<string> {
  let text = '';
  const buf = Buffer.alloc(4096);
  const deadline = Date.now() + timeoutMs;
  while (!re.test(text)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${re} on the pty; read so far: ${JSON.stringify(text.slice(-500))}`);
    try {
      text += buf.subarray(0, fs.readSync(fd, buf)).toString('latin1');
    } catch {
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  return text;
}

test.serial('virtio-console on a pty: vm.info names the pseudo-terminal, and a shell on hvc0 answers through it', async (t) => {
  const socket = path.join(tmp, 'pty.sock');
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', guestCmdline({ cmd: HVC_SHELL }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', 'tty', '--console', 'pty', '--api-socket', `path=${socket}`,
  ]);
  let slave: number | undefined;
  try {
    await vm.waitFor(/HVC-DEV/, BOOT_TIMEOUT);
    await waitForPath(socket);
    const info = JSON.parse(await ternRemote(socket, 'info')) as { config: { console: { mode: string; file?: string } } };
    t.is(info.config.console.mode, 'Pty');
    t.regex(info.config.console.file ?? '', /^\/dev\/pts\/\d+$/, 'vm.info gives the pty as the console\'s file');
    slave = fs.openSync(info.config.console.file!, fs.constants.O_RDWR | fs.constants.O_NOCTTY | fs.constants.O_NONBLOCK);
    // (HVC-READY was written before the slave was opened: the pty kept it)
    await readPtyUntil(slave, /HVC-READY/, 60_000);
    fs.writeSync(slave, 'echo "PTY-$((6*7))"\n');
    await readPtyUntil(slave, /PTY-42/, 60_000);
    fs.writeSync(slave, 'poweroff -f\n');
    const { code } = await vm.exit(BOOT_TIMEOUT);
    t.is(code, 0);
  } finally {
    if (slave !== undefined) fs.closeSync(slave);
    vm.kill();
  }
});

// A loop that writes (and syncs) a file on the ext4 disk every 100 ms and says so on the
// console, with entropy from the hwrng in each write: both devices have requests in flight
// when the VM is paused. The shell stays on the console for what comes after.
const DISK_LOOP =
  'mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && ' +
  '(i=0; while :; do i=$((i+1)); head -c 4096 /dev/hwrng > /mnt/d/w.$((i % 8)); echo $i >> /mnt/d/log; sync; echo "DW $i"; echo "HV $i" > /dev/hvc0; sleep 0.1; done) & ' +
  'echo $! > /tmp/loop.pid; exec sh -i';

const dwIn = (out: string) => [...out.matchAll(/^DW (\d+)\r?\n/gm)].map((m) => Number(m[1]));

test.serial('snapshot and restore of a guest writing to its disk: the loop goes on, the file system is clean', async (t) => {
  const image = path.join(tmp, 'loop.img');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, 64 * MIB);
  sh('mkfs.ext4', ['-q', '-F', image]);
  const socket = path.join(tmp, 'loop.sock');
  const snap = path.join(tmp, 'loop-snap');
  const hvcFile = path.join(tmp, 'loop.hvc');
  const devices = ['--disk', `path=${image}`, '--rng', 'src=/dev/urandom', '--console', `file=${hvcFile}`];
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', guestCmdline({ cmd: DISK_LOOP }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', 'tty', '--api-socket', `path=${socket}`, ...devices,
  ]);
  let before: number[];
  let beforeOutput = '';
  try {
    await vm.waitFor(/^DW 20\r?$/m, BOOT_TIMEOUT);
    await waitForPath(socket);
    await ternRemote(socket, 'pause');
    await ternRemote(socket, 'snapshot', `file://${snap}`);
    const counters = JSON.parse(await ternRemote(socket, 'counters')) as Record<string, Record<string, number>>;
    t.true((counters._disk0?.write_ops ?? 0) > 20, `the disk counted its writes: ${JSON.stringify(counters._disk0)}`);
  } finally {
    vm.kill();
    await vm.exited;
    beforeOutput = vm.output;
    before = dwIn(beforeOutput);
  }
  // The VMM is gone (SIGKILL, its image lock with it); a new one takes the VM from the snapshot.
  // (the console keeps the snapshot's file: hvc0 goes on writing to it)
  const restored = GuestProcess.tern(['--restore', `source_url=file://${snap},resume=on`, '--serial', 'tty']);
  try {
    const last = before[before.length - 1];
    await restored.waitFor(new RegExp(`^DW ${last + 10}\\r?$`, 'm'), BOOT_TIMEOUT);
    const after = dwIn(restored.output);
    // The pause may land inside a line ("DW 2" printed, "5" not yet): the restored guest prints
    // the rest of it first. The two consoles together are the guest's one byte stream.
    t.true(after[0] <= last + 2, `the loop continues where it was (${last} before, ${after[0]} first after)`);
    const across = dwIn(beforeOutput + restored.output);
    t.deepEqual(across, across.map((_, i) => across[0] + i), 'and counts on across the restore without a gap or a repeat');
    // The loop's last command (head, sync, sleep) may outlive it for a moment and keep the
    // file system busy: unmount is tried again until it is free.
    restored.type('p=$(cat /tmp/loop.pid); kill $p; while kill -0 $p 2>/dev/null; do sleep 0.1; done; for n in 1 2 3 4 5 6 7 8 9 10; do umount /mnt/d 2>/dev/null && echo UMOUNT-OK && break; sleep 0.5; done; poweroff -f\n');
    await restored.waitFor(/^UMOUNT-OK\r?$/m, BOOT_TIMEOUT);
    await restored.exit(BOOT_TIMEOUT);
  } finally {
    restored.kill();
  }
  t.notThrows(() => sh('fsck.ext4', ['-n', '-f', image]), 'fsck finds nothing');
  // hvc0 wrote the same count to its file before and after the restore, with no gap.
  const hv = [...fs.readFileSync(hvcFile, 'latin1').matchAll(/^HV (\d+)$/gm)].map((m) => Number(m[1]));
  t.true(hv.length > before!.length, `hvc0 lines after the restore too (${hv.length})`);
  t.deepEqual(hv, hv.map((_, i) => hv[0] + i), 'hvc0 counts on without a gap across the restore');
  const log = sh('debugfs', ['-R', 'cat /log', image]).trim().split('\n').map(Number);
  t.deepEqual(log, log.map((_, i) => i + 1), 'the log on disk holds every iteration once, in order');
});

// The devices migrate with the store: a guest reading its hwrng and writing its hvc0 in a loop,
// with a read-only disk it checksums and a writable one it writes a sector to each time, moves
// to a VMM started with only its API socket on the same host: the source hands the writable
// image's lock over while the guest is paused.
const RNG_LOOP =
  '(i=0; while :; do i=$((i+1)); head -c 4096 /dev/hwrng > /tmp/r; printf "WR %08d\\n" $i | dd of=/dev/vdb bs=512 seek=$i conv=sync,fsync 2>/dev/null; ' +
  'echo "MG $i $(md5sum < /dev/vda | cut -c1-8)"; echo "HV $i" > /dev/hvc0; sleep 0.1; done) & exec sh -i';

test.serial('live migration of a guest with its entropy device, console and disks: the loop goes on at the destination, every device serving', async (t) => {
  const ro = path.join(tmp, 'mig-ro.img');
  fs.writeFileSync(ro, Buffer.alloc(1 * MIB, 0x5a));
  const rw = path.join(tmp, 'mig-rw.img');
  fs.writeFileSync(rw, Buffer.alloc(4 * MIB));
  const hvcFile = path.join(tmp, 'mig.hvc');
  const srcSock = path.join(tmp, 'mig-src.sock');
  const dstSock = path.join(tmp, 'mig-dst.sock');
  const url = `unix:${path.join(tmp, 'mig.stream')}`;
  const src = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', guestCmdline({ cmd: RNG_LOOP }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', 'tty', '--api-socket', `path=${srcSock}`,
    '--rng', 'src=/dev/urandom', '--console', `file=${hvcFile}`, '--disk', `path=${ro},readonly=on`, '--disk', `path=${rw}`,
    // (info lines too: a failure shows what the VMM saw, a guest reset's cause among them)
    '-v',
  ]);
  const dst = GuestProcess.tern(['--api-socket', `path=${dstSock}`, '-v']);
  try {
    await src.waitFor(/MG 10 /, BOOT_TIMEOUT);
    await waitForPath(dstSock);
    const received = ternRemote(dstSock, 'receive-migration', url);
    await waitForPath(url.slice('unix:'.length));
    try {
      // (both at once: a failed send ends the receive too, and that must not go unhandled: a
      // stray rejection fails the file twice more, and the lab then retries none of it)
      await Promise.all([ternRemote(srcSock, 'send-migration', url), received]);
    } catch (e) {
      // (a guest that reset itself during the migration says why on its console or in the log)
      throw new Error(`${(e as Error).message}\nsource console (tail):\n${src.output.slice(-2000)}\nsource log (tail):\n${src.stderr.slice(-4000)}\ndestination log (tail):\n${dst.stderr.slice(-2000)}`);
    }
    t.is((await src.exit(BOOT_TIMEOUT)).code, 0, 'the source VMM exits once the destination runs the guest');
    const lastAtSource = Math.max(...[...src.output.matchAll(/MG (\d+) /g)].map((m) => Number(m[1])));
    await dst.waitFor(new RegExp(`MG ${lastAtSource + 10} `), BOOT_TIMEOUT);
    // (not anchored: the shell's prompt may come first on a line)
    const mg = [...(src.output + dst.output).matchAll(/MG (\d+) ([0-9a-f]{8})\r?$/gm)];
    const counts = mg.map((m) => Number(m[1]));
    t.deepEqual(counts, counts.map((_, i) => 1 + i), 'the loop counts on at the destination without a gap or a repeat');
    t.deepEqual([...new Set(mg.map((m) => m[2]))], [md5(fs.readFileSync(ro)).slice(0, 8)], 'the disk reads the same on both sides');
    const hv = [...fs.readFileSync(hvcFile, 'latin1').matchAll(/^HV (\d+)$/gm)].map((m) => Number(m[1]));
    t.true(hv[hv.length - 1] > lastAtSource, 'hvc0 writes on from the destination');
    t.deepEqual(hv, hv.map((_, i) => 1 + i), 'hvc0 counts without a gap across the migration');
    dst.type('poweroff -f\n');
    t.is((await dst.exit(BOOT_TIMEOUT)).code, 0);
    // Every iteration the console showed wrote its sector first, at the source or the destination.
    const image = fs.readFileSync(rw);
    const missing = counts.filter((i) => image.subarray(512 * i, 512 * i + 12).toString('latin1') !== `WR ${String(i).padStart(8, '0')}\n`);
    t.deepEqual(missing, [], 'the writable disk holds the sector of every iteration, before and after the move');
  } finally {
    src.kill();
    dst.kill();
  }
});
