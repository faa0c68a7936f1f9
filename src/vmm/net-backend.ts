// The host end of a virtio-net card: its tap, opened (or created) from the card's config with
// one file descriptor per queue pair, and its host side set up as Cloud Hypervisor sets it
// (the address and mask when given, the host MAC and MTU when given, the link up). Frames move
// on native threads (native/net_queue.cc); the worker only tells the queues how.
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import type { NetConfig } from '../api/schema';
import { isIPv6 } from 'node:net';
import { ipv6PrefixLength, netConfigProblem } from '../config/net-config';
import {
  VIRTIO_NET_CTRL_MAX_BYTES,
  VIRTIO_NET_DEFAULT_QUEUES,
  VirtioNetFeature,
  activePairsOf,
  parseMac,
  randomMac,
  tunOffloadsFor,
  virtioNetControl,
  type VirtioNetDevice,
} from '../devices/virtio/net';
import { featureBits, hasFeature, type VirtioFunctionState } from '../devices/virtio/transport';
import { VirtqueueError, readFromChain, writeToChain } from '../devices/virtio/virtqueue';
import { netIdOf } from '../devices/virtio/vm-devices';
import { native } from '../native/kvm';
import type { ChainResult, VirtioDeviceWorker } from './virtio-queues';

/** A tap Tern creates for a card whose config names none: the kernel numbers it. */
export const DEFAULT_TAP_NAME = 'vmtap%d';

/**
 * A transmit queue hands back a burst of large frames (segmentation offload: a bulk stream)
 * together with the next burst, or after this long if none comes: the guest takes one
 * interrupt for the two instead of one per frame, as with a device that serves its queue a
 * little later than the doorbell. Small frames (request/response) go back at once.
 * TERN_NET_TX_HOLD_US sets it (0: never held).
 */
const TX_HOLD_US = Math.min(100_000, Math.max(0, Number(process.env.TERN_NET_TX_HOLD_US ?? 200) || 0));
const TX_HOLD_MIN_FRAME = 16 << 10;

export class NetConfigError extends Error {}

export interface NetBackend {
  id: string;
  /** the tap's name (the one the kernel gave a new tap) */
  tap: string;
  /** one per queue pair */
  fds: number[];
  /** the card's MAC */
  mac: number[];
  /** whether the config gave it (else it is a random one) */
  macGiven: boolean;
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
  let tap: { name: string; fds: number[]; multiQueue: boolean };
  if (net.fds) {
    tap = adoptTaps(net.fds, id);
  } else {
    try {
      tap = native().openTap(net.tap ?? DEFAULT_TAP_NAME, pairs);
    } catch (e) {
      throw new NetConfigError(`net device '${id}': the tap '${net.tap ?? DEFAULT_TAP_NAME}' cannot be opened: ${(e as Error).message}`);
    }
  }
  const close = () => tap.fds.forEach((fd) => native().closeFd(fd));
  try {
    const v6 = net.ip !== undefined && isIPv6(net.ip);
    const settings = {
      ...(v6 ? { ip6: net.ip, prefix6: net.mask !== undefined ? ipv6PrefixLength(net.mask)! : 64 } : { ip: net.ip, mask: net.ip !== undefined ? (net.mask ?? '255.255.255.0') : net.mask }),
      mac: net.host_mac !== undefined ? parseMac(net.host_mac)! : undefined,
      mtu: net.mtu,
    };
    // A tap handed over by its creator is set up by it: only what the config asks is changed.
    if (!net.fds) native().configureInterface(tap.name, { ...settings, up: true });
    else if (Object.values(settings).some((v) => v !== undefined)) native().configureInterface(tap.name, settings);
    // A queue no thread reads yet takes no frames: on a tap another VMM also has queues of (the
    // source of a local migration), frames go to that one's until this guest runs.
    if (tap.multiQueue) for (const fd of tap.fds) native().tapSetQueue(fd, false);
  } catch (e) {
    close();
    throw new NetConfigError(`net device '${id}': the tap '${tap.name}' cannot be set up: ${(e as Error).message}`);
  }
  const mac = net.mac !== undefined ? parseMac(net.mac)! : randomMac(randomBytes);
  log.info({ device: id, tap: tap.name, queuePairs: pairs }, 'net device on a tap');
  return { id, tap: tap.name, fds: tap.fds, mac, macGiven: net.mac !== undefined, worker: netWorker(id, tap.fds, log, { detached: tap.multiQueue }), close };
}

/**
 * Taps this process was given (`fds` of the config, one per queue pair): duplicates of them,
 * checked to be queues of one tap with a virtio-net header. Throws NetConfigError.
 */
export function adoptTaps(fds: readonly number[], id: string): { name: string; fds: number[]; multiQueue: boolean } {
  const taken: { name: string; multiQueue: boolean; fd: number }[] = [];
  const fail = (why: string): never => {
    taken.forEach((t) => native().closeFd(t.fd));
    throw new NetConfigError(`net device '${id}': ${why}`);
  };
  for (const fd of fds) {
    try {
      taken.push(native().adoptTap(fd));
    } catch (e) {
      fail(`fd ${fd} cannot be used: ${(e as Error).message}`);
    }
  }
  if (new Set(taken.map((t) => t.name)).size > 1) fail(`its fds are queues of different taps (${[...new Set(taken.map((t) => t.name))].join(', ')})`);
  if (taken.length > 1 && !taken[0].multiQueue) fail(`its fds belong to '${taken[0].name}', which is not a multi-queue tap`);
  return { name: taken[0].name, fds: taken.map((t) => t.fd), multiQueue: taken[0].multiQueue };
}

/**
 * A restore's cards on taps handed to this process (net_fds: each card's queues): for each, the
 * tap the card is named after and its fds, which the restored VM then holds. A card also named
 * in `named` (the taps chosen by name) is refused. Throws NetConfigError; closes no fd given.
 */
export function restoredCardsOnTaps(handed: readonly { id: string; fds: number[] }[], named: readonly { id: string }[] = []): { id: string; tap: string; fds: number[] }[] {
  return handed
    .filter((e) => e.fds.length)
    .map((e) => {
      if (named.some((n) => n.id === e.id)) throw new NetConfigError(`net device '${e.id}' is given both in net and in net_fds`);
      return { id: e.id, tap: tapNameOf(e.fds, e.id), fds: e.fds };
    });
}

/**
 * The name of the tap that `fds` (given to this process) are queues of, checked as adoptTaps
 * checks them; the card they are for is named after it and opens them when it starts. Throws
 * NetConfigError; the fds stay open.
 */
export function tapNameOf(fds: readonly number[], id: string): string {
  const tap = adoptTaps(fds, id);
  tap.fds.forEach((fd) => native().closeFd(fd));
  return tap.name;
}

/**
 * virtio-net's worker. Queue 2n receives and 2n+1 transmits on pair n's tap fd, served by
 * native threads only; a queue no thread may serve yet (its vector masked) waits, and frames
 * wait in the tap meanwhile. A card with several pairs has a control queue after them, served
 * here: the driver says there how many pairs it uses. On a multi-queue tap (`detached`: its
 * queues start detached) the pairs in use are attached as their threads start, so the kernel
 * steers no frame to a queue the guest does not read.
 */
export function netWorker(id: string, fds: readonly number[], log: Logger, opts: { detached: boolean } = { detached: false }): VirtioDeviceWorker {
  let offloadWarned = false;
  const controlQueue = fds.length > 1 ? 2 * fds.length : undefined;
  // Which tap queues are attached now: host state that follows the card's active pairs.
  // Changed only while the card's threads are stopped.
  const attached = fds.map(() => !opts.detached);
  const attachActive = (device: VirtioNetDevice) => {
    if (!opts.detached) return;
    const active = activePairsOf(device);
    fds.forEach((fd, pair) => {
      if (attached[pair] === pair < active) return;
      try {
        native().tapSetQueue(fd, pair < active);
        attached[pair] = pair < active;
      } catch (e) {
        log.warn({ device: id, pair, err: (e as Error).message }, 'the tap refused to attach or detach a queue');
      }
    });
  };
  return {
    ready: (queue) => queue === controlQueue,
    chain(fn, queue, chain, memory): ChainResult {
      if (queue !== controlQueue) throw new VirtqueueError('a net queue is served by its native thread only');
      if (chain.writableBytes < 1) throw new VirtqueueError('a control command has no room for its ack');
      const { device, ack } = virtioNetControl(fn.device as VirtioNetDevice, readFromChain(memory, chain, VIRTIO_NET_CTRL_MAX_BYTES));
      writeToChain(memory, chain, Uint8Array.of(ack));
      if (device !== fn.device) log.info({ device: id, activePairs: activePairsOf(device) }, 'the driver set how many queue pairs it uses');
      return { written: 1, ...(device !== fn.device ? { deviceState: device } : {}) };
    },
    nativeQueue(fn: VirtioFunctionState, queue: number) {
      const fd = fds[Math.floor(queue / 2)];
      if (fd === undefined || queue === controlQueue) return undefined;
      const device = fn.device as VirtioNetDevice;
      attachActive(device);
      const receive = queue % 2 === 0;
      // A pair the driver does not use has no tap queue to read: its buffers wait.
      if (receive && Math.floor(queue / 2) >= activePairsOf(device) && controlQueue !== undefined) return undefined;
      try {
        // What the tap may hand the guest follows what the driver accepted.
        native().tapSetOffload(fd, tunOffloadsFor(featureBits(fn.virtio.driverFeatures)));
      } catch (e) {
        if (!offloadWarned) log.warn({ device: id, err: (e as Error).message }, 'the tap refused the offloads: the guest gets plain frames');
        offloadWarned = true;
      }
      return { kind: 'net', tapFd: fd, receive, mergeable: hasFeature(fn.virtio.driverFeatures, VirtioNetFeature.MRG_RXBUF), txHoldUs: TX_HOLD_US, txHoldMinFrame: TX_HOLD_MIN_FRAME };
    },
  };
}
