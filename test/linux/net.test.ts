// Lab tier: virtio-net on a tap under a real Debian kernel, through a snapshot, a restore and a
// live migration on this host. Tern creates a two-pair tap and gives its host side an address;
// the guest (two vCPUs, so its driver enables both pairs) brings up eth0, pings the host and
// streams numbered lines to a server in this test over TCP, while the host sends datagrams
// from many ports, which the tap spreads over its queues. The VMM is snapshotted and killed
// (its tap goes with it), a new one restores the guest on a tap the restore names, and migrates
// it to a third VMM that opens the same tap beside it; the one connection goes on throughout.
// A second guest migrates with its card over TCP from one network namespace to another (two
// "hosts"): the receiving host makes the tap again, and the guest reaches that host over it.
// (The 100 MiB transfers in each direction are in test/acceptance/net.test.ts,
// `npm run test:net-lab`.)
import test from 'ava';
import dgram from 'node:dgram';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { guestCmdline } from '../lab/qemu-peer';
import { execFileSync } from 'node:child_process';
import { ternRemote, waitForPath } from '../support/processes';
import { GuestProcess, TERN_CLI, fixture } from './guest-process';
import { migrate } from '../support/tern-migration';
import { createTwoHosts } from './two-hosts';
import { GUEST_IP, GUEST_MAC, HOST_IP, TAP, listenOn, tcpServer } from './net-peer';

const BOOT_TIMEOUT = 240_000;
/** As in virtio.test.ts: the lab's emulated SVM is steadier with a CPU profile under heavy interrupt load. */
const CPUS = 'boot=2,profile=x86-64-v2';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-linux-net-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

const STREAM = 5003;
const RESTORED_TAP = 'terntap1';
const HOST_MAC = '02:74:65:72:6e:02';
const STREAM_PROBE = [
  `ifconfig eth0 ${GUEST_IP} netmask 255.255.255.0 up`,
  `ping -c 1 -W 10 ${HOST_IP} >/dev/null && echo PING-OK`,
  'echo NET-READY; read go',
  `i=0; while :; do i=$((i+1)); echo "T $i"; sleep 0.2; done | nc ${HOST_IP} ${STREAM}`,
].join('; ');

/** The card's state in a snapshot: its active pairs and each queue's used index. */
function cardInSnapshot(dir: string): { activePairs?: number; used: number[] } {
  const env = JSON.parse(fs.readFileSync(path.join(dir, 'state.json'), 'utf8')) as { state: { devices: { instances: Record<string, { functions?: Record<string, unknown> }> } } };
  const fns = Object.values(env.state.devices.instances).flatMap((d) => Object.values(d.functions ?? {})) as {
    kind: string;
    device: { activePairs?: number };
    virtio: { queues: { nextUsed: number }[] };
  }[];
  const card = fns.find((f) => f.kind === 'virtio-net');
  if (!card) throw new Error('no virtio-net function in the snapshot');
  return { activePairs: card.device.activePairs, used: card.virtio.queues.map((q) => q.nextUsed) };
}

/** Datagrams to the guest from `flows` source ports: the tap picks a queue per flow. */
async function datagramsFromPorts(flows: number): Promise<void> {
  for (let i = 0; i < flows; i++) {
    const s = dgram.createSocket('udp4');
    await new Promise<void>((resolve) => s.bind(41000 + i, HOST_IP, () => resolve()));
    for (let k = 0; k < 4; k++) await new Promise<void>((resolve) => s.send(Buffer.from(`flow ${i}`), 9, GUEST_IP, () => resolve()));
    s.close();
  }
}

test.serial('a two-pair card through snapshot, restore and a local live migration: both pairs carry frames, the new VMMs open the tap again, the guest\'s TCP connection goes on', async (t) => {
  const socket = path.join(tmp, 'stream.sock');
  const restoredSock = path.join(tmp, 'restored.sock');
  const dstSock = path.join(tmp, 'dst.sock');
  const url = `unix:${path.join(tmp, 'mig.stream')}`;
  const snap = path.join(tmp, 'stream-snap');
  // host_mac: the tap made again has the MAC the guest's ARP cache holds.
  const netArg = `tap=${TAP},ip=${HOST_IP},mask=255.255.255.0,mac=${GUEST_MAC},host_mac=${HOST_MAC},num_queues=4`;
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
  const linesOn = async (what: string, more: number) => {
    const now = counts();
    const last = now[now.length - 1];
    await until(`line ${last + more} ${what}`, () => counts().some((n) => n >= last + more), BOOT_TIMEOUT);
  };
  let restored: GuestProcess | undefined;
  let dst: GuestProcess | undefined;
  try {
    await vm.waitFor(/^NET-READY\r?$/m, BOOT_TIMEOUT);
    await listenOn(server, STREAM);
    vm.type('go\n');
    await until('10 lines from the guest', () => counts().length >= 10, BOOT_TIMEOUT);
    await datagramsFromPorts(16);
    await waitForPath(socket);
    await ternRemote(socket, 'pause');
    await ternRemote(socket, 'snapshot', `file://${snap}`);
    vm.kill();
    await vm.exited;
    const card = cardInSnapshot(snap);
    t.is(card.activePairs, 2, 'the driver enabled both pairs on the control queue');
    t.true(card.used[0] > 0 && card.used[2] > 0, `both receive queues took frames (used: ${card.used.join(', ')})`);
    t.log(`queues' used indexes at the snapshot: ${card.used.join(', ')}`);
    t.false(fs.existsSync(`/sys/class/net/${TAP}`), 'the tap went with the VMM');

    // The restoring client picks the tap (a host setting): the card opens it, with the config's address and MACs.
    restored = GuestProcess.tern(['--restore', `source_url=file://${snap},resume=on`, '--serial', 'tty', '--api-socket', `path=${restoredSock}`, '--net', `id=_net0,tap=${RESTORED_TAP}`]);
    await linesOn('after the restore', 20);
    t.true(fs.existsSync(`/sys/class/net/${RESTORED_TAP}`), 'the restored card is on the tap the restore named');

    dst = GuestProcess.tern(['--api-socket', `path=${dstSock}`]);
    await waitForPath(dstSock);
    await waitForPath(restoredSock);
    const received = ternRemote(dstSock, 'receive-migration', url);
    await waitForPath(url.slice('unix:'.length));
    // (both at once: a failed send ends the receive too, and that must not go unhandled)
    await Promise.all([ternRemote(restoredSock, 'send-migration', url), received]);
    t.is((await restored.exit(BOOT_TIMEOUT)).code, 0, 'the source VMM exits once the destination runs the guest');
    await linesOn('after the migration', 20);

    const all = counts();
    t.deepEqual(all, all.map((_, i) => 1 + i), 'the guest\'s lines arrive in order, none lost, none twice');
    t.is(connections, 1, 'over the one TCP connection it had before the snapshot');
  } finally {
    server.close();
    vm.kill();
    restored?.kill();
    dst?.kill();
  }
});

// Between hosts: the destination's host has its own network stack, where no tap of the card's
// name exists; the card's config (tap, host address, host MAC) travels with the VM, and the
// destination makes the tap again there. The guest pings the host's tap address all along.
test.serial('a guest with a card migrates over TCP to another host: the tap is made again there, and the guest reaches that host through it', async (t) => {
  const hosts = createTwoHosts();
  const end = (label: string) => ({ socket: path.join(tmp, `hosts-${label}.sock`), monitor: path.join(tmp, `hosts-${label}.events`) });
  const pinger = [
    `ifconfig eth0 ${GUEST_IP} netmask 255.255.255.0 up`,
    `i=0; while :; do i=$((i+1)); if ping -c 1 -W 2 ${HOST_IP} >/dev/null; then echo "P $i ok"; else echo "P $i lost"; fi; sleep 0.3; done`,
  ].join('; ');
  const inHost = (h: typeof hosts.a, e: ReturnType<typeof end>, args: string[]) =>
    new GuestProcess(hosts.exec(h)[0], [...hosts.exec(h).slice(1), process.execPath, TERN_CLI, ...args, '--api-socket', `path=${e.socket}`, '--event-monitor', `path=${e.monitor}`]);
  const tapIn = (h: typeof hosts.a) => {
    try {
      return execFileSync('ip', ['-n', h.netns, '-o', '-4', 'addr', 'show', 'dev', TAP], { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
    } catch {
      return ''; // no such device
    }
  };
  const hostAddress = new RegExp(`inet ${HOST_IP.replace(/\./g, '\\.')}/24`);
  const pings = (output: string) => [...output.matchAll(/^P (\d+) (ok|lost)\r?$/gm)].map((m) => ({ n: Number(m[1]), ok: m[2] === 'ok' }));
  const srcEnd = end('src');
  const dstEnd = end('dst');
  const src = inHost(hosts.a, srcEnd, [
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', guestCmdline({ cmd: pinger }),
    '--cpus', CPUS, '--memory', 'size=256M', '--serial', 'tty', '--console', 'off',
    '--net', `tap=${TAP},ip=${HOST_IP},mask=255.255.255.0,mac=${GUEST_MAC},host_mac=${HOST_MAC}`,
  ]);
  let dst: GuestProcess | undefined;
  try {
    await src.waitFor(/^P \d+ ok\r?$/m, BOOT_TIMEOUT);
    t.regex(tapIn(hosts.a), hostAddress, 'the source host has the tap');
    t.is(tapIn(hosts.b), '', 'the destination host has no such tap yet');
    dst = inHost(hosts.b, dstEnd, []);
    await waitForPath(dstEnd.socket, 60_000);
    await waitForPath(srcEnd.socket);
    const url = `tcp:${hosts.b.address}:4290`;
    const o = await migrate({ vm: src, ...srcEnd }, { vm: dst, ...dstEnd }, { receiverUrl: url, destinationUrl: url, timeoutMs: BOOT_TIMEOUT });
    t.is(o.sendStatus, 204, o.sendBody);
    t.is(o.receiveStatus, 204, `${o.receiveBody}\ndestination stderr: ${dst.stderr.slice(-1500)}`);
    t.is((await src.exit(BOOT_TIMEOUT)).code, 0, 'the source VMM exits once the destination runs the guest');
    t.is(tapIn(hosts.a), '', 'the tap the source made went with it');
    t.regex(tapIn(hosts.b), hostAddress, 'the destination made the tap again, with the host address');
    const last = Math.max(...pings(src.output).map((p) => p.n));
    // Five pings answered by the new host, numbered after the ones the source saw.
    const deadline = Date.now() + BOOT_TIMEOUT;
    while (pings(dst.output).filter((p) => p.ok).length < 5) {
      if (Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const after = pings(dst.output);
    t.true(after.length > 0 && after[0].n > last, `the guest went on counting where it was (${last} at the source, ${after[0]?.n} first here)`);
    t.true(after.filter((p) => p.ok).length >= 5, `the guest's pings reach the new host: ${JSON.stringify(after.slice(0, 12))}; console: ${dst.output.slice(-500)}`);
  } finally {
    src.kill();
    dst?.kill();
    await src.exited;
    await dst?.exited;
    hosts.remove();
  }
});
