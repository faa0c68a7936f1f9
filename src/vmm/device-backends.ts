// The host ends of a VM's virtio devices, opened from its config before its machine is built
// (opening a disk image takes I/O): an entropy source, disk images, taps. They hold host resources
// only; what the guest sees of each device is in the store. Each device gets a worker that
// serves its requests.
import fs from 'node:fs';
import type { Logger } from 'pino';
import { type DiskImage, DiskImageError } from '../block/disk-image';
import { openDiskImage } from '../block/open-image';
import type { VmConfig } from '../config/vm-config';
import {
  SECTOR_SIZE,
  VirtioBlkRequestError,
  VirtioBlkStatus,
  VirtioBlkType,
  blkDataRange,
  blkIdBytes,
  parseBlkHeader,
  parseBlkRanges,
  type VirtioBlockDevice,
  VIRTIO_BLK_KIND,
  VIRTIO_BLK_MAX_RANGE_BYTES,
} from '../devices/virtio/block';
import type { PciSegmentState } from '../devices/pci';
import { VIRTIO_NET_KIND, formatMac, type VirtioNetDevice } from '../devices/virtio/net';
import { VIRTIO_RNG_KIND, VIRTIO_RNG_MAX_REQUEST } from '../devices/virtio/rng';
import type { VirtioFunctionState } from '../devices/virtio/transport';
import { VirtqueueError, readFromChain, writeToChain, type DescriptorChain } from '../devices/virtio/virtqueue';
import { diskIdOf, DEFAULT_RNG_ID } from '../devices/virtio/vm-devices';
import type { GuestMemory } from '../memory/guest-memory';
import { openEntropySource } from '../util/host-file';
import { NetConfigError, openNetBackend, type NetBackend } from './net-backend';
import type { ChainResult, NativeQueueSpec, VirtioDeviceWorker } from './virtio-queues';

export interface DeviceBackends {
  /** each device's worker, by device id */
  readonly workers: ReadonlyMap<string, VirtioDeviceWorker>;
  /** the disks' images by device id (their sizes give the disks' capacities) */
  readonly disks: ReadonlyMap<string, DiskImage>;
  /** the net cards' taps by device id (with the MACs the cards get) */
  readonly nets: ReadonlyMap<string, NetBackend>;
  /** release everything (the machine has drained its requests first) */
  close(): Promise<void>;
  /** Let the disks' locks go, images kept open (a paused migration source hands them over). */
  releaseLocks(): void;
  /** Take every disk's lock; throws when another process holds one (those taken stay taken). */
  takeLocks(): void;
}

/** virtio-rng: each request's writable buffers filled from the entropy source, up to VIRTIO_RNG_MAX_REQUEST bytes. */
export function entropyWorker(fd: number): VirtioDeviceWorker {
  return {
    chain(_fn, _queue, chain, memory) {
      const want = Math.min(chain.writableBytes, VIRTIO_RNG_MAX_REQUEST);
      if (want === 0) return { written: 0 };
      const buf = Buffer.allocUnsafe(want);
      let got = 0;
      try {
        got = fs.readSync(fd, buf, 0, want, null);
      } catch {
        // A source with nothing to give right now (EAGAIN) gives nothing this time.
        got = 0;
      }
      return { written: writeToChain(memory, chain, buf.subarray(0, got)) };
    },
  };
}

/**
 * Raw disks are served by native queue threads unless TERN_NATIVE_BLOCK_QUEUES=0 asks for the
 * JavaScript worker (which serves qcow2 and direct=on images in any case).
 */
export function nativeBlockQueuesEnabled(): boolean {
  return process.env.TERN_NATIVE_BLOCK_QUEUES !== '0';
}

/**
 * virtio-blk: a request is a 16-byte header (device-readable), data, and a status byte (the
 * last device-writable byte). A raw image without O_DIRECT may be served by native threads
 * (nativeQueue, native/block_queue.cc, with the same checks); this serves the others. The header and any data to write are copied out when the chain
 * is taken; the I/O runs on libuv's thread pool; read data and the status go into the guest's
 * buffers when it is done. A request the disk cannot carry out gets its status (IOERR,
 * UNSUPP); only a chain with no room for a status breaks the queue.
 */
export function blockWorker(image: DiskImage, log: Logger): VirtioDeviceWorker {
  // (read once: the queues ask on every doorbell)
  const nativeQueues = nativeBlockQueuesEnabled();
  return {
    nativeQueue(fn: VirtioFunctionState): NativeQueueSpec | undefined {
      const imageFd = image.rawFd;
      if (imageFd === undefined || !nativeQueues) return undefined;
      const device = fn.device as VirtioBlockDevice;
      return { kind: 'block', disk: { imageFd, capacity: device.capacity, readonly: device.readonly, id: device.serial } };
    },
    chain(fn: VirtioFunctionState, _queue: number, chain: DescriptorChain, memory: GuestMemory): Promise<ChainResult> {
      if (chain.writableBytes < 1) throw new VirtqueueError('a block request with no status byte');
      const device = fn.device as VirtioBlockDevice;
      const statusAt = chain.writableBytes - 1;
      const finish = (status: number, dataBytes = 0, counters?: Record<string, number>): ChainResult => {
        writeToChain(memory, chain, Uint8Array.of(status), statusAt);
        return counters ? { written: dataBytes + 1, counters } : { written: dataBytes + 1 };
      };
      let work: () => Promise<ChainResult>;
      try {
        const header = parseBlkHeader(readFromChain(memory, chain, 16));
        const payload = () => readFromChain(memory, chain, chain.readableBytes - 16, 16);
        const refuseReadonly = () => {
          if (device.readonly) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, 'the disk is read-only');
        };
        switch (header.type) {
          case VirtioBlkType.IN: {
            const range = blkDataRange(device, header.sector, statusAt);
            work = async () => {
              // Not zeroed: the image read fills it whole, or fails and it is dropped.
              const buf = Buffer.allocUnsafe(range.length);
              await image.read(range.offset, buf);
              writeToChain(memory, chain, buf);
              return finish(VirtioBlkStatus.OK, range.length, { read_bytes: range.length, read_ops: 1 });
            };
            break;
          }
          case VirtioBlkType.OUT: {
            refuseReadonly();
            const range = blkDataRange(device, header.sector, Math.max(0, chain.readableBytes - 16));
            const data = payload();
            work = async () => {
              await image.write(range.offset, data);
              return finish(VirtioBlkStatus.OK, 0, { write_bytes: range.length, write_ops: 1 });
            };
            break;
          }
          case VirtioBlkType.FLUSH:
            work = async () => {
              await image.flush();
              return finish(VirtioBlkStatus.OK);
            };
            break;
          case VirtioBlkType.GET_ID: {
            const id = blkIdBytes(device).subarray(0, statusAt);
            // The rest of the buffer is NUL padding, up to the 20 bytes of an ID.
            const padded = new Uint8Array(Math.min(statusAt, 20));
            padded.set(id);
            writeToChain(memory, chain, padded);
            return Promise.resolve(finish(VirtioBlkStatus.OK, padded.length));
          }
          case VirtioBlkType.DISCARD:
          case VirtioBlkType.WRITE_ZEROES: {
            refuseReadonly();
            // The guest decides how long the chain is: its size is checked before it is copied.
            if (chain.readableBytes - 16 > VIRTIO_BLK_MAX_RANGE_BYTES) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `range list of ${chain.readableBytes - 16} bytes`);
            const ranges = parseBlkRanges(device, payload(), header.type);
            const zero = header.type === VirtioBlkType.WRITE_ZEROES;
            work = async () => {
              for (const r of ranges) await (zero ? image.writeZeroes(r.offset, r.length) : image.discard(r.offset, r.length));
              return finish(VirtioBlkStatus.OK);
            };
            break;
          }
          default:
            return Promise.resolve(finish(VirtioBlkStatus.UNSUPP));
        }
      } catch (e) {
        if (e instanceof VirtioBlkRequestError) return Promise.resolve(finish(e.status));
        throw e;
      }
      return work().catch((e: unknown) => {
        // The disk failed the request: the guest sees an I/O error, the host a line (no data).
        log.warn({ device: fn.id, err: e instanceof DiskImageError ? e.message : String(e) }, 'virtio-blk request failed');
        return finish(VirtioBlkStatus.IOERR);
      });
    },
  };
}

/**
 * Open the host end of every virtio device in `config`; whatever opened is closed again if one
 * fails. `deferLocks` (a migration destination): raw images open without their locks, for
 * takeLocks() once the source has handed them over.
 */
export async function openDeviceBackends(config: VmConfig, log: Logger, opts: { deferLocks?: boolean } = {}): Promise<DeviceBackends> {
  const workers = new Map<string, VirtioDeviceWorker>();
  const disks = new Map<string, DiskImage>();
  const nets = new Map<string, NetBackend>();
  const fds: number[] = [];
  const close = async () => {
    for (const fd of fds.splice(0)) fs.closeSync(fd);
    for (const n of nets.values()) n.close();
    nets.clear();
    const images = [...disks.values()];
    disks.clear();
    await Promise.all(images.map((i) => i.close()));
  };
  try {
    for (const [index, disk] of (config.disks ?? []).entries()) {
      if (!disk.path) throw new DiskImageError(`disk ${index}: a path is needed (vhost-user disks are not supported)`);
      const format = disk.image_type === 'Qcow2' ? 'qcow2' : disk.image_type === 'Raw' ? 'raw' : undefined;
      const image = await openDiskImage(disk.path, { readonly: disk.readonly ?? false, direct: disk.direct ?? false, format, deferLock: opts.deferLocks });
      const id = diskIdOf(disk, index);
      disks.set(id, image);
      if (image.size % SECTOR_SIZE !== 0) log.warn({ disk: id, size: image.size }, 'disk image size is not whole sectors: the last partial sector is not visible');
      workers.set(id, blockWorker(image, log));
    }
    for (const [index, net] of (config.net ?? []).entries()) {
      const backend = openNetBackend(net, index, log);
      nets.set(backend.id, backend);
      workers.set(backend.id, backend.worker);
    }
    if (config.rng) {
      const fd = openEntropySource(config.rng.src);
      fds.push(fd);
      workers.set(config.rng.id ?? DEFAULT_RNG_ID, entropyWorker(fd));
    }
  } catch (e) {
    await close();
    throw e;
  }
  return {
    workers,
    disks,
    nets,
    close,
    releaseLocks: () => disks.forEach((d) => d.releaseLock()),
    takeLocks: () => disks.forEach((d) => d.takeLock()),
  };
}

/**
 * A machine built from saved state (a restore, a migration) gets its devices from that state
 * and its host ends from the config: they must agree, or the guest would see its disk change
 * under it. Each device needs its host end, each disk the capacity the guest knew.
 */
export function checkBackendsFit(segment: PciSegmentState, backends: DeviceBackends | undefined): void {
  for (const fn of Object.values(segment.functions) as VirtioFunctionState[]) {
    if (fn.kind === VIRTIO_BLK_KIND) {
      const device = fn.device as VirtioBlockDevice;
      const image = backends?.disks.get(fn.id);
      if (!image) throw new DiskImageError(`disk '${fn.id}' has no image: the config does not name it`);
      if (Math.floor(image.size / SECTOR_SIZE) !== device.capacity) {
        throw new DiskImageError(`disk '${fn.id}': the image has ${Math.floor(image.size / SECTOR_SIZE)} sectors, the guest's disk had ${device.capacity}`);
      }
      if (image.readonly && !device.readonly) throw new DiskImageError(`disk '${fn.id}': the image is open read-only, the guest's disk is writable`);
    } else if (fn.kind === VIRTIO_NET_KIND) {
      const tap = backends?.nets.get(fn.id);
      if (!tap) throw new NetConfigError(`net device '${fn.id}' has no tap: the config does not name it`);
      const pairs = (fn.device as VirtioNetDevice).queuePairs;
      if (tap.fds.length !== pairs) throw new NetConfigError(`net device '${fn.id}': the config gives ${tap.fds.length} queue pairs, the guest's card had ${pairs}`);
      const mac = (fn.device as VirtioNetDevice).mac;
      if (tap.macGiven && formatMac(tap.mac) !== formatMac(mac)) throw new NetConfigError(`net device '${fn.id}': the config gives MAC ${formatMac(tap.mac)}, the guest's card had ${formatMac(mac)}`);
    } else if (fn.kind === VIRTIO_RNG_KIND && !backends?.workers.has(fn.id)) {
      throw new Error(`entropy device '${fn.id}' has no source: the config does not name one`);
    }
  }
}
