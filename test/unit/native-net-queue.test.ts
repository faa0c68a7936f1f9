// The native virtio-net queue threads against a real tap, without KVM: guest RAM is plain
// memory, the doorbell and the interrupt are eventfds. The test plays the guest's driver and
// the host's network stack plays the peer: a frame the "guest" transmits reaches a host UDP
// socket; a datagram the host sends to the guest's address makes the kernel ask for its MAC
// (ARP), and that request is what the guest receives.
import test from 'ava';
import dgram from 'node:dgram';
import fs from 'node:fs';
import { anonymousGuestMemory, type GuestMemory } from '../../src/memory/guest-memory';
import { EventFdFlags, native, type NativeNetQueue } from '../../src/native/kvm';
import { ringDriver, until, type RingDriver } from './ring-driver';

const SIZE = 16;
const RING = { size: SIZE, desc: 0x0, avail: 0x1000, used: 0x2000 };
const RAM = 1 << 20;
const BUF = 0x10000;
const HOST_MAC = [0x02, 0x74, 0x65, 0x72, 0x6e, 0x01];
const GUEST_MAC = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

let subnet = 40 + (process.pid % 150);
/** A tap of its own for each test, up, with host address 10.213.N.1/24; closing its fds removes it. */
function tap(t: { teardown(fn: () => void): void }, opts: { up?: boolean; queues?: number } = {}): { name: string; fd: number; fds: number[]; host: string; guest: string } {
  const n = subnet++;
  const { name, fds } = native().openTap(`tnt${process.pid % 10000}x${n}`, opts.queues ?? 1);
  t.teardown(() => fds.forEach((fd) => native().closeFd(fd)));
  const host = `10.213.${n}.1`;
  // (no IPv6 on it: its router and neighbour solicitations would be frames the tests did not ask for)
  const v6 = `/proc/sys/net/ipv6/conf/${name}/disable_ipv6`;
  if (fs.existsSync(v6)) fs.writeFileSync(v6, '1');
  native().configureInterface(name, { ip: host, mask: '255.255.255.0', mac: HOST_MAC, up: opts.up ?? true });
  return { name, fd: fds[0], fds, host, guest: `10.213.${n}.2` };
}

interface Queue extends RingDriver {
  mem: GuestMemory;
  dirty: Uint8Array;
  kick: number;
  irq: number;
  queue: NativeNetQueue;
  broken: string[];
}

function serve(t: { teardown(fn: () => void): void }, tapFd: number, receive: boolean, opts: { mergeable?: boolean; eventIdx?: boolean; txHoldUs?: number; txHoldMinFrame?: number } = {}): Queue {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: RAM }]);
  const kick = native().eventfd(0, EventFdFlags.NONBLOCK | EventFdFlags.CLOEXEC);
  const irq = native().eventfd(0, EventFdFlags.NONBLOCK | EventFdFlags.CLOEXEC);
  const broken: string[] = [];
  const range = mem.regions[0].hostRange();
  const queue = native().serveNetQueue(
    { memory: [range], ...RING, eventIdx: opts.eventIdx ?? false, indirect: false, nextAvail: 0, nextUsed: 0, kickFd: kick, interruptFd: irq, tapFd, receive, mergeable: opts.mergeable ?? true, txHoldUs: opts.txHoldUs, txHoldMinFrame: opts.txHoldMinFrame },
    (reason) => broken.push(reason),
  );
  t.teardown(() => {
    queue.stop();
    native().closeFd(kick);
    native().closeFd(irq);
  });
  return { mem, dirty: range.dirty!, kick, irq, queue, broken, ...ringDriver(mem, RING, kick) };
}

const ipv4Sum = (b: Buffer) => {
  let s = 0;
  for (let i = 0; i < b.length; i += 2) s += b.readUInt16BE(i);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
};

/** An Ethernet frame with a UDP datagram from the guest to `dst`:`port` (UDP checksum 0: none). */
function udpFrame(src: string, dst: string, port: number, payload: Buffer): Buffer {
  const ip = Buffer.alloc(20);
  ip.writeUInt8(0x45, 0);
  ip.writeUInt16BE(20 + 8 + payload.length, 2);
  ip.writeUInt8(64, 8);
  ip.writeUInt8(17, 9);
  src.split('.').forEach((o, i) => ip.writeUInt8(Number(o), 12 + i));
  dst.split('.').forEach((o, i) => ip.writeUInt8(Number(o), 16 + i));
  ip.writeUInt16BE(ipv4Sum(ip), 10);
  const udp = Buffer.alloc(8);
  udp.writeUInt16BE(40000, 0);
  udp.writeUInt16BE(port, 2);
  udp.writeUInt16BE(8 + payload.length, 4);
  return Buffer.concat([Buffer.from(HOST_MAC), Buffer.from(GUEST_MAC), Buffer.from([0x08, 0x00]), ip, udp, payload]);
}

async function listen(t: { teardown(fn: () => void): void }, address: string): Promise<{ port: number; got: Buffer[] }> {
  const sock = dgram.createSocket('udp4');
  const got: Buffer[] = [];
  sock.on('message', (m) => got.push(m));
  await new Promise<void>((r) => sock.bind(0, address, r));
  t.teardown(() => sock.close());
  return { port: sock.address().port, got };
}

test('a transmitted frame reaches the host through the tap, is counted, and its chain is used with an interrupt', async (t) => {
  const nic = tap(t);
  const q = serve(t, nic.fd, false);
  const peer = await listen(t, nic.host);
  const payload = Buffer.from('hello from the guest');
  const frame = udpFrame(nic.guest, nic.host, peer.port, payload);
  q.mem.write(BUF, new Uint8Array(12)); // virtio_net_hdr_v1: no offload
  q.mem.write(BUF + 0x100, frame);
  t.deepEqual(q.queue.interrupts(), { sent: 0, lastSentMsAgo: null }, 'none raised before the chain');
  // header and frame in separate buffers, the frame itself split: one writev
  q.post([[BUF, 12, false], [BUF + 0x100, 20, false], [BUF + 0x114, frame.length - 20, false]]);
  await until('the chain to be used', () => q.usedIdx() === 1);
  t.deepEqual(q.used(0), { id: 0, len: 0 });
  t.not(native().eventfdRead(q.irq), null, 'an interrupt');
  // (counted by the thread, for a health report: this interrupt went out)
  await until('the interrupt to be counted', () => q.queue.interrupts().sent === 1);
  t.true((q.queue.interrupts().lastSentMsAgo ?? -1) >= 0);
  await until('the datagram to arrive', () => peer.got.length === 1);
  t.deepEqual(peer.got[0], payload);
  // (named for top -H and perf: which thread serves a queue)
  const names = fs.readdirSync('/proc/self/task').map((tid) => fs.readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim());
  t.true(names.includes('tern net queue'), names.join(', '));
  t.deepEqual(q.queue.stop(), { nextAvail: 1, nextUsed: 1, counters: { rx_bytes: 0, rx_frames: 0, rx_dropped: 0, tx_bytes: frame.length, tx_frames: 1, tx_dropped: 0 }, interrupt: false });
  t.deepEqual(q.broken, []);
});

/** Post the bulk test frame (header, then the frame) on a transmit queue. */
function postFrame(q: Queue, frame: Buffer): void {
  q.mem.write(BUF, new Uint8Array(12));
  q.mem.write(BUF + 0x100, frame);
  q.post([[BUF, 12, false], [BUF + 0x100, frame.length, false]]);
}

test('held transmit completions: a bulk frame goes out at once and its chain goes back with the next burst\'s, under one interrupt; stop() hands back a held chain', async (t) => {
  const nic = tap(t);
  const q = serve(t, nic.fd, false, { txHoldUs: 100_000, txHoldMinFrame: 32 });
  const peer = await listen(t, nic.host);
  const frame = udpFrame(nic.guest, nic.host, peer.port, Buffer.alloc(200, 7));
  postFrame(q, frame);
  await until('the first datagram to arrive', () => peer.got.length === 1);
  t.is(q.usedIdx(), 0, 'its chain is held (for up to 100 ms) while the next burst may come');
  postFrame(q, frame);
  await until('both chains to be used', () => q.usedIdx() === 2);
  await until('the second datagram to arrive', () => peer.got.length === 2);
  t.is(q.queue.interrupts().sent, 1, 'one interrupt for both');
  postFrame(q, frame);
  await until('the third datagram to arrive', () => peer.got.length === 3);
  t.like(q.queue.stop(), { nextAvail: 3, nextUsed: 3, interrupt: true }, 'its interrupt is owed, for the caller to raise as the vector allows');
  t.is(q.usedIdx(), 3, 'the driver sees what stop() reports');
  t.is(q.queue.interrupts().sent, 1, 'the stopping thread raised none itself');
  t.deepEqual(q.broken, []);
});

test('a hold that no frame ends gives the chain back, with its interrupt, when it runs out', async (t) => {
  const nic = tap(t);
  const q = serve(t, nic.fd, false, { txHoldUs: 50_000, txHoldMinFrame: 32 });
  const peer = await listen(t, nic.host);
  const small = udpFrame(nic.guest, nic.host, peer.port, Buffer.alloc(4, 1));
  const frame = udpFrame(nic.guest, nic.host, peer.port, Buffer.alloc(200, 7));
  postFrame(q, frame);
  await until('the datagram to arrive', () => peer.got.length === 1);
  await until('its chain to be used once the hold ran out', () => q.usedIdx() === 1);
  t.is(q.queue.interrupts().sent, 1);
  // A frame below txHoldMinFrame (not a bulk stream's) is never held.
  const held = serve(t, nic.fd, false, { txHoldUs: 100_000, txHoldMinFrame: small.length + 1 });
  postFrame(held, small);
  await until('the small datagram to arrive', () => peer.got.length === 2);
  await new Promise((r) => setTimeout(r, 20));
  t.is(held.usedIdx(), 1, 'given back at once (a hold would last 100 ms)');
  t.deepEqual([...q.broken, ...held.broken], []);
});

test('a tap that is down drops what the guest sends, as a NIC without link does, and the queue goes on', async (t) => {
  const nic = tap(t, { up: false });
  const q = serve(t, nic.fd, false);
  q.mem.write(BUF + 0x100, udpFrame(nic.guest, nic.host, 9, Buffer.from('x')));
  q.post([[BUF, 12, false], [BUF + 0x100, 60, false]]);
  q.post([[BUF, 12, false], [BUF + 0x100, 60, false]]);
  await until('both chains to be used', () => q.usedIdx() === 2);
  t.like(q.queue.stop().counters, { tx_frames: 0, tx_dropped: 2 });
  t.deepEqual(q.broken, []);
});

/** Make the host send a datagram to the guest's address: the kernel first asks for its MAC (an ARP request on the tap). */
function provokeArp(nic: { guest: string }): void {
  const s = dgram.createSocket('udp4');
  s.send(Buffer.from('?'), 9, nic.guest, () => s.close());
}

function isArpRequestFor(frame: Buffer, ip: string): boolean {
  return frame.readUInt16BE(12) === 0x0806 && frame.readUInt16BE(20) === 1 && frame.subarray(38, 42).join('.') === ip;
}

test('a received frame fills the guest buffers: mergeable, over as many chains as it needs, handed back together with num_buffers', async (t) => {
  const nic = tap(t);
  const q = serve(t, nic.fd, true, { mergeable: true });
  // An ARP request is 42 bytes; with its 12-byte header it needs two 40-byte buffers.
  q.post([[BUF, 40, true]]);
  q.post([[BUF + 0x100, 40, true]]);
  q.post([[BUF + 0x200, 40, true]]);
  q.dirty.fill(0);
  provokeArp(nic);
  await until('a frame to be received', () => q.usedIdx() >= 2);
  t.deepEqual([q.used(0), q.used(1)], [{ id: 0, len: 40 }, { id: 1, len: 14 }], 'the frame is spread over two chains');
  t.is(q.mem.readU16(BUF + 10), 2, 'num_buffers in the first header');
  const frame = Buffer.concat([Buffer.from(q.mem.read(BUF + 12, 28)), Buffer.from(q.mem.read(BUF + 0x100, 14))]);
  t.true(isArpRequestFor(frame, nic.guest), frame.toString('hex'));
  t.deepEqual([...frame.subarray(6, 12)], HOST_MAC, 'from the host side of the tap');
  t.not(native().eventfdRead(q.irq), null, 'an interrupt');
  t.true((q.dirty[Math.floor(BUF / 4096) >> 3] & (1 << (Math.floor(BUF / 4096) & 7))) !== 0, 'the page the frame landed in is dirty');
  const end = q.queue.stop();
  t.is(end.nextAvail, 2, 'the third chain stays available');
  t.like(end.counters, { rx_frames: 1, rx_bytes: 42 });
  t.deepEqual(q.broken, []);
});

test('without guest buffers the tap is not read: the frame waits in the tap and arrives once a buffer is posted', async (t) => {
  const nic = tap(t);
  const q = serve(t, nic.fd, true, { mergeable: false, eventIdx: true });
  provokeArp(nic);
  await new Promise((r) => setTimeout(r, 200));
  t.is(q.usedIdx(), 0);
  t.is(q.availEvent(), 0, 'avail_event asks for a kick at the first buffer');
  q.post([[BUF, 2048, true]]);
  await until('the frame to be received', () => q.usedIdx() === 1);
  t.is(q.used(0).len, 12 + 42);
  t.is(q.mem.readU16(BUF + 10), 1, 'num_buffers is 1 without mergeable buffers');
  t.true(isArpRequestFor(Buffer.from(q.mem.read(BUF + 12, 42)), nic.guest));
  t.deepEqual(q.broken, []);
});

test('hostile chains break the queue with the reason: a short header, an oversized frame, a readable receive buffer, a buffer outside RAM', async (t) => {
  const cases: [string, boolean, [number, number, boolean][], RegExp][] = [
    ['short header', false, [[BUF, 8, false]], /shorter than the 12-byte virtio-net header/],
    ['oversized frame', false, [[BUF, 12, false], [BUF + 0x100, 70000, false]], /more than 65550/],
    ['readable receive buffer', true, [[BUF, 64, false], [BUF + 0x100, 2048, true]], /device-readable buffer/],
    ['outside RAM', false, [[RAM + 0x1000, 64, false]], /not inside guest RAM/],
  ];
  for (const [what, receive, chain, reason] of cases) {
    const nic = tap(t);
    const q = serve(t, nic.fd, receive);
    q.post(chain);
    if (receive) provokeArp(nic);
    await until(`${what} to be reported`, () => q.broken.length > 0);
    t.regex(q.broken[0], reason, what);
    t.is(q.usedIdx(), 0, `${what}: nothing used`);
  }
});

/** The next frame on tap fd `fd` within 2 s; null when none came. */
async function frameOn(fd: number): Promise<Buffer | null> {
  const buf = Buffer.alloc(2048);
  for (let i = 0; i < 200; i++) {
    try {
      const n = fs.readSync(fd, buf);
      return buf.subarray(12, n); // (after the virtio-net header)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  return null;
}

test('a multi-queue tap steers frames only to its attached queues: a card\'s unused pairs get none', async (t) => {
  const nic = tap(t, { queues: 2 });
  native().tapSetQueue(nic.fds[0], false);
  native().tapSetQueue(nic.fds[0], false); // (again: no error, it already is)
  provokeArp(nic);
  const first = await frameOn(nic.fds[1]);
  t.true(first !== null && isArpRequestFor(first, nic.guest), 'the one attached queue gets the ARP request');
  native().tapSetQueue(nic.fds[0], true);
  native().tapSetQueue(nic.fds[1], false);
  provokeArp({ guest: nic.guest.replace(/\.2$/, '.3') });
  const second = await frameOn(nic.fds[0]);
  t.true(second !== null && isArpRequestFor(second, nic.guest.replace(/\.2$/, '.3')), 'and after the swap, the other');
});

test('a tap opened elsewhere is adopted when it has a virtio-net header; anything else is refused', (t) => {
  const nic = tap(t);
  const adopted = native().adoptTap(nic.fd);
  t.like(adopted, { name: nic.name, multiQueue: true });
  t.not(adopted.fd, nic.fd, 'the caller gets a duplicate of its own');
  native().closeFd(adopted.fd);
  const again = native().adoptTap(nic.fd);
  t.is(again.name, nic.name, 'the tap is still there after the duplicate closed');
  native().closeFd(again.fd);
  const efd = native().eventfd(0, EventFdFlags.CLOEXEC);
  t.teardown(() => native().closeFd(efd));
  t.throws(() => native().adoptTap(efd), { message: /not a tap/ });
  t.throws(() => native().adoptTap(-1));
});

test('taps are opened multi-queue, so a second VMM on the host (a local migration\'s destination) can open the same one', (t) => {
  const nic = tap(t);
  const second = native().openTap(nic.name, 1);
  t.teardown(() => second.fds.forEach((fd) => native().closeFd(fd)));
  t.like(second, { name: nic.name, multiQueue: true });
});

test('the host side of a tap can have an IPv6 address with its prefix length', (t) => {
  const { name, fds } = native().openTap(`tn6${process.pid % 10000}x${subnet++}`, 1);
  t.teardown(() => native().closeFd(fds[0]));
  native().configureInterface(name, { ip6: 'fd00:7465:726e::1', prefix6: 80, up: true });
  // /proc/net/if_inet6: address (32 hex digits), ifindex, prefix length (hex), scope, flags, name
  const line = fs.readFileSync('/proc/net/if_inet6', 'utf8').split('\n').find((l) => l.trim().endsWith(` ${name}`) && l.startsWith('fd007465726e'));
  t.truthy(line, 'the address is on the tap');
  t.is(parseInt(line!.trim().split(/\s+/)[2], 16), 80);
  t.throws(() => native().configureInterface(name, { ip6: 'not-an-address' }), { message: /not an IPv6 address/ });
});
