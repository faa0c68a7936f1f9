// A descriptor chain as the queue code hands it to a worker, built directly from its buffers,
// for tests of workers that need no ring.
import type { DescriptorChain } from '../../src/devices/virtio/virtqueue';

type Buffers = { addr: number; len: number }[];

export const chainOf = (readable: Buffers, writable: Buffers): DescriptorChain => ({
  head: 0,
  readable,
  writable,
  readableBytes: readable.reduce((n, s) => n + s.len, 0),
  writableBytes: writable.reduce((n, s) => n + s.len, 0),
});
