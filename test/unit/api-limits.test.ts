// What clients can hold of the VMM through its API socket is capped: connections (silent ones
// cannot exhaust its file descriptors or lock others out), silence (an idle or half-sent
// connection is closed after the idle timeout), request bodies held at once across connections
// (429 past the budget, while small calls still work), unanswered pipelined requests and live
// event streams.
import test from 'ava';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

import { TernClient } from '../../src/api/client';
import { DEFAULT_API_LIMITS, SERVER_NAME } from '../../src/api/server';
import { GuestProcess } from '../linux/guest-process';
import { waitForPath } from '../support/processes';
import { ReplyRecorder, parseResponses, rawExchange, startApi, tempDir, type ApiRig, type ParsedResponse } from './api-harness';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A raw connection kept open: what it received, and when it was closed (ms after opening). */
interface Held {
  socket: net.Socket;
  text(): string;
  closed: Promise<number>;
  isClosed(): boolean;
}

function hold(socketPath: string, bytes?: string | Buffer): Promise<Held> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const socket = net.connect(socketPath);
    let received = '';
    let closedAt: number | undefined;
    socket.on('data', (d) => (received += d.toString('latin1')));
    socket.on('error', () => undefined);
    const closed = new Promise<number>((r) =>
      socket.on('close', () => {
        closedAt = Date.now() - started;
        r(closedAt);
      }),
    );
    socket.once('connect', () => {
      if (bytes !== undefined) socket.write(bytes);
      resolve({ socket, text: () => received, closed, isClosed: () => closedAt !== undefined });
    });
    socket.once('error', reject);
  });
}

async function until(what: string, cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** The first complete reply on a held connection, once it has arrived. */
function firstReply(h: Held): ParsedResponse | undefined {
  const text = h.text();
  const end = text.indexOf('\r\n\r\n');
  if (end < 0) return undefined;
  const length = Number(/\r\ncontent-length: (\d+)/i.exec(text.slice(0, end))?.[1] ?? 0);
  if (text.length < end + 4 + length) return undefined;
  return parseResponses(Buffer.from(text.slice(0, end + 4 + length), 'latin1'))[0];
}

const fdCount = (pid: number): number => fs.readdirSync(`/proc/${pid}/fd`).length;
const eventsRequest = 'GET /api/v1/vmm.events HTTP/1.1\r\nHost: localhost\r\n\r\n';
const pingRequest = 'GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n';

async function withRig(name: string, limits: Parameters<typeof startApi>[2], body: (rig: ApiRig) => Promise<void>): Promise<void> {
  const rig = await startApi(new ReplyRecorder(), tempDir(`tern-api-limits-${name}-`), limits);
  try {
    await body(rig);
  } finally {
    await rig.close();
  }
}

test('more silent connections than the cap: the VMM keeps answering and its fds do not grow', async (t) => {
  const dir = tempDir('tern-api-limits-cap-');
  const socket = path.join(dir, 'api.sock');
  const vmm = GuestProcess.tern(['--api-socket', `path=${socket}`]);
  const client = new TernClient({ socketPath: socket, timeoutMs: 10_000 });
  const held: Held[] = [];
  try {
    await waitForPath(socket);
    t.is((await client.ping()).pid, vmm.child.pid);
    const before = fdCount(vmm.child.pid!);
    const extra = DEFAULT_API_LIMITS.maxConnections * 5;
    for (let i = 0; i < extra; i += 50) held.push(...(await Promise.all(Array.from({ length: 50 }, () => hold(socket)))));
    await sleep(500);
    const during = fdCount(vmm.child.pid!);
    t.true(during <= before + DEFAULT_API_LIMITS.maxConnections + 2, `the VMM had ${before} fds, ${during} with ${extra} connections open`);
    t.true(held.filter((h) => h.isClosed()).length >= extra - DEFAULT_API_LIMITS.maxConnections, 'the VMM closed the connections over its cap');
    const ping = await client.ping();
    t.is(ping.pid, vmm.child.pid, 'a new client is still answered');
    t.is(vmm.child.exitCode, null);
  } finally {
    for (const h of held) h.socket.destroy();
    client.close();
    vmm.kill();
  }
});

test('when every connection is busy, a new one gets a 503 error reply and is closed', async (t) => {
  await withRig('busy', { maxConnections: 2, maxEventStreams: 2 }, async (rig) => {
    const streams = await Promise.all([hold(rig.socket, eventsRequest), hold(rig.socket, eventsRequest)]);
    await until('both streams to start', () => streams.every((s) => s.text().includes('tern event stream')));
    const { data, timedOut } = await rawExchange(rig.socket, pingRequest, { end: false });
    t.false(timedOut, 'the refused connection is closed');
    const [reply] = parseResponses(data);
    t.is(reply.status, 503);
    t.is(data.toString('latin1').slice(0, data.indexOf('\r\n\r\n') + 4), `HTTP/1.1 503 \r\nServer: ${SERVER_NAME}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: ${reply.body.length}\r\n\r\n`);
    t.deepEqual(JSON.parse(reply.body.toString()), ['Service unavailable', 'the API already serves 2 connections']);
    t.false(streams.some((s) => s.isClosed()), 'the streams were not disturbed');
    streams[0].socket.destroy();
    await streams[0].closed;
    await sleep(100); // the server's side of the close
    t.is((await rig.client.ping()).pid, process.pid, 'a freed slot is used again');
    streams[1].socket.destroy();
  });
});

test('a silent connection, a half-sent head, a half-sent body and an idle keep-alive connection are closed after the idle timeout', async (t) => {
  const idle = 300;
  await withRig('idle', { idleTimeoutMs: idle }, async (rig) => {
    const silent = await hold(rig.socket);
    const halfHead = await hold(rig.socket, 'GET /api/v1/vmm.pi');
    const halfBody = await hold(rig.socket, 'PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"pay');
    const afterReply = await hold(rig.socket, pingRequest);
    const stream = await hold(rig.socket, eventsRequest);
    const times = await Promise.all([silent.closed, halfHead.closed, halfBody.closed, afterReply.closed]);
    for (const [i, ms] of times.entries()) t.true(ms >= idle - 50 && ms < idle + 2500, `connection ${i} closed after ${ms} ms`);
    t.is(silent.text(), '');
    const timeout = firstReply(halfBody)!;
    t.is(timeout.status, 408, 'the half-sent body is told why');
    t.regex(timeout.body.toString(), /stopped arriving/);
    t.is(firstReply(afterReply)?.status, 200);
    // An event stream is quiet between events; it is not idle.
    await sleep(idle * 2);
    t.false(stream.isClosed(), 'the event stream stays open');
    await rig.client.create({ payload: { kernel: '/k' } });
    await rig.client.delete();
    await until('the stream to carry the event', () => stream.text().includes('"deleted"'));
    stream.socket.destroy();
  });
});

test('large bodies beyond the budget are refused with 429 while others are held; small requests still work', async (t) => {
  const budget = 6 << 20;
  const big = (3 << 20) + (512 << 10);
  // spaces then a digit: JSON, but not a VmConfig (400 once read whole)
  const bigHead = `PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Length: ${big}\r\n\r\n`;
  const bigBody = Buffer.concat([Buffer.alloc(big - 1, 0x20), Buffer.from('1')]);
  await withRig('budget', { bodyBudgetBytes: budget }, async (rig) => {
    const first = await hold(rig.socket, Buffer.concat([Buffer.from(bigHead), bigBody.subarray(0, 4096)]));
    await sleep(100);
    const second = await hold(rig.socket, Buffer.concat([Buffer.from(bigHead), bigBody.subarray(0, 4096)]));
    await until('the second upload to be refused', () => firstReply(second) !== undefined);
    const refused = firstReply(second)!;
    t.is(refused.status, 429);
    t.regex(refused.body.toString(), /Too many requests.*retry later/);

    // chunked: refused once what it sent passes the budget
    const chunk = Buffer.alloc(1 << 20, 0x20);
    const chunked = await hold(rig.socket, 'PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n');
    for (let i = 0; i < 4 && !chunked.text(); i++) {
      chunked.socket.write(`${chunk.length.toString(16)}\r\n`);
      chunked.socket.write(chunk);
      chunked.socket.write('\r\n');
      await sleep(100);
    }
    await until('the chunked upload to be refused', () => firstReply(chunked) !== undefined);
    t.is(firstReply(chunked)!.status, 429);

    t.is(first.text(), '', 'the first upload is still being received');
    t.is((await rig.client.ping()).pid, process.pid);
    await rig.client.create({ payload: { kernel: '/k' } });
    t.is(rig.vmm.state.vm.status, 'Created', 'a small vm.create is not refused');
    await rig.client.delete();

    first.socket.write(bigBody.subarray(4096));
    await until('the first upload to be answered', () => firstReply(first) !== undefined);
    t.is(firstReply(first)!.status, 400, 'read whole and parsed');
    // what it held is given back
    const { data } = await rawExchange(rig.socket, Buffer.concat([Buffer.from(bigHead), bigBody]));
    t.is(parseResponses(data)[0].status, 400);
    for (const h of [first, second, chunked]) h.socket.destroy();
  });
});

test('event streams past their cap get 429; the others keep streaming', async (t) => {
  await withRig('streams', { maxEventStreams: 2 }, async (rig) => {
    const streams = await Promise.all([hold(rig.socket, eventsRequest), hold(rig.socket, eventsRequest)]);
    await until('both streams to start', () => streams.every((s) => s.text().includes('tern event stream')));
    const { data } = await rawExchange(rig.socket, eventsRequest);
    const [third] = parseResponses(data);
    t.is(third.status, 429);
    t.regex(third.body.toString(), /2 event streams are open already/);
    await rig.client.create({ payload: { kernel: '/k' } });
    await rig.client.delete();
    await until('both streams to carry the event', () => streams.every((s) => s.text().includes('"deleted"')));
    for (const s of streams) s.socket.destroy();
    t.pass();
  });
});

test('requests pipelined on one connection past the cap get 429 at once instead of queueing in the VMM', async (t) => {
  await withRig('pipelined', { maxPipelined: 4 }, async (rig) => {
    // Something slow holds the VMM's queue (as a snapshot would) while the pipeline arrives.
    const busy = (rig.vmm as unknown as { serialize(f: () => Promise<unknown>): Promise<unknown> }).serialize(() => sleep(500));
    const pause = 'PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\n\r\n';
    const pipeline = await hold(rig.socket, pause.repeat(50));
    const replies = (): ParsedResponse[] => {
      try {
        return parseResponses(Buffer.from(pipeline.text(), 'latin1'));
      } catch {
        return []; // not all there yet
      }
    };
    await busy;
    await until('50 replies', () => replies().length === 50);
    // in request order: the first four waited for the VMM, the rest were refused without queueing
    t.deepEqual(replies().map((r) => r.status), [...Array(4).fill(404), ...Array(46).fill(429)]);
    t.regex(replies()[49].body.toString(), /49 requests on this connection are not answered yet \(at most 4\)/);
    pipeline.socket.destroy();
    t.is((await rig.client.ping()).pid, process.pid);
  });
});
