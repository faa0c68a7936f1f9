// Guest pages in Memory frames. A payload is a sequence of records:
//
//   u64 guest address   u32 page count   u32 kind (0: the pages' bytes follow; 1: all zero)
//
// The source copies pages out of guest RAM into the frame before it checksums it (the guest may
// rewrite a page a moment later; the dirty log sends it again in the next round). Pages that are
// all zero travel as a zero record: round 0 skips them entirely (a new guest's RAM is zero).
import { native } from '../native/kvm';
import type { GuestMemory, GuestRegion } from '../memory/guest-memory';
import { MigrationProtocolError } from './frames';

export const PAGE = 4096;
const RECORD_HEADER = 16;
/** a Memory frame's page data (below the frame cap of 17 MiB with room for the records) */
export const MEMORY_FRAME_DATA_BYTES = 16 << 20;
/** pages scanned for zeros at a time */
const SCAN_PAGES = 1024;

const enum RecordKind {
  Data = 0,
  Zero = 1,
}

/** Builds one Memory frame's payload at a time. */
export class MemoryFrameBuilder {
  private buf = Buffer.allocUnsafe(MEMORY_FRAME_DATA_BYTES + (RECORD_HEADER << 10));
  private used = 0;
  private records = 0;
  /** pages added since the builder was made (all frames) */
  pages = 0;
  /** page bytes in the frame being built */
  dataBytes = 0;

  get empty(): boolean {
    return this.records === 0;
  }

  /** room for a data record of `pages` pages, or for another record at all */
  fits(pages: number): boolean {
    return this.used + RECORD_HEADER + pages * PAGE <= this.buf.length && this.records < 1024;
  }

  private header(gpa: number, pages: number, kind: RecordKind): void {
    this.buf.writeBigUInt64LE(BigInt(gpa), this.used);
    this.buf.writeUInt32LE(pages, this.used + 8);
    this.buf.writeUInt32LE(kind, this.used + 12);
    this.used += RECORD_HEADER;
    this.records++;
    this.pages += pages;
  }

  addData(gpa: number, bytes: Uint8Array): void {
    this.header(gpa, bytes.length / PAGE, RecordKind.Data);
    this.buf.set(bytes, this.used);
    this.used += bytes.length;
    this.dataBytes += bytes.length;
  }

  addZero(gpa: number, pages: number): void {
    this.header(gpa, pages, RecordKind.Zero);
  }

  /**
   * The payload so far, and start over. Not a copy: it stays valid until the next add, so it
   * is sent (and flushed to the kernel) before the builder is filled again.
   */
  take(): Buffer {
    const out = this.buf.subarray(0, this.used);
    this.used = 0;
    this.records = 0;
    this.dataBytes = 0;
    return out;
  }

  /**
   * The payload so far, and start over in another buffer: the payload stays valid while it is
   * sent, however far the builder fills meanwhile. giveBack() returns its buffer for reuse.
   */
  handOver(): Buffer {
    const out = this.take();
    this.buf = this.spares.pop() ?? Buffer.allocUnsafe(this.buf.length);
    return out;
  }

  /** A payload from handOver() has been sent: its buffer may be filled again. */
  giveBack(payload: Buffer): void {
    const whole = Buffer.from(payload.buffer as ArrayBuffer, payload.byteOffset, this.buf.length);
    if (whole.byteLength === this.buf.length) this.spares.push(whole);
  }

  private readonly spares: Buffer<ArrayBuffer>[] = [];
}

/** How long page scanning may hold the JavaScript thread before it lets other work run. */
const SLICE_MS = 4;
let sliceStart = Date.now();

/** This slice of scanning has taken SLICE_MS (never while the guest is paused). */
const sliceOver = (paused: boolean): boolean => !paused && Date.now() - sliceStart >= SLICE_MS;

/**
 * Let the event loop run: the vCPUs' port and MMIO exits (the guest's console, its timer-driven
 * devices) are served on this thread, and a guest must not stall while gigabytes of its RAM
 * are scanned for the next frame.
 */
async function yieldNow(): Promise<void> {
  await new Promise<void>((r) => setImmediate(r));
  sliceStart = Date.now();
}

/** [offset, offset+len) of a region as one view, or a copy when it spans chunks. */
function regionBytes(region: GuestRegion, offset: number, len: number): Uint8Array {
  return region.view(offset, len) ?? region.read(offset, len);
}

/**
 * Feed the pages [p, end) of `region` to the builder, synchronously: non-zero runs as data,
 * zero runs as zero records unless `skipZero` (round 0). Returns the first page not fed: `end`,
 * or earlier when the frame is full (`full`) or the scanning slice is over.
 */
function feedPages(b: MemoryFrameBuilder, region: GuestRegion, p: number, end: number, skipZero: boolean, paused: boolean): { next: number; full: boolean } {
  const { zeroPages } = native();
  while (p < end) {
    const n = Math.min(SCAN_PAGES, end - p);
    const bytes = regionBytes(region, p * PAGE, n * PAGE);
    const zero = zeroPages(bytes);
    for (let i = 0; i < n; ) {
      let j = i;
      while (j < n && zero[j] === zero[i]) j++;
      if (zero[i] === 1) {
        if (!skipZero) {
          if (!b.fits(0)) return { next: p + i, full: true };
          b.addZero(region.guestAddress + (p + i) * PAGE, j - i);
        }
      } else {
        for (let k = i; k < j; ) {
          if (!b.fits(1)) return { next: p + k, full: true };
          const room = Math.floor((MEMORY_FRAME_DATA_BYTES - b.dataBytes) / PAGE);
          const take = Math.max(1, Math.min(j - k, room));
          b.addData(region.guestAddress + (p + k) * PAGE, bytes.subarray(k * PAGE, (k + take) * PAGE));
          k += take;
        }
      }
      i = j;
    }
    p += n;
    if (p < end && sliceOver(paused)) break;
  }
  return { next: p, full: false };
}

/**
 * Feed each range [first, first+count) of `region` to the builder, calling `flush` whenever the
 * frame is full. The only awaits are flushes and, while the guest runs, the end of each
 * scanning slice: the final round, with the guest paused, goes through its pages (often
 * hundreds of short runs) without a turn of the event loop per run, which in the pause was
 * time the guest waited for.
 */
async function addRanges(
  b: MemoryFrameBuilder,
  region: GuestRegion,
  ranges: Iterable<readonly [first: number, count: number]>,
  skipZero: boolean,
  flush: () => Promise<void>,
  paused: boolean,
): Promise<void> {
  for (const [first, count] of ranges) {
    const end = first + count;
    for (let p = first; p < end; ) {
      const fed = feedPages(b, region, p, end, skipZero, paused);
      p = fed.next;
      if (fed.full) await flush();
      else if (sliceOver(paused)) await yieldNow();
    }
  }
}

/** Round 0: every page of guest RAM that is not all zero (pages never written are not even read). */
export async function addAllNonZeroPages(b: MemoryFrameBuilder, memory: GuestMemory, flush: () => Promise<void>): Promise<void> {
  for (const region of memory.regions) {
    const ranges = region.populatedRanges().map(([start, end]) => [start / PAGE, (end - start) / PAGE] as const);
    await addRanges(b, region, ranges, true, flush, false);
  }
}

/** The runs [first, count, first, count, ...] as pairs. */
function* pairs(runs: ArrayLike<number>): Generator<readonly [number, number]> {
  for (let i = 0; i < runs.length; i += 2) yield [runs[i], runs[i + 1]];
}

/**
 * A later round: the pages set in any of the bitmap sets (each one bitmap per region, one bit
 * per page), each page once. `paused`: the guest is paused (the final round, which sends the
 * last round's pages with the pause's), so the scan never gives the thread up.
 */
export async function addDirtyPages(
  b: MemoryFrameBuilder,
  memory: GuestMemory,
  bitmapSets: readonly (readonly Uint8Array[])[],
  flush: () => Promise<void>,
  paused = false,
): Promise<void> {
  const { dirtyRuns } = native();
  for (let r = 0; r < memory.regions.length; r++) {
    const region = memory.regions[r];
    // (natively: in JavaScript the scan of an idle 1 GiB guest's bitmaps, its pages nearly all
    // clean, took longer than sending the few dirty ones, in the pause)
    const runs = dirtyRuns(region.size / PAGE, bitmapSets.map((set) => set[r]));
    await addRanges(b, region, pairs(runs), false, flush, paused);
  }
}

/** Pages set in the bitmaps. */
export function countDirtyPages(bitmaps: readonly Uint8Array[]): number {
  let n = 0;
  for (const bits of bitmaps) {
    for (let i = 0; i < bits.length; i++) {
      let v = bits[i];
      while (v) {
        v &= v - 1;
        n++;
      }
    }
  }
  return n;
}

/** A Memory frame checked against the layout, to be written into RAM after the frames before it. */
export interface CheckedMemoryFrame {
  pages: number;
  /** write it: zero records at once, each region's data records as one task on libuv's pool */
  apply(): Promise<void>;
}

/**
 * Destination: check one Memory frame's records. Every record must lie inside one region of
 * the layout the handshake announced; anything else refuses the stream, before any is written.
 */
export function checkMemoryFrame(memory: GuestMemory, payload: Buffer): CheckedMemoryFrame {
  let off = 0;
  let pages = 0;
  const zeros: { region: GuestRegion; at: number; len: number }[] = [];
  const data = new Map<GuestRegion, number[]>();
  while (off < payload.length) {
    if (payload.length - off < RECORD_HEADER) throw new MigrationProtocolError('Memory frame: truncated record header');
    const gpa = payload.readBigUInt64LE(off);
    const count = payload.readUInt32LE(off + 8);
    const kind = payload.readUInt32LE(off + 12);
    off += RECORD_HEADER;
    if (gpa % BigInt(PAGE) !== 0n || gpa > BigInt(Number.MAX_SAFE_INTEGER) || count === 0) {
      throw new MigrationProtocolError('Memory frame: record address not page-aligned or page count zero');
    }
    const addr = Number(gpa);
    const len = count * PAGE;
    const region = memory.regions.find((r) => r.contains(addr, len));
    if (!region) throw new MigrationProtocolError(`Memory frame: pages 0x${addr.toString(16)}+${len} lie outside guest RAM`);
    const at = addr - region.guestAddress;
    if (kind === RecordKind.Data) {
      if (payload.length - off < len) throw new MigrationProtocolError('Memory frame: record data truncated');
      let runs = data.get(region);
      if (!runs) data.set(region, (runs = []));
      runs.push(off, len, at);
      off += len;
    } else if (kind === RecordKind.Zero) {
      zeros.push({ region, at, len });
    } else {
      throw new MigrationProtocolError(`Memory frame: unknown record kind ${kind}`);
    }
    pages += count;
  }
  return {
    pages,
    async apply() {
      for (const z of zeros) z.region.fill(z.at, z.len, 0);
      await Promise.all([...data].map(([region, runs]) => region.writeBulkRuns(payload, Float64Array.from(runs))));
    },
  };
}

/**
 * Destination: writes Memory frames into RAM in the order they came, each one while the
 * JavaScript thread reads and checks the next (writing RAM was a third of the destination's
 * time in the first round, on that thread). A page sent again in a later round lands after
 * its earlier copy. At most `depth` frames wait to be written; add() waits for room.
 */
export class MemoryFrameWriter {
  /** the writes not yet made, oldest first (each waits for the one before) */
  private readonly waiting = new Set<Promise<void>>();
  private last: Promise<void> = Promise.resolve();
  private failure?: unknown;

  constructor(
    private readonly memory: GuestMemory,
    private readonly depth = 2,
  ) {}

  /**
   * Check the frame (throws MigrationProtocolError now) and queue its write once fewer than
   * `depth` writes wait, however many connections add frames at once (more would pile up and
   * still be writing when the guest is paused); returns its pages. `written` is called once its
   * pages are in RAM (not if the write fails): nothing reads the payload after that.
   */
  async add(payload: Buffer, written?: () => void): Promise<number> {
    if (this.failure !== undefined) throw this.failure;
    const frame = checkMemoryFrame(this.memory, payload);
    // Room first, then the write joins the queue: frames added at once by several connections
    // belong to one round, whose pages are all different, so their order does not matter; a
    // round's frames are all queued (add() returned) before any connection starts the next.
    while (this.waiting.size >= this.depth) await Promise.race(this.waiting);
    if (this.failure !== undefined) throw this.failure;
    // (never rejects: the first failure is kept, and the writes after it are not made)
    const write: Promise<void> = this.last
      .then(async () => {
        if (this.failure !== undefined) return;
        await frame.apply();
        written?.();
      })
      .catch((e: unknown) => void (this.failure ??= e))
      .finally(() => this.waiting.delete(write));
    this.last = write;
    this.waiting.add(write);
    return frame.pages;
  }

  /** writes queued and not yet made */
  get pendingWrites(): number {
    return this.waiting.size;
  }

  /** Every frame added is in RAM (or failed: the first failure is thrown). */
  async drain(): Promise<void> {
    await this.last;
    if (this.failure !== undefined) throw this.failure;
  }
}
