// Lab tier: virtio-net on a tap under a real Debian kernel, through a snapshot and a restore.
// Tern creates the tap and gives its host side an address; the guest's virtio_net driver brings
// up eth0, pings the host and streams numbered lines to a server in this test over TCP; the VMM
// is snapshotted and killed (its tap goes with it), a new one restores the guest and makes the
// tap again, and the same connection goes on. (The 100 MiB transfers in each direction are in
// test/acceptance/net.test.ts, `npm run test:net-lab`.)
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { guestCmdline } from '../lab/qemu-peer';
import { ternRemote, waitForPath } from '../support/processes';
import { GuestProcess, fixture } from './guest-process';
import { GUEST_IP, GUEST_MAC, HOST_IP, TAP, listenOn, tcpServer } from './net-peer';

const BOOT_TIMEOUT = 240_000;
/** As in virtio.test.ts: the lab's emulated SVM is steadier with a CPU profile under heavy interrupt load. */
const CPUS = 'boot=1,profile=x86-64-v2';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-linux-net-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

const STREAM = 5003;
const HOST_MAC = '02:74:65:72:6e:02';
const STREAM_PROBE = [
  `ifconfig eth0 ${GUEST_IP} netmask 255.255.255.0 up`,
  `ping -c 1 -W 10 ${HOST_IP} >/dev/null && echo PING-OK`,
  'echo NET-READY; read go',
  `i=0; while :; do i=$((i+1)); echo "T $i"; sleep 0.2; done | nc ${HOST_IP} ${STREAM}`,
].join('; ');

test.serial('snapshot and restore of a guest with a net card: the new VMM makes the tap again and the guest\'s TCP connection to the host goes on', async (t) => {
  const socket = path.join(tmp, 'stream.sock');
  const snap = path.join(tmp, 'stream-snap');
  // host_mac: the tap made again has the MAC the guest's ARP cache holds.
  const netArg = `tap=${TAP},ip=${HOST_IP},mask=255.255.255.0,mac=${GUEST_MAC},host_mac=${HOST_MAC}`;
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', guestCmdline({ cmd: STREAM_PROBE }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', 'tty', '--console', 'off', '--api-socket', `path=${socket}`, '--net', netArg,
  ]);
  let connections = 0;
  let text = '';
  const server = tcpServer((sock) => {
    connections++;
    sock.on('data', (d: Buffer) => (text += d.toString('latin1')));
  });
  const counts = () => [...text.matchAll(/^T (\d+)\n/gm)].map((m) => Number(m[1]));
  const until = async (what: string, cond: () => boolean, ms: number) => {
    const end = Date.now() + ms;
    while (!cond()) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}; the host has: ${text.slice(-300)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  let restored: GuestProcess | undefined;
  try {
    await vm.waitFor(/^NET-READY\r?$/m, BOOT_TIMEOUT);
    await listenOn(server, STREAM);
    vm.type('go\n');
    await until('10 lines from the guest', () => counts().length >= 10, BOOT_TIMEOUT);
    await waitForPath(socket);
    await ternRemote(socket, 'pause');
    await ternRemote(socket, 'snapshot', `file://${snap}`);
    vm.kill();
    await vm.exited;
    const before = counts();
    t.false(fs.existsSync(`/sys/class/net/${TAP}`), 'the tap went with the VMM');
    restored = GuestProcess.tern(['--restore', `source_url=file://${snap},resume=on`, '--serial', 'tty']);
    const last = before[before.length - 1];
    await until(`line ${last + 20} after the restore`, () => counts().some((n) => n >= last + 20), BOOT_TIMEOUT);
    const all = counts();
    t.deepEqual(all, all.map((_, i) => 1 + i), 'the guest\'s lines arrive in order, none lost, none twice');
    t.is(connections, 1, 'over the one TCP connection it had before the snapshot');
  } finally {
    server.close();
    vm.kill();
    restored?.kill();
  }
});
