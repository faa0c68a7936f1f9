// The bytes of every kind of reply, as Cloud Hypervisor's server (micro_http) frames them, read
// with raw UNIX-socket clients rather than Node's http client: "HTTP/1.1 NNN " with no reason
// phrase (ch-remote parses everything after "HTTP/1.1 " up to CR as the status number), Server
// and Connection: keep-alive, Content-Type and Content-Length only with a body, never chunked.
// Then a client that parses exactly as ch-remote's api_client does drives a whole exchange,
// and tern-remote (Node's http client) still works, and sends the contract's spellings.
import test from 'ava';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

import { SERVER_NAME } from '../../src/api/server';
import { runTernRemote } from '../support/processes';
import { ReplyRecorder, contractTest, rawExchange, startApi, tempDir, type ApiRig } from './api-harness';

const recorder = new ReplyRecorder();
const dir = tempDir('tern-api-framing-');
let rig: ApiRig;

test.before(async () => {
  rig = await startApi(recorder, dir);
});
test.after.always(async () => {
  await rig?.close();
});

/** Exactly what micro_http writes for a reply with a body (Server aside, which names the VMM). */
const headWithBody = (status: number, length: number, connection = 'keep-alive') =>
  `HTTP/1.1 ${status} \r\nServer: ${SERVER_NAME}\r\nConnection: ${connection}\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n`;
const NO_CONTENT = `HTTP/1.1 204 \r\nServer: ${SERVER_NAME}\r\nConnection: keep-alive\r\n\r\n`;

const get = (p: string) => `GET /api/v1/${p} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n`;
const put = (p: string, body?: string) =>
  `PUT /api/v1/${p} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n${body === undefined ? '' : `Content-Length: ${Buffer.byteLength(body)}\r\n`}\r\n${body ?? ''}`;

/** One reply's head and body from the front of `text`, split by its Content-Length. */
function takeReply(text: string): { head: string; body: string; rest: string } {
  const end = text.indexOf('\r\n\r\n') + 4;
  const head = text.slice(0, end);
  const m = /\r\nContent-Length: (\d+)\r\n/.exec(head);
  const len = m ? Number(m[1]) : 0;
  return { head, body: text.slice(end, end + len), rest: text.slice(end + len) };
}

function record(method: string, endpoint: string, reply: { head: string; body: string }): void {
  const status = Number(reply.head.slice(9, 12));
  const type = /\r\nContent-Type: ([^\r]+)/.exec(reply.head)?.[1];
  recorder.add({ method, endpoint, status, contentType: type, body: Buffer.from(reply.body) });
}

test.serial('200 with a body, 204, 400, 404 and 500 are framed byte for byte as micro_http frames them', async (t) => {
  // one connection, pipelined, as a keep-alive client would
  const { data } = await rawExchange(
    rig.socket,
    get('vmm.ping') + put('vm.delete') + put('vmm.ping') + get('vm.info') + get('vm.counters') + put('vm.create', '{"payload":'),
  );
  let rest = data.toString('latin1');
  const replies: ReturnType<typeof takeReply>[] = [];
  for (let i = 0; i < 6; i++) {
    const r = takeReply(rest);
    replies.push(r);
    rest = r.rest;
  }
  t.is(rest, '', 'nothing after the six replies: no chunk trailers, no extra bytes');
  const [ping, deleted, wrongMethod, noVm, notRunning, badJson] = replies;

  t.is(ping.head, headWithBody(200, ping.body.length));
  t.is((JSON.parse(ping.body) as { pid: number }).pid, process.pid);
  t.is(deleted.head, NO_CONTENT, '204: no Content-Type, no Content-Length, no body');
  t.is(deleted.body, '');
  for (const [r, status, re] of [
    [wrongMethod, 400, /accepts GET only/],
    [noVm, 404, /no VM has been created/],
    [notRunning, 500, /no VM has been created/],
    [badJson, 400, /malformed JSON/],
  ] as const) {
    t.is(r.head, headWithBody(status, Buffer.byteLength(r.body)), `${status}`);
    const chain = JSON.parse(r.body) as string[];
    t.true(Array.isArray(chain) && chain.length >= 2, r.body);
    t.regex(chain.join(': '), re);
  }
  for (const [[method, ep], r] of [['GET', 'vmm.ping'], ['PUT', 'vm.delete'], ['PUT', 'vmm.ping'], ['GET', 'vm.info'], ['GET', 'vm.counters'], ['PUT', 'vm.create']].map(
    (k, i) => [k, replies[i]] as const,
  )) {
    record(method, ep, r);
  }
});

test.serial('a request asking to close gets Connection: close and the connection ends; a parser error closes too', async (t) => {
  const { data, timedOut } = await rawExchange(rig.socket, `GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`, { end: false });
  t.false(timedOut, 'the server closed the connection');
  const r = takeReply(data.toString('latin1'));
  t.is(r.head, headWithBody(200, r.body.length, 'close'));
  t.is(r.rest, '');

  const garbage = await rawExchange(rig.socket, 'NOT HTTP AT ALL\r\n\r\n', { end: false });
  t.false(garbage.timedOut);
  const g = takeReply(garbage.data.toString('latin1'));
  t.is(g.head, headWithBody(400, Buffer.byteLength(g.body), 'close'));
  t.regex(g.body, /malformed HTTP request/);
});

test.serial('the event stream is plain text to the end of the connection, not chunked', async (t) => {
  const c = net.connect(rig.socket);
  let text = '';
  c.on('data', (d) => (text += d.toString('latin1')));
  c.write(get('vmm.events'));
  const deadline = Date.now() + 5000;
  while (!text.includes('tern event stream') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  await rig.call('PUT', 'vm.create', { payload: { kernel: '/k' } });
  await rig.call('PUT', 'vm.delete');
  while (!text.includes('"deleted"') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  c.destroy();
  t.true(
    text.startsWith(
      `HTTP/1.1 200 \r\nServer: ${SERVER_NAME}\r\nConnection: close\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n: tern event stream\n\n`,
    ),
    JSON.stringify(text.slice(0, 300)),
  );
  t.regex(text, /\n\nid: \d+\ndata: \{"timestamp":\{"secs":\d+,"nanos":\d+\},"source":"vm","event":"deleted","properties":null\}\n\n$/);
});

/**
 * One call the way Cloud Hypervisor's api_client makes it: the request bytes it writes, then
 * its reading: up to the blank line, then Content-Length more bytes if that header is there
 * (found by the exact text "Content-Length: "), the status being everything after "HTTP/1.1 "
 * up to the first CR, trimmed, which must parse as an unsigned integer.
 */
function chRemoteCall(socket: string, method: string, command: string, body?: string): Promise<{ status: number; body: string | null }> {
  return new Promise((resolve, reject) => {
    const c = net.connect(socket);
    let res = '';
    const finish = () => {
      c.destroy();
      const o = res.indexOf('HTTP/1.1');
      if (o < 0) return reject(new Error(`HTTP output is missing protocol statement: ${JSON.stringify(res)}`));
      const code = res.slice(o + 'HTTP/1.1 '.length, o + res.slice(o).indexOf('\r')).trim();
      if (!/^\+?\d+$/.test(code)) return reject(new Error(`Error parsing HTTP status code: invalid digit found in ${JSON.stringify(code)}`));
      const bodyOffset = res.indexOf('\r\n\r\n') + 4;
      const hasLength = res.indexOf('Content-Length: ') >= 0;
      resolve({ status: Number(code), body: hasLength ? res.slice(bodyOffset) : null });
    };
    c.on('data', (d) => {
      res += d.toString('utf8');
      const end = res.indexOf('\r\n\r\n');
      if (end < 0) return;
      const at = res.indexOf('Content-Length: ');
      if (at < 0) return finish();
      const length = res.slice(at + 'Content-Length: '.length, at + res.slice(at).indexOf('\r')).trim();
      if (!/^\d+$/.test(length)) return reject(new Error(`Error parsing HTTP Content-Length field: ${length}`));
      if (res.length >= Number(length) + end + 4) finish();
    });
    c.on('end', finish);
    c.on('error', reject);
    c.write(`${method} /api/v1/${command} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n`);
    if (body !== undefined) c.write(`Content-Length: ${body.length}\r\n`);
    c.write('\r\n');
    if (body !== undefined) c.write(body);
  });
}

test.serial('a client parsing like ch-remote reads every status and body', async (t) => {
  const ping = await chRemoteCall(rig.socket, 'GET', 'vmm.ping');
  t.is(ping.status, 200);
  t.is((JSON.parse(ping.body!) as { pid: number }).pid, process.pid);
  const create = await chRemoteCall(rig.socket, 'PUT', 'vm.create', JSON.stringify({ payload: { kernel: '/k' }, memory: { size: 64 << 20 } }));
  t.deepEqual(create, { status: 204, body: null }, 'no Content-Length: ch-remote prints nothing');
  const info = await chRemoteCall(rig.socket, 'GET', 'vm.info');
  t.is(info.status, 200);
  t.is((JSON.parse(info.body!) as { state: string }).state, 'Created');
  const pause = await chRemoteCall(rig.socket, 'PUT', 'vm.pause');
  t.is(pause.status, 500);
  t.regex(pause.body!, /could not be paused/);
  const restore = await chRemoteCall(rig.socket, 'PUT', 'vm.restore', '{"source_url":"file:///nonexistent","prefault":false,"memory_restore_mode":"OnDemand","resume":false}');
  t.is(restore.status, 500, 'refused by the state machine (a VM exists), not for the spelling');
  t.is((await chRemoteCall(rig.socket, 'PUT', 'vm.delete')).status, 204);
  const unknown = await chRemoteCall(rig.socket, 'PUT', 'vm.resize');
  t.is(unknown.status, 404);
  t.true(Array.isArray(JSON.parse(unknown.body!)));
});

test.serial('tern-remote still works against the API, printing bodies and error chains', async (t) => {
  const ping = await runTernRemote(rig.socket, ['ping']);
  t.is(ping.code, 0, ping.stderr);
  t.is((JSON.parse(ping.stdout) as { pid: number }).pid, process.pid);
  const info = await runTernRemote(rig.socket, ['info']);
  t.is(info.code, 1);
  t.regex(info.stderr, /info failed: HTTP 404 Not Found\n {2}0: The VM information is not available\n {2}1: no VM has been created/);
  t.is((await runTernRemote(rig.socket, ['delete'])).code, 0);
});

test.serial('tern-remote restore sends the contract spelling of memory_restore_mode, as ch-remote does', async (t) => {
  // A stand-in server that records the request and answers as Cloud Hypervisor would.
  const sock = path.join(dir, 'capture.sock');
  let request = '';
  const server = net.createServer((c) => {
    c.on('data', (d) => {
      request += d.toString('latin1');
      if (/\r\n\r\n[\s\S]*\}$/.test(request)) c.end('HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n');
    });
  });
  await new Promise<void>((r) => server.listen(sock, r));
  try {
    const r = await runTernRemote(sock, ['restore', 'source_url=file:///snap,memory_restore_mode=ondemand,resume=on']);
    t.is(r.code, 0, r.stderr);
    t.regex(request, /^PUT \/api\/v1\/vm\.restore HTTP\/1\.1\r\n/);
    t.deepEqual(JSON.parse(request.slice(request.indexOf('\r\n\r\n') + 4)), { source_url: 'file:///snap', memory_restore_mode: 'OnDemand', resume: true });
    const bad = await runTernRemote(sock, ['restore', 'source_url=file:///snap,memory_restore_mode=lazy']);
    t.is(bad.code, 2);
    t.regex(bad.stderr, /memory_restore_mode=lazy must be copy or ondemand/);
  } finally {
    server.close();
    fs.rmSync(sock, { force: true });
  }
});

contractTest(test, recorder, 'api-framing', ['GET vmm.ping', 'PUT vm.delete', 'PUT vmm.ping', 'GET vm.info', 'GET vm.counters', 'PUT vm.create']);

test.serial('a client that half-closes after its request still gets the reply of a call that takes a while', async (t) => {
  // A receive waits for a source; cancelling it from another connection ends it with a 500.
  const url = `unix:${path.join(tempDir('tern-halfclose-'), 'mig.sock')}`;
  const body = JSON.stringify({ receiver_url: url });
  const exchange = rawExchange(
    rig.socket,
    `PUT /api/v1/vm.receive-migration HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    { end: true, timeoutMs: 10_000 },
  );
  for (let i = 0; i < 100 && (await rig.client.request('GET', 'vm.migration-progress')).status !== 200; i++) await new Promise((r) => setTimeout(r, 50));
  t.is((await rig.client.request('PUT', 'vm.migration-cancel')).status, 204);
  const { data, timedOut } = await exchange;
  t.false(timedOut);
  t.regex(data.toString('latin1'), /^HTTP\/1\.1 500 \r\n[\s\S]*cancelled by the client/);
});
