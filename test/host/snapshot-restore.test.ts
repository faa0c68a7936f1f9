// Snapshot and restore through the real CLI and API with the tiny kernel: a VM is paused and
// snapshotted, its VMM killed with SIGKILL, and new VMMs restored from the directory alone
// continue the guest's counter (serial COUNT lines and the RAM status block) where it stopped.
// Also: the memory file is sparse, a corrupt snapshot gives its error and exit 1, and
// the API refuses a snapshot of a running VM and a restore over an existing VM; a card restored
// with a tap handed over (net_fds, SCM_RIGHTS) runs on that tap.
import test from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';

import { TernApiError, TernClient } from '../../src/api/client';
import { buildCpuid } from '../../src/boot/cpuid';
import { KvmCap, native } from '../../src/native/kvm';
import { REPO, TERN_REMOTE, runTernRemote, waitForPath } from '../support/processes';
import { editState, fitSavedVcpusToHost } from '../support/snapshot-edit';
import { GuestProcess, TERN_CLI } from '../linux/guest-process';
import { tempDir } from '../unit/api-harness';
import { sleep } from './harness';
import { countsIn, lastCount, lastStatus, startTern, startTinyVm } from './tiny-kernel';

const T = 40_000;
const dir = tempDir('tern-snapshot-');
const url = (p: string): string => `file://${p}`;

/** Boot a tiny VM with an API socket, let it count, pause it and snapshot it; then SIGKILL it. */
async function makeSnapshot(name: string, args: string[] = []): Promise<Snapshot> {
  const socket = path.join(dir, `${name}.sock`);
  const vm = await startTinyVm(['--api-socket', `path=${socket}`, ...args]);
  try {
    await vm.waitFor(/^COUNT 3\n/m, T);
    await waitForPath(socket);
    const client = new TernClient({ socketPath: socket, timeoutMs: 30_000 });
    try {
      await client.pause();
      // The last COUNT line may still be on its way through the VMM's stdout pipe: read the
      // counter once the output has been quiet for a while.
      for (let seen = -1; seen !== vm.output.length; ) {
        seen = vm.output.length;
        await sleep(500);
      }
      const last = lastCount(vm.output);
      // The pause may have cut a COUNT line; the restored guest prints the rest of it.
      const cut = vm.output.slice(vm.output.lastIndexOf('\n') + 1);
      const snap = path.join(dir, name);
      const r = await runTernRemote(socket, ['snapshot', url(snap)]);
      if (r.code !== 0) throw new Error(`tern-remote snapshot: ${r.stderr}`);
      return { snap, last, cut };
    } finally {
      client.close();
    }
  } finally {
    vm.kill();
    await vm.exited;
  }
}

/** A snapshot, the last COUNT line printed whole before the pause, and the line the pause cut. */
interface Snapshot {
  snap: string;
  last: number;
  cut: string;
}

async function restoreAndCheck(t: import('ava').ExecutionContext, { snap, last, cut }: Snapshot, extra = '', cliArgs: string[] = []): Promise<void> {
  const vm: GuestProcess = await startTern(['--restore', `source_url=${url(snap)},resume=on${extra}`, '--serial', 'tty', '--console', 'off', ...cliArgs]);
  try {
    await vm.waitFor(new RegExp(`^COUNT ${last + 2}\\n`, 'm'), T);
    if (cliArgs.includes('-vv')) {
      // Where the restore's time went, for an operator: each step once, in order, in time.
      const line = vm.stderr.split('\n').find((l) => l.includes('"restore steps"'));
      t.truthy(line, 'a restore steps line with -vv');
      const steps = (JSON.parse(line!) as { steps: { step: string; ms: number }[] }).steps;
      const names = steps.map((s) => s.step);
      for (const step of ['snapshot read and checked', 'guest RAM mapped', 'vCPUs set', 'restored', 'resumed']) t.true(names.includes(step), `${step} in ${names.join(', ')}`);
      t.is(names.at(-1), 'resumed');
      t.true(steps.every((s, i) => i === 0 || s.ms >= steps[i - 1].ms), JSON.stringify(steps));
    }
    const counts = countsIn(cut + vm.output);
    t.is(counts[0], last + 1, `continues from the next value, got ${counts.slice(0, 5).join(',')}; stderr ${vm.stderr.slice(-500)}`);
    t.deepEqual(counts, counts.map((_, i) => last + 1 + i), 'consecutive');
    t.notRegex(vm.output, /TINY-KERNEL-BOOT/, 'nothing booted');
    const from = vm.output.length;
    vm.type('s');
    await vm.waitFor(/^STATUS .*\n/m, T, from);
    const status = lastStatus(vm.output)!;
    t.true(status.count > last + 1, `the RAM status block counter continued: ${JSON.stringify(status)}`);
    t.true(status.ticks > last, 'LAPIC timer ticks continued too');
  } finally {
    vm.kill();
    await vm.exited;
  }
}

let shared: Promise<Snapshot> | undefined;
const snapshotOnce = () => (shared ??= makeSnapshot('base'));

test.serial('snapshot of a paused VM, SIGKILL, restore (twice, copy) continues the counter', async (t) => {
  const base = await snapshotOnce();
  const { snap, last } = base;
  t.true(last >= 3);
  t.deepEqual(fs.readdirSync(snap).sort(), ['config.json', 'memory-ranges', 'state.json']);
  t.deepEqual(fs.readdirSync(dir).filter((f) => f.includes('.partial-')), [], 'no temp dir left');
  await restoreAndCheck(t, base);
  await restoreAndCheck(t, base);
});

test.serial('restore with memory_restore_mode=ondemand (and prefault) continues the counter', async (t) => {
  const base = await snapshotOnce();
  await restoreAndCheck(t, base, ',memory_restore_mode=ondemand', ['-vv']);
  await restoreAndCheck(t, base, ',memory_restore_mode=ondemand,prefault=on');
});

test.serial('a 2-vCPU VM (the second waiting for SIPI) restores with both vCPUs and continues', async (t) => {
  const smp = await makeSnapshot('smp', ['--cpus', 'boot=2']);
  const env = JSON.parse(fs.readFileSync(path.join(smp.snap, 'state.json'), 'utf8'));
  t.deepEqual(Object.keys(env.state.vcpus.saved).sort(), ['0', '1']);
  t.not(env.state.vcpus.saved['0'].mpState, env.state.vcpus.saved['1'].mpState, 'the AP is saved in its own (wait-for-SIPI) state');
  await restoreAndCheck(t, smp);
});

test.serial('a VM booted under a CPU profile keeps it through snapshot and restore', async (t) => {
  const snap = await makeSnapshot('profile', ['--cpus', 'boot=1,profile=x86-64']);
  const config = JSON.parse(fs.readFileSync(path.join(snap.snap, 'config.json'), 'utf8'));
  t.is(config.cpus.tern_profile, 'x86-64');
  const kvm = native().openKvm();
  const supported = kvm.supportedCpuid();
  // (the machine adds the TSC-deadline timer KVM emulates, profile or not)
  const tscDeadline = kvm.checkExtension(KvmCap.TSC_DEADLINE_TIMER) > 0;
  kvm.close();
  const saved = JSON.parse(fs.readFileSync(path.join(snap.snap, 'state.json'), 'utf8')).state.vcpus.saved['0'].cpuid;
  t.deepEqual(saved, buildCpuid(supported, 0, 1, { profile: 'x86-64', tscDeadline }), 'the guest was given the reduced CPUID');
  t.notDeepEqual(saved, buildCpuid(supported, 0, 1, { tscDeadline }), 'which is not the host one');
  await restoreAndCheck(t, snap);
});

test.serial('memory-ranges is sparse: far fewer blocks than 64M of guest RAM', async (t) => {
  // A snapshot of its own: an ondemand restore maps the shared one, and on tmpfs reading a hole
  // through a mapping allocates a page for it.
  const { snap } = await makeSnapshot('sparse');
  const st = fs.statSync(path.join(snap, 'memory-ranges'));
  t.true(st.size >= 64 << 20, `apparent size ${st.size}`);
  t.true(st.blocks * 512 < 8 << 20, `allocated ${st.blocks * 512} bytes`);
});

/** Copy the snapshot, break it, and restore through the CLI: exit 1 with `expected` on stderr. */
async function corruptCase(t: import('ava').ExecutionContext, name: string, breakIt: (d: string) => void, expected: RegExp): Promise<void> {
  const { snap } = await snapshotOnce();
  const d = path.join(dir, `bad-${name}`);
  fs.cpSync(snap, d, { recursive: true });
  breakIt(d);
  const before = fs.readdirSync(d).sort();
  const vm = await startTern(['--restore', `source_url=${url(d)},resume=on`, '--serial', 'tty', '--console', 'off']);
  const { code } = await vm.exit(T);
  t.is(code, 1, `${name}: exit code; stderr ${vm.stderr}`);
  t.regex(vm.stderr, expected, name);
  t.deepEqual(fs.readdirSync(d).sort(), before, 'nothing written');
}


/**
 * A feature of leaf 7.0 EBX this host's KVM cannot give a guest, for a snapshot that claims it
 * was taken on a CPU that had it (a guest moved from a newer host).
 */
function featureThisHostLacks(): { name: string; bit: number } {
  const kvm = native().openKvm();
  try {
    const l7 = kvm.supportedCpuid().find((e) => e.function === 7 && e.index === 0);
    const ebx = (l7?.ebx ?? 0) >>> 0;
    const candidates: [string, number][] = [['avx512f', 16], ['avx512bw', 30], ['avx512cd', 28], ['sha_ni', 29], ['avx2', 5], ['bmi2', 8]];
    const found = candidates.find(([, bit]) => !(ebx & (1 << bit)));
    if (!found) throw new Error('this host has every candidate feature');
    return { name: found[0], bit: found[1] };
  } finally {
    kvm.close();
  }
}
const LACKED = featureThisHostLacks();

function claimFeature(d: string): void {
  editState(d, (e) => {
    const l7 = e.state.vcpus.saved['0'].cpuid.find((x: { function: number; index: number }) => x.function === 7 && x.index === 0);
    l7.ebx = (l7.ebx | (1 << LACKED.bit)) >>> 0;
  });
}

// Every way of breaking a snapshot is checked without KVM in test/unit/snapshot-files.test.ts;
// here a few go through the real CLI (exit 1, the error on stderr, nothing written), among them
// the one only a real copy restore finds: guest RAM altered in memory-ranges.
const CORRUPTIONS: [string, (d: string) => void, RegExp][] = [
  ['missing state.json', (d) => fs.rmSync(path.join(d, 'state.json')), /state\.json: missing/],
  ['wrong checksum', (d) => editState(d, (e) => (e.state.vm.bootCount += 1), false), /state\.json: checksum mismatch/],
  ['guest RAM altered in memory-ranges', (d) => {
    const file = path.join(d, 'memory-ranges');
    const fd = fs.openSync(file, 'r+');
    // A byte of the tiny kernel (loaded at 2 MiB), after the 4 KiB header.
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, 4096 + 0x200000);
    b[0] ^= 0xff;
    fs.writeSync(fd, b, 0, 1, 4096 + 0x200000);
    fs.closeSync(fd);
  }, /memory-ranges: range 0 \(guest 0x0\) fails the checksum recorded in state\.json/],
  ['no such directory', (d) => fs.rmSync(d, { recursive: true }), /no such directory/],
  [
    'saved CPUID claims a feature this host lacks',
    claimFeature,
    new RegExp(`this host cannot run the guest's CPU: feature ${LACKED.name} \\(leaf 0x7\\.0 ebx bit ${LACKED.bit}\\)`),
  ],
];

for (const [name, breakIt, expected] of CORRUPTIONS) {
  test.serial(`corrupt snapshot: ${name} -> specific error, exit 1`, async (t) => {
    if (name === 'no such directory') {
      const { snap } = await snapshotOnce();
      void snap;
      const vm = await startTern(['--restore', `source_url=${url(path.join(dir, 'nothing-here'))}`]);
      const { code } = await vm.exit(T);
      t.is(code, 1);
      t.regex(vm.stderr, expected);
      return;
    }
    await corruptCase(t, name, breakIt, expected);
  });
}

test.serial('API: snapshot of a running VM is 500; an existing destination is refused; restore with a VM present is 500; restore via API works', async (t) => {
  const { snap, last, cut } = await snapshotOnce();
  const socket = path.join(dir, 'api.sock');
  const vm = await startTinyVm(['--api-socket', `path=${socket}`]);
  const client = new TernClient({ socketPath: socket, timeoutMs: 30_000 });
  try {
    await vm.waitFor(/^COUNT 1\n/m, T);
    await waitForPath(socket);
    const target = path.join(dir, 'api-snap');
    const e1 = await t.throwsAsync(client.snapshot(url(target)));
    t.is((e1 as TernApiError).status, 500);
    t.false(fs.existsSync(target));
    await client.pause();
    const e2 = await t.throwsAsync(client.snapshot(url(snap)));
    t.is((e2 as TernApiError).status, 500);
    t.regex((e2 as TernApiError).chain.join(' '), /already exists/);
    t.is((await client.info()).state, 'Paused', 'the VM stays Paused after a failed snapshot');
    const e3 = await t.throwsAsync(client.restore({ source_url: url(snap) }));
    t.is((e3 as TernApiError).status, 500);
    await client.delete();
    await client.restore({ source_url: url(snap), resume: false });
    t.is((await client.info()).state, 'Paused');
    const from = vm.output.length;
    await client.resume();
    await vm.waitFor(new RegExp(`^COUNT ${last + 2}\\n`, 'm'), T, from);
    t.deepEqual(countsIn(cut + vm.output.slice(from)).slice(0, 2), [last + 1, last + 2], 'the restored guest continues the snapshot');
  } finally {
    client.close();
    vm.kill();
    await vm.exited;
  }
});

// A snapshot written by a schema-2 build (before the memory slice), kept in the repository with
// its memory gzipped. The schema 2 -> 3 upgrade gives it the RAM layout those builds used, and
// the guest continues: the snapshot was taken after the guest printed COUNT 5.
const SCHEMA2_FIXTURE = path.join(REPO, 'test', 'fixtures', 'snapshot-schema2');
const SCHEMA2_LAST_COUNT = 5;

test.serial('a snapshot from a schema-2 build restores through the upgrade registry and continues', async (t) => {
  const snap = path.join(dir, 'schema2');
  fs.mkdirSync(snap);
  for (const f of ['config.json', 'state.json']) fs.copyFileSync(path.join(SCHEMA2_FIXTURE, f), path.join(snap, f));
  fs.writeFileSync(path.join(snap, 'memory-ranges'), zlib.gunzipSync(fs.readFileSync(path.join(SCHEMA2_FIXTURE, 'memory-ranges.gz'))));
  t.is(JSON.parse(fs.readFileSync(path.join(snap, 'state.json'), 'utf8')).schema_version, 2);
  // The fixture was recorded on an AMD host whose CPUID this host may not offer, and restore
  // refuses a guest given features this host lacks (tested above). What this test is about is
  // the schema upgrade (the tiny kernel never enabled XSAVE, so its saved XCR0 holds anywhere).
  editState(snap, (env) => fitSavedVcpusToHost(env.state));
  await restoreAndCheck(t, { snap, last: SCHEMA2_LAST_COUNT, cut: '' });
  t.deepEqual(fs.readdirSync(snap).sort(), ['config.json', 'memory-ranges', 'state.json'], 'the old snapshot is read, never rewritten');
});

/** The tap names of the tun descriptors process `pid` holds (from /proc/PID/fdinfo's iff line). */
function tapsHeldBy(pid: number): string[] {
  const names: string[] = [];
  for (const fd of fs.readdirSync(`/proc/${pid}/fdinfo`)) {
    try {
      const m = /^iff:\s*(\S+)/m.exec(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
      if (m) names.push(m[1]);
    } catch {
      /* closed meanwhile */
    }
  }
  return names;
}

test.serial('a card restored with a tap handed over (ch-remote restore net_fds=[id@[fd]], SCM_RIGHTS) runs on that tap; a wrong count is refused', async (t) => {
  const saved = `tsr${process.pid % 10000}a`;
  const { snap, last } = await makeSnapshot('net', ['--net', `tap=${saved},id=uplink,mac=52:54:00:12:34:56`]);
  // The tap the restoring side hands over, as Kata or libvirt would: opened by the parent.
  const handed = native().openTap(`tsr${process.pid % 10000}b`, 1);
  t.teardown(() => handed.fds.forEach((fd) => native().closeFd(fd)));
  const socket = path.join(dir, 'net-restore.sock');
  const vm = await startTern(['--api-socket', `path=${socket}`]);
  try {
    await waitForPath(socket);
    const restore = (arg: string) =>
      new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, [TERN_REMOTE, '--api-socket', socket, 'restore', arg], { stdio: ['ignore', 'pipe', 'pipe', handed.fds[0]] });
        let stderr = '';
        child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
        child.on('close', (code) => resolve({ code, stderr }));
      });
    const wrongCount = await restore(`source_url=${url(snap)},net_fds=[uplink@[3,3]]`);
    t.not(wrongCount.code, 0);
    t.regex(wrongCount.stderr, /net device 'uplink': 2 fds for 2 queues: one tap fd per queue pair/, 'two fds for a card of one queue pair');
    const r = await restore(`source_url=${url(snap)},resume=on,net_fds=[uplink@[3]]`);
    t.is(r.code, 0, r.stderr);
    await vm.waitFor(new RegExp(`^COUNT ${last + 2}\\n`, 'm'), T);
    const client = new TernClient({ socketPath: socket, timeoutMs: 30_000 });
    try {
      const info = (await client.info()) as unknown as { config: { net: { id: string; tap: string; mac: string }[] } };
      t.like(info.config.net[0], { id: 'uplink', tap: handed.name, mac: '52:54:00:12:34:56' });
    } finally {
      client.close();
    }
    const held = tapsHeldBy(vm.child.pid!);
    t.true(held.includes(handed.name), `the restored VMM holds the handed tap: ${held.join(', ')}`);
    t.false(held.includes(saved), 'and not the tap the snapshot names');
  } finally {
    vm.kill();
    await vm.exited;
  }
  // The command line's way: tern inherits the tap as its fd 3 (--restore ...,net_fds=[uplink@[3]]).
  const cli = new GuestProcess(process.execPath, [TERN_CLI, '--restore', `source_url=${url(snap)},resume=on,net_fds=[uplink@[3]]`, '--serial', 'tty', '--console', 'off'], { passFds: [handed.fds[0]] });
  try {
    await cli.waitFor(new RegExp(`^COUNT ${last + 2}\\n`, 'm'), T);
    const held = tapsHeldBy(cli.child.pid!);
    t.true(held.includes(handed.name), `tern --restore with net_fds holds the handed tap: ${held.join(', ')}`);
    t.false(held.includes(saved));
  } finally {
    cli.kill();
    await cli.exited;
  }
});
