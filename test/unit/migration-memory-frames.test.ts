// Round 0 of a migration: only the parts of RAM the backing says hold data are read, and what
// is sent lands byte for byte in the destination's RAM; a later round sends the pages its dirty
// bitmaps mark, found natively (dirtyRuns).
import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import { MemoryFrameBuilder, MemoryFrameWriter, addAllNonZeroPages, addDirtyPages } from '../../src/migration/memory-frames';
import { MigrationProtocolError } from '../../src/migration/frames';
import { native } from '../../src/native/kvm';

const PAGE = 4096;

function region(size: number, fill: number, dataRanges?: () => number[] | undefined): GuestRegion {
  const buf = new ArrayBuffer(size);
  new Uint8Array(buf).fill(fill);
  return new GuestRegion({ guestAddress: 0x10_0000, size, chunks: [buf], chunkSize: size, dataRanges });
}

test('populatedRanges rounds to pages, merges neighbours, and is the whole region when the backing cannot tell', (t) => {
  t.deepEqual(region(64 * PAGE, 0).populatedRanges(), [[0, 64 * PAGE]]);
  t.deepEqual(region(64 * PAGE, 0, () => undefined).populatedRanges(), [[0, 64 * PAGE]]);
  t.deepEqual(region(64 * PAGE, 0, () => []).populatedRanges(), []);
  const r = region(64 * PAGE, 0, () => [PAGE + 10, 2 * PAGE + 1, 3 * PAGE, 4 * PAGE, 10 * PAGE, 100 * PAGE]);
  t.deepEqual(r.populatedRanges(), [[PAGE, 4 * PAGE], [10 * PAGE, 64 * PAGE]]);
});

test('round 0 reads only the populated ranges and the destination gets exactly those pages', async (t) => {
  const size = 256 * PAGE;
  // Every byte is 0x5a, but the backing says only pages 3-4 and 200 hold data: the rest are
  // holes, which read as zero on a real memfd, so they must not be read or sent here.
  const src = region(size, 0x5a, () => [3 * PAGE, 5 * PAGE, 200 * PAGE, 201 * PAGE]);
  const b = new MemoryFrameBuilder();
  const frames: Buffer[] = [];
  await addAllNonZeroPages(b, new GuestMemory([src]), async () => {
    if (!b.empty) frames.push(Buffer.from(b.take()));
  });
  if (!b.empty) frames.push(Buffer.from(b.take()));
  t.is(b.pages, 3, 'three pages sent');

  const dstRegion = region(size, 0);
  const dst = new GuestMemory([dstRegion]);
  const writer = new MemoryFrameWriter(dst);
  let pages = 0;
  for (const f of frames) pages += await writer.add(f);
  await writer.drain();
  t.is(pages, 3);
  const sent = (p: number) => dstRegion.read(p * PAGE, PAGE).every((v) => v === 0x5a);
  const untouched = (p: number) => dstRegion.read(p * PAGE, PAGE).every((v) => v === 0);
  t.true(sent(3) && sent(4) && sent(200));
  t.true([0, 2, 5, 100, 199, 201, 255].every(untouched));
});

test('frames added from several connections at once: never more than `depth` writes wait, and every page lands', async (t) => {
  const dstRegion = region(8 * PAGE, 0);
  const writer = new MemoryFrameWriter(new GuestMemory([dstRegion]), 2);
  // six frames of one round, a page each
  const frames = [1, 2, 3, 4, 5, 6].map((p) => {
    const b = new MemoryFrameBuilder();
    b.addData(0x10_0000 + p * PAGE, new Uint8Array(PAGE).fill(p));
    return Buffer.from(b.take());
  });
  const seen: number[] = [];
  // three readers, two frames each, adding at once
  await Promise.all(
    [0, 1, 2].map(async (reader) => {
      for (const f of [frames[reader], frames[reader + 3]]) {
        await writer.add(f);
        seen.push(writer.pendingWrites);
      }
    }),
  );
  await writer.drain();
  t.true(seen.every((n) => n <= 2), `writes waiting when add() returned: ${seen.join(', ')}`);
  for (const p of [1, 2, 3, 4, 5, 6]) t.true(dstRegion.read(p * PAGE, PAGE).every((v) => v === p), `page ${p}`);
  t.is(writer.pendingWrites, 0);
});

test('a later round sends exactly the pages set in either of its dirty bitmaps, each once', async (t) => {
  const pages = 8 * 32 + 5; // a bitmap that does not end on a word
  const src = region(pages * PAGE, 0);
  for (let p = 0; p < pages; p++) src.fill(p * PAGE, PAGE, (p % 250) + 1);
  const bitmap = (...set: number[]) => {
    const b = new Uint8Array(Math.ceil(pages / 8));
    for (const p of set) b[p >> 3] |= 1 << (p & 7);
    return b;
  };
  const dirty = [0, 31, 32, 63, 64, 100, 200, pages - 1];
  // (32 and 100 are in both: the final round's last pages and the round before's overlap)
  const bitmaps = [[bitmap(0, 31, 32, 100)], [bitmap(32, 63, 64, 100, 200, pages - 1)]];
  const b = new MemoryFrameBuilder();
  const frames: Buffer[] = [];
  await addDirtyPages(b, new GuestMemory([src]), bitmaps, async () => {
    if (!b.empty) frames.push(Buffer.from(b.take()));
  });
  if (!b.empty) frames.push(Buffer.from(b.take()));
  const dstRegion = region(pages * PAGE, 0);
  const dst = new GuestMemory([dstRegion]);
  const writer = new MemoryFrameWriter(dst);
  let written = 0;
  for (const f of frames) written += await writer.add(f);
  await writer.drain();
  t.is(written, dirty.length);
  for (let p = 0; p < pages; p++) {
    const want = dirty.includes(p) ? (p % 250) + 1 : 0;
    t.true(dstRegion.read(p * PAGE, PAGE).every((v) => v === want), `page ${p}`);
  }
});

test('the final round, guest paused: frames split where they fill (data bytes or record count), zero pages go as records, and the scan keeps the thread', async (t) => {
  // 1100 scattered single pages (more records than a frame holds), half of them zero, then a
  // run of 4200 data pages (more than a frame's 16 MiB).
  const pages = 2 * 1100 + 4200;
  const src = region(pages * PAGE, 0);
  const want = new Uint8Array(pages);
  const bits = new Uint8Array(Math.ceil(pages / 8));
  const mark = (p: number, v: number) => {
    bits[p >> 3] |= 1 << (p & 7);
    want[p] = v;
    if (v) src.fill(p * PAGE, PAGE, v);
  };
  for (let i = 0; i < 1100; i++) mark(2 * i, i % 2 ? 0 : (i % 200) + 1);
  for (let p = 2200; p < pages; p++) mark(p, (p % 7) + 1);
  const dstRegion = region(pages * PAGE, 0xee);
  for (let p = 0; p < pages; p++) if (!(bits[p >> 3] & (1 << (p & 7)))) dstRegion.fill(p * PAGE, PAGE, 0);
  const b = new MemoryFrameBuilder();
  const frames: Buffer[] = [];
  let immediateRan = false;
  setImmediate(() => (immediateRan = true));
  await addDirtyPages(
    b,
    new GuestMemory([src]),
    [[bits]],
    async () => {
      if (!b.empty) frames.push(Buffer.from(b.take()));
    },
    true,
  );
  t.false(immediateRan, 'the scan with the guest paused never gave the thread up');
  if (!b.empty) frames.push(Buffer.from(b.take()));
  t.true(frames.length >= 3, `${frames.length} frames`);
  t.true(frames.every((f) => f.length <= (17 << 20)), 'every frame under the cap');
  const writer = new MemoryFrameWriter(new GuestMemory([dstRegion]));
  let written = 0;
  for (const f of frames) written += await writer.add(f);
  await writer.drain();
  t.is(written, 1100 + 4200, 'each page once');
  let wrong = 0;
  for (let p = 0; p < pages; p++) if (!dstRegion.read(p * PAGE, PAGE).every((v) => v === want[p])) wrong++;
  t.is(wrong, 0, 'every page as the source had it, zero pages zeroed');
});

test('dirtyRuns: the runs of pages set in any bitmap, below the page count, whatever the bitmaps\' alignment', (t) => {
  const { dirtyRuns } = native();
  for (const pages of [1, 7, 8, 9, 64, 4096 * 8 + 5]) {
    const bytes = Math.ceil(pages / 8) + 2; // bits past `pages` are set too, and must be ignored
    const a = Uint8Array.from({ length: bytes }, (_, i) => (i * 37) & 0xff);
    // `b` starts one byte into its buffer, as a view of a larger read can
    const b = new Uint8Array(bytes + 1).subarray(1);
    b.forEach((_, i) => (b[i] = (i * 91 + 5) & 0xc3));
    const want: number[] = [];
    for (let p = 0; p < pages; ) {
      const set = (q: number) => ((a[q >> 3] | b[q >> 3]) >> (q & 7)) & 1;
      if (!set(p)) {
        p++;
        continue;
      }
      let q = p + 1;
      while (q < pages && set(q)) q++;
      want.push(p, q - p);
      p = q;
    }
    t.deepEqual([...dirtyRuns(pages, [a, b])], want, `${pages} pages`);
  }
  t.deepEqual([...dirtyRuns(64, [new Uint8Array(8)])], [], 'nothing set, no runs');
  t.deepEqual([...dirtyRuns(16, [Uint8Array.of(0xff, 0xff)])], [0, 16], 'all set, one run');
  t.deepEqual([...dirtyRuns(16, [])], [], 'no bitmaps, no runs');
  t.throws(() => dirtyRuns(17, [new Uint8Array(2)]), { instanceOf: RangeError }, 'a bitmap shorter than its pages');
  t.throws(() => dirtyRuns(1.5, [new Uint8Array(2)]), { instanceOf: RangeError });
  t.throws(() => dirtyRuns(8, [new Uint16Array(1) as unknown as Uint8Array]), { instanceOf: TypeError });
});

/** A region whose bulk writes go to a file (as a memfd's do), read back from that file. */
function fileRegion(t: ExecutionContext, pages: number, flags = 'w+'): { region: GuestRegion; page(p: number): Buffer } {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'tern-frames-')), 'ram');
  const fd = fs.openSync(file, flags === 'r' ? 'w+' : flags);
  fs.ftruncateSync(fd, pages * PAGE);
  const backingFd = flags === 'r' ? (fs.closeSync(fd), fs.openSync(file, 'r')) : fd;
  t.teardown(() => fs.closeSync(backingFd));
  const region = new GuestRegion({ guestAddress: 0x10_0000, size: pages * PAGE, chunks: [new ArrayBuffer(pages * PAGE)], chunkSize: pages * PAGE, backingFd });
  return { region, page: (p) => fs.readFileSync(file).subarray(p * PAGE, (p + 1) * PAGE) };
}

function frameOf(records: [page: number, fill: number][]): Buffer {
  const b = new MemoryFrameBuilder();
  for (const [p, fill] of records) b.addData(0x10_0000 + p * PAGE, new Uint8Array(PAGE).fill(fill));
  return Buffer.from(b.take());
}

test('the frame writer writes through the backing file, and a page sent again lands after its earlier copy', async (t) => {
  const { region, page } = fileRegion(t, 8);
  const writer = new MemoryFrameWriter(new GuestMemory([region]), 1);
  // (one page rewritten in each of many frames, more than may wait at once: only the last copy may remain)
  for (let round = 1; round <= 20; round++) t.is(await writer.add(frameOf([[2, round], [5, 100 + round]])), 2);
  await writer.drain();
  t.true(page(2).every((v) => v === 20), 'page 2 holds the last round\'s copy');
  t.true(page(5).every((v) => v === 120), 'page 5 holds the last round\'s copy');
  t.true(page(0).every((v) => v === 0), 'a page never sent stays zero');
});

test('the frame writer refuses a frame outside RAM before writing it, and reports a failed write at the next frame or drain', async (t) => {
  const { region, page } = fileRegion(t, 4);
  const writer = new MemoryFrameWriter(new GuestMemory([region]));
  await t.throwsAsync(writer.add(frameOf([[1, 7], [4, 7]])), { instanceOf: MigrationProtocolError });
  await writer.drain();
  t.true(page(1).every((v) => v === 0), 'nothing of the refused frame was written');

  const ro = fileRegion(t, 4, 'r');
  const failing = new MemoryFrameWriter(new GuestMemory([ro.region]));
  let released = 0;
  await failing.add(frameOf([[1, 7]]), () => released++).catch(() => undefined);
  await t.throwsAsync(failing.drain(), { message: /EBADF/ });
  await t.throwsAsync(failing.add(frameOf([[2, 7]])), { message: /EBADF/ }, 'and every frame after it');
  t.is(released, 0, 'a frame whose write failed is not reported written (its buffer is not used again)');
});

test('the frame writer reports each frame written only once its pages are in RAM, so its buffer can be used again', async (t) => {
  const { region, page } = fileRegion(t, 8);
  const writer = new MemoryFrameWriter(new GuestMemory([region]), 1);
  const frame = frameOf([[3, 9]]);
  let writtenSeen: number[] | undefined;
  await writer.add(frame, () => (writtenSeen = [...page(3).subarray(0, 4)]));
  // (overwriting the payload once reported written must not change what landed)
  await writer.drain();
  t.deepEqual(writtenSeen, [9, 9, 9, 9], 'the page was in RAM when the frame was reported written');
  frame.fill(0xee);
  t.true(page(3).every((v) => v === 9));
});
