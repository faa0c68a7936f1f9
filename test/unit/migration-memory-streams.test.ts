// Guest memory over several connections (memory-streams.ts): no stream writes a round's pages
// before every stream has ended the round before, frames spread over connections with room,
// and only the connections the destination asked for can join.
import test from 'ava';
import type { FrameChannel } from '../../src/migration/frame-channel';
import { FrameType, MigrationProtocolError } from '../../src/migration/frames';
import { checkHello, MIGRATION_PROTOCOL_VERSION } from '../../src/migration/handshake';
import { MAX_FRAMES_IN_FLIGHT, MemoryFanOut, RoundBarrier, checkJoin, checkRoundEnd, newJoinToken } from '../../src/migration/memory-streams';
import { ROOT_SCHEMA_VERSION } from '../../src/state';

const tick = () => new Promise((r) => setImmediate(r));

test('round barrier: a stream waits at the end of a round until every stream has ended it', async (t) => {
  const b = new RoundBarrier(3);
  const passed: string[] = [];
  const wait = (stream: number, round: number) => b.arrive(stream, round).then(() => passed.push(`${stream}:${round}`));
  const w0 = wait(0, 0);
  const w1 = wait(1, 0);
  await tick();
  t.deepEqual(passed, [], 'two of three streams at the end of round 0: nobody goes on');
  const w2 = wait(2, 0);
  await Promise.all([w0, w1, w2]);
  t.deepEqual(passed.sort(), ['0:0', '1:0', '2:0']);
  // the next round is counted afresh
  const r1 = [wait(2, 1), wait(0, 1)];
  await tick();
  t.is(passed.length, 3);
  await Promise.all([...r1, wait(1, 1)]);
  t.is(passed.length, 6);
});

test('round barrier: a round past a stream\'s last one, and fail(), end every wait with an error', async (t) => {
  const b = new RoundBarrier(2);
  await Promise.all([b.arrive(0, 0, true), b.arrive(1, 0)]);
  await t.throwsAsync(b.arrive(1, 1), { instanceOf: MigrationProtocolError, message: /round 1 goes on after connection 0 ended at round 0/ });
  const c = new RoundBarrier(2);
  const waiting = c.arrive(0, 0);
  c.fail(new Error('connection 1 dropped'));
  await t.throwsAsync(waiting, { message: 'connection 1 dropped' });
  await t.throwsAsync(c.arrive(1, 0), { message: 'connection 1 dropped' });
});

test('join: only the token of this migration and a connection still awaited get in', (t) => {
  const token = newJoinToken();
  t.regex(token, /^[0-9a-f]{32}$/);
  t.not(newJoinToken(), token);
  const open = new Set([1, 2]);
  t.is(checkJoin({ token, index: 2 }, token, open), 2);
  t.throws(() => checkJoin({ token: newJoinToken(), index: 1 }, token, open), { message: /not this migration's token/ });
  t.throws(() => checkJoin({ token: token.slice(1), index: 1 }, token, open), { message: /not this migration's token/ });
  t.throws(() => checkJoin({ token, index: 3 }, token, open), { message: /connection 3 is not one this migration waits for/ });
  t.throws(() => checkJoin({ token, index: 0 }, token, open), { message: /connection 0/ });
  for (const bad of [null, [], 'x', { token }, { index: 1 }, { token: 7, index: 1 }]) t.throws(() => checkJoin(bad, token, open), { instanceOf: MigrationProtocolError });
});

test('round end: its number must be the stream\'s next', (t) => {
  t.deepEqual(checkRoundEnd({ round: 3, last: false }, 3), { round: 3, last: false });
  t.throws(() => checkRoundEnd({ round: 4, last: false }, 3), { message: /round 4 where round 3 ends/ });
  t.throws(() => checkRoundEnd({ round: 3 }, 3), { message: /malformed/ });
});

test('Hello: connections 1..128, and one for a local migration', (t) => {
  const hello = { protocol: MIGRATION_PROTOCOL_VERSION, schemaVersion: ROOT_SCHEMA_VERSION, tern: 'x', local: false, regions: [{ guestAddress: 0, size: 1 << 20 }], cpuid: [], msrIndices: [] };
  t.is(checkHello({ ...hello, connections: 4 }, { fds: 0 }).connections, 4);
  t.is(checkHello(hello, { fds: 0 }).connections, undefined);
  for (const connections of [0, 129, 1.5, '2']) t.throws(() => checkHello({ ...hello, connections }, { fds: 0 }), { message: /connections must be 1\.\.128/ });
  t.throws(() => checkHello({ ...hello, local: true, connections: 2 }, { fds: 1 }), { message: /a local migration takes one connection/ });
});

/** A channel whose sends finish when the test says. */
function fakeChannel(name: string, log: string[]) {
  const pending: (() => void)[] = [];
  const ch = {
    sendFlushed(type: FrameType, payload: Buffer) {
      log.push(`${name}:${FrameType[type]}:${payload.toString()}`);
      return new Promise<void>((resolve) => pending.push(resolve));
    },
  };
  return { ch: ch as unknown as FrameChannel, finishOne: () => pending.shift()?.(), pending };
}

test('fan-out: frames go to connections with room, round robin; each buffer comes back once sent; drain waits for all', async (t) => {
  const log: string[] = [];
  const a = fakeChannel('a', log);
  const b = fakeChannel('b', log);
  const fan = new MemoryFanOut([a.ch, b.ch]);
  const released: string[] = [];
  const release = (p: Buffer) => released.push(p.toString());
  await fan.send(Buffer.from('1'), release);
  await fan.send(Buffer.from('2'), release);
  t.deepEqual(log, ['a:Memory:1', 'b:Memory:2']);
  // both busy: the third frame waits for room
  let third = false;
  const sending = fan.send(Buffer.from('3'), release).then(() => (third = true));
  await tick();
  t.false(third);
  b.finishOne();
  await sending;
  t.deepEqual(log, ['a:Memory:1', 'b:Memory:2', 'b:Memory:3'], 'the frame went to the connection that had room');
  t.deepEqual(released, ['2']);
  let drained = false;
  const draining = fan.drain().then(() => (drained = true));
  await tick();
  t.false(drained);
  a.finishOne();
  b.finishOne();
  await draining;
  t.deepEqual(released.sort(), ['1', '2', '3']);
});

test('fan-out: a failed send fails the next send or drain, and never more than the in-flight limit is out', async (t) => {
  const log: string[] = [];
  const chans = Array.from({ length: 12 }, (_, i) => fakeChannel(`c${i}`, log));
  const fan = new MemoryFanOut(chans.map((c) => c.ch));
  for (let i = 0; i < MAX_FRAMES_IN_FLIGHT; i++) await fan.send(Buffer.from(String(i)), () => undefined);
  let more = false;
  const next = fan.send(Buffer.from('x'), () => undefined).then(() => (more = true));
  await tick();
  t.false(more, `at most ${MAX_FRAMES_IN_FLIGHT} frames on their way`);
  t.is(log.length, MAX_FRAMES_IN_FLIGHT);
  for (const c of chans) c.finishOne();
  await next;

  const broken = { sendFlushed: () => Promise.reject(new Error('connection reset')) } as unknown as FrameChannel;
  const fan2 = new MemoryFanOut([broken]);
  await fan2.send(Buffer.from('1'), () => undefined);
  await t.throwsAsync(fan2.drain(), { message: 'connection reset' });
});
