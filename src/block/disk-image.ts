// What a virtio-blk device needs from a disk image, whatever its format. Methods are async (the
// I/O runs on libuv's thread pool) and may be called concurrently; each format serializes what
// must be serialized inside.

export class DiskImageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DiskImageError';
  }
}

export interface DiskImage {
  readonly format: 'raw' | 'qcow2';
  /** Guest-visible size in bytes. */
  readonly size: number;
  readonly readonly: boolean;
  /** Stable identifier of the image file (at most 20 ASCII bytes, virtio-blk's GET_ID). */
  readonly id: string;
  /**
   * The file a native queue worker may read and write directly, guest offset = file offset:
   * a raw image without direct=on (O_DIRECT would need aligned guest buffers). Undefined for
   * other images, which their own code serves.
   */
  readonly rawFd?: number;
  /** Fill `into` with the bytes at `offset`. */
  read(offset: number, into: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Make every completed write durable (fsync). */
  flush(): Promise<void>;
  /** The range's contents become unspecified (zeroes, or the backing file's) and its space may be freed. */
  discard(offset: number, length: number): Promise<void>;
  /** The range reads as zeroes afterwards. */
  writeZeroes(offset: number, length: number): Promise<void>;
  /**
   * Let the image's lock go while keeping it open: a paused migration source hands a writable
   * image to a destination on the same host. takeLock() takes it again.
   */
  releaseLock(): void;
  /** Take the image's lock (shared when read-only); throws a DiskImageError when another process holds it. */
  takeLock(): void;
  /** Waits for operations in progress, then releases the file and its lock. */
  close(): Promise<void>;
}

/** Throws unless [offset, offset+length) is a range of integers inside an image of `size` bytes. */
export function checkRange(size: number, offset: number, length: number, writing: boolean, readonly: boolean): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new DiskImageError(`bad range: offset ${offset}, length ${length}`);
  }
  if (offset + length > size) throw new DiskImageError(`range ${offset}+${length} is past the end of the ${size}-byte image`);
  if (writing && readonly) throw new DiskImageError('the image is open read-only');
}
