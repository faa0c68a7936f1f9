import test from 'ava';
import pino from 'pino';

import { LogRateLimiter, guestLog } from '../../src/util/guest-log';

test('a key logs its burst, then one line per refill that counts what was suppressed', (t) => {
  let now = 0;
  const lines: { msg: string; suppressed?: number; state?: number }[] = [];
  const log = guestLog(pino({ level: 'warn' }, { write: (s: string) => void lines.push(JSON.parse(s)) }), {
    burst: 3,
    perSecond: 1,
    now: () => now,
  });
  for (let i = 0; i < 100; i++) log.warn('sleep', { state: 1 }, 'sleep request');
  t.is(lines.length, 3);
  now += 1000;
  log.warn('sleep', { state: 1 }, 'sleep request');
  t.is(lines.length, 4);
  t.is(lines[3].suppressed, 97);
  t.is(lines[3].msg, 'sleep request (97 more suppressed)');
  t.is(lines[3].state, 1);
  // Another key has its own bucket; lines below the level cost nothing.
  log.warn('reset', {}, 'reset');
  for (let i = 0; i < 100; i++) log.info('sleep', {}, 'not logged at warn');
  now += 1000;
  log.warn('sleep', {}, 'sleep request');
  t.is(lines.length, 6);
  t.is(lines[5].suppressed, undefined);
});

test('the limiter refills at its rate and never beyond its burst', (t) => {
  let now = 0;
  const l = new LogRateLimiter({ burst: 2, perSecond: 10, now: () => now });
  t.is(l.take('k'), 0);
  t.is(l.take('k'), 0);
  t.is(l.take('k'), null);
  now += 100;
  t.is(l.take('k'), 1);
  now += 60_000;
  t.is(l.take('k'), 0);
  t.is(l.take('k'), 0);
  t.is(l.take('k'), null);
});
