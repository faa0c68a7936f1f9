// The host ends of a VM's virtio devices, from its config: what serves each device's
// requests. They hold host resources only (an open entropy source); every piece of device
// state is in the store.
import fs from 'node:fs';
import type { VmConfig } from '../config/vm-config';
import { VIRTIO_RNG_MAX_REQUEST } from '../devices/virtio/rng';
import { writeToChain, type DescriptorChain } from '../devices/virtio/virtqueue';
import { DEFAULT_RNG_ID } from '../devices/virtio/vm-devices';
import type { GuestMemory } from '../memory/guest-memory';
import { openEntropySource } from '../util/host-file';
import type { VirtioDeviceWorker } from './virtio-queues';

/** virtio-rng: each request's writable buffers filled from the entropy source, up to VIRTIO_RNG_MAX_REQUEST bytes. */
export function entropyWorker(src: string): VirtioDeviceWorker {
  const fd = openEntropySource(src);
  return {
    chain(_queue: number, chain: DescriptorChain, memory: GuestMemory): number {
      const want = Math.min(chain.writableBytes, VIRTIO_RNG_MAX_REQUEST);
      if (want === 0) return 0;
      const buf = Buffer.allocUnsafe(want);
      let got = 0;
      try {
        got = fs.readSync(fd, buf, 0, want, null);
      } catch {
        // A source that fails (EAGAIN from a FIFO-like device) gives nothing this time.
        got = 0;
      }
      return writeToChain(memory, chain, buf.subarray(0, got));
    },
    close: () => fs.closeSync(fd),
  };
}

/** Each virtio device's worker, by device id; closes what it opened if one fails. */
export function virtioWorkers(config: VmConfig): Map<string, VirtioDeviceWorker> {
  const out = new Map<string, VirtioDeviceWorker>();
  try {
    if (config.rng) out.set(config.rng.id ?? DEFAULT_RNG_ID, entropyWorker(config.rng.src));
  } catch (e) {
    for (const w of out.values()) w.close?.();
    throw e;
  }
  return out;
}
