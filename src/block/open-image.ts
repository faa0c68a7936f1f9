// Opening a disk image: its format (given, or probed from the qcow2 magic as Cloud Hypervisor
// does) and, for qcow2, its chain of read-only backing images.
import path from 'node:path';
import { native } from '../native/kvm';
import { DiskImageError, type DiskImage } from './disk-image';
import { closeImageFile, lockImageFile, openImageFile, readAt, type ImageFile } from './image-file';
import { parseQcow2Header, QCOW2_MAGIC, qcow2HeaderBytes } from './qcow2-header';
import { Qcow2Image } from './qcow2-image';
import { RawImage } from './raw-image';

/** Backing images below one image, at most. */
export const MAX_BACKING_DEPTH = 8;

export interface OpenDiskImageOptions {
  readonly?: boolean;
  /** O_DIRECT (Cloud Hypervisor's direct=on); raw images only. */
  direct?: boolean;
  /** Skip probing. A raw image a guest may write should be opened as 'raw': a guest could write a qcow2 header into it. */
  format?: 'raw' | 'qcow2';
  /**
   * A migration destination: a writable raw image is opened without its lock, which takeLock()
   * takes once the source has handed it over (on the same host the source holds it until
   * then). A qcow2 image is locked at once: its tables are read now, and must not be read
   * while another process may still change them.
   */
  deferLock?: boolean;
}

async function probe(file: ImageFile): Promise<'raw' | 'qcow2'> {
  if (file.size < 4) return 'raw';
  const head = file.direct ? new Uint8Array(native().alignedBuffer(4096)) : new Uint8Array(4);
  await readAt(file, head, 0, true);
  return Buffer.from(head.buffer, head.byteOffset, 4).readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
}

export function openDiskImage(file: string, opts: OpenDiskImageOptions = {}): Promise<DiskImage> {
  return openAt(file, { readonly: opts.readonly ?? false, direct: opts.direct ?? false, format: opts.format, deferLock: opts.deferLock ?? false }, 0);
}

async function openAt(file: string, opts: { readonly: boolean; direct: boolean; format?: 'raw' | 'qcow2'; deferLock?: boolean }, depth: number): Promise<DiskImage> {
  const f = openImageFile(file, { ...opts, lock: !opts.deferLock });
  try {
    const format = opts.format ?? (await probe(f));
    if (format === 'raw') return new RawImage(f);
    if (opts.deferLock) lockImageFile(f);
    if (f.direct) throw new DiskImageError(`disk image ${file}: direct=on is supported for raw images only`);
    const first = Buffer.alloc(Math.min(f.size, 104));
    await readAt(f, first, 0);
    const clusterBits = first.length >= 24 ? first.readUInt32BE(20) : 16;
    const head = Buffer.alloc(Math.min(f.size, qcow2HeaderBytes(clusterBits)));
    await readAt(f, head, 0);
    const header = parseQcow2Header(head, f.size);
    let backing: DiskImage | undefined;
    if (header.backingFile !== undefined) {
      if (depth >= MAX_BACKING_DEPTH) throw new DiskImageError(`disk image ${file}: backing chain deeper than ${MAX_BACKING_DEPTH} images`);
      const fmt = header.backingFormat;
      if (fmt !== undefined && fmt !== 'raw' && fmt !== 'qcow2') throw new DiskImageError(`disk image ${file}: backing format ${JSON.stringify(fmt.slice(0, 16))} is not raw or qcow2`);
      const name = path.resolve(path.dirname(file), header.backingFile);
      backing = await openAt(name, { readonly: true, direct: false, format: fmt }, depth + 1);
    }
    try {
      return await Qcow2Image.open(f, header, backing);
    } catch (e) {
      await backing?.close();
      throw e;
    }
  } catch (e) {
    closeImageFile(f);
    throw e;
  }
}
