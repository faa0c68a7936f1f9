// Live migration when things go wrong, each fault once: a corrupt or truncated frame, a protocol
// or schema version the destination cannot take, a dropped connection, a timeout with each
// strategy, a cancel, a second migration while one runs. The VM never runs on both sides: the
// source keeps (or resumes) its guest, reports migration-failed with the reason and can migrate
// again; the destination discards what it received, reports migration-receive-failed and can
// receive again. Peers that misbehave on purpose speak the real framing (test/support).
import test, { type ExecutionContext } from 'ava';
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { GuestMemory } from '../../src/memory/guest-memory';
import { MigrationEvents, type MigrationFailedPayload, type StoreEvent } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { pausedState } from '../unit/snapshot-fixture';
import { FrameType, connectAsSource, cuttingLink, encodeFrame, fakeDestination, helloFor, slowLink } from '../support/migration-peer';
import { frameJson } from '../../src/migration/frames';
import { sleep, waitUntil } from './harness';
import { TINY_KERNEL_MAGIC, TinyKernelStatus, buildTinyKernel, tinyVmConfig } from './tiny-kernel';

// Generous: in the nested lab a tiny guest and both VMMs run on an emulated CPU.
const until = (what: string, cond: () => boolean, ms = 30_000): Promise<void> => waitUntil(what, cond, ms);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-migration-faults-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

let nextPort = 20000 + ((process.pid * 7) % 20000);
const tcpUrl = (): string => `tcp:127.0.0.1:${nextPort++}`;

const guestCount = (vmm: Vmm): number => vmm.guestMemory()?.readU32(TinyKernelStatus.COUNT) ?? -1;

class Side {
  readonly events: StoreEvent[] = [];
  constructor(readonly vmm: Vmm) {
    vmm.store.events$.subscribe((e) => this.events.push(e));
  }
  migrationEvents(): string[] {
    return this.events.filter((e) => e.type.startsWith('[Migration]')).map((e) => e.type);
  }
  lastFailure(type: string): string | undefined {
    const e = [...this.events].reverse().find((x) => x.type === type);
    return (e?.payload as MigrationFailedPayload | undefined)?.reason;
  }
}

async function counting(name: string): Promise<Side> {
  const cfg = await tinyVmConfig(`faults ${name}`, path.join(tmp, `${name}.serial`));
  const vmm = new Vmm({ log: silentLogger() });
  const side = new Side(vmm);
  await vmm.create(cfg);
  await vmm.boot();
  await until('the guest has initialised', () => vmm.guestMemory()!.readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC);
  return side;
}

/** The source kept its guest: Running and counting, with a migration-failed saying `why`. */
async function sourceKeptItsGuest(t: ExecutionContext, src: Side, why: RegExp): Promise<void> {
  await until('the source reports the failure', () => src.migrationEvents().includes(MigrationEvents.Failed), 30_000);
  t.regex(src.lastFailure(MigrationEvents.Failed) ?? '', why);
  t.is(src.vmm.state.vm.status, 'Running');
  const c = guestCount(src.vmm);
  try {
    await until('the guest counts on at the source', () => guestCount(src.vmm) >= c + 2);
  } catch (e) {
    // (a guest that stopped counting: whether its vCPUs run, and how long since each last exited)
    throw new Error(`${(e as Error).message}; count ${c} then ${guestCount(src.vmm)}; health ${JSON.stringify(src.vmm.health()).slice(0, 3000)}`);
  }
  t.is(src.vmm.migrationProgress()?.phase, 'failed');
}

/** The VM migrates for real now: the source can migrate again. */
async function migratesAfterwards(t: ExecutionContext, src: Side): Promise<void> {
  const dst = new Side(new Vmm({ log: silentLogger() }));
  try {
    const url = tcpUrl();
    const received = dst.vmm.receiveMigration({ receiver_url: url });
    await until('the destination listens', () => dst.migrationEvents().includes(MigrationEvents.ReceiveReady));
    await src.vmm.sendMigration({ destination_url: url });
    await received;
    t.is(dst.vmm.state.vm.status, 'Running');
    const c = guestCount(dst.vmm);
    await until('the guest counts on at the destination', () => guestCount(dst.vmm) >= c + 2);
  } finally {
    await dst.vmm.shutdownVmm();
  }
}

/** A receiving Tern, listening. */
async function receiving(): Promise<{ dst: Side; url: string; result: Promise<unknown> }> {
  const dst = new Side(new Vmm({ log: silentLogger() }));
  const url = tcpUrl();
  const result = dst.vmm.receiveMigration({ receiver_url: url }).then(
    () => 'received',
    (e: Error) => e,
  );
  await until('the destination listens', () => dst.migrationEvents().includes(MigrationEvents.ReceiveReady));
  return { dst, url, result };
}

/** The destination threw it all away and can receive a real VM now. */
async function destinationRecovered(t: ExecutionContext, dst: Side, result: Promise<unknown>, why: RegExp): Promise<void> {
  const r = await result;
  t.true(r instanceof Error, 'receive-migration failed');
  t.regex((r as Error).message, why);
  t.regex(dst.lastFailure(MigrationEvents.ReceiveFailed) ?? '', why);
  t.is(dst.vmm.state.vm.status, 'NotCreated');
  t.is(dst.vmm.guestMemory(), undefined);
  const src = await counting(`after-${dst.events.length}`);
  try {
    const url = tcpUrl();
    const again = dst.vmm.receiveMigration({ receiver_url: url });
    await until('the destination listens again', () => dst.migrationEvents().filter((e) => e === MigrationEvents.ReceiveReady).length === 2);
    await src.vmm.sendMigration({ destination_url: url });
    await again;
    t.is(dst.vmm.state.vm.status, 'Running');
  } finally {
    await src.vmm.shutdownVmm();
    await dst.vmm.shutdownVmm();
  }
}

const regions = [{ guestAddress: 0, size: 64 << 20 }];

test.serial('destination: a frame whose checksum does not verify is refused', async (t) => {
  const { dst, url, result } = await receiving();
  const { channel, socket } = await connectAsSource(url);
  await channel.sendJson(FrameType.Hello, helloFor(regions));
  await channel.expect(FrameType.Accept);
  const frame = encodeFrame(FrameType.Config, Buffer.from(JSON.stringify({ payload: { kernel: '/k' } })));
  frame[frame.length - 3] ^= 0x40; // one bit of the payload
  socket.write(frame);
  await destinationRecovered(t, dst, result, /checksum mismatch/);
});

test.serial('destination: a stream that ends inside a frame is refused', async (t) => {
  const { dst, url, result } = await receiving();
  const { channel, socket } = await connectAsSource(url);
  await channel.sendJson(FrameType.Hello, helloFor(regions));
  await channel.expect(FrameType.Accept);
  const frame = encodeFrame(FrameType.Config, Buffer.from(JSON.stringify({ payload: { kernel: '/k' } })));
  socket.end(frame.subarray(0, frame.length - 5));
  await destinationRecovered(t, dst, result, /closed/);
});

test.serial('destination: a protocol version it does not speak is refused at the handshake', async (t) => {
  const { dst, url, result } = await receiving();
  const { channel } = await connectAsSource(url);
  await channel.sendJson(FrameType.Hello, helloFor(regions, { protocol: 99 }));
  await t.throwsAsync(channel.expect(FrameType.Accept), { message: /gave up: protocol version 99 is not supported/ });
  await destinationRecovered(t, dst, result, /protocol version 99 is not supported/);
});

test.serial('destination: a state schema newer than its own is refused at the handshake', async (t) => {
  const { dst, url, result } = await receiving();
  const { channel } = await connectAsSource(url);
  await channel.sendJson(FrameType.Hello, helloFor(regions, { schemaVersion: 99 }));
  await t.throwsAsync(channel.expect(FrameType.Accept), { message: /state schema 99 cannot be received/ });
  await destinationRecovered(t, dst, result, /state schema 99/);
});

test.serial('destination: pages outside the announced RAM are refused', async (t) => {
  const { dst, url, result } = await receiving();
  const { channel } = await connectAsSource(url);
  const state = pausedState(); // a valid state with 2 MiB of RAM
  await channel.sendJson(FrameType.Hello, helloFor(state.memory.regions));
  await channel.expect(FrameType.Accept);
  await channel.sendJson(FrameType.Config, state.vm.config);
  await channel.sendJson(FrameType.State, state);
  const rec = Buffer.alloc(16 + 4096, 0x55);
  rec.writeBigUInt64LE(BigInt(state.memory.regions[0].size), 0); // the page just past the end
  rec.writeUInt32LE(1, 8);
  rec.writeUInt32LE(0, 12);
  await channel.send(FrameType.Memory, rec);
  await destinationRecovered(t, dst, result, /outside guest RAM/);
});

test.serial('destination: a state that fails its schema is refused when it arrives', async (t) => {
  const { dst, url, result } = await receiving();
  const { channel } = await connectAsSource(url);
  const state = structuredClone(pausedState()) as any;
  await channel.sendJson(FrameType.Hello, helloFor(state.memory.regions));
  await channel.expect(FrameType.Accept);
  await channel.sendJson(FrameType.Config, state.vm.config);
  state.vm.bootCount = 'many';
  await channel.sendJson(FrameType.State, state);
  await destinationRecovered(t, dst, result, /State frame: .*bootCount/);
});

test.serial('source: a destination that refuses the handshake leaves the VM untouched', async (t) => {
  const src = await counting('refused');
  try {
    const { server, url } = await fakeDestination(async (ch) => {
      await ch.expect(FrameType.Hello);
      ch.abort('this destination speaks another protocol');
    });
    await t.throwsAsync(src.vmm.sendMigration({ destination_url: url }), { message: /refused the migration: .*another protocol/ });
    server.close();
    t.is(src.vmm.state.vm.status, 'Running');
    t.deepEqual(src.migrationEvents(), [], 'nothing started, nothing to report');
    await migratesAfterwards(t, src);
  } finally {
    await src.vmm.shutdownVmm();
  }
});

test.serial('source: the connection dropped in the middle: the guest runs on here and can migrate again', async (t) => {
  const src = await counting('dropped');
  try {
    const { server, url } = await fakeDestination(async (ch, socket) => {
      await ch.expect(FrameType.Hello);
      await ch.sendJson(FrameType.Accept, {});
      await ch.expect(FrameType.Config);
      await ch.expect(FrameType.State);
      await ch.expect(FrameType.Memory);
      socket.destroy();
    });
    await src.vmm.sendMigration({ destination_url: url });
    await sourceKeptItsGuest(t, src, /destination|connection/);
    server.close();
    await migratesAfterwards(t, src);
  } finally {
    await src.vmm.shutdownVmm();
  }
});

test.serial('one of three connections cut in the middle: the source keeps its guest, the destination discards it all, and both can migrate again', async (t) => {
  const src = await counting('cut-connection');
  const { dst, url, result } = await receiving();
  // (the low 8 MiB are the tiny kernel's: random pages above make several 16 MiB frames to spread)
  (src.vmm.guestMemory() as GuestMemory).write(16 << 20, crypto.randomBytes(48 << 20));
  const link = await cuttingLink(url, 1, 4 << 20);
  try {
    await src.vmm.sendMigration({ destination_url: link.url, connections: 3 });
    await link.cutDone;
    await sourceKeptItsGuest(t, src, /destination|connection/);
    link.server.close();
    await destinationRecovered(t, dst, result, /memory connection 1|connection/);
    await migratesAfterwards(t, src);
  } finally {
    link.server.close();
    await src.vmm.shutdownVmm();
  }
});

test.serial('destination: it grants eight of twenty connections; ones that do not join with the Accept\'s token are closed, and the migration waits on for its own', async (t) => {
  const { dst, url, result } = await receiving();
  const { channel, socket } = await connectAsSource(url);
  await channel.sendJson(FrameType.Hello, helloFor(regions, { connections: 20 }));
  const accept = frameJson(await channel.expect(FrameType.Accept)) as { connections?: number; join?: string };
  t.is(accept.connections, 8, 'what a source can make the destination hold is capped');
  t.regex(accept.join ?? '', /^[0-9a-f]{32}$/);
  for (const join of [{ token: '0'.repeat(32), index: 1 }, { token: accept.join, index: 8 }, { token: accept.join, index: 0 }]) {
    const stray = await connectAsSource(url);
    await stray.channel.sendJson(FrameType.Join, join);
    await t.throwsAsync(stray.channel.expect(FrameType.RoundEnd), { message: /gave up: Join: |closed/ }, JSON.stringify(join));
  }
  t.is(dst.vmm.migrationProgress()?.phase, 'receiving', 'the strays did not end the migration');
  // the real one joins; then the source goes away: the destination discards it all
  const extra = await connectAsSource(url);
  await extra.channel.sendJson(FrameType.Join, { token: accept.join, index: 1 });
  await sleep(200);
  t.is(dst.vmm.migrationProgress()?.phase, 'receiving');
  socket.destroy();
  await destinationRecovered(t, dst, result, /source|connection/);
});

test.serial('auto-converge: a throttle that ends inside a period\'s parked part (a migration failing mid-round) leaves no vCPU parked', async (t) => {
  const src = await counting('throttle-end');
  // (the throttle is the source's; a migration that fails ends it as this does)
  const machine = (src.vmm as unknown as { machine: { throttle(percent: number): void } }).machine;
  try {
    for (let round = 0; round < 5; round++) {
      // Parked 99 ms of every 100: 250 ms in, the vCPUs are parked, their resume 50 ms away.
      machine.throttle(99);
      await sleep(250);
      machine.throttle(0);
      const c = guestCount(src.vmm);
      try {
        await until(`round ${round}: the guest counts on`, () => guestCount(src.vmm) >= c + 2, 10_000);
      } catch (e) {
        throw new Error(`${(e as Error).message}; health ${JSON.stringify(src.vmm.health()).slice(0, 2000)}`);
      }
    }
    t.true(src.vmm.health().vcpus!.every((v) => v.thread === 'running'), 'every vCPU thread runs');
  } finally {
    await src.vmm.shutdownVmm();
  }
});

test.serial('source: a destination that never confirms Ready is given up after the timeout (Cancel)', async (t) => {
  const src = await counting('timeout-cancel');
  try {
    const { server, url } = await fakeDestination(async (ch) => {
      await ch.expect(FrameType.Hello);
      await ch.sendJson(FrameType.Accept, {});
      for (;;) await ch.next(); // takes everything, answers nothing
    });
    await src.vmm.sendMigration({ destination_url: url, timeout_s: 1, timeout_strategy: 'Cancel' });
    await sourceKeptItsGuest(t, src, /timed out after 1 s/);
    server.close();
    await migratesAfterwards(t, src);
  } finally {
    await src.vmm.shutdownVmm();
  }
});

test.serial('source: past the timeout with Ignore, the migration finishes anyway', async (t) => {
  const src = await counting('timeout-ignore');
  const { dst, url, result } = await receiving();
  // A link slow enough that the first round alone outlasts the timeout.
  const link = await slowLink(url, 32 << 10);
  try {
    await src.vmm.sendMigration({ destination_url: link.url, timeout_s: 1, timeout_strategy: 'Ignore' });
    t.is(await result, 'received');
    await until('the source has finished', () => src.vmm.migrationProgress()?.phase !== 'completing');
    const p = src.vmm.migrationProgress()!;
    t.is(p.phase, 'finished');
    t.true(p.elapsed_ms > 1000, `took ${p.elapsed_ms} ms, longer than the 1 s timeout`);
    t.is(dst.vmm.state.vm.status, 'Running');
  } finally {
    link.server.close();
    await src.vmm.shutdownVmm();
    await dst.vmm.shutdownVmm();
  }
});

test.serial('cancel and a second send-migration while one runs: refused, then cancelled on both sides', async (t) => {
  const src = await counting('cancel');
  const { dst, url, result } = await receiving();
  const link = await slowLink(url, 64 << 10);
  try {
    await src.vmm.sendMigration({ destination_url: link.url });
    await t.throwsAsync(src.vmm.sendMigration({ destination_url: url }), { message: /already in progress/ });
    await sleep(300);
    src.vmm.cancelMigration();
    await sourceKeptItsGuest(t, src, /cancelled by the client/);
    t.throws(() => src.vmm.cancelMigration(), { message: /no migration is in progress/ });
    link.server.close();
    await destinationRecovered(t, dst, result, /cancelled by the client|closed/);
  } finally {
    await src.vmm.shutdownVmm();
    await dst.vmm.shutdownVmm();
  }
});

/** A migration side in a child process, and a promise for the first line matching `re`. */
function child(args: string[]): { proc: ChildProcess; line: (re: RegExp) => Promise<void> } {
  const proc = spawn(process.execPath, [path.join(__dirname, '..', 'support', 'migration-child.js'), ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  proc.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  const line = (re: RegExp) => until(`the child printed ${re}`, () => re.test(out), 30_000);
  return { proc, line };
}

test.serial('the destination killed (SIGKILL) in the middle: the guest runs on at the source, which can migrate again', async (t) => {
  const src = await counting('dst-killed');
  const url = tcpUrl();
  const dst = child(['receive', url]);
  try {
    await dst.line(/READY/);
    const link = await slowLink(url, 32 << 10);
    await src.vmm.sendMigration({ destination_url: link.url });
    await sleep(500);
    dst.proc.kill('SIGKILL');
    await sourceKeptItsGuest(t, src, /destination|connection/);
    link.server.close();
    await migratesAfterwards(t, src);
  } finally {
    dst.proc.kill('SIGKILL');
    await src.vmm.shutdownVmm();
  }
});

test.serial('the source killed (SIGKILL) in the middle: the destination discards it all and can receive again', async (t) => {
  const { dst, url, result } = await receiving();
  const link = await slowLink(url, 32 << 10);
  const src = child(['send', link.url, await buildTinyKernel(), path.join(tmp, 'src-killed.serial')]);
  try {
    await src.line(/STARTED/);
    await until('the destination is receiving', () => dst.migrationEvents().includes(MigrationEvents.ReceiveStarted));
    src.proc.kill('SIGKILL');
    link.server.close();
    await destinationRecovered(t, dst, result, /source|closed/);
  } finally {
    src.proc.kill('SIGKILL');
  }
});

test.serial('a paused source whose migration fails stays paused, and migrates paused afterwards', async (t) => {
  const src = await counting('paused-dropped');
  try {
    await src.vmm.pause();
    const count = guestCount(src.vmm);
    const { server, url } = await fakeDestination(async (ch, socket) => {
      await ch.expect(FrameType.Hello);
      await ch.sendJson(FrameType.Accept, {});
      await ch.expect(FrameType.Config);
      socket.destroy();
    });
    await src.vmm.sendMigration({ destination_url: url });
    await until('the source reports the failure', () => src.migrationEvents().includes(MigrationEvents.Failed));
    server.close();
    t.is(src.vmm.state.vm.status, 'Paused');
    await sleep(500);
    t.is(guestCount(src.vmm), count, 'the guest did not run');
    const { dst, url: again, result } = await receiving();
    try {
      await src.vmm.sendMigration({ destination_url: again });
      t.is(await result, 'received');
      t.is(dst.vmm.state.vm.status, 'Paused');
      t.is(guestCount(dst.vmm), count);
    } finally {
      await dst.vmm.shutdownVmm();
    }
  } finally {
    await src.vmm.shutdownVmm();
  }
});
