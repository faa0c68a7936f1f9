// The source's round policy against a guest that dirties memory faster than the link carries
// it: rounds do not shrink, so the sender takes vCPU time away (auto-converge) a step per round
// until what is left fits the downtime, instead of iterating until the timeout; and it pauses
// the guest only once the destination has applied every round. The guest here is a model whose
// dirty set shrinks with the throttle; the destination a peer on the real framing that takes
// every frame and completes the protocol.
import type net from 'node:net';
import test, { type ExecutionContext } from 'ava';
import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import { MigrationSender, type SourceMachine } from '../../src/migration/send-migration';
import { MigrationEvents, ROOT_SCHEMA_VERSION, createStore, type RootState } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import type { FrameChannel } from '../../src/migration/frame-channel';
import { frameJson } from '../../src/migration/frames';
import { MIGRATION_PROTOCOL_VERSION, checkHello } from '../../src/migration/handshake';
import { FrameType, fakeDestination } from '../support/migration-peer';
import { pausedState } from './snapshot-fixture';

const PAGE = 4096;
const RAM = 64 << 20;

/**
 * A guest dirtying `perRound` pages between two reads of the log, fewer as it is throttled,
 * and none once 80% of its time is taken (its dirtying loop starved).
 */
function dirtyingGuest(perRound: number | number[]): SourceMachine & { throttles: number[]; logging: () => boolean } {
  const buf = new ArrayBuffer(RAM);
  new Uint8Array(buf).fill(0x5a);
  const memory = new GuestMemory([new GuestRegion({ guestAddress: 0, size: RAM, chunks: [buf], chunkSize: RAM })]);
  let throttle = 0;
  let logging = false;
  const throttles: number[] = [];
  // (a list: the pages dirtied before each read of the log in turn, the first read included)
  const reads = typeof perRound === 'number' ? undefined : [...perRound];
  return {
    memory,
    throttles,
    logging: () => logging,
    dirtyLogging(on: boolean) {
      logging = on;
    },
    dirtyBitmaps() {
      // as KVM: no log to read unless the sender turned it on
      if (!logging) throw new Error('dirty logging is off');
      const bits = new Uint8Array(RAM / PAGE / 8);
      const n = reads ? (reads.shift() ?? 0) : throttle >= 80 ? 0 : Math.round((perRound as number) * (1 - throttle / 100));
      for (let p = 0; p < n; p++) bits[p >> 3] |= 1 << (p & 7);
      return [bits];
    },
    memoryFds: () => undefined,
    cpuFacts: () => ({ cpuid: [], msrIndices: [] }),
    pause: async () => ({ parked_ms: 0, saved_ms: 0, read_ms: 0, encode_ms: 0, dispatch_ms: 0 }),
    resume: () => undefined,
    releaseDiskLocks: () => undefined,
    takeDiskLocks: () => undefined,
    throttle(percent: number) {
      throttle = percent;
      throttles.push(percent);
    },
  };
}

/** A destination's part up to the memory rounds: accept, take config and state, say Prepared. */
async function acceptUpToRounds(ch: FrameChannel): Promise<void> {
  await ch.expect(FrameType.Hello);
  await ch.sendJson(FrameType.Accept, {});
  await ch.expect(FrameType.Config);
  await ch.expect(FrameType.State);
  await ch.sendJson(FrameType.Prepared, {});
}

/** A destination that takes every frame and completes the protocol. */
function completingDestination() {
  return fakeDestination(async (ch) => {
    await acceptUpToRounds(ch);
    for (let f = await ch.next(); f.type !== FrameType.Complete; f = await ch.next());
    await ch.sendJson(FrameType.Ready, {});
    await ch.expect(FrameType.Commit);
    await ch.sendJson(FrameType.Running, {});
  });
}

function runningStore() {
  const store = createStore();
  const s = pausedState();
  store.replaceState({ ...s, vm: { ...s.vm, status: 'Running' }, memory: { ...s.memory, regions: [{ guestAddress: 0, size: RAM }] } } as RootState);
  return store;
}

test('a guest dirtying faster than the link is throttled step by step until the rest fits the downtime', async (t) => {
  const { server, url } = await completingDestination();
  const guest = dirtyingGuest(4096); // 16 MiB a round
  const store = runningStore();
  const iterations: number[] = [];
  store.events$.subscribe((e) => e.type === MigrationEvents.MemoryIteration && iterations.push((e.payload as { id: number }).id));
  const sender = new MigrationSender(
    { store, log: silentLogger(), machine: () => guest, exclusive: (fn) => fn() },
    // 1 ms: 16 MiB never fits on any link; a tenth of it still would not, a hundredth might.
    { destination_url: url, downtime_ms: 1 },
  );
  try {
    await sender.start();
    t.true(await sender.done!);
    const p = sender.progress();
    t.is(p.phase, 'finished');
    // Each round in which the guest dirtied more than half of what went took 20 points more;
    // at 80 it stopped dirtying, and the next round was the last.
    t.deepEqual(guest.throttles.filter((x) => x > 0), [20, 40, 60, 80]);
    // (the machine's pause ends the throttle, keeping its vCPUs parked: ending it first would
    // let them run for nothing inside the downtime)
    t.deepEqual(guest.throttles, [20, 40, 60, 80], 'the source does not end the throttle before the pause');
    t.is(p.throttle_percent, 80);
    t.true(iterations.length <= 7, `converged in rounds ${iterations.join(',')}, not at the round cap`);
  } finally {
    server.close();
  }
});

test('a guest the link keeps up with is never throttled and goes in few rounds', async (t) => {
  const { server, url } = await completingDestination();
  const guest = dirtyingGuest(16); // 64 KiB a round
  const sender = new MigrationSender({ store: runningStore(), log: silentLogger(), machine: () => guest, exclusive: (fn) => fn() }, { destination_url: url });
  try {
    await sender.start();
    t.true(await sender.done!);
    t.deepEqual(guest.throttles.filter((x) => x > 0), []);
    t.true(sender.progress().iteration <= 2);
  } finally {
    server.close();
  }
});

test('a guest whose rounds shrink gets more rounds while they halve, so the pause sends a small last round', async (t) => {
  const { server, url } = await completingDestination();
  // The log read at the start (dropped: round 0 sends everything), then after rounds 0, 1 and 2,
  // then in the pause. 4096 pages fit the default downtime on any link here, so they alone
  // would once have been sent inside the pause.
  const guest = dirtyingGuest([5000, 4096, 1024, 100, 10]);
  const store = runningStore();
  const rounds: { id: number; pages: number }[] = [];
  store.events$.subscribe((e) => e.type === MigrationEvents.MemoryIteration && rounds.push(e.payload as { id: number; pages: number }));
  const sender = new MigrationSender({ store, log: silentLogger(), machine: () => guest, exclusive: (fn) => fn() }, { destination_url: url });
  try {
    await sender.start();
    t.true(await sender.done!);
    t.deepEqual(
      rounds.map((r) => r.pages),
      [RAM / PAGE, 4096, 1024, 100],
      'rounds 1 and 2 went while the guest ran; the pause sent the 100 pages left (the 10 of its own read among them)',
    );
    t.deepEqual(guest.throttles.filter((x) => x > 0), []);
  } finally {
    server.close();
  }
});

test('a migration that fails during its rounds turns the dirty log off again', async (t) => {
  // (a destination that goes away after the first round: the sender fails and the guest runs on)
  const { server, url } = await fakeDestination(async (ch) => {
    await acceptUpToRounds(ch);
    for (let f = await ch.next(); f.type !== FrameType.Round; f = await ch.next());
    ch.abort('the destination gives up');
  });
  const guest = dirtyingGuest(4096);
  const sender = new MigrationSender({ store: runningStore(), log: silentLogger(), machine: () => guest, exclusive: (fn) => fn() }, { destination_url: url, downtime_ms: 1 });
  try {
    await sender.start();
    t.false(await sender.done!);
    t.is(sender.progress().phase, 'failed');
    // While KVM logs a slot it maps it in 4 KiB pages only: a guest that stays here runs without.
    t.false(guest.logging());
  } finally {
    server.close();
  }
});

test('the source pauses its guest only once the destination has applied every round it sent', async (t) => {
  const order: string[] = [];
  let asked: unknown;
  const { server, url } = await fakeDestination(async (ch) => {
    asked = (frameJson(await ch.expect(FrameType.Hello)) as { roundsApplied?: unknown }).roundsApplied;
    await ch.sendJson(FrameType.Accept, { rounds_applied: true });
    await ch.expect(FrameType.Config);
    await ch.expect(FrameType.State);
    await ch.sendJson(FrameType.Prepared, {});
    let rounds = 0;
    for (let f = await ch.next(); f.type !== FrameType.Complete; f = await ch.next()) {
      if (f.type === FrameType.Final) order.push('final');
      if (f.type !== FrameType.Round) continue;
      // Each round applied a while after it came (a destination still writing its pages): a
      // source that did not wait for it would pause its guest meanwhile.
      const round = rounds++;
      setTimeout(() => {
        order.push(`applied ${round}`);
        void ch.sendJson(FrameType.RoundApplied, { round }).catch(() => undefined);
      }, 150);
    }
    await ch.sendJson(FrameType.Ready, {});
    await ch.expect(FrameType.Commit);
    await ch.sendJson(FrameType.Running, {});
  });
  const guest = dirtyingGuest([5000, 4096, 1024, 100, 10]);
  const pause = guest.pause;
  guest.pause = () => {
    order.push('pause');
    return pause();
  };
  const sender = new MigrationSender({ store: runningStore(), log: silentLogger(), machine: () => guest, exclusive: (fn) => fn() }, { destination_url: url });
  try {
    await sender.start();
    t.true(await sender.done!);
    t.is(asked, true, 'the source asks for RoundApplied frames in its Hello');
    const applied = order.filter((o) => o.startsWith('applied'));
    t.true(applied.length >= 2, `rounds: ${order.join(', ')}`);
    t.deepEqual(order.slice(applied.length), ['pause', 'final'], `every round applied before the pause: ${order.join(', ')}`);
  } finally {
    server.close();
  }
});

/** Migrate a guest to the destination at `url`: the migration fails with `error`, and the guest was never paused. */
async function failsBeforeThePause(t: ExecutionContext, server: net.Server, url: string, error: RegExp): Promise<void> {
  const guest = dirtyingGuest(16);
  let resumed = 0;
  guest.resume = () => void resumed++;
  const sender = new MigrationSender({ store: runningStore(), log: silentLogger(), machine: () => guest, exclusive: (fn) => fn() }, { destination_url: url });
  try {
    await sender.start();
    t.false(await sender.done!);
    t.regex(sender.progress().error ?? '', error);
    t.is(resumed, 0, 'the guest was never paused');
  } finally {
    server.close();
  }
}

test('a destination that sends RoundApplied unasked fails the migration, and the guest, never paused, runs on', async (t) => {
  const { server, url } = await fakeDestination(async (ch) => {
    await ch.expect(FrameType.Hello);
    // (it never said it applies rounds: a RoundApplied is then no frame the source expects)
    await ch.sendJson(FrameType.Accept, {});
    await ch.expect(FrameType.Config);
    await ch.expect(FrameType.State);
    await ch.sendJson(FrameType.RoundApplied, { round: 0 });
    await ch.sendJson(FrameType.Prepared, {});
    for (;;) await ch.next();
  });
  await failsBeforeThePause(t, server, url, /expected a Prepared or RoundApplied frame, got RoundApplied/);
});

test('Hello: roundsApplied is a boolean when present', (t) => {
  const hello = { protocol: MIGRATION_PROTOCOL_VERSION, schemaVersion: ROOT_SCHEMA_VERSION, tern: 'x', local: false, regions: [{ guestAddress: 0, size: 1 << 20 }], cpuid: [], msrIndices: [] };
  t.is(checkHello({ ...hello, roundsApplied: true }, { fds: 0 }).roundsApplied, true);
  t.is(checkHello(hello, { fds: 0 }).roundsApplied, undefined);
  for (const roundsApplied of ['yes', 1, null]) t.throws(() => checkHello({ ...hello, roundsApplied }, { fds: 0 }), { message: /roundsApplied must be a boolean/ });
});

test('a RoundApplied for another round than the next fails the migration, and the guest, never paused, runs on', async (t) => {
  const { server, url } = await fakeDestination(async (ch) => {
    await ch.expect(FrameType.Hello);
    await ch.sendJson(FrameType.Accept, { rounds_applied: true });
    await ch.expect(FrameType.Config);
    await ch.expect(FrameType.State);
    await ch.sendJson(FrameType.Prepared, {});
    for (;;) if ((await ch.next()).type === FrameType.Round) await ch.sendJson(FrameType.RoundApplied, { round: 7 });
  });
  await failsBeforeThePause(t, server, url, /RoundApplied for round 7 where round 0 was next/);
});
