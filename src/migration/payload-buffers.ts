// Buffers for the receiving side's Memory frame payloads, used again once a frame's pages are
// in RAM. A fresh 16 MiB buffer per frame cost more than the frame's own work: the kernel faults
// in and zeroes every page of it, and held while their RAM writes ran the buffers were not
// reused by the allocator (receiving 768 MiB over loopback on the development machine: 1.23-1.39 s
// of CPU with fresh buffers, 0.46-0.50 s with these).

/** Payloads at least this large come from the pool; a small last round's frames need none. */
const POOLED_MIN_BYTES = 1 << 20;

export class PayloadBuffers {
  private readonly spares: Buffer[] = [];
  private closed = false;
  /** the pool's own backing stores: only those come back */
  private readonly own = new WeakSet<ArrayBufferLike>();

  /**
   * `size`: every pooled buffer's size (the largest payload it takes); `keep`: spares held at
   * most (the rest are left to the garbage collector).
   */
  constructor(
    private readonly size: number,
    private readonly keep: number,
  ) {}

  /** A buffer for a payload of `length` bytes: a spare's first `length` bytes, or a new one. */
  take(length: number): Buffer {
    if (length < POOLED_MIN_BYTES || length > this.size) return Buffer.allocUnsafe(length);
    let whole = this.spares.pop();
    if (!whole) {
      whole = Buffer.allocUnsafeSlow(this.size);
      this.own.add(whole.buffer);
    }
    return whole.subarray(0, length);
  }

  /** Nothing reads or writes `payload` any more (its pages are in RAM): its buffer may be taken again. */
  give(payload: Buffer): void {
    if (this.closed || !this.own.has(payload.buffer) || this.spares.length >= this.keep) return;
    this.spares.push(Buffer.from(payload.buffer, 0, this.size));
  }

  /**
   * The receive is over: let the spares go, and every buffer given back later (a write that
   * ends after it). The receiver stays for its progress report; 68 MiB need not stay with it.
   */
  close(): void {
    this.closed = true;
    this.spares.length = 0;
  }

  /** spares held now */
  get spareCount(): number {
    return this.spares.length;
  }
}
