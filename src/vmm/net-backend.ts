// The host end of a virtio-net card: its tap, opened (or created) from the card's config with
// one file descriptor per queue pair, and its host side set up as Cloud Hypervisor sets it
// (the address and mask when given, the host MAC and MTU when given, the link up). Frames move
// on native threads (native/net_queue.cc); the worker only tells the queues how.
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import type { NetConfig } from '../api/schema';
import { netConfigProblem } from '../config/net-config';
import { VIRTIO_NET_DEFAULT_QUEUES, VirtioNetFeature, parseMac, randomMac, tunOffloadsFor } from '../devices/virtio/net';
import { featureBits, hasFeature, type VirtioFunctionState } from '../devices/virtio/transport';
import { VirtqueueError } from '../devices/virtio/virtqueue';
import { netIdOf } from '../devices/virtio/vm-devices';
import { native } from '../native/kvm';
import type { VirtioDeviceWorker } from './virtio-queues';

/** A tap Tern creates for a card whose config names none: the kernel numbers it. */
export const DEFAULT_TAP_NAME = 'vmtap%d';

export class NetConfigError extends Error {}

export interface NetBackend {
  id: string;
  /** the tap's name (the one the kernel gave a new tap) */
  tap: string;
  /** one per queue pair */
  fds: number[];
  /** the card's MAC */
  mac: number[];
  worker: VirtioDeviceWorker;
  close(): void;
}

/**
 * Open card `index` of a config: its tap (created when missing), its host side set up. Throws
 * NetConfigError for a config it cannot carry out; the fds are closed again on any failure.
 */
export function openNetBackend(net: NetConfig, index: number, log: Logger): NetBackend {
  const id = netIdOf(net, index);
  const problem = netConfigProblem(net, id);
  if (problem) throw new NetConfigError(problem);
  const pairs = (net.num_queues ?? VIRTIO_NET_DEFAULT_QUEUES) / 2;
  let tap: { name: string; fds: number[] };
  try {
    tap = native().openTap(net.tap ?? DEFAULT_TAP_NAME, pairs);
  } catch (e) {
    throw new NetConfigError(`net device '${id}': the tap '${net.tap ?? DEFAULT_TAP_NAME}' cannot be opened: ${(e as Error).message}`);
  }
  const close = () => tap.fds.forEach((fd) => native().closeFd(fd));
  try {
    native().configureInterface(tap.name, {
      ip: net.ip,
      mask: net.ip !== undefined ? (net.mask ?? '255.255.255.0') : net.mask,
      mac: net.host_mac !== undefined ? parseMac(net.host_mac)! : undefined,
      mtu: net.mtu,
      up: true,
    });
  } catch (e) {
    close();
    throw new NetConfigError(`net device '${id}': the tap '${tap.name}' cannot be set up: ${(e as Error).message}`);
  }
  const mac = net.mac !== undefined ? parseMac(net.mac)! : randomMac(randomBytes);
  log.info({ device: id, tap: tap.name, queuePairs: pairs }, 'net device on a tap');
  return { id, tap: tap.name, fds: tap.fds, mac, worker: netWorker(id, tap.fds, log), close };
}

/**
 * virtio-net's worker: its queues are served by native threads only (queue 2n receives and
 * 2n+1 transmits on pair n's tap fd). A queue no thread may serve yet (its vector masked)
 * waits; frames wait in the tap meanwhile.
 */
export function netWorker(id: string, fds: readonly number[], log: Logger): VirtioDeviceWorker {
  let offloadWarned = false;
  return {
    ready: () => false,
    chain() {
      throw new VirtqueueError('a net queue is served by its native thread only');
    },
    nativeQueue(fn: VirtioFunctionState, queue: number) {
      const fd = fds[Math.floor(queue / 2)];
      if (fd === undefined) return undefined;
      try {
        // What the tap may hand the guest follows what the driver accepted.
        native().tapSetOffload(fd, tunOffloadsFor(featureBits(fn.virtio.driverFeatures)));
      } catch (e) {
        if (!offloadWarned) log.warn({ device: id, err: (e as Error).message }, 'the tap refused the offloads: the guest gets plain frames');
        offloadWarned = true;
      }
      return { kind: 'net', tapFd: fd, receive: queue % 2 === 0, mergeable: hasFeature(fn.virtio.driverFeatures, VirtioNetFeature.MRG_RXBUF) };
    },
  };
}
