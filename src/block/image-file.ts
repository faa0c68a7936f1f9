// An image file as the VMM holds it: opened without following a symlink, checked to be a
// regular file (a block device's size needs the BLKGETSIZE64 ioctl, which the addon does not
// have yet, so block devices are refused), locked with flock so that two VMMs never write one image
// (shared for read-only opens, exclusive otherwise), and read and written whole.
import fs from 'node:fs';
import { native } from '../native/kvm';
import { DiskImageError } from './disk-image';

const { O_RDONLY, O_RDWR, O_NOFOLLOW, O_NONBLOCK, O_DIRECT } = fs.constants;

export interface ImageFile {
  readonly path: string;
  readonly fd: number;
  /** Bytes. */
  readonly size: number;
  readonly readonly: boolean;
  /** Opened O_DIRECT: offsets, lengths and buffers must be aligned. */
  readonly direct: boolean;
  /** dev, rdev and inode, as Cloud Hypervisor's default disk serial, cut to 20 bytes. */
  readonly id: string;
}

function openFault(code: string | undefined): string {
  if (code === 'ENOENT') return 'missing';
  if (code === 'ELOOP') return 'is a symbolic link';
  if (code === 'EINVAL') return 'cannot be opened with O_DIRECT on this file system';
  return `cannot be opened (${code ?? 'unknown error'})`;
}

/**
 * Open an image file. `lock: false` leaves it unlocked (a migration destination on the same
 * host, where the source holds the lock until it hands the image over): lockImageFile takes
 * the lock later.
 */
export function openImageFile(path: string, opts: { readonly: boolean; direct: boolean; lock?: boolean }): ImageFile {
  let fd: number;
  try {
    fd = fs.openSync(path, (opts.readonly ? O_RDONLY : O_RDWR) | O_NOFOLLOW | O_NONBLOCK | (opts.direct ? O_DIRECT : 0));
  } catch (e) {
    throw new DiskImageError(`disk image ${path}: ${openFault((e as NodeJS.ErrnoException).code)}`);
  }
  try {
    const st = fs.fstatSync(fd);
    if (st.isBlockDevice()) throw new DiskImageError(`disk image ${path}: is a block device; only regular files are supported`);
    if (!st.isFile()) throw new DiskImageError(`disk image ${path}: is not a regular file`);
    const size = st.size;
    const id = `${st.dev}${st.rdev}${st.ino}`.slice(0, 20);
    const file = { path, fd, size, readonly: opts.readonly, direct: opts.direct, id };
    if (opts.lock ?? true) lockImageFile(file);
    return file;
  } catch (e) {
    fs.closeSync(fd);
    if (e instanceof DiskImageError) throw e;
    throw new DiskImageError(`disk image ${path}: cannot be examined (${(e as NodeJS.ErrnoException).code ?? 'unknown error'})`);
  }
}

function ioError(file: ImageFile, what: string, pos: number, e: unknown): DiskImageError {
  return new DiskImageError(`disk image ${file.path}: ${what} at ${pos} failed (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
}

function pread(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

function pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

/**
 * Read buf.length bytes at pos. Past the end of the file the rest is zero-filled when
 * zeroPastEnd, and an error otherwise (metadata that ends early is a damaged image).
 */
export async function readAt(file: ImageFile, buf: Uint8Array, pos: number, zeroPastEnd = false): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    let n: number;
    try {
      n = await pread(file.fd, buf, done, buf.length - done, pos + done);
    } catch (e) {
      throw ioError(file, 'read', pos + done, e);
    }
    if (n === 0) {
      if (!zeroPastEnd) throw new DiskImageError(`disk image ${file.path}: ends at ${pos + done}, before the ${buf.length} bytes at ${pos}`);
      buf.fill(0, done);
      return;
    }
    done += n;
  }
}

export async function writeAt(file: ImageFile, data: Uint8Array, pos: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    try {
      done += await pwrite(file.fd, data, done, data.length - done, pos + done);
    } catch (e) {
      throw ioError(file, 'write', pos + done, e);
    }
  }
}

export function syncFile(file: ImageFile): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(file.fd, (err) => (err ? reject(ioError(file, 'fsync', 0, err)) : resolve())));
}

/** Take the file's lock: shared for a read-only image, exclusive otherwise; throws when another process holds a conflicting one. */
export function lockImageFile(file: ImageFile): void {
  if (!native().flock(file.fd, { exclusive: !file.readonly, nonblocking: true })) {
    throw new DiskImageError(`disk image ${file.path}: locked by another process (${file.readonly ? 'it is being written' : 'it is in use'})`);
  }
}

/** Let the file's lock go (a migration source handing the image over); the file stays open. */
export function unlockImageFile(file: ImageFile): void {
  native().flock(file.fd, { unlock: true });
}

export function closeImageFile(file: ImageFile): void {
  fs.closeSync(file.fd); // drops the flock
}
