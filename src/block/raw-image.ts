// A raw image: guest offset = file offset. With direct=on (O_DIRECT) every transfer goes through
// a 4 KiB-aligned bounce buffer, and offsets and lengths must be multiples of 512 bytes.
import { native } from '../native/kvm';
import { InFlight } from './in-flight';
import { checkRange, DiskImageError, type DiskImage } from './disk-image';
import { closeImageFile, lockImageFile, unlockImageFile, readAt, syncFile, writeAt, type ImageFile } from './image-file';

export const DIRECT_ALIGNMENT = 512;
const CHUNK = 1 << 20;

export class RawImage implements DiskImage {
  readonly format = 'raw';
  readonly size: number;
  readonly readonly: boolean;
  readonly id: string;
  private closed = false;
  private readonly inFlight = new InFlight();

  constructor(private readonly file: ImageFile) {
    this.size = file.size;
    this.readonly = file.readonly;
    this.id = file.id;
  }

  get rawFd(): number | undefined {
    return this.file.direct || this.closed ? undefined : this.file.fd;
  }

  private check(offset: number, length: number, writing: boolean): void {
    if (this.closed) throw new DiskImageError(`disk image ${this.file.path}: closed`);
    checkRange(this.size, offset, length, writing, this.readonly);
    if (this.file.direct && (offset % DIRECT_ALIGNMENT !== 0 || length % DIRECT_ALIGNMENT !== 0)) {
      throw new DiskImageError(`disk image ${this.file.path}: direct=on needs offsets and lengths in multiples of ${DIRECT_ALIGNMENT} bytes (got ${offset}+${length})`);
    }
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    return this.inFlight.track(this.readNow(offset, into));
  }

  private async readNow(offset: number, into: Uint8Array): Promise<void> {
    this.check(offset, into.length, false);
    if (!this.file.direct) return readAt(this.file, into, offset);
    const bounce = new Uint8Array(native().alignedBuffer(Math.min(CHUNK, into.length)));
    for (let done = 0; done < into.length; done += bounce.length) {
      const part = bounce.subarray(0, Math.min(bounce.length, into.length - done));
      await readAt(this.file, part, offset + done);
      into.set(part, done);
    }
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.inFlight.track(this.writeNow(offset, data));
  }

  private async writeNow(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length, true);
    if (!this.file.direct) return writeAt(this.file, data, offset);
    const bounce = new Uint8Array(native().alignedBuffer(Math.min(CHUNK, data.length)));
    for (let done = 0; done < data.length; done += bounce.length) {
      const part = bounce.subarray(0, Math.min(bounce.length, data.length - done));
      part.set(data.subarray(done, done + part.length));
      await writeAt(this.file, part, offset + done);
    }
  }

  flush(): Promise<void> {
    return this.inFlight.track(this.flushNow());
  }

  private async flushNow(): Promise<void> {
    if (!this.readonly) await syncFile(this.file);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.inFlight.track(this.discardNow(offset, length));
  }

  private async discardNow(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    if (length === 0) return;
    // A punched hole reads as zeroes; a file system without hole punching gets zeroes written.
    if (!native().fallocate(this.file.fd, 'punch-hole', offset, length)) await this.zeroByWriting(offset, length);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.inFlight.track(this.writeZeroesNow(offset, length));
  }

  private async writeZeroesNow(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    if (length === 0) return;
    if (!native().fallocate(this.file.fd, 'zero-range', offset, length)) await this.zeroByWriting(offset, length);
  }

  private async zeroByWriting(offset: number, length: number): Promise<void> {
    const zeros = new Uint8Array(Math.min(CHUNK, length));
    for (let done = 0; done < length; done += zeros.length) {
      await this.write(offset + done, zeros.subarray(0, Math.min(zeros.length, length - done)));
    }
  }

  releaseLock(): void {
    unlockImageFile(this.file);
  }

  takeLock(): void {
    lockImageFile(this.file);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.inFlight.settled();
    closeImageFile(this.file);
  }
}
