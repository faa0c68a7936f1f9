// Lab tier: virtio-net on a tap under a real Debian kernel. Tern creates the tap and gives its
// host side an address; the guest's virtio_net driver brings up eth0, pings the host, and moves
// 100 MiB each way over TCP to servers in this test, which compare checksums.
import test from 'ava';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { guestCmdline } from '../lab/qemu-peer';
import { ternRemote, waitForPath } from '../support/processes';
import { GuestProcess, fixture } from './guest-process';

const BOOT_TIMEOUT = 240_000;
const TRANSFER_TIMEOUT = 600_000;
/** As in virtio.test.ts: the lab's emulated SVM is steadier with a CPU profile under heavy interrupt load. */
const CPUS = 'boot=1,profile=x86-64-v2';
const MIB = 1024 * 1024;
const SIZE = 100 * MIB;
const HOST_IP = '192.168.249.1';
const GUEST_IP = '192.168.249.2';
const GUEST_MAC = '52:54:00:7e:4e:01';
const TAP = 'terntap0';
const TO_HOST = 5001;
const FROM_HOST = 5002;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-linux-net-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

const NET_PROBE = [
  `ifconfig eth0 ${GUEST_IP} netmask 255.255.255.0 up`,
  'echo "MAC $(cat /sys/class/net/eth0/address)"',
  `ping -c 3 -W 10 ${HOST_IP} >/dev/null && echo PING-OK`,
  `head -c ${SIZE} /dev/urandom > /tmp/big; echo "TOHOST-SUM $(md5sum /tmp/big | cut -c1-32)"`,
  'echo NET-READY; read go',
  `nc ${HOST_IP} ${TO_HOST} < /tmp/big; echo TOHOST-DONE; rm /tmp/big`,
  `echo "FROMHOST-SUM $(nc ${HOST_IP} ${FROM_HOST} | md5sum | cut -c1-32)"`,
].join('; ');

/** Listen on the tap's address: one connection, whose bytes are hashed until `size` have come, then closed. */
function receiver(port: number, size: number): { listening: Promise<void>; done: Promise<{ bytes: number; md5: string }>; close(): void } {
  let resolve!: (v: { bytes: number; md5: string }) => void;
  const done = new Promise<{ bytes: number; md5: string }>((r) => (resolve = r));
  const server = net.createServer((sock) => {
    const hash = createHash('md5');
    let bytes = 0;
    sock.on('data', (d: Buffer) => {
      hash.update(d);
      bytes += d.length;
      if (bytes >= size) sock.end();
    });
    sock.on('close', () => resolve({ bytes, md5: hash.digest('hex') }));
    sock.on('error', () => undefined);
  });
  const listening = new Promise<void>((r) => server.listen(port, HOST_IP, r));
  return { listening, done, close: () => server.close() };
}

/** Listen on the tap's address: send `size` random bytes to the one connection, then end it; resolves their md5. */
function sender(port: number, size: number): { listening: Promise<void>; md5: Promise<string>; close(): void } {
  let resolve!: (v: string) => void;
  const md5 = new Promise<string>((r) => (resolve = r));
  const server = net.createServer((sock) => {
    const hash = createHash('md5');
    let sent = 0;
    const pump = () => {
      while (sent < size) {
        const chunk = randomBytes(Math.min(MIB, size - sent));
        hash.update(chunk);
        sent += chunk.length;
        if (!sock.write(chunk)) return void sock.once('drain', pump);
      }
      sock.end(() => resolve(hash.digest('hex')));
    };
    sock.on('error', () => undefined);
    pump();
  });
  const listening = new Promise<void>((r) => server.listen(port, HOST_IP, r));
  return { listening, md5, close: () => server.close() };
}

test.serial('virtio-net: the guest pings the tap, moves 100 MiB each way over TCP with matching checksums, and the card counts them', async (t) => {
  const socket = path.join(tmp, 'net.sock');
  const vm = GuestProcess.tern([
    '--kernel', fixture('vmlinux'), '--initramfs', fixture('initramfs.img'), '--cmdline', guestCmdline({ cmd: NET_PROBE }),
    '--cpus', CPUS, '--memory', 'size=512M', '--serial', 'tty', '--console', 'off', '--api-socket', `path=${socket}`,
    '--net', `tap=${TAP},ip=${HOST_IP},mask=255.255.255.0,mac=${GUEST_MAC}`,
  ]);
  const toHost = receiver(TO_HOST, SIZE);
  const fromHost = sender(FROM_HOST, SIZE);
  try {
    await vm.waitFor(/^NET-READY\r?$/m, BOOT_TIMEOUT);
    const out = vm.output;
    t.regex(out, new RegExp(`^MAC ${GUEST_MAC}\\r?$`, 'm'), 'the guest has the configured MAC');
    t.regex(out, /^PING-OK\r?$/m, 'the guest pings the host side of the tap');
    // The servers listen on the tap's address, which exists now.
    await Promise.all([toHost.listening, fromHost.listening]);
    vm.type('go\n');
    const got = await Promise.race([toHost.done, vm.waitFor(/^TOHOST-DONE\r?$/m, TRANSFER_TIMEOUT).then(() => toHost.done)]);
    t.is(got.bytes, SIZE, 'guest to host: every byte arrived');
    t.is(got.md5, /^TOHOST-SUM ([0-9a-f]{32})/m.exec(vm.output)?.[1] ?? 'no TOHOST-SUM line', 'guest to host: the checksum matches');
    const [sum] = await vm.waitFor(/^FROMHOST-SUM [0-9a-f]{32}/m, TRANSFER_TIMEOUT);
    t.is(sum.slice('FROMHOST-SUM '.length), await fromHost.md5, 'host to guest: the checksum matches');
    await waitForPath(socket);
    const counters = JSON.parse(await ternRemote(socket, 'counters')) as Record<string, Record<string, number>>;
    t.true((counters._net0?.tx_bytes ?? 0) >= SIZE, `tx counted: ${JSON.stringify(counters._net0)}`);
    t.true((counters._net0?.rx_bytes ?? 0) >= SIZE, `rx counted: ${JSON.stringify(counters._net0)}`);
    const { code } = await vm.exit(BOOT_TIMEOUT);
    t.is(code, 0, vm.stderr.slice(-2000));
  } finally {
    toHost.close();
    fromHost.close();
    vm.kill();
  }
  t.false(fs.existsSync(`/sys/class/net/${TAP}`), 'the tap Tern created went with it');
});
