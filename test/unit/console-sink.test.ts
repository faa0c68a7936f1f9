// The serial console's host end under a guest that writes without end and hosts that do not
// keep up: the file cap, write errors, a reader that is not ready (EAGAIN), unsafe paths.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';

import { guestLog } from '../../src/util/guest-log';
import { ConsoleConfigError, ConsoleOutput, OUTPUT_MAX_PENDING_BYTES, openConsoleSink } from '../../src/vmm/console-sink';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-console-sink-'));
test.after.always(() => fs.rmSync(tmp, { recursive: true, force: true }));

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const bytes = (n: number, from = 0): number[] => Array.from({ length: n }, (_, i) => (from + i) & 0xff);

test('a serial file stops growing at its cap; the rest is dropped and reported', async (t) => {
  const file = path.join(tmp, 'capped.log');
  let dropped = 0;
  const sink = openConsoleSink({ mode: 'File', file }, { maxFileBytes: 1000, onDropped: (n) => (dropped += n) });
  for (let i = 0; i < 3; i++) {
    sink.write(bytes(600, i * 600));
    await turn();
  }
  sink.close();
  const content = fs.readFileSync(file);
  t.is(content.length, 1000);
  t.deepEqual([...content], bytes(1000));
  t.is(dropped, 800);
  t.is(fs.statSync(file).mode & 0o777, 0o600, 'created 0600');

  // Reopened (a reboot): the cap counts what the file already holds.
  let again = 0;
  const next = openConsoleSink({ mode: 'File', file }, { maxFileBytes: 1100, onDropped: (n) => (again += n) });
  next.write(bytes(300));
  next.close();
  t.is(fs.statSync(file).size, 1100);
  t.is(again, 200);
});

test('a serial file path that is a symlink, a FIFO or a directory is refused', (t) => {
  const target = path.join(tmp, 'target');
  fs.writeFileSync(target, 'keep');
  const link = path.join(tmp, 'link');
  fs.symlinkSync(target, link);
  t.throws(() => openConsoleSink({ mode: 'File', file: link }), { instanceOf: ConsoleConfigError, message: /symbolic link/ });
  t.is(fs.readFileSync(target, 'utf8'), 'keep');

  const fifo = path.join(tmp, 'fifo');
  execFileSync('mkfifo', [fifo]);
  t.throws(() => openConsoleSink({ mode: 'File', file: fifo }), { instanceOf: ConsoleConfigError }, 'refused, and the open does not hang');
  t.throws(() => openConsoleSink({ mode: 'File', file: tmp }), { instanceOf: ConsoleConfigError });
});

test('a write error (ENOSPC) is logged and counted, never thrown', async (t) => {
  const lines: { msg: string; code?: string }[] = [];
  const log = guestLog(pino({ level: 'warn' }, { write: (s: string) => void lines.push(JSON.parse(s)) }));
  const fd = fs.openSync('/dev/full', 'w');
  let dropped = 0;
  const out = new ConsoleOutput(fd, { name: 'full', log, onDropped: (n) => (dropped += n) });
  try {
    for (let i = 0; i < 50; i++) {
      out.write(bytes(100));
      await turn();
    }
    out.close();
  } finally {
    fs.closeSync(fd);
  }
  t.is(dropped, 5000);
  t.true(lines.length >= 1 && lines.length <= 15, `${lines.length} log lines`);
  t.is(lines[0].code, 'ENOSPC');
});

/** A FIFO whose both ends are non-blocking: writes past the pipe buffer get EAGAIN. */
function nonBlockingPipe(name: string): { reader: number; writer: number } {
  const fifo = path.join(tmp, name);
  execFileSync('mkfifo', [fifo]);
  const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const writer = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  return { reader, writer };
}

function readAvailable(fd: number, into: number[]): void {
  const buf = Buffer.alloc(65536);
  for (;;) {
    let n: number;
    try {
      n = fs.readSync(fd, buf, 0, buf.length, null);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return;
      throw e;
    }
    if (n === 0) return;
    for (let i = 0; i < n; i++) into.push(buf[i]);
  }
}

test('a reader that is not ready (EAGAIN) is waited for without blocking the event loop; nothing is lost', async (t) => {
  const { reader, writer } = nonBlockingPipe('slow-reader');
  let dropped = 0;
  const out = new ConsoleOutput(writer, { name: 'pipe', onDropped: (n) => (dropped += n) });
  const total = 300 * 1024;
  try {
    for (let off = 0; off < total; off += 30 * 1024) {
      out.write(bytes(30 * 1024, off));
      await turn();
    }
    // The pipe holds 64 KiB and nobody reads: the rest waits. Timers keep firing meanwhile.
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    await sleep(200);
    clearInterval(timer);
    t.true(ticks >= 2, `only ${ticks} timer ticks in 200 ms: the event loop was blocked`);

    const got: number[] = [];
    const end = Date.now() + 5000;
    while (got.length < total && Date.now() < end) {
      readAvailable(reader, got);
      await sleep(5);
    }
    t.is(got.length, total);
    t.deepEqual(got, bytes(total), 'in order');
    t.is(dropped, 0);
  } finally {
    out.close();
    fs.closeSync(writer);
    fs.closeSync(reader);
  }
});

test('output waiting for a reader is bounded; what does not fit is dropped and counted', async (t) => {
  const { reader, writer } = nonBlockingPipe('stuck-reader');
  let dropped = 0;
  const out = new ConsoleOutput(writer, { name: 'pipe', onDropped: (n) => (dropped += n) });
  const total = 3 * OUTPUT_MAX_PENDING_BYTES;
  try {
    for (let off = 0; off < total; off += 64 * 1024) {
      out.write(bytes(64 * 1024, off));
      await turn();
    }
    t.true(dropped > 0 && dropped < total, `dropped ${dropped}`);
    const got: number[] = [];
    const end = Date.now() + 5000;
    while (got.length + dropped < total && Date.now() < end) {
      readAvailable(reader, got);
      await sleep(5);
    }
    t.is(got.length + dropped, total, 'every byte is either delivered or counted as dropped');
  } finally {
    out.close();
    fs.closeSync(writer);
    fs.closeSync(reader);
  }
});

test('a pty console: the guest output reaches whoever opens the slave, what they type reaches the guest, nothing echoes back', async (t) => {
  const sink = openConsoleSink({ mode: 'Pty' }, { device: 'console' });
  t.teardown(() => sink.close());
  t.regex(sink.path ?? '', /^\/dev\/pts\/\d+$/);
  const got: number[] = [];
  sink.onInput((bytes) => {
    got.push(...bytes);
    return bytes.length;
  });
  // Output written before anyone opened the slave waits in the pty for its reader.
  sink.write(Buffer.from('early\n'));
  const slave = fs.openSync(sink.path!, fs.constants.O_RDWR | fs.constants.O_NOCTTY | fs.constants.O_NONBLOCK);
  t.teardown(() => fs.closeSync(slave));
  sink.write(Buffer.from('login: '));
  let seen = '';
  const buf = Buffer.alloc(256);
  const deadline = Date.now() + 5000;
  while (!seen.includes('login: ') && Date.now() < deadline) {
    try {
      const n = fs.readSync(slave, buf);
      seen += buf.subarray(0, n).toString('latin1');
    } catch {
      await new Promise((r) => setTimeout(r, 5));
    }
  }
  t.is(seen, 'early\nlogin: ', 'the slave reads the output unchanged (raw: no \\r added)');
  fs.writeSync(slave, 'root\r');
  while (got.length < 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  t.is(Buffer.from(got).toString('latin1'), 'root\r', 'the typed bytes, unchanged, and not the output echoed back');
});
