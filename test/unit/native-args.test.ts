// Numbers from JavaScript are checked at the native boundary: an argument that is not an
// integer, or does not fit the field it fills, throws an error naming it instead of being cast
// (undefined behaviour for a double beyond 2^64) or truncated (2^32+1 becoming 1).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import test from 'ava';

import { native } from '../../src/native/kvm';

const TWO_32_PLUS_1 = 2 ** 32 + 1;

/** Values no integer argument accepts, with the error each must give. */
const NOT_INTEGERS: [unknown, typeof TypeError | typeof RangeError, RegExp][] = [
  [NaN, TypeError, /must be an integer, got NaN/],
  [1.5, TypeError, /must be an integer, got a fraction/],
  ['7', TypeError, /must be an integer \(number or bigint\), got a string/],
  [{}, TypeError, /got an object/],
  [null, TypeError, /got null/],
  [-1, RangeError, /got a negative number/],
  [-1n, RangeError, /got a negative bigint/],
  [Infinity, RangeError, /above 2\^53-1/],
  [1e300, RangeError, /above 2\^53-1/],
  [2n ** 64n, RangeError, /got a bigint above 2\^64-1/],
];

function withFile<T>(fn: (fd: number) => T): T {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-args-'));
  const fd = fs.openSync(path.join(dir, 'f'), 'w+');
  try {
    fs.writeSync(fd, Buffer.alloc(4096, 1));
    return fn(fd);
  } finally {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('seekData/seekHole refuse offsets that are not integers in 0..2^63-1, naming the offset', (t) => {
  const n = native();
  withFile((fd) => {
    for (const [bad, type, message] of NOT_INTEGERS) {
      for (const seek of [n.seekData, n.seekHole]) {
        const err = t.throws(() => seek(fd, bad as number), { instanceOf: type, message }, `offset ${String(bad)}`);
        t.regex(err?.message ?? '', /^lseek\(SEEK_(DATA|HOLE)\): offset must/);
      }
    }
    // 1e300 used to be cast to an integer (undefined behaviour) and seek to offset 0.
    t.throws(() => n.seekData(fd, 1e300), { instanceOf: RangeError, message: /offset must be in 0\.\.9223372036854775807/ });
    t.throws(() => n.seekData(fd, 2 ** 63 as number), { instanceOf: RangeError });
    t.is(n.seekData(fd, 0), 0);
    t.is(n.seekHole(fd, 0), 4096);
  });
});

test('fallocate takes only its two modes and offsets that fit off_t; alignedBuffer is capped at 64 MiB', (t) => {
  const n = native();
  withFile((fd) => {
    t.throws(() => n.fallocate(fd, 'collapse' as 'punch-hole', 0, 512), { instanceOf: TypeError, message: /mode must be/ });
    for (const [bad, type, message] of NOT_INTEGERS) {
      t.throws(() => n.fallocate(fd, 'punch-hole', bad as number, 512), { instanceOf: type, message }, `offset ${String(bad)}`);
    }
    t.throws(() => n.fallocate(fd, 'zero-range', (2n ** 62n) as unknown as number, (2n ** 62n) as unknown as number), { instanceOf: RangeError, message: /length must be in/ });
    t.true(n.fallocate(fd, 'punch-hole', 0, 4096));
    const b = Buffer.alloc(4096, 1);
    fs.readSync(fd, b, 0, 4096, 0);
    t.true(b.equals(Buffer.alloc(4096)), 'the punched range reads as zeroes');
    t.is(fs.fstatSync(fd).size, 4096, 'and the file keeps its size');
  });
  t.throws(() => n.alignedBuffer(2 ** 26 + 1), { instanceOf: RangeError, message: /alignedBuffer: size must be in/ });
  const a = new Uint8Array(n.alignedBuffer(8192));
  t.is(a.length, 8192);
  t.true(a.every((x) => x === 0));
});

test('a file descriptor argument must be an integer in 0..2^31-1: 2^32+1 is not fd 1', (t) => {
  const n = native();
  for (const [bad, type, message] of NOT_INTEGERS) {
    t.throws(() => n.eventfdRead(bad as number), { instanceOf: type, message }, `fd ${String(bad)}`);
  }
  // Int32 truncation made this fd 1 (stdout) and closed it.
  t.throws(() => n.closeFd(TWO_32_PLUS_1), { instanceOf: RangeError, message: /^fd must be in 0\.\.2147483647, got 4294967297$/ });
  t.throws(() => n.flock(2 ** 31), { instanceOf: RangeError, message: /^fd must be in/ });
  t.notThrows(() => fs.fstatSync(1), 'stdout is still open');
});

test('openKvm takes a path string or nothing: another type is an error, not /dev/kvm', (t) => {
  // Before, a number was ignored and /dev/kvm opened (or, without KVM, ENOENT for it).
  t.throws(() => native().openKvm(7 as unknown as string), { instanceOf: TypeError, message: 'openKvm: path must be a string' });
});

test('eventfd and eventfdWrite check their counter values', (t) => {
  const n = native();
  t.throws(() => n.eventfd(TWO_32_PLUS_1), { instanceOf: RangeError, message: /^eventfd: initial must be in 0\.\.4294967295/ });
  t.throws(() => n.eventfd(0, -1), { instanceOf: RangeError, message: /^eventfd: flags must be in/ });
  const fd = n.eventfd();
  try {
    for (const [bad, type, message] of NOT_INTEGERS) {
      t.throws(() => n.eventfdWrite(fd, bad as bigint), { instanceOf: type, message }, `value ${String(bad)}`);
    }
    // 2^64-1 is the one value the kernel's counter cannot take.
    t.throws(() => n.eventfdWrite(fd, 2n ** 64n - 1n), { instanceOf: RangeError, message: /^eventfdWrite: value must be in/ });
    t.is(n.eventfdRead(fd), null, 'nothing was written');
    n.eventfdWrite(fd, 2n ** 53n + 1n);
    t.is(n.eventfdRead(fd), 2n ** 53n + 1n, 'a bigint counter value arrives exactly');
  } finally {
    n.closeFd(fd);
  }
});
