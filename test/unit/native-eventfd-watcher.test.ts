// The native eventfd watcher: a doorbell write reaches JavaScript as one callback with the
// count, drained from the eventfd; counts written faster than JavaScript runs coalesce; after
// remove() nothing more of that fd is delivered, even what was already read; close() joins the
// thread and lets the process exit; bad arguments throw and a throwing callback is contained.
//
// A negative ("no callback for fd a") is only checked after a positive signal: a write to a
// sentinel fd that the same thread reports later.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';

import { EventFdFlags, NativeEventfdWatcher, native } from '../../src/native/kvm';
import { tempDir } from './api-harness';

interface Call {
  fd: number;
  count: number;
  error?: Error;
}

/** Collects callbacks; waitFor resolves once the calls so far satisfy `done`, or fails. */
function recorder(onCall?: (c: Call) => void) {
  const calls: Call[] = [];
  let waiter: (() => void) | undefined;
  const cb = (fd: number, count: number, error?: Error) => {
    const c: Call = error === undefined ? { fd, count } : { fd, count, error };
    calls.push(c);
    onCall?.(c);
    waiter?.();
  };
  const waitFor = (done: (calls: Call[]) => boolean, timeoutMs = 5000) =>
    new Promise<void>((resolve, reject) => {
      if (done(calls)) return resolve();
      const timer = setTimeout(() => {
        waiter = undefined;
        reject(new Error(`timed out; calls so far: ${JSON.stringify(calls)}`));
      }, timeoutMs);
      waiter = () => {
        if (!done(calls)) return;
        clearTimeout(timer);
        waiter = undefined;
        resolve();
      };
    });
  return { calls, cb, waitFor, of: (fd: number) => calls.filter((c) => c.fd === fd) };
}

/** Block the JavaScript thread (not the watcher's) so that work piles up before it runs. */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

const opened: number[] = [];
function efd(flags?: number): number {
  const fd = native().eventfd(0, flags);
  opened.push(fd);
  return fd;
}
test.after.always(() => {
  for (const fd of opened) native().closeFd(fd);
});

function watcher(cb: (fd: number, count: number, error?: Error) => void): NativeEventfdWatcher {
  return native().watchEventfds(cb);
}

test.serial('a write of 3 is one callback (fd, 3), and the eventfd is drained', async (t) => {
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    const a = efd();
    const sentinel = efd();
    w.add(a);
    w.add(sentinel);
    native().eventfdWrite(a, 3n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === a));
    t.is(native().eventfdRead(a), null, 'the watcher read the counter');
    native().eventfdWrite(sentinel, 1n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === sentinel));
    t.deepEqual(rec.of(a), [{ fd: a, count: 3 }]);
    t.deepEqual(rec.of(sentinel), [{ fd: sentinel, count: 1 }]);
  } finally {
    w.close();
  }
});

test.serial('two fds are told apart', async (t) => {
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    const a = efd();
    const b = efd();
    w.add(a);
    w.add(b);
    native().eventfdWrite(b, 2n);
    native().eventfdWrite(a, 5n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === a) && cs.some((c) => c.fd === b));
    t.deepEqual(rec.of(a), [{ fd: a, count: 5 }]);
    t.deepEqual(rec.of(b), [{ fd: b, count: 2 }]);
  } finally {
    w.close();
  }
});

test.serial('writes made before JavaScript runs coalesce into calls whose counts sum to the total', async (t) => {
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    const a = efd();
    const sentinel = efd();
    w.add(a);
    w.add(sentinel);
    for (let i = 0; i < 1000; i++) {
      native().eventfdWrite(a, 1n);
      if (i % 100 === 0) sleepSync(2); // let the thread read and queue in between
    }
    const sum = () => rec.of(a).reduce((s, c) => s + c.count, 0);
    await rec.waitFor(() => sum() >= 1000);
    native().eventfdWrite(sentinel, 1n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === sentinel));
    t.is(sum(), 1000);
    // One call may be queued while JavaScript is busy; reads after it runs need one more.
    t.true(rec.of(a).length <= 2, `${rec.of(a).length} calls`);
    t.is(native().eventfdRead(a), null);
  } finally {
    w.close();
  }
});

test.serial('a count beyond Number.MAX_SAFE_INTEGER is clamped to it', async (t) => {
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    const a = efd();
    w.add(a);
    native().eventfdWrite(a, 1n << 60n);
    await rec.waitFor((cs) => cs.length > 0);
    t.deepEqual(rec.calls, [{ fd: a, count: Number.MAX_SAFE_INTEGER }]);
  } finally {
    w.close();
  }
});

test.serial('after remove() a write is neither read nor reported; add() again watches anew', async (t) => {
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    const a = efd();
    const sentinel = efd();
    w.add(a);
    w.add(sentinel);
    w.remove(a);
    w.remove(a); // not watched: nothing happens
    native().eventfdWrite(a, 5n);
    native().eventfdWrite(sentinel, 1n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === sentinel));
    await new Promise((r) => setTimeout(r, 50));
    t.deepEqual(rec.of(a), []);
    t.is(native().eventfdRead(a), 5n, 'the counter was left alone');

    w.add(a);
    native().eventfdWrite(a, 2n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === a));
    t.deepEqual(rec.of(a), [{ fd: a, count: 2 }]);
  } finally {
    w.close();
  }
});

test.serial('remove() drops a count the thread has already read and queued', async (t) => {
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    const a = efd();
    const sentinel = efd();
    w.add(a);
    w.add(sentinel);
    native().eventfdWrite(a, 7n);
    sleepSync(100); // the thread reads it and queues a call that cannot run yet
    t.is(native().eventfdRead(a), null, 'the count was read before remove()');
    w.remove(a);
    native().eventfdWrite(sentinel, 1n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === sentinel));
    await new Promise((r) => setImmediate(r));
    t.deepEqual(rec.of(a), []);
  } finally {
    w.close();
  }
});

test.serial('remove() from the callback drops the other fd of the same delivery', async (t) => {
  const a = efd();
  const b = efd();
  const sentinel = efd();
  let w: NativeEventfdWatcher | undefined;
  let removed = -1;
  const rec = recorder((c) => {
    if (removed < 0 && (c.fd === a || c.fd === b)) {
      removed = c.fd === a ? b : a;
      w!.remove(removed);
      native().eventfdWrite(sentinel, 1n);
    }
  });
  w = watcher(rec.cb);
  try {
    w.add(a);
    w.add(b);
    w.add(sentinel);
    native().eventfdWrite(a, 1n);
    native().eventfdWrite(b, 1n);
    sleepSync(100); // both counts are read into one delivery
    t.is(native().eventfdRead(a), null);
    t.is(native().eventfdRead(b), null);
    await rec.waitFor((cs) => cs.some((c) => c.fd === sentinel));
    t.deepEqual(rec.of(removed), []);
    t.is(rec.calls.filter((c) => c.fd === a || c.fd === b).length, 1);
  } finally {
    w.close();
  }
});

test.serial('a callback that throws is contained: its fd is dropped and reported once', async (t) => {
  const a = efd();
  const sentinel = efd();
  const boom = new Error('device bug');
  const rec = recorder((c) => {
    if (c.fd === a && !c.error) throw boom;
  });
  const w = watcher(rec.cb);
  try {
    w.add(a);
    w.add(sentinel);
    native().eventfdWrite(a, 1n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === a && c.error));
    const [first, report] = rec.of(a);
    t.deepEqual(first, { fd: a, count: 1 });
    t.is(report.count, 0);
    t.regex(report.error!.message, /callback for fd \d+ threw: device bug/);
    t.is((report.error as Error & { cause?: unknown }).cause, boom);

    native().eventfdWrite(a, 1n);
    native().eventfdWrite(sentinel, 1n);
    await rec.waitFor((cs) => cs.some((c) => c.fd === sentinel));
    t.is(rec.of(a).length, 2, 'no more calls for the dropped fd');
    t.is(native().eventfdRead(a), 1n);
  } finally {
    w.close();
  }
});

test.serial('a short read (not an eventfd) drops the fd and reports EIO', async (t) => {
  const dir = tempDir('tern-efdw-');
  const fifo = path.join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  const r = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const wr = fs.openSync(fifo, fs.constants.O_WRONLY);
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    w.add(r);
    fs.writeSync(wr, 'abc');
    await rec.waitFor((cs) => cs.length > 0);
    t.is(rec.calls.length, 1);
    t.is(rec.calls[0].fd, r);
    t.is(rec.calls[0].count, 0);
    t.is((rec.calls[0].error as NodeJS.ErrnoException).code, 'EIO');
    t.regex(rec.calls[0].error!.message, /short read of 3 bytes/);
    t.notThrows(() => w.add(r), 'the fd is no longer watched');
  } finally {
    w.close();
    fs.closeSync(wr);
    fs.closeSync(r);
  }
});

test.serial('a drained fd does not wake the thread again', async (t) => {
  const rec = recorder();
  const w = watcher(rec.cb);
  try {
    const a = efd();
    w.add(a);
    native().eventfdWrite(a, 1n);
    await rec.waitFor((cs) => cs.length > 0);
    const before = process.cpuUsage();
    await new Promise((r) => setTimeout(r, 200));
    const used = process.cpuUsage(before);
    t.true(used.user + used.system < 100_000, `${used.user + used.system} us of CPU in 200 ms`);
    t.is(rec.calls.length, 1);
  } finally {
    w.close();
  }
});

test.serial('close() is idempotent; afterwards add() throws EBADF and remove() does nothing', (t) => {
  const w = watcher(() => {});
  const a = efd();
  w.add(a);
  w.close();
  t.notThrows(() => w.close());
  t.notThrows(() => w.remove(a));
  const err = t.throws(() => w.add(a));
  t.is((err as NodeJS.ErrnoException).code, 'EBADF');
});

test.serial('bad arguments throw', (t) => {
  const addon = native() as unknown as { watchEventfds(...args: unknown[]): NativeEventfdWatcher };
  t.throws(() => addon.watchEventfds(), { instanceOf: TypeError });
  t.throws(() => addon.watchEventfds(42), { instanceOf: TypeError });
  const w = watcher(() => {}) as unknown as NativeEventfdWatcher & {
    add(...args: unknown[]): void;
    remove(...args: unknown[]): void;
  };
  try {
    t.throws(() => w.add(), { instanceOf: TypeError });
    t.throws(() => w.add('3'), { instanceOf: TypeError });
    t.throws(() => w.add(1.5), { instanceOf: TypeError });
    t.throws(() => w.add(NaN), { instanceOf: TypeError });
    t.throws(() => w.remove({}), { instanceOf: TypeError });
    // Out of range, as for every fd argument of the addon.
    t.throws(() => w.add(-1), { instanceOf: RangeError });
    t.throws(() => w.add(2 ** 31), { instanceOf: RangeError });
    const Ctor = (w as unknown as { constructor: new (...args: unknown[]) => unknown }).constructor;
    t.throws(() => new Ctor(), { instanceOf: TypeError });

    const a = efd();
    w.add(a);
    t.is((t.throws(() => w.add(a)) as NodeJS.ErrnoException).code, 'EEXIST');
    const blocking = efd(EventFdFlags.CLOEXEC);
    t.is((t.throws(() => w.add(blocking)) as NodeJS.ErrnoException).code, 'EINVAL');
    const closed = native().eventfd();
    native().closeFd(closed);
    t.is((t.throws(() => w.add(closed)) as NodeJS.ErrnoException).code, 'EBADF');
  } finally {
    w.close();
  }
});

/** Run `body` in a fresh node with `addon` bound to the addon; resolves when it exits or is killed. */
function runChild(body: string, killAfterMs: number) {
  const kvm = require.resolve('../../src/native/kvm');
  const script = `const addon = require(${JSON.stringify(kvm)}).native();\n${body}`;
  return new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>(
    (resolve, reject) => {
      const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs);
      child.on('error', reject);
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        resolve({ code, signal, stdout, stderr });
      });
    },
  );
}

test.serial('the process exits once its watchers are closed or idle', async (t) => {
  const cases: Array<[string, string]> = [
    ['closed while watching', 'const w = addon.watchEventfds(() => {}); w.add(addon.eventfd()); w.close(); w.close();'],
    ['never watched anything', 'addon.watchEventfds(() => {});'],
    ['every fd removed', 'const w = addon.watchEventfds(() => {}); const fd = addon.eventfd(); w.add(fd); w.remove(fd);'],
    [
      'closed from its callback',
      'const fd = addon.eventfd(); const w = addon.watchEventfds((f, n) => { console.log("got", n); w.close(); });' +
        ' w.add(fd); addon.eventfdWrite(fd, 4n);',
    ],
  ];
  for (const [name, body] of cases) {
    const r = await runChild(body + ' console.log("end of script");', 10_000);
    t.is(r.signal, null, `${name}: killed; stderr: ${r.stderr}`);
    t.is(r.code, 0, `${name}: stderr: ${r.stderr}`);
    t.regex(r.stdout, /end of script/, name);
    if (name === 'closed from its callback') t.regex(r.stdout, /got 4/);
  }
});

test.serial('a watcher watching an fd keeps the process alive until closed', async (t) => {
  const r = await runChild('const w = addon.watchEventfds(() => {}); w.add(addon.eventfd()); globalThis.keep = w;', 1500);
  t.is(r.signal, 'SIGKILL', `exited on its own: code ${r.code}, stderr: ${r.stderr}`);
});
