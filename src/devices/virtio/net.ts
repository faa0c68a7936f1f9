// virtio-net (virtio 1.2, 5.1): the guest-visible side of a network card. Its state is what the
// guest can see: its MAC, the MTU it is told, how many queue pairs it has and which offloads
// it is offered, so a restored or migrated guest finds the same card. The tap behind it is the
// VMM's host end (src/vmm/net-backend.ts); frames move on native threads (native/net_queue.cc).
import { Type } from '@sinclair/typebox';
import { Exact, IntIn } from '../../state/state-schema';
import { defineVirtioFunction, VIRTIO_MAX_QUEUES } from './transport';

export const VIRTIO_NET_KIND = 'virtio-net' as const;
export const VIRTIO_ID_NET = 1;
/** Cloud Hypervisor's default queue size and queue count (one receive/transmit pair). */
export const VIRTIO_NET_DEFAULT_QUEUE_SIZE = 256;
export const VIRTIO_NET_DEFAULT_QUEUES = 2;
/** Queue pairs a card may have. */
export const VIRTIO_NET_MAX_QUEUE_PAIRS = 8;
/** Bytes of struct virtio_net_hdr_v1 before every frame. */
export const VIRTIO_NET_HEADER_BYTES = 12;
/** The MTU range a guest may be told (68: IPv4's least; a 64 KiB frame at most). */
export const VIRTIO_NET_MIN_MTU = 68;
export const VIRTIO_NET_MAX_MTU = 65535;

/** Feature bits (5.1.3). */
export const VirtioNetFeature = {
  CSUM: 0,
  GUEST_CSUM: 1,
  MTU: 3,
  MAC: 5,
  GUEST_TSO4: 7,
  GUEST_TSO6: 8,
  GUEST_UFO: 10,
  HOST_TSO4: 11,
  HOST_TSO6: 12,
  HOST_UFO: 14,
  MRG_RXBUF: 15,
  STATUS: 16,
  CTRL_VQ: 17,
  MQ: 22,
} as const;

/** The control queue's command classes and acks (5.1.6.5); Tern implements multiqueue's only. */
export const VirtioNetCtrl = { MQ: 4, MQ_VQ_PAIRS_SET: 0, OK: 0, ERR: 1 } as const;
/** A control command: class and command bytes, then its data (VQ_PAIRS_SET: a le16). */
export const VIRTIO_NET_CTRL_MAX_BYTES = 64;

/** Status field bits: the link is up. */
export const VIRTIO_NET_S_LINK_UP = 1;

/** TUN_F_* offload flags (linux/if_tun.h): what the tap may hand the guest. */
export const TunOffload = { CSUM: 0x01, TSO4: 0x02, TSO6: 0x04, UFO: 0x10 } as const;

export interface VirtioNetDevice {
  /** the card's MAC, 6 bytes */
  mac: number[];
  /** the MTU the guest is told (VIRTIO_NET_F_MTU); 0: none */
  mtu: number;
  queuePairs: number;
  /**
   * how many pairs the driver has enabled (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET); only those
   * receive. Absent: one, as after a reset (states saved before cards had several pairs).
   */
  activePairs?: number;
  /** which offloads are offered: checksums, TCP segmentation, UDP fragmentation (both ways) */
  offloads: { csum: boolean; tso: boolean; ufo: boolean };
}

const bit = (b: number) => 1n << BigInt(b);

/**
 * Offered: the MAC, the link status, mergeable receive buffers, the MTU when one is set, and
 * the offloads enabled. Segmentation needs checksum offload (5.1.3.1), so without csum none is.
 */
export function virtioNetFeatures(d: VirtioNetDevice): bigint {
  const F = VirtioNetFeature;
  let f = bit(F.MAC) | bit(F.STATUS) | bit(F.MRG_RXBUF);
  if (d.mtu > 0) f |= bit(F.MTU);
  // Several pairs need the control queue, where the driver says how many it uses.
  if (d.queuePairs > 1) f |= bit(F.CTRL_VQ) | bit(F.MQ);
  if (d.offloads.csum) {
    f |= bit(F.CSUM) | bit(F.GUEST_CSUM);
    if (d.offloads.tso) f |= bit(F.HOST_TSO4) | bit(F.HOST_TSO6) | bit(F.GUEST_TSO4) | bit(F.GUEST_TSO6);
    if (d.offloads.ufo) f |= bit(F.HOST_UFO) | bit(F.GUEST_UFO);
  }
  return f;
}

/** Queues of a card: a receive and a transmit queue per pair, then the control queue when it has several pairs. */
export const virtioNetQueueCount = (queuePairs: number): number => 2 * queuePairs + (queuePairs > 1 ? 1 : 0);

/** The control queue's index; undefined for a single-pair card, which has none. */
export const virtioNetControlQueue = (d: VirtioNetDevice): number | undefined => (d.queuePairs > 1 ? 2 * d.queuePairs : undefined);

/** How many pairs receive now. */
export const activePairsOf = (d: VirtioNetDevice): number => Math.min(d.activePairs ?? 1, d.queuePairs);

/**
 * A command on the control queue (class, command, data): the card after it and the ack. Only
 * VQ_PAIRS_SET is known (5.1.6.5.5); a pair count outside 1..max, or any other command, is
 * refused with ERR and changes nothing.
 */
export function virtioNetControl(d: VirtioNetDevice, request: Uint8Array): { device: VirtioNetDevice; ack: number } {
  const refused = { device: d, ack: VirtioNetCtrl.ERR };
  if (request.length < 2 || request[0] !== VirtioNetCtrl.MQ || request[1] !== VirtioNetCtrl.MQ_VQ_PAIRS_SET || request.length < 4) return refused;
  const pairs = request[2] | (request[3] << 8);
  if (pairs < 1 || pairs > d.queuePairs) return refused;
  return { device: pairs === activePairsOf(d) ? d : { ...d, activePairs: pairs }, ack: VirtioNetCtrl.OK };
}

/** struct virtio_net_config: mac, status (link up), max_virtqueue_pairs, mtu. */
export function virtioNetConfigBytes(d: VirtioNetDevice): Uint8Array {
  const b = new Uint8Array(12);
  const v = new DataView(b.buffer);
  b.set(d.mac, 0);
  v.setUint16(6, VIRTIO_NET_S_LINK_UP, true);
  v.setUint16(8, d.queuePairs, true);
  v.setUint16(10, d.mtu, true);
  return b;
}

/** The tap offloads that match what the driver accepted (`driverFeatures`). */
export function tunOffloadsFor(driverFeatures: bigint): number {
  const has = (b: number) => ((driverFeatures >> BigInt(b)) & 1n) === 1n;
  const F = VirtioNetFeature;
  if (!has(F.GUEST_CSUM)) return 0;
  let flags = TunOffload.CSUM;
  if (has(F.GUEST_TSO4)) flags |= TunOffload.TSO4;
  if (has(F.GUEST_TSO6)) flags |= TunOffload.TSO6;
  if (has(F.GUEST_UFO)) flags |= TunOffload.UFO;
  return flags;
}

/** "52:54:00:12:34:56" as bytes; null when it is not a MAC. */
export function parseMac(s: string): number[] | null {
  const m = /^([0-9a-fA-F]{2})(?::([0-9a-fA-F]{2})){5}$/.test(s) ? s.split(':') : null;
  return m ? m.map((h) => parseInt(h, 16)) : null;
}

export const formatMac = (mac: readonly number[]): string => mac.map((b) => b.toString(16).padStart(2, '0')).join(':');

/** A random locally administered unicast MAC, as a card given none gets (Cloud Hypervisor does the same). */
export function randomMac(random: (n: number) => Uint8Array): number[] {
  const mac = [...random(6)];
  mac[0] = (mac[0] & 0xfe) | 0x02;
  return mac;
}

/** What the schema cannot say about a card. */
function virtioNetProblem(d: VirtioNetDevice): string | null {
  if ((d.mac[0] & 1) !== 0) return `MAC ${formatMac(d.mac)} is a multicast address`;
  if (d.mtu !== 0 && d.mtu < VIRTIO_NET_MIN_MTU) return `MTU ${d.mtu} is below ${VIRTIO_NET_MIN_MTU}`;
  if (d.activePairs !== undefined && d.activePairs > d.queuePairs) return `${d.activePairs} active queue pairs of ${d.queuePairs}`;
  return null;
}

export const virtioNetModel = defineVirtioFunction<VirtioNetDevice>({
  kind: VIRTIO_NET_KIND,
  virtioId: VIRTIO_ID_NET,
  // Network controller, Ethernet: what drivers expect of a virtio NIC.
  classCode: 0x02_00_00,
  // One per data queue and the configuration's: drivers give the control queue none (Linux
  // asks for no interrupt from it), and cards made before it existed keep their MSI-X table.
  vectors: 2 * VIRTIO_NET_MAX_QUEUE_PAIRS + 1,
  maxQueues: Math.min(virtioNetQueueCount(VIRTIO_NET_MAX_QUEUE_PAIRS), VIRTIO_MAX_QUEUES),
  deviceSchema: Exact({
    mac: Type.Array(IntIn(0, 255), { minItems: 6, maxItems: 6 }),
    mtu: IntIn(0, VIRTIO_NET_MAX_MTU),
    queuePairs: IntIn(1, VIRTIO_NET_MAX_QUEUE_PAIRS),
    activePairs: Type.Optional(IntIn(1, VIRTIO_NET_MAX_QUEUE_PAIRS)),
    offloads: Exact({ csum: Type.Boolean(), tso: Type.Boolean(), ufo: Type.Boolean() }),
  }),
  checkDevice: virtioNetProblem,
  features: virtioNetFeatures,
  configBytes: virtioNetConfigBytes,
  // A reset device uses one pair until its driver enables more (5.1.6.5.5).
  resetDevice: ({ activePairs: _, ...d }) => d,
});
