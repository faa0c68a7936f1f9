// virtio-net without KVM: what the driver reads of the card (features, MAC, link, MTU), how a
// VM config becomes cards with Cloud Hypervisor's ids and defaults, what the tap is told about
// the guest's offloads, and how the worker hands each queue to a native thread.
import test from 'ava';
import pino from 'pino';
import {
  TunOffload,
  VIRTIO_NET_S_LINK_UP,
  VirtioNetFeature as F,
  formatMac,
  parseMac,
  randomMac,
  tunOffloadsFor,
  VirtioNetCtrl,
  activePairsOf,
  virtioNetConfigBytes,
  virtioNetControl,
  virtioNetFeatures,
  virtioNetModel,
  type VirtioNetDevice,
} from '../../src/devices/virtio/net';
import { placeVirtioFunctions, virtioFunctionsOf } from '../../src/devices/virtio/vm-devices';
import { featureWords, virtioQueueServed, type VirtioFunctionState } from '../../src/devices/virtio/transport';
import { anonymousGuestMemory } from '../../src/memory/guest-memory';
import type { ChainResult } from '../../src/vmm/virtio-queues';
import { ipv4PrefixLength, ipv6PrefixLength, netConfigProblem } from '../../src/config/net-config';
import { pciSegmentInitialState } from '../../src/devices/pci/segment';
import { checkBackendsFit, type DeviceBackends } from '../../src/vmm/device-backends';
import { netWorker, type NetBackend } from '../../src/vmm/net-backend';
import { chainOf } from './chain-of';

const bit = (b: number) => 1n << BigInt(b);
const card = (o: Partial<VirtioNetDevice> = {}): VirtioNetDevice => ({ mac: [0x52, 0x54, 0, 1, 2, 3], mtu: 0, queuePairs: 1, offloads: { csum: true, tso: true, ufo: true }, ...o });

test('offered features: MAC, status and mergeable buffers always; the MTU when set; offloads as enabled, segmentation only with checksums', (t) => {
  const base = bit(F.MAC) | bit(F.STATUS) | bit(F.MRG_RXBUF);
  const all = virtioNetFeatures(card());
  for (const b of [F.CSUM, F.GUEST_CSUM, F.HOST_TSO4, F.HOST_TSO6, F.GUEST_TSO4, F.GUEST_TSO6, F.HOST_UFO, F.GUEST_UFO]) t.true((all & bit(b)) !== 0n, `bit ${b}`);
  t.is(all & bit(F.MTU), 0n, 'no MTU offered without one');
  t.is(virtioNetFeatures(card({ mtu: 9000 })) & bit(F.MTU), bit(F.MTU));
  t.is(virtioNetFeatures(card({ offloads: { csum: false, tso: true, ufo: true } })), base, 'no checksum offload: no segmentation either');
  t.is(virtioNetFeatures(card({ offloads: { csum: true, tso: false, ufo: false } })), base | bit(F.CSUM) | bit(F.GUEST_CSUM));
});

test('the configuration space: MAC, link up, one queue pair, the MTU', (t) => {
  const b = virtioNetConfigBytes(card({ mtu: 1400 }));
  const v = new DataView(b.buffer);
  t.deepEqual([...b.subarray(0, 6)], [0x52, 0x54, 0, 1, 2, 3]);
  t.is(v.getUint16(6, true), VIRTIO_NET_S_LINK_UP);
  t.is(v.getUint16(8, true), 1);
  t.is(v.getUint16(10, true), 1400);
});

test('the tap hands the guest only what it accepted', (t) => {
  t.is(tunOffloadsFor(0n), 0);
  t.is(tunOffloadsFor(bit(F.GUEST_TSO4)), 0, 'segmentation without checksum offload is nothing');
  t.is(tunOffloadsFor(bit(F.GUEST_CSUM) | bit(F.GUEST_TSO4) | bit(F.GUEST_TSO6) | bit(F.GUEST_UFO)), TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO6 | TunOffload.UFO);
});

test('MACs: parsed, printed, and a random one is locally administered unicast', (t) => {
  t.deepEqual(parseMac('52:54:00:AB:cd:0f'), [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
  for (const bad of ['52:54:00:ab:cd', '52-54-00-ab-cd-0f', '52:54:00:ab:cd:0g', '']) t.is(parseMac(bad), null, bad);
  t.is(formatMac([0x52, 0x54, 0, 0xab, 0xcd, 0x0f]), '52:54:00:ab:cd:0f');
  const mac = randomMac(() => new Uint8Array([0xff, 1, 2, 3, 4, 5]));
  t.deepEqual(mac, [0xfe, 1, 2, 3, 4, 5], 'multicast bit cleared, local bit set');
  t.is(randomMac(() => new Uint8Array(6))[0], 0x02);
});

test('a config\'s cards come after its disks with ids _net0, _net1..., Cloud Hypervisor\'s queue defaults, and the MACs their taps were opened with', (t) => {
  const fns = virtioFunctionsOf(
    { payload: { kernel: '/k' }, console: { mode: 'Off' }, net: [{ tap: 'a' }, { tap: 'b', id: 'up', mtu: 1400, offload_tso: false }], rng: { src: '/dev/urandom' } },
    { diskSizes: new Map(), netMacs: new Map([['_net0', [2, 0, 0, 0, 0, 1]], ['up', [2, 0, 0, 0, 0, 2]]]) },
  );
  t.deepEqual(fns.map((f) => [f.kind, f.id]), [['virtio-net', '_net0'], ['virtio-net', 'up'], ['virtio-rng', '__rng']]);
  t.deepEqual(fns[0].virtio.queues.map((q) => q.size), [256, 256]);
  t.deepEqual(fns[1].device, { mac: [2, 0, 0, 0, 0, 2], mtu: 1400, queuePairs: 1, offloads: { csum: true, tso: false, ufo: true } });
  t.deepEqual(Object.keys(placeVirtioFunctions(fns)), ['01.0', '02.0', '03.0']);
  t.throws(() => virtioFunctionsOf({ payload: { kernel: '/k' }, net: [{ tap: 'a' }] }, { diskSizes: new Map() }), { message: /no tap open/ });
});

test('the state schema takes a card and refuses a multicast MAC', (t) => {
  const fn = virtioNetModel.create('_net0', card(), [256, 256]);
  t.is(virtioNetModel.checkState?.(fn) ?? null, null);
  t.regex(virtioNetModel.checkState?.(virtioNetModel.create('_net0', card({ mac: [1, 0, 0, 0, 0, 1] }), [256, 256])) ?? '', /multicast/);
});

test('the worker gives each queue to a native thread: even queues receive, odd transmit, on their pair\'s tap fd, mergeable as negotiated, bulk transmits held 200 µs', (t) => {
  const w = netWorker('_net0', [-1], pino({ level: 'silent' }));
  const fn = virtioNetModel.create('_net0', card(), [256, 256]) as VirtioFunctionState;
  // (fd -1: TUNSETOFFLOAD fails, which the worker logs and lives with)
  const negotiated = { ...fn, virtio: { ...fn.virtio, driverFeatures: featureWords(bit(F.MRG_RXBUF) | bit(32)) } };
  const hold = { txHoldUs: 200, txHoldMinFrame: 16384 };
  t.deepEqual(w.nativeQueue?.(negotiated, 0), { kind: 'net', tapFd: -1, receive: true, mergeable: true, ...hold });
  t.deepEqual(w.nativeQueue?.(fn, 1), { kind: 'net', tapFd: -1, receive: false, mergeable: false, ...hold });
  t.is(w.nativeQueue?.(fn, 2), undefined, 'no pair 1');
  t.false(w.ready?.(0) ?? true, 'nothing is served on the JavaScript thread');
});

const pairsSet = (pairs: number) => Uint8Array.of(VirtioNetCtrl.MQ, VirtioNetCtrl.MQ_VQ_PAIRS_SET, pairs & 0xff, pairs >> 8);

test('a card with several pairs offers the control queue and multiqueue, and has a queue for it after the pairs', (t) => {
  t.is(virtioNetFeatures(card()) & (bit(F.CTRL_VQ) | bit(F.MQ)), 0n, 'one pair: no control queue, as cards had before');
  t.is(virtioNetFeatures(card({ queuePairs: 2 })) & (bit(F.CTRL_VQ) | bit(F.MQ)), bit(F.CTRL_VQ) | bit(F.MQ));
  t.is(new DataView(virtioNetConfigBytes(card({ queuePairs: 3 })).buffer).getUint16(8, true), 3, 'max_virtqueue_pairs');
  const fns = virtioFunctionsOf({ payload: { kernel: '/k' }, net: [{ tap: 'a', num_queues: 4, queue_size: 512 }] }, { diskSizes: new Map(), netMacs: new Map([['_net0', [2, 0, 0, 0, 0, 1]]]) });
  t.deepEqual(fns[0].virtio.queues.map((q) => q.maxSize), [512, 512, 512, 512, 512], 'two pairs and the control queue');
  t.is(virtioNetModel.checkState?.(fns[0] as never) ?? null, null);
});

test('control commands: VQ_PAIRS_SET within 1..max is taken; any other pair count or command is refused and changes nothing', (t) => {
  const d = card({ queuePairs: 4 });
  t.is(activePairsOf(d), 1, 'one pair until the driver says more');
  const two = virtioNetControl(d, pairsSet(2));
  t.is(two.ack, VirtioNetCtrl.OK);
  t.is(activePairsOf(two.device), 2);
  t.is(virtioNetControl(two.device, pairsSet(2)).device, two.device, 'the same count changes nothing');
  for (const [req, why] of [
    [pairsSet(0), 'no pair'],
    [pairsSet(5), 'more pairs than the card has'],
    [pairsSet(0x102), 'a count whose low byte alone would fit'],
    [Uint8Array.of(VirtioNetCtrl.MQ, VirtioNetCtrl.MQ_VQ_PAIRS_SET, 2), 'data cut short'],
    [Uint8Array.of(0, 0, 1), 'a receive-mode command (not offered)'],
    [Uint8Array.of(), 'nothing at all'],
  ] as const) {
    const r = virtioNetControl(d, req);
    t.is(r.ack, VirtioNetCtrl.ERR, why);
    t.is(r.device, d, why);
  }
  t.deepEqual(virtioNetModel.type.resetDevice?.(two.device), d, 'a reset forgets the pairs the driver enabled');
});

test('the active pairs are the card\'s state: recorded with the control queue\'s cursors, and checked', (t) => {
  const fn = virtioNetModel.create('_net0', card({ queuePairs: 2 }), [256, 256, 256, 256, 256]);
  const served = virtioQueueServed(virtioNetModel, fn, { queue: 4, nextAvail: 1, nextUsed: 1, interrupt: false, deviceState: { ...fn.device, activePairs: 2 } });
  t.is(served.fn.device.activePairs, 2);
  t.is(served.fn.virtio.queues[4].nextUsed, 1);
  t.throws(() => virtioQueueServed(virtioNetModel, fn, { queue: 4, nextAvail: 1, nextUsed: 1, interrupt: false, deviceState: { ...fn.device, activePairs: 3 } }), { message: /3 active queue pairs of 2/ });
  t.throws(() => virtioQueueServed(virtioNetModel, fn, { queue: 4, nextAvail: 1, nextUsed: 1, interrupt: false, deviceState: { ...fn.device, mac: 'x' } }), { message: /device state field \/mac/ });
});


test('the worker serves the control queue itself: the ack goes into the chain, the new state comes back; data queues of unused pairs wait', (t) => {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: 1 << 20 }]);
  const w = netWorker('_net0', [-1, -2], pino({ level: 'silent' }));
  const fn = virtioNetModel.create('_net0', card({ queuePairs: 2 }), [256, 256, 256, 256, 256]) as VirtioFunctionState;
  t.true(w.ready!(4), 'the control queue is served on the JavaScript thread');
  t.false(w.ready!(0));
  mem.write(0x1000, Uint8Array.of(VirtioNetCtrl.MQ, VirtioNetCtrl.MQ_VQ_PAIRS_SET));
  mem.write(0x2000, Uint8Array.of(2, 0));
  mem.write(0x3000, Uint8Array.of(0xee));
  const r = w.chain(fn, 4, chainOf([{ addr: 0x1000, len: 2 }, { addr: 0x2000, len: 2 }], [{ addr: 0x3000, len: 1 }]), mem) as ChainResult;
  t.is(r.written, 1);
  t.is(mem.read(0x3000, 1)[0], VirtioNetCtrl.OK);
  t.is((r.deviceState as VirtioNetDevice).activePairs, 2);
  t.throws(() => w.chain(fn, 4, chainOf([{ addr: 0x1000, len: 4 }], []), mem), { message: /no room for its ack/ });
  t.throws(() => w.chain(fn, 1, chainOf([{ addr: 0x1000, len: 4 }], []), mem), { message: /native thread only/ });
  // (fds -1 and -2: the tap calls fail, which the worker logs and lives with)
  t.is(w.nativeQueue?.(fn, 4), undefined, 'no thread for the control queue');
  t.is(w.nativeQueue?.(fn, 2), undefined, 'pair 1 does not receive until the driver enables it');
  t.like(w.nativeQueue?.(fn, 3), { kind: 'net', tapFd: -2, receive: false });
  t.like(w.nativeQueue?.({ ...fn, device: r.deviceState }, 2), { kind: 'net', tapFd: -2, receive: true });
});

test('a restored card must fit its tap: as many pairs, and the MAC its config gives if it gives one', (t) => {
  const fn = virtioNetModel.create('_net0', card({ queuePairs: 2 }), [256, 256, 256, 256, 256]);
  const segment = pciSegmentInitialState({ functions: { '01.0': fn } });
  const backends = (tap: Partial<NetBackend>) => ({ nets: new Map([['_net0', { id: '_net0', tap: 't', fds: [-1, -2], mac: [2, 0, 0, 0, 0, 9], macGiven: false, ...tap } as NetBackend]]) }) as unknown as DeviceBackends;
  t.notThrows(() => checkBackendsFit(segment, backends({})), 'no MAC in the config: the card keeps its own');
  t.notThrows(() => checkBackendsFit(segment, backends({ mac: card().mac, macGiven: true })));
  t.throws(() => checkBackendsFit(segment, backends({ macGiven: true })), { message: /config gives MAC 02:00:00:00:00:09, the guest's card had 52:54:00:01:02:03/ });
  t.throws(() => checkBackendsFit(segment, backends({ fds: [-1] })), { message: /1 queue pairs, the guest's card had 2/ });
});

test('a card\'s host address may be IPv4 with an IPv4 netmask or IPv6 with an IPv6 one', (t) => {
  t.is(netConfigProblem({ tap: 't', ip: '192.168.1.1', mask: '255.255.254.0' }, 'n'), null);
  t.is(netConfigProblem({ tap: 't', ip: 'fd00::1', mask: 'ffff:ffff:ffff:ffff::' }, 'n'), null);
  t.is(netConfigProblem({ tap: 't', ip: 'fd00::1' }, 'n'), null, 'prefix 64 when no mask is given');
  t.regex(netConfigProblem({ tap: 't', ip: 'fd00::1', mask: '255.255.255.0' }, 'n') ?? '', /not an IPv6 netmask/);
  t.regex(netConfigProblem({ tap: 't', ip: '10.0.0.1', mask: 'ffff::' }, 'n') ?? '', /not an IPv4 netmask/);
  t.regex(netConfigProblem({ tap: 't', ip: 'host.example' }, 'n') ?? '', /not an IPv4 or IPv6 address/);
  t.deepEqual([ipv4PrefixLength('255.255.255.0'), ipv4PrefixLength('255.255.255.255'), ipv4PrefixLength('0.0.0.0'), ipv4PrefixLength('255.0.255.0')], [24, 32, 0, null]);
  t.deepEqual([ipv6PrefixLength('ffff:ffff:ffff:ffff::'), ipv6PrefixLength('ffff:ff80::'), ipv6PrefixLength('::'), ipv6PrefixLength('ffff::ffff')], [64, 25, 0, null]);
});
