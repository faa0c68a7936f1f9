// Descriptors passed over a UNIX socket that Node owns: the receiver takes exactly the bytes it
// asked for plus the descriptors, and Node reads whatever follows; a peer that sends too many
// descriptors, hangs up mid-message or sends nothing gets an error and leaks nothing.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import test from 'ava';

import { native } from '../../src/native/kvm';
import { tempDir } from './api-harness';

interface Pair {
  client: net.Socket;
  server: net.Socket;
  clientFd: number;
  serverFd: number;
  close(): void;
}

/** The fd behind a connected net.Socket (what the migration code hands to the addon). */
function socketFd(s: net.Socket): number {
  const fd = (s as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('socket has no fd');
  return fd;
}

/** One directory for every socket and file of this file's tests. */
const dir = tempDir('tern-fdpass-');
let serial = 0;

async function connectedPair(): Promise<Pair> {
  const sockPath = path.join(dir, `s${serial++}`);
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(sockPath, resolve));
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect(sockPath);
  await new Promise<void>((resolve) => client.once('connect', resolve));
  const conn = await accepted;
  return {
    client,
    server: conn,
    clientFd: socketFd(client),
    serverFd: socketFd(conn),
    close() {
      client.destroy();
      conn.destroy();
      server.close();
    },
  };
}

function openFds(): string[] {
  return fs.readdirSync('/proc/self/fd').sort();
}

function tempFile(contents: string): { fd: number; file: string } {
  const file = path.join(dir, `f${serial++}`);
  fs.writeFileSync(file, contents, { mode: 0o600 });
  return { fd: fs.openSync(file, 'r+'), file };
}

test('a descriptor and bytes arrive together; Node reads the bytes that follow', async (t) => {
  const p = await connectedPair();
  const { fd, file } = tempFile('from the sender');
  try {
    native().sendWithFds(p.clientFd, Buffer.from('HELLOworld'), [fd], 1000);
    p.client.write('-after');
    const got = native().recvWithFds(p.serverFd, 5, 4, 1000);
    t.is(got.data.toString(), 'HELLO');
    t.is(got.fds.length, 1);
    t.not(got.fds[0], fd, 'the receiver has its own descriptor');
    // The same open file: what one side writes, the other reads.
    fs.writeSync(got.fds[0], 'RECEIVER', 0);
    t.is(fs.readFileSync(file, 'utf8'), 'RECEIVER sender');
    const buf = Buffer.alloc(6);
    fs.writeSync(fd, 'SENDER', 0);
    fs.readSync(got.fds[0], buf, 0, 6, 0);
    t.is(buf.toString(), 'SENDER');
    t.true((fs.fstatSync(got.fds[0]).mode & 0o170000) === 0o100000);
    fs.closeSync(got.fds[0]);

    // Nothing past the 5 bytes was taken from the stream: Node sees the rest, in order.
    const rest = new Promise<string>((resolve) => {
      let text = '';
      p.server.on('data', (d: Buffer) => {
        text += d.toString();
        if (text.length >= 'world-after'.length) resolve(text);
      });
    });
    p.server.resume();
    t.is(await rest, 'world-after');
  } finally {
    fs.closeSync(fd);
    p.close();
  }
});

test('several descriptors and a message longer than one read arrive whole', async (t) => {
  const p = await connectedPair();
  const files = [tempFile('a'), tempFile('b'), tempFile('c')];
  try {
    const data = Buffer.alloc(64 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = i % 251;
    native().sendWithFds(p.clientFd, data, files.map((f) => f.fd), 1000);
    const got = native().recvWithFds(p.serverFd, data.length, 3, 1000);
    t.true(got.data.equals(data));
    t.is(got.fds.length, 3);
    got.fds.forEach((fd, i) => {
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, 0);
      t.is(b.toString(), 'abc'[i], 'descriptors keep their order');
      fs.closeSync(fd);
    });
  } finally {
    for (const f of files) fs.closeSync(f.fd);
    p.close();
  }
});

test('more descriptors than allowed: refused, and every one received is closed', async (t) => {
  const p = await connectedPair();
  const files = [tempFile('a'), tempFile('b'), tempFile('c')];
  try {
    native().sendWithFds(p.clientFd, Buffer.from('xy'), files.map((f) => f.fd), 1000);
    const before = openFds();
    const err = t.throws(() => native().recvWithFds(p.serverFd, 2, 2, 1000));
    t.is((err as NodeJS.ErrnoException).code, 'EMSGSIZE');
    t.is((err as NodeJS.ErrnoException).syscall, 'recvmsg');
    t.regex(err!.message, /sent 3 descriptors, at most 2/);
    t.deepEqual(openFds(), before, 'no received descriptor is left open');
  } finally {
    for (const f of files) fs.closeSync(f.fd);
    p.close();
  }
});

test('the peer hanging up mid-message is an error that names how far it got', async (t) => {
  const p = await connectedPair();
  const file = tempFile('a');
  try {
    native().sendWithFds(p.clientFd, Buffer.from('abc'), [file.fd], 1000);
    const closed = new Promise((resolve) => p.client.once('close', resolve));
    p.client.destroy();
    await closed;
    const before = openFds();
    const err = t.throws(() => native().recvWithFds(p.serverFd, 10, 4, 1000));
    t.is((err as NodeJS.ErrnoException).code, 'ECONNRESET');
    t.is((err as NodeJS.ErrnoException).errno, 104);
    t.regex(err!.message, /closed the connection after 3 of 10 bytes/);
    t.deepEqual(openFds(), before, 'the descriptor that came with the first bytes is closed');
  } finally {
    fs.closeSync(file.fd);
    p.close();
  }
});

test('nothing arriving ends in a timeout after the time given', async (t) => {
  const p = await connectedPair();
  try {
    const start = Date.now();
    const err = t.throws(() => native().recvWithFds(p.serverFd, 4, 1, 80));
    const took = Date.now() - start;
    t.is((err as NodeJS.ErrnoException).code, 'ETIMEDOUT');
    t.is((err as NodeJS.ErrnoException).syscall, 'recvmsg');
    t.true(took >= 75 && took < 2000, `waited ${took} ms`);
  } finally {
    p.close();
  }
});

test('a full socket is waited on, then the send times out', async (t) => {
  const p = await connectedPair();
  try {
    // Nobody reads the server side: the socket buffers fill and sendmsg says EAGAIN.
    const chunk = Buffer.alloc(64 * 1024, 1);
    const err = t.throws(() => {
      for (let i = 0; i < 1000; i++) native().sendWithFds(p.clientFd, chunk, [], 60);
    });
    t.is((err as NodeJS.ErrnoException).code, 'ETIMEDOUT');
    t.is((err as NodeJS.ErrnoException).syscall, 'sendmsg');
  } finally {
    p.close();
  }
});

test('arguments are checked: caps, types and integer ranges', async (t) => {
  const p = await connectedPair();
  try {
    const n = native();
    t.throws(() => n.sendWithFds(p.clientFd, Buffer.alloc(64 * 1024 + 1), [], 10), { instanceOf: RangeError, message: /at most|1\.\.65536/ });
    t.throws(() => n.sendWithFds(p.clientFd, Buffer.alloc(0), [], 10), { instanceOf: RangeError });
    t.throws(() => n.sendWithFds(p.clientFd, Buffer.from('x'), new Array(65).fill(0), 10), { instanceOf: RangeError, message: /at most 64 fds/ });
    t.throws(() => n.sendWithFds(p.clientFd, 'x' as unknown as Uint8Array, [], 10), { instanceOf: TypeError });
    t.throws(() => n.sendWithFds(p.clientFd, Buffer.from('x'), [1.5], 10), { instanceOf: TypeError, message: /fds\[0\] must be an integer/ });
    t.throws(() => n.sendWithFds(-1, Buffer.from('x'), [], 10), { instanceOf: RangeError, message: /socketFd/ });
    t.throws(() => n.recvWithFds(p.serverFd, 0, 1, 10), { instanceOf: RangeError, message: /length/ });
    t.throws(() => n.recvWithFds(p.serverFd, 64 * 1024 + 1, 1, 10), { instanceOf: RangeError, message: /length/ });
    t.throws(() => n.recvWithFds(p.serverFd, 4, 65, 10), { instanceOf: RangeError, message: /maxFds/ });
    t.throws(() => n.recvWithFds(p.serverFd, 4, 1, NaN), { instanceOf: TypeError, message: /timeoutMs/ });
  } finally {
    p.close();
  }
});
