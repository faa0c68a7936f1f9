// virtio-rng (virtio 1.2, 5.4): one request queue whose device-writable buffers the device
// fills with entropy from the host. It has no configuration space and no feature bits of its
// own, so its state is the transport's alone; where the entropy comes from (`src=`) is the
// VMM's configuration, not guest-visible state.
import { Exact } from '../../state/state-schema';
import { defineVirtioFunction } from './transport';

export const VIRTIO_RNG_KIND = 'virtio-rng' as const;
export const VIRTIO_ID_ENTROPY = 4;
/** The queue size offered: what Linux's driver uses whole. */
export const VIRTIO_RNG_QUEUE_SIZE = 256;
/**
 * Bytes given per request at most: a driver asking for more gets this much (it may ask
 * again), so one request cannot make the host read without bound.
 */
export const VIRTIO_RNG_MAX_REQUEST = 64 * 1024;

export type VirtioRngDevice = Record<string, never>;

export const virtioRngModel = defineVirtioFunction<VirtioRngDevice>({
  kind: VIRTIO_RNG_KIND,
  virtioId: VIRTIO_ID_ENTROPY,
  // Base class 0xff: a device that fits no other class (what drivers expect of virtio-rng).
  classCode: 0xff_00_00,
  vectors: 2,
  maxQueues: 1,
  deviceSchema: Exact({}),
  features: () => 0n,
});
