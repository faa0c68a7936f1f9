// The driver's side of one split virtqueue in plain memory, for tests of the native queue
// threads: it writes descriptor chains and the available ring, rings the doorbell (an
// eventfd), and reads the used ring back.
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/devices/virtio/virtqueue';
import type { GuestMemory } from '../../src/memory/guest-memory';
import { native } from '../../src/native/kvm';

export interface RingLayout {
  size: number;
  desc: number;
  avail: number;
  used: number;
}

export interface RingDriver {
  /** post a chain of [addr, len, writable] buffers (and ring the doorbell unless kick is false); returns its head */
  post(buffers: [number, number, boolean][], kick?: boolean): number;
  /** write a chain's descriptors only, not yet available to the device (a test may change them first); returns its head */
  chain(buffers: [number, number, boolean][]): number;
  /** make the chain at `head` available (and ring the doorbell unless kick is false) */
  offer(head: number, kick?: boolean): void;
  usedIdx(): number;
  used(i: number): { id: number; len: number };
  /** the avail_event the device published (EVENT_IDX) */
  availEvent(): number;
  /** set used_event (EVENT_IDX): the driver wants an interrupt once the used index passes it */
  setUsedEvent(v: number): void;
}

export function ringDriver(mem: GuestMemory, ring: RingLayout, kickFd: number): RingDriver {
  let nextDesc = 0;
  let availIdx = 0;
  const driver: RingDriver = {
    post: (buffers, kick = true) => {
      const head = driver.chain(buffers);
      driver.offer(head, kick);
      return head;
    },
    chain(buffers) {
      const head = nextDesc;
      buffers.forEach(([addr, len, writable], i) => {
        const at = ring.desc + 16 * ((head + i) % ring.size);
        mem.writeU64(at, BigInt(addr));
        mem.writeU32(at + 8, len);
        const last = i === buffers.length - 1;
        mem.writeU16(at + 12, (last ? 0 : VIRTQ_DESC_F_NEXT) | (writable ? VIRTQ_DESC_F_WRITE : 0));
        mem.writeU16(at + 14, (head + i + 1) % ring.size);
      });
      nextDesc = (nextDesc + buffers.length) % ring.size;
      return head;
    },
    offer(head, kick = true) {
      mem.writeU16(ring.avail + 4 + 2 * (availIdx % ring.size), head);
      availIdx = (availIdx + 1) & 0xffff;
      mem.writeU16(ring.avail + 2, availIdx);
      if (kick) native().eventfdWrite(kickFd, 1n);
    },
    usedIdx: () => mem.readU16(ring.used + 2),
    used: (i) => ({ id: mem.readU32(ring.used + 4 + 8 * (i % ring.size)), len: mem.readU32(ring.used + 8 + 8 * (i % ring.size)) }),
    availEvent: () => mem.readU16(ring.used + 4 + 8 * ring.size),
    setUsedEvent: (v) => mem.writeU16(ring.avail + 4 + 2 * ring.size, v),
  };
  return driver;
}

/** Wait (polling) until `cond` holds; throws after 5 s naming `what`. */
export async function until(what: string, cond: () => boolean): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
