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
  virtioNetConfigBytes,
  virtioNetFeatures,
  virtioNetModel,
  type VirtioNetDevice,
} from '../../src/devices/virtio/net';
import { placeVirtioFunctions, virtioFunctionsOf } from '../../src/devices/virtio/vm-devices';
import { featureWords, type VirtioFunctionState } from '../../src/devices/virtio/transport';
import { netWorker } from '../../src/vmm/net-backend';

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

test('the worker gives each queue to a native thread: even queues receive, odd transmit, on their pair\'s tap fd, mergeable as negotiated', (t) => {
  const w = netWorker('_net0', [-1], pino({ level: 'silent' }));
  const fn = virtioNetModel.create('_net0', card(), [256, 256]) as VirtioFunctionState;
  // (fd -1: TUNSETOFFLOAD fails, which the worker logs and lives with)
  const negotiated = { ...fn, virtio: { ...fn.virtio, driverFeatures: featureWords(bit(F.MRG_RXBUF) | bit(32)) } };
  t.deepEqual(w.nativeQueue?.(negotiated, 0), { kind: 'net', tapFd: -1, receive: true, mergeable: true });
  t.deepEqual(w.nativeQueue?.(fn, 1), { kind: 'net', tapFd: -1, receive: false, mergeable: false });
  t.is(w.nativeQueue?.(fn, 2), undefined, 'no pair 1');
  t.false(w.ready?.(0) ?? true, 'nothing is served on the JavaScript thread');
});
