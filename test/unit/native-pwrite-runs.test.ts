// pwriteRuns, the snapshot's writer of guest RAM: runs of a buffer land at their file
// positions with holes between them, a failed write rejects with its errno, and runs that do
// not lie inside the buffer are refused before anything is written.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import test from 'ava';

import { native } from '../../src/native/kvm';

const PAGE = 4096;

function tempFile(): { file: string; fd: number; done: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-pwrite-runs-'));
  const file = path.join(dir, 'f');
  const fd = fs.openSync(file, 'w+', 0o600);
  return { file, fd, done: () => (fs.closeSync(fd), fs.rmSync(dir, { recursive: true, force: true })) };
}

const pattern = (n: number) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + 3) & 255 || 1);

test('many tasks queued at once, as the snapshot writer queues its chunks, all land whole', async (t) => {
  const { fd, done } = tempFile();
  try {
    // Twelve 1 MiB chunks queued without waiting, more than the thread pool has threads: they
    // take turns, none is lost or torn, and each promise reports its own bytes.
    const chunk = 1 << 20;
    const views = Array.from({ length: 12 }, (_, i) => new Uint8Array(chunk).fill(i + 1));
    const counts = await Promise.all(views.map((v, i) => native().pwriteRuns(fd, v, Float64Array.from([0, chunk, i * chunk]))));
    t.deepEqual(counts, views.map(() => chunk));
    const file = fs.readFileSync(`/proc/self/fd/${fd}`);
    t.is(file.length, 12 * chunk);
    for (let i = 0; i < 12; i++) t.true(file.subarray(i * chunk, (i + 1) * chunk).every((b) => b === i + 1), `chunk ${i}`);
  } finally {
    done();
  }
});

test('runs are written at their positions, the rest of the file stays a hole', async (t) => {
  const { fd, done } = tempFile();
  try {
    const view = pattern(8 * PAGE);
    // pages 1-2 to file page 10, page 5 to file page 3, and a partial run at the view's end
    const n = await native().pwriteRuns(fd, view, Float64Array.from([PAGE, 2 * PAGE, 10 * PAGE, 5 * PAGE, PAGE, 3 * PAGE, 8 * PAGE - 100, 100, 20 * PAGE]));
    t.is(n, 3 * PAGE + 100);
    const file = fs.readFileSync(`/proc/self/fd/${fd}`);
    t.is(file.length, 20 * PAGE + 100);
    t.deepEqual(file.subarray(10 * PAGE, 12 * PAGE), Buffer.from(view.subarray(PAGE, 3 * PAGE)));
    t.deepEqual(file.subarray(3 * PAGE, 4 * PAGE), Buffer.from(view.subarray(5 * PAGE, 6 * PAGE)));
    t.deepEqual(file.subarray(20 * PAGE), Buffer.from(view.subarray(8 * PAGE - 100)));
    t.true(file.subarray(0, 3 * PAGE).every((b) => b === 0) && file.subarray(4 * PAGE, 10 * PAGE).every((b) => b === 0));
    t.true(fs.fstatSync(fd).blocks * 512 <= 6 * PAGE, 'only the runs took disk space');
    t.is(await native().pwriteRuns(fd, view, new Float64Array(0)), 0, 'no runs: nothing written');
  } finally {
    done();
  }
});

test('a write the device refuses rejects with its errno (a full disk: ENOSPC)', async (t) => {
  const fd = fs.openSync('/dev/full', 'w');
  try {
    await t.throwsAsync(() => native().pwriteRuns(fd, pattern(PAGE), Float64Array.from([0, PAGE, 0])), { code: 'ENOSPC', message: /pwrite failed/ });
  } finally {
    fs.closeSync(fd);
  }
  const { fd: closed, done } = tempFile();
  done();
  await t.throwsAsync(() => native().pwriteRuns(closed, pattern(PAGE), Float64Array.from([0, PAGE, 0])), { code: 'EBADF' });
});

test('runs outside the buffer, or that are not whole non-negative numbers, are refused and nothing is written', (t) => {
  const { fd, done } = tempFile();
  try {
    const view = pattern(2 * PAGE);
    const bad: [number[], RegExp][] = [
      [[PAGE, PAGE + 1, 0], /outside the view/],
      [[2 * PAGE + 1, 0, 0], /outside the view/],
      [[0, PAGE, 2 ** 53], /not a safe non-negative integer/],
      [[-1, PAGE, 0], /not a safe non-negative integer/],
      [[0, NaN, 0], /not a safe non-negative integer/],
      [[0, 1.5, 0], /not a safe non-negative integer/],
      [[0, PAGE, Infinity], /not a safe non-negative integer/],
    ];
    for (const [runs, message] of bad) {
      // (a good run first: the whole call is refused, not just the bad run)
      t.throws(() => native().pwriteRuns(fd, view, Float64Array.from([0, PAGE, 0, ...runs])), { instanceOf: RangeError, message }, JSON.stringify(runs));
    }
    t.throws(() => native().pwriteRuns(fd, view, Float64Array.from([0, PAGE])), { instanceOf: TypeError, message: /triples/ });
    t.throws(() => native().pwriteRuns(fd, view, [0, PAGE, 0] as unknown as Float64Array), { instanceOf: TypeError });
    t.throws(() => native().pwriteRuns(fd, new Uint16Array(8) as unknown as Uint8Array, Float64Array.from([0, 2, 0])), { instanceOf: TypeError });
    t.is(fs.fstatSync(fd).size, 0, 'nothing was written');
  } finally {
    done();
  }
});
