// The checksum of snapshot memory ranges: XXH64 through the native addon, and RangeHasher's
// promise that a range hashes the same however it is fed (the writer feeds populated 1 MiB
// blocks, a copy restore feeds the file's data extents).
import test from 'ava';
import crypto from 'node:crypto';
import { RangeHasher } from '../../src/migration/memory-ranges';
import { native } from '../../src/native/kvm';

const PAGE = 4096;

const xxh64 = (...parts: Uint8Array[]): string => {
  const addon = native();
  const state = addon.xxh64Init();
  for (const p of parts) addon.xxh64Update(state, p);
  return addon.xxh64Digest(state);
};

test('XXH64 gives the reference answers (seed 0) and streams: split input hashes as whole', (t) => {
  t.is(xxh64(new Uint8Array()), 'ef46db3751d8e999');
  t.is(xxh64(Buffer.from('abc')), '44bc2cf5ad770999');
  const data = crypto.randomBytes(100_003);
  t.is(xxh64(data.subarray(0, 7), data.subarray(7, 40_000), data.subarray(40_000)), xxh64(data));
  t.not(xxh64(data), xxh64(Buffer.concat([data, Buffer.from([0])])));
});

test('the XXH64 state must be one xxh64Init made: anything else is a TypeError, not a crash', (t) => {
  const addon = native();
  t.throws(() => addon.xxh64Update(new Uint8Array(3), Buffer.from('x')), { instanceOf: TypeError, message: /expected a state from xxh64Init/ });
  t.throws(() => addon.xxh64Digest({} as Uint8Array), { instanceOf: TypeError });
  const forged = addon.xxh64Init().fill(0xff);
  t.throws(() => addon.xxh64Update(forged, Buffer.alloc(64)), { instanceOf: TypeError, message: /expected a state from xxh64Init/ });
  t.throws(() => addon.xxh64Update(addon.xxh64Init(), 'text' as unknown as Uint8Array), { instanceOf: TypeError, message: /expected a Uint8Array of data/ });
});

/** 64 pages: data, with zero pages at 3, 10-12 and 40, and the last page zero. */
function range(): Uint8Array {
  const r = new Uint8Array(crypto.randomBytes(64 * PAGE));
  for (const p of [3, 10, 11, 12, 40, 63]) r.fill(0, p * PAGE, (p + 1) * PAGE);
  return r;
}

function hashIn(r: Uint8Array, blockPages: number[], kind?: 'xxh64' | 'sha256'): string {
  const h = new RangeHasher(kind);
  let page = 0;
  for (const n of blockPages) {
    const block = r.subarray(page * PAGE, (page + n) * PAGE);
    h.feed(page, block, native().zeroPages(block));
    page += n;
  }
  return h.digest();
}

test('a range hashes the same whichever blocks it is fed in; a moved or changed page changes it', (t) => {
  const r = range();
  const whole = hashIn(r, [64]);
  t.regex(whole, /^xxh64:[0-9a-f]{16}$/);
  t.is(hashIn(r, [5, 6, 1, 30, 22]), whole);
  t.is(hashIn(r, Array(64).fill(1)), whole);
  t.is(hashIn(r, [64], 'sha256'), hashIn(r, [13, 51], 'sha256'));
  // Data moved into a zero page's place (same bytes, other pages) is not the same range.
  const moved = r.slice();
  moved.copyWithin(3 * PAGE, 4 * PAGE, 5 * PAGE);
  moved.fill(0, 4 * PAGE, 5 * PAGE);
  t.not(hashIn(moved, [64]), whole);
  const flipped = r.slice();
  flipped[20 * PAGE + 100] ^= 1;
  t.not(hashIn(flipped, [64]), whole);
  t.is(RangeHasher.matching(whole).constructor, RangeHasher);
  t.regex(RangeHasher.matching('sha256:' + '0'.repeat(64)).digest(), /^sha256:/);
});
