// The migration stream's framing as a receiver meets it: bytes in pieces of any size, from a
// read buffer that is reused for the next read, and streams that are corrupt or cut short.
import test from 'ava';

import zlib from 'node:zlib';

import { FRAME_HEADER_BYTES, FrameChecksum, FrameDecoder, FrameType, MigrationProtocolError, encodeFrame, encodeJsonFrame, frameHeader, type Frame } from '../../src/migration/frames';

function stream(): { bytes: Buffer; frames: { type: FrameType; payload: Buffer }[] } {
  const memory = Buffer.alloc(3 * 4096 + 16);
  for (let i = 0; i < memory.length; i++) memory[i] = (i * 7 + 3) & 0xff;
  const frames = [
    { type: FrameType.Hello, payload: Buffer.from(JSON.stringify({ protocol: 1, pad: 'x'.repeat(300) })) },
    { type: FrameType.Memory, payload: memory },
    { type: FrameType.Complete, payload: Buffer.alloc(0) },
    { type: FrameType.Round, payload: Buffer.from('{"patches":[]}') },
  ];
  return { bytes: Buffer.concat(frames.map((f) => encodeFrame(f.type, f.payload))), frames };
}

/** Feed `bytes` in pieces of the given sizes, each through one scratch buffer that is overwritten after use. */
function feed(d: FrameDecoder, bytes: Buffer, sizes: (i: number) => number): Frame[] {
  const scratch = Buffer.alloc(64 << 10);
  const out: Frame[] = [];
  for (let at = 0, i = 0; at < bytes.length; i++) {
    const n = Math.min(sizes(i), bytes.length - at, scratch.length);
    bytes.copy(scratch, 0, at, at + n);
    out.push(...d.push(scratch.subarray(0, n)));
    scratch.fill(0xee); // as a socket's next read would
    at += n;
  }
  return out;
}

for (const [name, sizes] of [
  ['one byte at a time', () => 1],
  ['pieces that split headers', (i: number) => [5, FRAME_HEADER_BYTES + 3, 4096, 9][i % 4]],
  ['large reads', () => 64 << 10],
] as const) {
  test(`frames come out whole and unchanged when the bytes arrive ${name}, from a reused buffer`, (t) => {
    const { bytes, frames } = stream();
    const d = new FrameDecoder();
    const got = feed(d, bytes, sizes);
    t.deepEqual(
      got.map((f) => ({ type: f.type, payload: Buffer.from(f.payload) })),
      frames,
    );
    t.is(d.pendingBytes, 0);
    t.notThrows(() => d.end());
  });
}

test('a payload byte changed in transit is refused at that frame, and the decoder stays refused', (t) => {
  const { bytes } = stream();
  const hello = encodeJsonFrame(FrameType.Hello, { protocol: 1 });
  const bad = Buffer.from(bytes);
  bad[hello.length + FRAME_HEADER_BYTES + 100] ^= 1; // inside the Memory frame (the Hello is longer, see stream())
  const d = new FrameDecoder();
  const err = t.throws(() => feed(d, bad, () => 1000), { instanceOf: MigrationProtocolError });
  t.regex(err.message, /checksum mismatch/);
  t.throws(() => d.push(Buffer.alloc(1)), { message: /already refused/ });
});

test('a header announcing more than its type may carry is refused before any payload arrives', (t) => {
  const h = frameHeader(FrameType.Accept, Buffer.alloc(10));
  h.writeUInt32LE(10 << 20, 8); // 10 MiB for an Accept (cap 64 KiB)
  const d = new FrameDecoder();
  t.throws(() => d.push(h), { message: /Accept frame announces 10485760 bytes, more than its cap/ });
});

test('a stream that ends inside a frame is truncated', (t) => {
  const { bytes } = stream();
  const d = new FrameDecoder();
  d.push(bytes.subarray(0, bytes.length - 3));
  t.true(d.pendingBytes > 0);
  t.throws(() => d.end(), { message: /truncated/ });
  const h = new FrameDecoder();
  h.push(bytes.subarray(0, 7)); // half a header
  t.throws(() => h.end(), { message: /truncated/ });
});

test('bad magic and unknown types are refused', (t) => {
  const f = encodeJsonFrame(FrameType.Config, {});
  const magic = Buffer.from(f);
  magic[0] ^= 0xff;
  t.throws(() => new FrameDecoder().push(magic), { message: /bad frame magic/ });
  const type = Buffer.from(f);
  type.writeUInt16LE(999, 4);
  t.throws(() => new FrameDecoder().push(type), { message: /unknown frame type 999/ });
});

test('frames checksummed with XXH64 decode alongside CRC-32 ones; a changed byte, a changed kind or an unknown kind is refused', (t) => {
  const memory = Buffer.alloc(64 << 10);
  for (let i = 0; i < memory.length; i++) memory[i] = (i * 13 + 1) & 0xff;
  const crc = encodeJsonFrame(FrameType.Hello, { protocol: 1 });
  const xxh = encodeFrame(FrameType.Memory, memory, FrameChecksum.Xxh64Low32);
  t.is(xxh.readUInt16LE(6), FrameChecksum.Xxh64Low32, 'the kind is in the header');
  t.not(xxh.readUInt32LE(12), zlib.crc32(xxh.subarray(FRAME_HEADER_BYTES), zlib.crc32(xxh.subarray(0, 12))), 'and it is not a CRC-32');
  const got = feed(new FrameDecoder(), Buffer.concat([crc, xxh]), () => 4096);
  t.deepEqual(got.map((f) => f.type), [FrameType.Hello, FrameType.Memory]);
  t.true(Buffer.from(got[1].payload).equals(memory));

  const flipped = Buffer.from(xxh);
  flipped[FRAME_HEADER_BYTES + 40_000] ^= 0x10;
  t.throws(() => new FrameDecoder().push(flipped), { message: /Memory frame: checksum mismatch/ });
  // the kind is covered by the checksum: a frame relabelled CRC-32 does not verify either
  const relabelled = Buffer.from(xxh);
  relabelled.writeUInt16LE(FrameChecksum.Crc32, 6);
  t.throws(() => new FrameDecoder().push(relabelled), { message: /checksum mismatch/ });
  const unknown = Buffer.from(xxh);
  unknown.writeUInt16LE(7, 6);
  t.throws(() => new FrameDecoder().push(unknown), { message: /Memory frame: unknown checksum kind 7/ });
});
