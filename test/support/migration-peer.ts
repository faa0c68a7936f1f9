// A migration peer driven by a test, frame by frame, over the real framing: a source or a
// destination that says exactly what the test wants (a corrupt frame, an old schema, silence),
// to check what the Tern on the other end does about it.
import net from 'node:net';
import { FrameChannel } from '../../src/migration/frame-channel';
import { FrameType, encodeFrame, frameHeader } from '../../src/migration/frames';
import { MIGRATION_PROTOCOL_VERSION, type Hello } from '../../src/migration/handshake';
import { MemoryFrameBuilder, addAllNonZeroPages } from '../../src/migration/memory-frames';
import { parseMigrationUrl } from '../../src/migration/migration-url';
import type { GuestMemory } from '../../src/memory/guest-memory';
import { ROOT_SCHEMA_VERSION, type RamRegionState } from '../../src/state';

export { FrameType, encodeFrame, frameHeader };

export function helloFor(regions: RamRegionState[], extra: Partial<Hello> = {}): Hello {
  return { protocol: MIGRATION_PROTOCOL_VERSION, schemaVersion: ROOT_SCHEMA_VERSION, tern: 'test', local: false, regions, cpuid: [], msrIndices: [], ...extra };
}

/** Connect to a receiving Tern as a source (TCP URLs: no preamble). */
export async function connectAsSource(url: string): Promise<{ socket: net.Socket; channel: FrameChannel }> {
  const a = parseMigrationUrl(url, 'url');
  if (a.kind !== 'tcp') throw new Error('connectAsSource takes tcp: URLs');
  const socket = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.connect({ host: a.host, port: a.port }, () => resolve(s));
    s.once('error', reject);
  });
  return { socket, channel: new FrameChannel(socket, { idleTimeoutMs: 30_000, peer: 'destination' }) };
}

/** Send all non-zero pages of `memory` as Memory frames. */
export async function sendAllPages(channel: FrameChannel, memory: GuestMemory): Promise<void> {
  const b = new MemoryFrameBuilder();
  const flush = async () => {
    if (!b.empty) await channel.sendFlushed(FrameType.Memory, b.take());
  };
  await addAllNonZeroPages(b, memory, flush);
  await flush();
}

/**
 * Listen as a destination on a TCP port; each connection goes to `handle`. Resolves to the
 * server, whose URL is tcp:127.0.0.1:<port>.
 */
export async function fakeDestination(handle: (channel: FrameChannel, socket: net.Socket) => Promise<void> | void): Promise<{ server: net.Server; url: string }> {
  const server = net.createServer((socket) => {
    const channel = new FrameChannel(socket, { idleTimeoutMs: 30_000, peer: 'source' });
    Promise.resolve(handle(channel, socket)).catch(() => socket.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { server, url: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}` };
}

/** A relay's two sockets end together, whichever closes or fails first. */
function endTogether(client: net.Socket, upstream: net.Socket, also?: () => void): void {
  const end = () => {
    also?.();
    client.destroy();
    upstream.destroy();
  };
  for (const s of [client, upstream]) {
    s.on('close', end);
    s.on('error', end);
  }
}

/**
 * A TCP relay to `target` that passes at most `bytesPerSecond` source→destination: a slow
 * link, to make a migration take longer than its timeout or long enough to cancel.
 */
export async function slowLink(target: string, bytesPerSecond: number): Promise<{ server: net.Server; url: string }> {
  const to = parseMigrationUrl(target, 'target');
  if (to.kind !== 'tcp') throw new Error('slowLink relays tcp: URLs');
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: to.host, port: to.port });
    upstream.pipe(client);
    const tickMs = 50;
    const perTick = Math.max(1, Math.floor((bytesPerSecond * tickMs) / 1000));
    const queue: Buffer[] = [];
    let queued = 0;
    const timer = setInterval(() => {
      let budget = perTick;
      while (budget > 0 && queue.length) {
        const head = queue[0];
        const n = Math.min(budget, head.length);
        upstream.write(head.subarray(0, n));
        if (n === head.length) queue.shift();
        else queue[0] = head.subarray(n);
        queued -= n;
        budget -= n;
      }
      if (queued < 1 << 20) client.resume();
    }, tickMs);
    client.on('data', (c: Buffer) => {
      queue.push(c);
      queued += c.length;
      if (queued >= 1 << 20) client.pause();
    });
    endTogether(client, upstream, () => clearInterval(timer));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { server, url: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}` };
}

/**
 * A TCP relay to `target` that cuts its connection number `cut` (0: the first accepted) once
 * `afterBytes` have gone source→destination on it: one of a migration's connections failing
 * in the middle while the others carry on.
 */
export async function cuttingLink(target: string, cut: number, afterBytes: number): Promise<{ server: net.Server; url: string; cutDone: Promise<void> }> {
  const to = parseMigrationUrl(target, 'target');
  if (to.kind !== 'tcp') throw new Error('cuttingLink relays tcp: URLs');
  let accepted = 0;
  let cutNow!: () => void;
  const cutDone = new Promise<void>((r) => (cutNow = r));
  const server = net.createServer((client) => {
    const n = accepted++;
    const upstream = net.connect({ host: to.host, port: to.port });
    upstream.pipe(client);
    let passed = 0;
    client.on('data', (c: Buffer) => {
      if (n === cut && passed + c.length >= afterBytes) {
        upstream.write(c.subarray(0, Math.max(0, afterBytes - passed)));
        client.destroy();
        upstream.destroy();
        cutNow();
        return;
      }
      passed += c.length;
      if (!upstream.write(c)) client.pause();
    });
    upstream.on('drain', () => client.resume());
    endTogether(client, upstream);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { server, url: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, cutDone };
}
