// The qcow2 header (versions 2 and 3) and its extensions, checked field by field against the
// file's size before anything is allocated from them: a hostile image gets an error naming the
// field, never a huge allocation or a read outside the file.
import { DiskImageError } from './disk-image';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
/** Largest L1 table read into memory: 32 MiB, as QEMU allows. */
export const MAX_L1_BYTES = 32 << 20;
/** Largest refcount table read into memory: 8 MiB, as QEMU allows. */
export const MAX_REFCOUNT_TABLE_BYTES = 8 << 20;
export const MAX_SNAPSHOTS = 65536;
/** Offsets are JS numbers: a virtual size is capped well under 2^53. */
export const MAX_VIRTUAL_SIZE = 2 ** 52;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;

const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_DATA_FILE = 0x44415441;

export class Qcow2HeaderError extends DiskImageError {
  constructor(
    readonly field: string,
    problem: string,
  ) {
    super(`qcow2 header: ${field} ${problem}`);
    this.name = 'Qcow2HeaderError';
  }
}

/** Tables that contradict themselves or the file, found after the header was accepted. */
export class Qcow2DamageError extends DiskImageError {
  constructor(file: string, what: string) {
    super(`qcow2 image ${file} is damaged: ${what}`);
    this.name = 'Qcow2DamageError';
  }
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  backingFile?: string;
  backingFormat?: string;
}

/** Bytes of the file to hand to parseQcow2Header: the header, its extensions and the backing name. */
export function qcow2HeaderBytes(clusterBits: number): number {
  return 1 << Math.min(Math.max(clusterBits, 9), 21);
}

function u64(buf: Uint8Array, off: number, field: string): number {
  const v = Buffer.from(buf.buffer, buf.byteOffset, buf.length).readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Qcow2HeaderError(field, `is ${v}, too large`);
  return Number(v);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function text(bytes: Uint8Array, field: string): string {
  let s: string;
  try {
    s = utf8.decode(bytes);
  } catch {
    throw new Qcow2HeaderError(field, 'is not UTF-8 text');
  }
  if (s.includes('\0')) throw new Qcow2HeaderError(field, 'holds a NUL byte');
  return s;
}

function checkTable(field: string, offset: number, bytes: number, clusterSize: number, fileSize: number): void {
  if (offset % clusterSize !== 0) throw new Qcow2HeaderError(field, `${offset} is not aligned to the ${clusterSize}-byte cluster`);
  if (offset === 0 && bytes > 0) throw new Qcow2HeaderError(field, 'is 0 (it would overlap the header)');
  if (offset + bytes > fileSize) throw new Qcow2HeaderError(field, `puts ${bytes} bytes at ${offset}, past the end of the ${fileSize}-byte file`);
}

/**
 * Parse the header from the file's first bytes (`head`: at least 104 bytes, or as many as the
 * file has; the whole first cluster when the file is that long).
 */
export function parseQcow2Header(head: Uint8Array, fileSize: number): Qcow2Header {
  if (head.length < 72) throw new Qcow2HeaderError('magic', `cannot be read: the file is ${fileSize} bytes`);
  const b = Buffer.from(head.buffer, head.byteOffset, head.length);
  if (b.readUInt32BE(0) !== QCOW2_MAGIC) throw new Qcow2HeaderError('magic', 'is not QFI\\xfb');
  const version = b.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new Qcow2HeaderError('version', `is ${version}, not 2 or 3`);
  const clusterBits = b.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) throw new Qcow2HeaderError('cluster_bits', `is ${clusterBits}, outside 9..21`);
  const clusterSize = 2 ** clusterBits;

  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(head, 8, 'backing_file_offset'),
    backingFileSize: b.readUInt32BE(16),
    clusterBits,
    size: u64(head, 24, 'size'),
    l1Size: b.readUInt32BE(36),
    l1TableOffset: u64(head, 40, 'l1_table_offset'),
    refcountTableOffset: u64(head, 48, 'refcount_table_offset'),
    refcountTableClusters: b.readUInt32BE(56),
    nbSnapshots: b.readUInt32BE(60),
    snapshotsOffset: u64(head, 64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 72,
  };
  const cryptMethod = b.readUInt32BE(32);
  if (cryptMethod !== 0) throw new Qcow2HeaderError('crypt_method', `is ${cryptMethod}: encrypted images are not supported`);

  let compressionType = 0;
  if (version === 3) {
    if (head.length < 104) throw new Qcow2HeaderError('header_length', `cannot be read: the file is ${fileSize} bytes`);
    h.incompatibleFeatures = b.readBigUInt64BE(72);
    h.compatibleFeatures = b.readBigUInt64BE(80);
    h.autoclearFeatures = b.readBigUInt64BE(88);
    h.refcountOrder = b.readUInt32BE(96);
    h.headerLength = b.readUInt32BE(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0 || h.headerLength > clusterSize || h.headerLength > head.length) {
      throw new Qcow2HeaderError('header_length', `is ${h.headerLength}: it must be a multiple of 8 from 104 to the cluster size, inside the file`);
    }
    if (h.headerLength > 104) compressionType = head[104];
  }

  const known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
  const unknown = h.incompatibleFeatures & ~known;
  if (unknown !== 0n) {
    const bits = [...Array(64).keys()].filter((i) => (unknown >> BigInt(i)) & 1n);
    throw new Qcow2HeaderError('incompatible_features', `has unknown bits ${bits.join(', ')}`);
  }
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) throw new Qcow2HeaderError('incompatible_features', 'asks for an external data file, which is not supported');
  if (h.incompatibleFeatures & INCOMPAT_EXTL2) throw new Qcow2HeaderError('incompatible_features', 'asks for extended L2 entries, which are not supported');
  if (compressionType !== 0) throw new Qcow2HeaderError('compression_type', `is ${compressionType}: only deflate (0) is supported`);
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION) throw new Qcow2HeaderError('incompatible_features', 'sets the compression type bit with deflate compression');
  if (h.refcountOrder < 3 || h.refcountOrder > 6) {
    throw new Qcow2HeaderError('refcount_order', `is ${h.refcountOrder}: only 8-, 16-, 32- and 64-bit refcounts (orders 3..6) are supported`);
  }

  if (h.size > MAX_VIRTUAL_SIZE) throw new Qcow2HeaderError('size', `is ${h.size}, more than the ${MAX_VIRTUAL_SIZE} supported`);
  const l2Entries = clusterSize / 8;
  const l1Needed = Math.ceil(h.size / (clusterSize * l2Entries));
  if (h.l1Size * 8 > MAX_L1_BYTES) throw new Qcow2HeaderError('l1_size', `is ${h.l1Size}, more than the ${MAX_L1_BYTES / 8} entries allowed`);
  if (h.l1Size < l1Needed) throw new Qcow2HeaderError('l1_size', `is ${h.l1Size}, fewer than the ${l1Needed} entries a ${h.size}-byte disk needs`);
  checkTable('l1_table_offset', h.l1TableOffset, h.l1Size * 8, clusterSize, fileSize);

  if (h.refcountTableClusters === 0) throw new Qcow2HeaderError('refcount_table_clusters', 'is 0');
  if (h.refcountTableClusters * clusterSize > MAX_REFCOUNT_TABLE_BYTES) {
    throw new Qcow2HeaderError('refcount_table_clusters', `is ${h.refcountTableClusters}, more than the ${MAX_REFCOUNT_TABLE_BYTES} bytes allowed`);
  }
  checkTable('refcount_table_offset', h.refcountTableOffset, h.refcountTableClusters * clusterSize, clusterSize, fileSize);

  if (h.nbSnapshots > MAX_SNAPSHOTS) throw new Qcow2HeaderError('nb_snapshots', `is ${h.nbSnapshots}, more than ${MAX_SNAPSHOTS}`);
  if (h.nbSnapshots > 0) checkTable('snapshots_offset', h.snapshotsOffset, 1, clusterSize, fileSize);

  if (h.backingFileOffset !== 0 || h.backingFileSize !== 0) {
    if (h.backingFileSize === 0 || h.backingFileSize > 1023) throw new Qcow2HeaderError('backing_file_size', `is ${h.backingFileSize}, not 1..1023`);
    if (h.backingFileOffset < h.headerLength || h.backingFileOffset + h.backingFileSize > Math.min(clusterSize, head.length)) {
      throw new Qcow2HeaderError('backing_file_offset', `is ${h.backingFileOffset}: the name must lie after the header, in the first cluster, inside the file`);
    }
    h.backingFile = text(head.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize), 'backing file name');
  }

  // Header extensions follow the header, each 8-byte aligned, up to an end marker.
  const end = Math.min(clusterSize, head.length);
  let pos = h.headerLength;
  for (;;) {
    if (pos + 8 > end) throw new Qcow2HeaderError('header extension', `at ${pos} runs past the first cluster`);
    const type = b.readUInt32BE(pos);
    const len = b.readUInt32BE(pos + 4);
    if (type === EXT_END) break;
    if (pos + 8 + len > end) throw new Qcow2HeaderError('header extension', `0x${type.toString(16)} length ${len} runs past the first cluster`);
    const data = head.subarray(pos + 8, pos + 8 + len);
    if (type === EXT_BACKING_FORMAT) h.backingFormat = text(data, 'backing format extension');
    if (type === EXT_DATA_FILE) throw new Qcow2HeaderError('header extension', 'names an external data file, which is not supported');
    pos += 8 + Math.ceil(len / 8) * 8;
  }
  return h;
}
