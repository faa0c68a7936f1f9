// Live migration between two Vmm instances in one process, with the tiny PVH kernel: the guest's
// counter continues at the destination without a gap, RAM arrives whole, a paused VM stays
// paused, and the source ends with no VM while the destination runs it.
import test from 'ava';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { VmConfig } from '../../src/config/vm-config';
import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import { frameJson } from '../../src/migration/frames';
import type { Hello } from '../../src/migration/handshake';
import { readSnapshot } from '../../src/migration/snapshot';
import { MigrationEvents, ROOT_SCHEMA_VERSION } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { fitSavedVcpusToHost } from '../support/snapshot-edit';
import { FrameType, connectAsSource, helloFor, sendAllPages } from '../support/migration-peer';
import { unpackSchema2 } from '../unit/snapshot-fixture';
import { capturingLogger, waitUntil } from './harness';
import { TINY_KERNEL_MAGIC, TinyKernelStatus, buildTinyKernel, countsIn } from './tiny-kernel';

// Generous: in the nested lab a tiny guest and both VMMs run on an emulated CPU.
const until = (what: string, cond: () => boolean, ms = 30_000): Promise<void> => waitUntil(what, cond, ms);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-migration-vmm-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

let nextPort = 20000 + (process.pid % 20000);
const tcpUrl = (): string => `tcp:127.0.0.1:${nextPort++}`;

async function config(name: string, extra: Partial<VmConfig> = {}): Promise<VmConfig> {
  return {
    payload: { kernel: await buildTinyKernel(), cmdline: `migration ${name}` },
    cpus: { boot_vcpus: 2, max_vcpus: 2 },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: path.join(tmp, `${name}.serial`) },
    console: { mode: 'Off' },
    ...extra,
  };
}

const guestCount = (vmm: Vmm): number => vmm.guestMemory()?.readU32(TinyKernelStatus.COUNT) ?? -1;

function ramHash(vmm: Vmm): string {
  const mem = vmm.guestMemory()!;
  const h = crypto.createHash('sha256');
  for (let off = 0; off < mem.size; off += 1 << 20) h.update(mem.read(off, Math.min(1 << 20, mem.size - off)));
  return h.digest('hex');
}

async function bootCounting(name: string, extra: Partial<VmConfig> = {}, log = silentLogger()): Promise<{ vmm: Vmm; serial: string }> {
  const cfg = await config(name, extra);
  const vmm = new Vmm({ log });
  await vmm.create(cfg);
  await vmm.boot();
  await until('the guest has initialised', () => vmm.guestMemory()!.readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC);
  const c0 = guestCount(vmm);
  await until('the guest counts', () => guestCount(vmm) >= c0 + 2);
  return { vmm, serial: (cfg.serial as { file: string }).file };
}

function eventTypes(vmm: Vmm): string[] {
  const seen: string[] = [];
  vmm.store.events$.subscribe((e) => seen.push(e.type));
  return seen;
}

test.serial('a running guest migrates over TCP: its counter goes on at the destination, the source has no VM left', async (t) => {
  const srcLog = capturingLogger('debug');
  const dstLog = capturingLogger('debug');
  const { vmm: src, serial } = await bootCounting('tcp', {}, srcLog.log);
  const dst = new Vmm({ log: dstLog.log });
  const srcEvents = eventTypes(src);
  const dstEvents = eventTypes(dst);
  try {
    const url = tcpUrl();
    const received = dst.receiveMigration({ receiver_url: url });
    await until('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
    // COUNT lines printed so far: the last one the source surely printed is COUNT before-1.
    const before = guestCount(src);
    await src.sendMigration({ destination_url: url });
    await received;
    await until('the source has let the VM go', () => src.state.vm.status === 'Shutdown');
    t.is(dst.state.vm.status, 'Running');
    const after = guestCount(dst);
    await until('the guest counts on at the destination', () => guestCount(dst) >= after + 3);
    // The serial file is the same path on both sides here: the lines before and after the
    // move form one gapless sequence.
    const counts = countsIn(fs.readFileSync(serial, 'utf8'));
    t.true(counts.includes(before - 1) && counts[counts.length - 1] >= after + 1, `COUNT lines ${counts.join(',')}; ${before} before, ${after} after`);
    counts.forEach((c, i) => i > 0 && t.is(c, counts[i - 1] + 1, `COUNT ${counts[i - 1]} is followed by ${c}`));
    t.deepEqual(srcEvents.filter((e) => e.startsWith('[Migration]')).filter((e, i, a) => a.indexOf(e) === i), [
      MigrationEvents.Started,
      MigrationEvents.MemoryIteration,
      MigrationEvents.Finished,
    ]);
    t.deepEqual(dstEvents.filter((e) => e.startsWith('[Migration]')), [MigrationEvents.ReceiveReady, MigrationEvents.ReceiveStarted, MigrationEvents.ReceiveFinished]);
    const p = src.migrationProgress()!;
    t.is(p.phase, 'finished');
    t.true(p.bytes_transferred > 0);
    t.true((p.downtime_ms ?? -1) >= 0);
    // Each side ran its pause's code once before the pause, on real KVM objects, without a
    // hitch, and the destination set every saved MSR.
    const problems = [...srcLog.lines, ...dstLog.lines].filter((l) => /rehearsal|rejected/.test(l.msg)).map((l) => JSON.stringify(l));
    t.deepEqual(problems, []);
    t.true(srcLog.lines.some((l) => l.msg === 'migration: pause steps'), 'the source logged its pause');
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});

test.serial('a paused guest arrives paused with RAM identical to the source, and runs when resumed', async (t) => {
  const { vmm: src } = await bootCounting('paused');
  const dst = new Vmm({ log: silentLogger() });
  const dstEvents = eventTypes(dst);
  try {
    await src.pause();
    const hash = ramHash(src);
    const count = guestCount(src);
    const url = tcpUrl();
    const received = dst.receiveMigration({ receiver_url: url });
    await until('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
    await src.sendMigration({ destination_url: url });
    await received;
    t.is(dst.state.vm.status, 'Paused');
    t.is(ramHash(dst), hash);
    t.is(guestCount(dst), count);
    await dst.resume();
    await until('the guest counts on', () => guestCount(dst) >= count + 2);
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});

test.serial('asked for twelve TCP connections, the destination grants eight: 48 MiB of random RAM arrives identical over several of them, and the counter goes on without a gap', async (t) => {
  const dstLog = capturingLogger('debug');
  const { vmm: src, serial } = await bootCounting('three-connections');
  const dst = new Vmm({ log: dstLog.log });
  const dstEvents = eventTypes(dst);
  try {
    // (the tiny kernel uses the low 8 MiB; the host writes above them as a guest would, through
    // the VMM's memory and its dirty bitmap: enough for several 16 MiB frames to spread)
    (src.guestMemory() as GuestMemory).write(16 << 20, crypto.randomBytes(48 << 20));
    const region = (vmm: Vmm) => crypto.createHash('sha256').update(vmm.guestMemory()!.read(16 << 20, 48 << 20)).digest('hex');
    const hash = region(src);
    const url = tcpUrl();
    const received = dst.receiveMigration({ receiver_url: url });
    await until('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
    const before = guestCount(src);
    await src.sendMigration({ destination_url: url, connections: 12 });
    await received;
    t.is(dst.state.vm.status, 'Running');
    t.is(region(dst), hash, 'every page landed');
    const ended = dstLog.lines.filter((l) => l.msg === 'migration: a memory connection ended') as unknown as { connection: number; frames: number }[];
    t.deepEqual(ended.map((l) => l.connection).sort((a, b) => a - b), [1, 2, 3, 4, 5, 6, 7], 'the seven extra connections granted joined and ended');
    t.true(ended.filter((l) => l.frames > 0).length >= 2, `Memory frames per extra connection: ${ended.map((l) => l.frames).join(', ')}`);
    t.true(src.migrationProgress()!.bytes_transferred > 48 << 20, 'progress counts the bytes of every connection');
    // The counter's page went again in every round, over any connection: the newest copy won.
    const after = guestCount(dst);
    await until('the guest counts on at the destination', () => guestCount(dst) >= after + 3);
    const counts = countsIn(fs.readFileSync(serial, 'utf8'));
    t.true(counts.includes(before - 1) && counts[counts.length - 1] >= after + 1, `COUNT lines ${counts.join(',')}; ${before} before, ${after} after`);
    counts.forEach((c, i) => i > 0 && t.is(c, counts[i - 1] + 1, `COUNT ${counts[i - 1]} is followed by ${c}`));
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});

/** The schema-2 snapshot fixture (a real saved VM) as a source speaks it, frame by frame. */
function schema2Source(name: string): { config: unknown; state: any; memory: GuestMemory; regions: { guestAddress: number; size: number }[] } {
  const dir = path.join(tmp, name);
  unpackSchema2(dir);
  const raw = JSON.parse(fs.readFileSync(path.join(dir, 'state.json'), 'utf8'));
  if (raw.schema_version !== 2) throw new Error('the fixture is not a schema-2 state');
  fitSavedVcpusToHost(raw.state);
  const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
  const snap = readSnapshot(dir);
  const file = fs.readFileSync(snap.memoryPath);
  const memory = new GuestMemory(
    snap.ranges.map((r) => {
      const buf = new ArrayBuffer(r.length);
      new Uint8Array(buf).set(file.subarray(r.fileOffset, r.fileOffset + r.length));
      return new GuestRegion({ guestAddress: r.guestAddress, size: r.length, chunks: [buf], chunkSize: r.length });
    }),
  );
  return { config, state: raw.state, memory, regions: snap.ranges.map((r) => ({ guestAddress: r.guestAddress, size: r.length })) };
}

/**
 * A destination listening, and a connection to it as a source, handshake, config and state sent;
 * its Prepared awaited unless `awaitPrepared` is false (finishMigration then awaits it).
 * `hello`: more of the source's Hello; `accepted` gets the destination's Accept.
 */
async function receivingFrom(
  src: ReturnType<typeof schema2Source>,
  dst = new Vmm({ log: silentLogger() }),
  awaitPrepared = true,
  hello: Partial<Hello> = {},
  accepted: (accept: Record<string, unknown>) => void = () => undefined,
): Promise<{ dst: Vmm; received: Promise<unknown>; channel: Awaited<ReturnType<typeof connectAsSource>>['channel'] }> {
  const dstEvents = eventTypes(dst);
  const url = tcpUrl();
  const received = dst.receiveMigration({ receiver_url: url }).then(
    () => 'received',
    (e: Error) => e,
  );
  await until('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
  const { channel } = await connectAsSource(url);
  await channel.sendJson(FrameType.Hello, helloFor(src.regions, { schemaVersion: 2, ...hello }));
  accepted(frameJson(await channel.expect(FrameType.Accept)) as Record<string, unknown>);
  await channel.sendJson(FrameType.Config, src.config);
  await channel.sendJson(FrameType.State, src.state);
  if (awaitPrepared) await channel.expect(FrameType.Prepared);
  return { dst, received, channel };
}

/**
 * The rest of a migration after the State frame: the final state and every page (in this
 * build's order, the final state first, or as earlier builds sent them, the pages first), then
 * the handover. `preparedAfterPages`: the pages go before the destination's Prepared is read,
 * as a source sends its first round at once.
 */
async function finishMigration(
  channel: Awaited<ReturnType<typeof connectAsSource>>['channel'],
  memory: GuestMemory,
  order: 'final-first' | 'pages-first',
  preparedAfterPages = false,
): Promise<void> {
  if (order === 'pages-first') await sendAllPages(channel, memory);
  if (preparedAfterPages) await channel.expect(FrameType.Prepared);
  await channel.sendJson(FrameType.Final, { patches: [] });
  if (order === 'final-first') await sendAllPages(channel, memory);
  await channel.send(FrameType.Complete);
  await channel.expect(FrameType.Ready);
  await channel.send(FrameType.Commit);
  await channel.expect(FrameType.Running);
}

// A source running an older build sends a schema-2 state (before the memory slice), and its
// last pages before the final state: the destination lifts the state with the same upgraders as
// a restore, and the guest continues.
test.serial('a source that sends a schema-2 state: upgraded on arrival, and the guest continues', async (t) => {
  const src = schema2Source('schema2');
  // (its pages go while the destination still readies its final checks: a source sends its
  // first round from the State frame on, and waits for Prepared only before its pause)
  const { dst, received, channel } = await receivingFrom(src, undefined, false);
  try {
    await finishMigration(channel, src.memory, 'pages-first', true);
    t.is(await received, 'received');
    t.is(dst.state.schemaVersion, ROOT_SCHEMA_VERSION);
    t.is(dst.state.vm.status, 'Paused', 'the fixture was saved paused');
    t.deepEqual(dst.state.memory.regions, src.regions);
    const count = guestCount(dst);
    t.is(count, 6, 'the fixture was saved after COUNT 5 (six lines from COUNT 0)');
    await dst.resume();
    await until('the guest counts on', () => guestCount(dst) >= count + 2);
  } finally {
    await dst.shutdownVmm();
  }
});

// A source pauses its guest only once the destination has every round in RAM (a destination
// still writing the first round's last frames did it inside the pause). A source that asks is
// told so round by round (RoundApplied); an older source that does not ask is sent none, and
// its next frame after Complete is Ready as before.
for (const asks of [true, false]) {
  test.serial(`a source that ${asks ? 'asks' : 'does not ask'} for RoundApplied ${asks ? 'gets one per round' : 'gets none'}`, async (t) => {
    const src = schema2Source(`round-applied-${asks}`);
    let accept: Record<string, unknown> = {};
    const { dst, received, channel } = await receivingFrom(src, undefined, true, asks ? { roundsApplied: true } : {}, (a) => (accept = a));
    try {
      t.is(accept.rounds_applied, asks ? true : undefined);
      for (let round = 0; round < 2; round++) {
        await sendAllPages(channel, src.memory);
        await channel.sendJson(FrameType.Round, { patches: [] });
        if (asks) t.deepEqual(frameJson(await channel.expect(FrameType.RoundApplied)), { round });
      }
      await finishMigration(channel, src.memory, 'final-first');
      t.is(await received, 'received');
      const count = guestCount(dst);
      t.is(count, 6, 'every page arrived');
      await dst.resume();
      await until('the guest counts on', () => guestCount(dst) >= count + 2);
    } finally {
      await dst.shutdownVmm();
    }
  });
}

// This build's order: the final state first, so the destination builds the VM while the last
// pages arrive. The guest must still see every page, and a state frame after the final one is
// refused.
test.serial('the last pages may follow the final state; a Round after it is refused, and a source gone after it leaves nothing behind', async (t) => {
  const src = schema2Source('final-first');
  const first = await receivingFrom(src);
  try {
    await finishMigration(first.channel, src.memory, 'final-first');
    t.is(await first.received, 'received');
    const count = guestCount(first.dst);
    t.is(count, 6, 'every page arrived after the VM was built');
    await first.dst.resume();
    await until('the guest counts on', () => guestCount(first.dst) >= count + 2);
  } finally {
    await first.dst.shutdownVmm();
  }

  const second = await receivingFrom(src);
  try {
    await second.channel.sendJson(FrameType.Final, { patches: [] });
    await second.channel.sendJson(FrameType.Round, { patches: [] }).catch(() => undefined);
    const r = await second.received;
    t.true(r instanceof Error);
    t.regex((r as Error).message, /Round frame after the Final frame/);
    t.is(second.dst.state.vm.status, 'NotCreated');
    t.is(second.dst.guestMemory(), undefined, 'the half-built VM was discarded');

    // A source gone after the final state (the VM built here, its last pages not yet in): the
    // destination discards it, and receives the VM whole the next time.
    const third = await receivingFrom(src, second.dst);
    await third.channel.sendJson(FrameType.Final, { patches: [] });
    third.channel.socket.destroy();
    const dropped = await third.received;
    t.true(dropped instanceof Error, 'the receive failed');
    t.is(second.dst.state.vm.status, 'NotCreated');
    const fourth = await receivingFrom(src, second.dst);
    await finishMigration(fourth.channel, src.memory, 'final-first');
    t.is(await fourth.received, 'received');
    t.is(guestCount(second.dst), 6, 'the VM received after the dropped one has every page');
  } finally {
    await second.dst.shutdownVmm();
  }
});

test.serial('local migration over a UNIX socket hands the RAM over as memfds: no page is copied', async (t) => {
  const { vmm: src, serial } = await bootCounting('local', { memory: { size: 64 << 20, shared: true } });
  const dst = new Vmm({ log: silentLogger() });
  const dstEvents = eventTypes(dst);
  try {
    const url = `unix:${path.join(tmp, 'local.sock')}`;
    const received = dst.receiveMigration({ receiver_url: url });
    await until('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
    await src.sendMigration({ destination_url: url, local: true });
    await received;
    await until('the source has let the VM go', () => src.state.vm.status === 'Shutdown');
    t.is(dst.state.vm.status, 'Running');
    const after = guestCount(dst);
    await until('the guest counts on at the destination', () => guestCount(dst) >= after + 3);
    const counts = countsIn(fs.readFileSync(serial, 'utf8'));
    counts.forEach((c, i) => i > 0 && t.is(c, counts[i - 1] + 1, `COUNT ${counts[i - 1]} is followed by ${c}`));
    const p = src.migrationProgress()!;
    t.is(p.phase, 'finished');
    t.true(p.local);
    // The state and a few frames; guest RAM (with the kernel and its page tables in it) never went.
    t.true(p.bytes_transferred < 256 << 10, `${p.bytes_transferred} bytes sent`);
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});

test.serial('local migration is refused before anything moves without memory shared=on, or over TCP', async (t) => {
  const { vmm: src } = await bootCounting('local-refused');
  try {
    await t.throwsAsync(src.sendMigration({ destination_url: `unix:${path.join(tmp, 'nobody.sock')}`, local: true }), { message: /memory shared=on/ });
    await t.throwsAsync(src.sendMigration({ destination_url: tcpUrl(), local: true }), { message: /unix: URL/ });
    t.is(src.state.vm.status, 'Running');
  } finally {
    await src.shutdownVmm();
  }
});

test.serial('a destination whose CPU lacks a feature the guest was given refuses at the handshake, naming it', async (t) => {
  const dst = new Vmm({ log: silentLogger() });
  const dstEvents = eventTypes(dst);
  try {
    const url = tcpUrl();
    const received = dst.receiveMigration({ receiver_url: url }).catch((e: Error) => e);
    await until('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
    const { channel } = await connectAsSource(url);
    // Leaf 7 with every feature bit set: no real host has them all (avx512f among them).
    const cpuid = [
      { function: 0, index: 0, flags: 0, eax: 7, ebx: 0, ecx: 0, edx: 0 },
      { function: 7, index: 0, flags: 1, eax: 0, ebx: 0xffffffff, ecx: 0, edx: 0 },
    ];
    await channel.sendJson(FrameType.Hello, helloFor([{ guestAddress: 0, size: 64 << 20 }], { cpuid }));
    await t.throwsAsync(channel.expect(FrameType.Accept), { message: /cannot run the guest's CPU: .*feature/ });
    const r = await received;
    t.true(r instanceof Error);
    t.regex((r as Error).message, /avx512f/);
    t.is(dst.state.vm.status, 'NotCreated');
  } finally {
    await dst.shutdownVmm();
  }
});
