/**
 * A kernel image, initramfs or boot configuration the loader cannot use. The message names
 * the file (when there is one) and what is wrong with it, e.g.
 * "/boot/vmlinuz: truncated bzImage: ...".
 */
export class BootError extends Error {
  /** The file the fault is in, as given by the caller; undefined for configuration errors. */
  readonly file?: string;

  constructor(message: string, file?: string) {
    super(file ? `${file}: ${message}` : message);
    this.name = 'BootError';
    this.file = file;
  }
}
