// virtio-blk (virtio 1.2, 5.2): the guest-visible side of a disk. Its state is what the guest
// can see of the disk (capacity, read-only, serial, queues, which commands it offers), so a
// restored or migrated guest sees the same disk; the image file itself is the VMM's host end.
// Requests are parsed and checked here, as plain functions; the VMM's worker does the I/O.
import { Type } from '@sinclair/typebox';
import { Count, Exact, IntIn } from '../../state/state-schema';
import { defineVirtioFunction, VIRTIO_MAX_QUEUES } from './transport';

export const VIRTIO_BLK_KIND = 'virtio-blk' as const;
export const VIRTIO_ID_BLOCK = 2;
export const SECTOR_SIZE = 512;
/** Cloud Hypervisor's default queue size. */
export const VIRTIO_BLK_DEFAULT_QUEUE_SIZE = 128;
/** Most queues a disk may have (one MSI-X vector each, plus the configuration's). */
export const VIRTIO_BLK_MAX_QUEUES = 32;
/** GET_ID answers with at most 20 bytes (VIRTIO_BLK_ID_BYTES). */
export const VIRTIO_BLK_ID_BYTES = 20;
/** Data a request may carry at most; the device tells the driver through seg_max and size_max. */
export const VIRTIO_BLK_MAX_REQUEST = 4 << 20;
/**
 * Buffers per request at most (seg_max); the header and the status take two more. A chain may
 * be no longer than its queue (2.7.5.3.1), and Linux builds requests of seg_max + 2
 * descriptors: a disk offers seg_max = its queue size - 2, up to this.
 */
export const VIRTIO_BLK_SEG_MAX = 126;
/** The smallest queue a disk takes: room for a request of a few buffers. */
export const VIRTIO_BLK_MIN_QUEUE_SIZE = 8;
/** Bytes per buffer (size_max). */
export const VIRTIO_BLK_SIZE_MAX = 1 << 20;
/** Ranges per discard or write-zeroes request, and sectors per range. */
export const VIRTIO_BLK_MAX_RANGES = 16;
export const VIRTIO_BLK_MAX_RANGE_SECTORS = (1 << 30) / SECTOR_SIZE;

/** Feature bits (5.2.3). */
export const VirtioBlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** Request types (5.2.6). */
export const VirtioBlkType = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  DISCARD: 11,
  WRITE_ZEROES: 13,
} as const;

/** Status byte values. */
export const VirtioBlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

export interface VirtioBlockDevice {
  /** size in 512-byte sectors */
  capacity: number;
  readonly: boolean;
  /** what GET_ID answers (ASCII, at most 20 bytes) */
  serial: string;
  /** the number of request queues the device offers */
  numQueues: number;
  /** buffers per request the driver may use (seg_max): below the queue size */
  segMax: number;
}

/** seg_max for queues of `queueSize`: a request of seg_max + 2 descriptors must fit one. */
export function blkSegMax(queueSize: number): number {
  return Math.min(VIRTIO_BLK_SEG_MAX, queueSize - 2);
}

const bit = (n: number) => 1n << BigInt(n);

export function virtioBlockFeatures(d: VirtioBlockDevice): bigint {
  let f = bit(VirtioBlkFeature.SIZE_MAX) | bit(VirtioBlkFeature.SEG_MAX) | bit(VirtioBlkFeature.BLK_SIZE) | bit(VirtioBlkFeature.FLUSH);
  if (d.numQueues > 1) f |= bit(VirtioBlkFeature.MQ);
  // A read-only disk offers neither discard nor write-zeroes: both change what it reads.
  f |= d.readonly ? bit(VirtioBlkFeature.RO) : bit(VirtioBlkFeature.DISCARD) | bit(VirtioBlkFeature.WRITE_ZEROES);
  return f;
}

/** struct virtio_blk_config as the driver reads it. */
export function virtioBlockConfigBytes(d: VirtioBlockDevice): Uint8Array {
  const b = new Uint8Array(0x3c);
  const v = new DataView(b.buffer);
  v.setBigUint64(0x00, BigInt(d.capacity), true);
  v.setUint32(0x08, VIRTIO_BLK_SIZE_MAX, true);
  v.setUint32(0x0c, d.segMax, true);
  v.setUint32(0x14, SECTOR_SIZE, true);
  v.setUint16(0x22, d.numQueues, true);
  v.setUint32(0x24, VIRTIO_BLK_MAX_RANGE_SECTORS, true);
  v.setUint32(0x28, VIRTIO_BLK_MAX_RANGES, true);
  v.setUint32(0x2c, 1, true);
  v.setUint32(0x30, VIRTIO_BLK_MAX_RANGE_SECTORS, true);
  v.setUint32(0x34, VIRTIO_BLK_MAX_RANGES, true);
  v.setUint8(0x38, 1);
  return b;
}

export const virtioBlockModel = defineVirtioFunction<VirtioBlockDevice>({
  kind: VIRTIO_BLK_KIND,
  virtioId: VIRTIO_ID_BLOCK,
  // Mass storage, SCSI subclass: what drivers and firmware expect of a virtio disk.
  classCode: 0x01_00_00,
  vectors: VIRTIO_BLK_MAX_QUEUES + 1,
  maxQueues: Math.min(VIRTIO_BLK_MAX_QUEUES, VIRTIO_MAX_QUEUES),
  deviceSchema: Exact({
    capacity: Count(),
    readonly: Type.Boolean(),
    serial: Type.String({ maxLength: VIRTIO_BLK_ID_BYTES, pattern: '^[\\x20-\\x7e]*$' }),
    numQueues: IntIn(1, VIRTIO_BLK_MAX_QUEUES),
    segMax: IntIn(1, VIRTIO_BLK_SEG_MAX),
  }),
  features: virtioBlockFeatures,
  configBytes: virtioBlockConfigBytes,
});

/** A request's header (struct virtio_blk_req's first 16 bytes). */
export interface VirtioBlkHeader {
  type: number;
  sector: number;
}

/** One range of a discard or write-zeroes request. */
export interface VirtioBlkRange {
  offset: number;
  length: number;
  unmap: boolean;
}

/** Why a request cannot be carried out: its status byte and a reason for the log. */
export class VirtioBlkRequestError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'VirtioBlkRequestError';
  }
}

export function parseBlkHeader(bytes: Uint8Array): VirtioBlkHeader {
  if (bytes.length < 16) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, 'request header shorter than 16 bytes');
  const v = new DataView(bytes.buffer, bytes.byteOffset, 16);
  const sector = v.getBigUint64(8, true);
  // Sectors past 2^53 / 512 are past any disk: the range check refuses them.
  return { type: v.getUint32(0, true), sector: sector > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(sector) };
}

/** The byte range a read or write of `length` bytes at `sector` covers, checked against the disk. */
export function blkDataRange(d: VirtioBlockDevice, sector: number, length: number): { offset: number; length: number } {
  if (length % SECTOR_SIZE !== 0) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `data of ${length} bytes is not whole sectors`);
  if (length > VIRTIO_BLK_MAX_REQUEST) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `request of ${length} bytes is larger than ${VIRTIO_BLK_MAX_REQUEST}`);
  if (sector > d.capacity || length / SECTOR_SIZE > d.capacity - sector) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `sectors ${sector}+${length / SECTOR_SIZE} are past the end of the disk`);
  return { offset: sector * SECTOR_SIZE, length };
}

/** Bytes a discard or write-zeroes range list may have: checked before the list is copied out of the guest. */
export const VIRTIO_BLK_MAX_RANGE_BYTES = VIRTIO_BLK_MAX_RANGES * 16;

/** The ranges of a discard or write-zeroes payload, each checked against the disk. */
export function parseBlkRanges(d: VirtioBlockDevice, payload: Uint8Array, type: number): VirtioBlkRange[] {
  if (payload.length === 0 || payload.length % 16 !== 0) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `range list of ${payload.length} bytes`);
  const count = payload.length / 16;
  if (count > VIRTIO_BLK_MAX_RANGES) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `${count} ranges, more than ${VIRTIO_BLK_MAX_RANGES}`);
  const v = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const out: VirtioBlkRange[] = [];
  for (let i = 0; i < count; i++) {
    const sector = v.getBigUint64(16 * i, true);
    const sectors = v.getUint32(16 * i + 8, true);
    const flags = v.getUint32(16 * i + 12, true);
    // Only write-zeroes has a flag (unmap); any other bit is unsupported (5.2.6.2).
    if ((type === VirtioBlkType.DISCARD && flags !== 0) || flags & ~1) throw new VirtioBlkRequestError(VirtioBlkStatus.UNSUPP, `range flags 0x${flags.toString(16)}`);
    if (sectors > VIRTIO_BLK_MAX_RANGE_SECTORS) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `range of ${sectors} sectors`);
    const s = sector > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(sector);
    if (s > d.capacity || sectors > d.capacity - s) throw new VirtioBlkRequestError(VirtioBlkStatus.IOERR, `range ${s}+${sectors} is past the end of the disk`);
    out.push({ offset: s * SECTOR_SIZE, length: sectors * SECTOR_SIZE, unmap: (flags & 1) === 1 });
  }
  return out;
}

/** GET_ID's answer: the serial, NUL-padded when shorter than the buffer. */
export function blkIdBytes(d: VirtioBlockDevice): Uint8Array {
  return new TextEncoder().encode(d.serial.slice(0, VIRTIO_BLK_ID_BYTES));
}
