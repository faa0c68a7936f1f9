// The frame channel's cap on what a peer can make this side hold unread: beyond it the socket
// is no longer read (the peer waits on TCP), and a frame larger than the cap still arrives.
import test from 'ava';
import net from 'node:net';
import { FrameChannel } from '../../src/migration/frame-channel';
import { FrameType, frameHeader } from '../../src/migration/frames';

const MIB = 1 << 20;

/**
 * A connected pair over loopback: the receiving end as a migration destination reads its
 * source (large reads into one buffer), with `maxBufferedBytes`.
 */
async function pair(maxBufferedBytes: number): Promise<{ sender: FrameChannel; receiver: FrameChannel; close: () => void }> {
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  const socket = await accepted;
  server.close();
  const receiver = new FrameChannel(socket, { idleTimeoutMs: 30_000, peer: 'source', largeReads: true, maxBufferedBytes });
  receiver.socket.resume();
  const sender = new FrameChannel(client, { idleTimeoutMs: 30_000, peer: 'destination' });
  return { sender, receiver, close: () => (sender.close(), receiver.close()) };
}

const payload = (bytes: number, fill: number) => Buffer.alloc(bytes, fill);

test('a frame larger than the cap arrives whole when nothing else waits', async (t) => {
  const { sender, receiver, close } = await pair(1 * MIB);
  try {
    // (in two pieces, apart: the receiver holds the first 2 MiB, over its cap, with no frame whole)
    const body = payload(3 * MIB, 7);
    sender.socket.write(frameHeader(FrameType.State, body, sender.checksum));
    sender.socket.write(body.subarray(0, 2 * MIB));
    await new Promise((r) => setTimeout(r, 200));
    sender.socket.write(body.subarray(2 * MIB));
    const f = await Promise.race([receiver.next(), new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the frame never arrived')), 5000))]);
    t.is(f.type, FrameType.State);
    t.is(f.payload.length, 3 * MIB);
    t.true(f.payload.every((b) => b === 7));
  } finally {
    close();
  }
});

test('frames beyond the cap stay with the peer until the ones waiting are taken, then all arrive in order', async (t) => {
  const { sender, receiver, close } = await pair(4 * MIB);
  try {
    const frames = 12;
    // (not awaited: the sender is held up once the receiver stops reading)
    const sent = (async () => {
      for (let i = 0; i < frames; i++) await sender.send(FrameType.Memory, payload(2 * MIB, i));
    })();
    await new Promise((r) => setTimeout(r, 300));
    t.true(receiver.socket.isPaused(), 'the receiver stopped reading');
    t.true(receiver.bytesRead < 12 * MIB, `read ${receiver.bytesRead} bytes of 24 MiB sent unread`);
    for (let i = 0; i < frames; i++) {
      const f = await receiver.next();
      t.is(f.payload[0], i);
      t.is(f.payload.length, 2 * MIB);
    }
    await sent;
  } finally {
    close();
  }
});
