// Live migration between two Vmm instances in one process, with the tiny PVH kernel: the guest's
// counter continues at the destination without a gap, RAM arrives whole, a paused VM stays
// paused, and the source ends with no VM while the destination runs it.
import test from 'ava';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { VmConfig } from '../../src/config/vm-config';
import { MigrationEvents } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { waitUntil } from './harness';
import { TINY_KERNEL_MAGIC, TinyKernelStatus, buildTinyKernel, countsIn } from './tiny-kernel';

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

async function bootCounting(name: string, extra: Partial<VmConfig> = {}): Promise<{ vmm: Vmm; serial: string }> {
  const cfg = await config(name, extra);
  const vmm = new Vmm({ log: silentLogger() });
  await vmm.create(cfg);
  await vmm.boot();
  await waitUntil('the guest has initialised', () => vmm.guestMemory()!.readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC);
  const c0 = guestCount(vmm);
  await waitUntil('the guest counts', () => guestCount(vmm) >= c0 + 2);
  return { vmm, serial: (cfg.serial as { file: string }).file };
}

function eventTypes(vmm: Vmm): string[] {
  const seen: string[] = [];
  vmm.store.events$.subscribe((e) => seen.push(e.type));
  return seen;
}

test.serial('a running guest migrates over TCP: its counter goes on at the destination, the source has no VM left', async (t) => {
  const { vmm: src, serial } = await bootCounting('tcp');
  const dst = new Vmm({ log: silentLogger() });
  const srcEvents = eventTypes(src);
  const dstEvents = eventTypes(dst);
  try {
    const url = tcpUrl();
    const received = dst.receiveMigration({ receiver_url: url });
    await waitUntil('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
    await src.sendMigration({ destination_url: url });
    await received;
    await waitUntil('the source has let the VM go', () => src.state.vm.status === 'Shutdown');
    t.is(dst.state.vm.status, 'Running');
    const after = guestCount(dst);
    await waitUntil('the guest counts on at the destination', () => guestCount(dst) >= after + 3);
    // The serial file is the same path on both sides here: the lines before and after the
    // move form one gapless sequence.
    const counts = countsIn(fs.readFileSync(serial, 'utf8'));
    t.true(counts.length > 5);
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
    await waitUntil('the destination listens', () => dstEvents.includes(MigrationEvents.ReceiveReady));
    await src.sendMigration({ destination_url: url });
    await received;
    t.is(dst.state.vm.status, 'Paused');
    t.is(ramHash(dst), hash);
    t.is(guestCount(dst), count);
    await dst.resume();
    await waitUntil('the guest counts on', () => guestCount(dst) >= count + 2);
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});
