// What a net card's config may ask: checked when a VM is created or a card added (400 with the
// reason), and again when its tap is opened.
import { isIPv4 } from 'node:net';
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
  for (const [key, v] of [['ip', net.ip], ['mask', net.mask]] as const) {
    if (v !== undefined && !isIPv4(v)) return `net device '${id}': ${key} '${v}' is not an IPv4 address (IPv6 host addresses are not supported yet)`;
  }
  return null;
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
