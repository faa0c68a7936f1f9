// The receiving side's Memory payloads come from a pool and go back to it once in RAM: a
// buffer given back is the next frame's, a small payload or a foreign buffer is never pooled.
import test from 'ava';
import { FrameChecksum, FrameDecoder, FrameType, encodeFrame } from '../../src/migration/frames';
import { PayloadBuffers } from '../../src/migration/payload-buffers';

const MIB = 1 << 20;

test('a buffer given back is taken again; small payloads, foreign buffers and spares beyond the limit are not kept', (t) => {
  const pool = new PayloadBuffers(4 * MIB, 1);
  const a = pool.take(3 * MIB);
  t.is(a.length, 3 * MIB);
  t.is(a.buffer.byteLength, 4 * MIB, 'pooled buffers are all of the pool\'s size');
  pool.give(a);
  const b = pool.take(2 * MIB);
  t.is(b.buffer, a.buffer, 'the spare was used again');
  const c = pool.take(4 * MIB);
  t.not(c.buffer, a.buffer, 'a buffer in use is not handed out twice');
  pool.give(b);
  pool.give(c);
  t.is(pool.spareCount, 1, 'no more spares than the limit');
  const small = pool.take(4096);
  t.is(small.length, 4096);
  pool.give(small);
  pool.give(Buffer.alloc(4 * MIB));
  t.is(pool.spareCount, 1, 'neither a small payload nor a buffer from elsewhere joins the pool');
  t.is(pool.take(5 * MIB).length, 5 * MIB, 'a payload larger than the pool\'s buffers gets its own');
});

test('a closed pool lets its spares go and keeps nothing given back after', (t) => {
  const pool = new PayloadBuffers(2 * MIB, 4);
  const a = pool.take(2 * MIB);
  const b = pool.take(2 * MIB);
  pool.give(a);
  t.is(pool.spareCount, 1);
  pool.close();
  t.is(pool.spareCount, 0, 'the spares went with the close');
  pool.give(b); // a write that ended after the receive
  t.is(pool.spareCount, 0, 'nothing is kept after the close');
});

test('frames decoded into a reused buffer come out whole and verified, one after another', (t) => {
  const pool = new PayloadBuffers(2 * MIB, 2);
  const decoder = new FrameDecoder(pool);
  const payloads = [1, 2, 3, 4, 5].map((n) => Buffer.alloc(MIB + 4096 * n, n));
  const stream = Buffer.concat(payloads.map((p) => encodeFrame(FrameType.Memory, p, FrameChecksum.Xxh64Low32)));
  const buffers = new Set<ArrayBufferLike>();
  for (let at = 0, i = 0; at < stream.length; at += 64 << 10) {
    for (const f of decoder.push(stream.subarray(at, at + (64 << 10)))) {
      t.true(Buffer.from(f.payload).equals(payloads[i]), `frame ${i} intact`);
      buffers.add(f.payload.buffer);
      pool.give(f.payload);
      i++;
    }
  }
  // (a frame's header may come in the read that ends the frame before: two buffers take turns)
  t.is(buffers.size, 2, 'five frames in two buffers, each given back used again');
  // A JSON frame never comes from the pool, whatever its size.
  const state = encodeFrame(FrameType.State, Buffer.from(JSON.stringify({ pad: 'x'.repeat(MIB + 10) })));
  const [f] = new FrameDecoder(pool).push(state);
  t.false(buffers.has(f.payload.buffer));
});
