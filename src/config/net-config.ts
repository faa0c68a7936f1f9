// What a net card's config may ask: checked when a VM is created or a card added (400 with the
// reason), and again when its tap is opened.
import { isIP, isIPv4, isIPv6 } from 'node:net';
import type { NetConfig } from '../api/schema';
import { VIRTIO_NET_DEFAULT_QUEUE_SIZE, VIRTIO_NET_DEFAULT_QUEUES, VIRTIO_NET_MAX_MTU, VIRTIO_NET_MAX_QUEUE_PAIRS, VIRTIO_NET_MIN_MTU, parseMac } from '../devices/virtio/net';

const MAX_QUEUE_SIZE = 32768;

/** What the config asks of a card that Tern cannot do, or that is malformed; null when it is fine. */
export function netConfigProblem(net: NetConfig, id: string): string | null {
  if (net.vhost_user) return `net device '${id}': vhost-user net devices are not supported`;
  const queues = net.num_queues ?? VIRTIO_NET_DEFAULT_QUEUES;
  if (!Number.isInteger(queues) || queues < 2 || queues > 2 * VIRTIO_NET_MAX_QUEUE_PAIRS || queues % 2 !== 0) {
    return `net device '${id}': num_queues ${queues}: a receive and a transmit queue per pair, so an even number from 2 to ${2 * VIRTIO_NET_MAX_QUEUE_PAIRS}`;
  }
  if (net.fds !== undefined && (net.fds.length === 0 || net.fds.length * 2 !== queues)) {
    return `net device '${id}': ${net.fds.length} fds for ${queues} queues: one tap fd per queue pair`;
  }
  if (net.fds?.some((fd) => fd < 0)) return `net device '${id}': fds must be the numbers of open file descriptors`;
  const size = net.queue_size ?? VIRTIO_NET_DEFAULT_QUEUE_SIZE;
  if (size < 2 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) return `net device '${id}': queue_size ${size} is not a power of two from 2 to ${MAX_QUEUE_SIZE}`;
  if (net.mac !== undefined && !parseMac(net.mac)) return `net device '${id}': mac '${net.mac}' is not a MAC address (xx:xx:xx:xx:xx:xx)`;
  if (net.mac !== undefined && (parseMac(net.mac)![0] & 1) !== 0) return `net device '${id}': mac '${net.mac}' is a multicast address`;
  if (net.host_mac !== undefined && !parseMac(net.host_mac)) return `net device '${id}': host_mac '${net.host_mac}' is not a MAC address`;
  if (net.mtu !== undefined && (net.mtu < VIRTIO_NET_MIN_MTU || net.mtu > VIRTIO_NET_MAX_MTU)) return `net device '${id}': mtu ${net.mtu} is not from ${VIRTIO_NET_MIN_MTU} to ${VIRTIO_NET_MAX_MTU}`;
  if (net.ip !== undefined && !isIP(net.ip)) return `net device '${id}': ip '${net.ip}' is not an IPv4 or IPv6 address`;
  if (net.ip !== undefined && isIPv6(net.ip)) {
    if (net.mask !== undefined && ipv6PrefixLength(net.mask) === null) return `net device '${id}': mask '${net.mask}' is not an IPv6 netmask, as an IPv6 ip needs`;
  } else if (net.mask !== undefined && (!isIPv4(net.mask) || ipv4PrefixLength(net.mask) === null)) {
    return `net device '${id}': mask '${net.mask}' is not an IPv4 netmask`;
  }
  return null;
}

/** The prefix length of a netmask written as an address (ones, then zeros); null when it is not one. */
function prefixLength(bytes: number[]): number | null {
  const bits = bytes.map((b) => b.toString(2).padStart(8, '0')).join('');
  return /^1*0*$/.test(bits) ? bits.indexOf('0') === -1 ? bits.length : bits.indexOf('0') : null;
}

export function ipv4PrefixLength(mask: string): number | null {
  return isIPv4(mask) ? prefixLength(mask.split('.').map(Number)) : null;
}

/** "ffff:ffff:ffff:ffff::" is 64. */
export function ipv6PrefixLength(mask: string): number | null {
  if (!isIPv6(mask) || mask.includes('.')) return null;
  const [head, tail] = mask.includes('::') ? mask.split('::') : [mask, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = [...h, ...new Array(8 - h.length - t.length).fill('0'), ...t].map((g) => parseInt(g, 16));
  return prefixLength(groups.flatMap((g) => [g >> 8, g & 0xff]));
}

/**
 * A config without taps held as fds: fd numbers mean something only in the process that was
 * given them, so an API body's or a saved config's are dropped (Cloud Hypervisor ignores them
 * too). A card keeps its `tap`, which names the interface the fds were queues of. Unchanged
 * (the same object) when no card had fds.
 */
export function withoutHeldFds<C extends { net?: NetConfig[] }>(config: C): C {
  if (!config.net?.some((n) => n.fds !== undefined)) return config;
  return { ...config, net: config.net.map(({ fds: _, ...n }) => n) };
}
