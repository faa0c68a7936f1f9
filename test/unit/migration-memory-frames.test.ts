// Round 0 of a migration: only the parts of RAM the backing says hold data are read, and what
// is sent lands byte for byte in the destination's RAM.
import test from 'ava';

import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import { MemoryFrameBuilder, addAllNonZeroPages, addDirtyPages, applyMemoryFrame, unionBitmaps } from '../../src/migration/memory-frames';

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
  const pages = frames.reduce((n, f) => n + applyMemoryFrame(dst, f), 0);
  t.is(pages, 3);
  const sent = (p: number) => dstRegion.read(p * PAGE, PAGE).every((v) => v === 0x5a);
  const untouched = (p: number) => dstRegion.read(p * PAGE, PAGE).every((v) => v === 0);
  t.true(sent(3) && sent(4) && sent(200));
  t.true([0, 2, 5, 100, 199, 201, 255].every(untouched));
});

test('a later round sends exactly the pages of the union of its dirty bitmaps', async (t) => {
  const pages = 8 * 32 + 5; // a bitmap that does not end on a word
  const src = region(pages * PAGE, 0);
  for (let p = 0; p < pages; p++) src.fill(p * PAGE, PAGE, (p % 250) + 1);
  const bitmap = (...set: number[]) => {
    const b = new Uint8Array(Math.ceil(pages / 8));
    for (const p of set) b[p >> 3] |= 1 << (p & 7);
    return b;
  };
  const dirty = [0, 31, 32, 63, 64, 100, 200, pages - 1];
  const bitmaps = unionBitmaps([bitmap(0, 31, 32, 100)], [bitmap(63, 64, 200, pages - 1)]);
  const b = new MemoryFrameBuilder();
  const frames: Buffer[] = [];
  await addDirtyPages(b, new GuestMemory([src]), bitmaps, async () => {
    if (!b.empty) frames.push(Buffer.from(b.take()));
  });
  if (!b.empty) frames.push(Buffer.from(b.take()));
  const dstRegion = region(pages * PAGE, 0);
  const dst = new GuestMemory([dstRegion]);
  t.is(frames.reduce((n, f) => n + applyMemoryFrame(dst, f), 0), dirty.length);
  for (let p = 0; p < pages; p++) {
    const want = dirty.includes(p) ? (p % 250) + 1 : 0;
    t.true(dstRegion.read(p * PAGE, PAGE).every((v) => v === want), `page ${p}`);
  }
});

test('the union of two bitmaps is every bit of either, whatever their length and alignment', (t) => {
  for (const length of [1, 3, 4, 33, 4096 + 7]) {
    const a = Uint8Array.from({ length }, (_, i) => (i * 37) & 0xff);
    // `b` starts one byte into its buffer, as a view of a larger read can
    const b = new Uint8Array(length + 1).subarray(1);
    b.forEach((_, i) => (b[i] = (i * 91 + 5) & 0xff));
    const [u] = unionBitmaps([a], [b]);
    t.deepEqual([...u], [...a].map((x, i) => x | b[i]), `length ${length}`);
    t.deepEqual([...a], Array.from({ length }, (_, i) => (i * 37) & 0xff), 'the inputs are left as they were');
  }
});
