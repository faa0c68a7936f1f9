// Snapshot/restore benchmark, run where /dev/kvm can boot Linux (inside the lab). For each
// guest size the guest first fills most of its RAM (a tmpfs file of non-zero data), then:
//   tern: vm.pause, vm.snapshot to a directory; restore with --restore in copy and ondemand
//         mode, each into a new process started as users start tern (the launcher, which uses
//         the startup snapshot where it was built);
//   QEMU: stop, migrate "exec:cat > FILE"; restore with -incoming "exec:cat FILE".
// Reported side by side: snapshot time, snapshot size on disk against the guest's memory in
// use, process start to the guest running again, and tern's own restore time (the monitor's
// restoring -> restored events). Snapshot speed is also put against the speed of plainly
// writing the same bytes to the same file system, measured between the snapshots.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { TernClient } from '../../src/api/client';
import { GuestProcess, fixture } from '../linux/guest-process';
import { guestCmdline, microvmCommand } from '../lab/qemu-peer';
import { monitorEventMs, monitorSpanMs } from '../support/monitor-file';
import { waitForPath } from '../support/processes';
import { QmpClient } from '../support/qmp-client';
import { median } from './median';

const SIZES_MIB = (process.env.TERN_BENCH_SNAPSHOT_SIZES ?? '512,2048').split(',').map(Number);
const RESTORES = Number(process.env.TERN_BENCH_RESTORES ?? 3);
/** The memory the second plain write reads from: more pages than a TLB holds, as guest RAM has. */
const SOURCE_MIB = 256;
const SNAPSHOTS = Math.max(2, Number(process.env.TERN_BENCH_SNAPSHOTS ?? 3));
const FILL_TIMEOUT = 15 * 60_000;
const RUNNING_TIMEOUT = 5 * 60_000;
const MIB = 1024 * 1024;
const BLOCK_MIB = 64;

/**
 * The guest's workload: a tmpfs file of non-zero bytes filling 4/5 of the memory the guest has
 * available after boot (built by doubling a 16-byte pattern to 64 MiB, then appending that
 * block), its memory use, then a heartbeat.
 */
function fillCommand(): string {
  return [
    'mkdir -p /mnt/f && mount -t tmpfs -o size=95% tmpfs /mnt/f && cd /mnt/f',
    `blocks=$(( $(awk '/^MemAvailable/{print int($2/1024)}' /proc/meminfo) * 4 / 5 / ${BLOCK_MIB} - 1 ))`,
    'echo FILLING $blocks blocks; printf 0123456789abcdef > b && i=0 && while [ $i -lt 22 ]; do cat b b > c && mv c b; i=$((i+1)); done',
    'j=0 && while [ $j -lt $blocks ]; do cat b >> fill; j=$((j+1)); done && rm b',
    "echo FILLED used_kib=$(awk '/^MemTotal/{t=$2} /^MemFree/{f=$2} END{print t-f}' /proc/meminfo)",
    'i=0; while :; do i=$((i+1)); echo ALIVE $i; sleep 0.2; done',
  ].join('; ');
}

const cmdlineFor = () => guestCmdline({ cmd: fillCommand() });
const elapsedMs = (start: bigint) => Number(process.hrtime.bigint() - start) / 1e6;
/** Bytes allocated on disk for a file or every file in a directory (holes not counted). */
function allocatedBytes(p: string): number {
  const st = fs.statSync(p);
  if (!st.isDirectory()) return st.blocks * 512;
  return fs.readdirSync(p).reduce((n, f) => n + allocatedBytes(path.join(p, f)), 0);
}

/** Echo a VMM's console to ours, line by line with a prefix, so a long run shows progress. */
function echoConsole(vm: GuestProcess, prefix: string): GuestProcess {
  let pending = '';
  vm.child.stdout.on('data', (d: Buffer) => {
    pending += d.toString('latin1').replace(/\r/g, '');
    const lines = pending.split('\n');
    pending = lines.pop()!;
    for (const l of lines) if (l.trim() && !/^ALIVE \d*[1-9]$/.test(l)) process.stdout.write(`  [${prefix}] ${l}\n`);
  });
  return vm;
}

async function waitFilled(vm: GuestProcess): Promise<number> {
  const m = await vm.waitFor(/Kernel panic|TERN-GUEST-EXIT|FILLED used_kib=(\d+)\r?\n/, FILL_TIMEOUT);
  if (m[1] === undefined) throw new Error(`the guest failed while filling its memory: ${m[0]}`);
  await vm.waitFor(/ALIVE 2\b/, RUNNING_TIMEOUT);
  return Number(m[1]) * 1024;
}

/** Spawn a VMM that restores, and time process start -> the guest's next heartbeat. */
async function timeToRunning(start: () => GuestProcess): Promise<{ ms: number; vm: GuestProcess }> {
  const t0 = process.hrtime.bigint();
  const vm = start();
  await vm.waitFor(/ALIVE \d+\r?\n/, RUNNING_TIMEOUT);
  return { ms: elapsedMs(t0), vm };
}

interface SizeResult {
  memMiB: number;
  usedBytes: { tern: number; qemu: number };
  snapshotMs: { tern: number; qemu: number };
  snapshotBytes: { tern: number; qemu: number };
  restoreMs: { ternCopy: number; ternOndemand: number; qemu: number };
  ternVmmRestoreMs: { copy: number; ondemand: number };
  diskWriteMBps: number;
  memoryWriteMBps: number;
}

async function benchTern(work: string, memMiB: number, r: Partial<SizeResult>): Promise<void> {
  const socket = path.join(work, 'tern.sock');
  const vm = echoConsole(GuestProcess.tern([
    '--kernel', fixture('bzImage'), '--initramfs', fixture('initramfs.img'), '--cmdline', cmdlineFor(),
    '--cpus', 'boot=1', '--memory', `size=${memMiB}M`, '--serial', 'tty', '--console', 'off', '--api-socket', `path=${socket}`, '-v',
  ]), `tern ${memMiB}M`);
  const snap = path.join(work, 'tern-snap');
  try {
    r.usedBytes = { tern: await waitFilled(vm), qemu: 0 };
    await waitForPath(socket);
    const client = new TernClient({ socketPath: socket, timeoutMs: 10 * 60_000 });
    try {
      await client.pause();
      // Several snapshots of the same paused VM with plain writes of as many bytes to the same
      // file system between them: the ratio is taken from neighbours, so it does not carry the
      // lab's drift between the start and the end of a run.
      const ms: number[] = [];
      const plainMBps: number[] = [];
      const fromMemoryMBps: number[] = [];
      // The first writes to the lab's tmpfs after the guest filled its RAM run slower than the
      // ones after them, whoever writes (in one lab run, five snapshots of a paused 512 MiB VM
      // in a row took 1026, 1127, 1037, 988 and 910 ms over guest RAM; after three plain
      // writes of 400 MiB, 952, 849, 831, 793 and 828 ms, a plain write 830 ms): two plain
      // writes of as much as the guest's RAM (no snapshot of it is larger), not counted, go
      // first, so the first snapshots are not the ones to pay for it.
      for (let i = 0; i < 2; i++) {
        process.stdout.write(`  ${memMiB} MiB: a plain write of ${memMiB} MiB before the snapshots (not counted): ${diskWriteMBps(work, memMiB * MIB).toFixed(0)} MB/s\n`);
      }
      for (let i = 0; i < SNAPSHOTS; i++) {
        const dir = i === SNAPSHOTS - 1 ? snap : `${snap}-${i}`;
        const t0 = process.hrtime.bigint();
        await client.snapshot(`file://${dir}`);
        ms.push(elapsedMs(t0));
        const bytes = allocatedBytes(dir);
        // (each plain write goes between two snapshots, the last one kept for the restores:
        // the lab's tmpfs has no room for a 2 GiB guest's snapshot and its plain copy at once)
        if (dir !== snap) {
          fs.rmSync(dir, { recursive: true, force: true });
          plainMBps.push(diskWriteMBps(work, bytes));
          fromMemoryMBps.push(diskWriteMBps(work, bytes, SOURCE_MIB));
        }
        const written = vm.stderr.split('\n').filter((l) => l.includes('"snapshot written"'))[i];
        if (written) {
          const w = JSON.parse(written) as { memory_bytes: number; memory_extents: number; memory_ms: number; total_ms: number };
          const plain = dir !== snap ? `; plain writes of ${mib(bytes)} after it: ${plainMBps[i].toFixed(0)} MB/s from 1 MiB, ${fromMemoryMBps[i].toFixed(0)} MB/s from ${SOURCE_MIB} MiB of memory` : '';
          process.stdout.write(`  tern ${memMiB} MiB snapshot #${i + 1}: ${ms[i].toFixed(0)} ms, ${w.total_ms} ms in the VMM, ${w.memory_ms} ms of it guest RAM (${mib(w.memory_bytes)} in ${w.memory_extents} extents)${plain}\n`);
        }
      }
      r.snapshotMs = { tern: median(ms), qemu: 0 };
      r.diskWriteMBps = median(plainMBps);
      r.memoryWriteMBps = median(fromMemoryMBps);
    } finally {
      client.close();
    }
  } finally {
    vm.kill();
    await vm.exited;
  }
  r.snapshotBytes = { tern: allocatedBytes(snap), qemu: 0 };

  const restore = async (mode: 'copy' | 'ondemand') => {
    const wall: number[] = [];
    const vmmMs: number[] = [];
    for (let i = 0; i < RESTORES; i++) {
      const monitor = path.join(work, `restore-${mode}-${i}.events`);
      const { ms, vm: restored } = await timeToRunning(() => GuestProcess.ternLauncher([
        '--restore', `source_url=file://${snap},resume=on,memory_restore_mode=${mode}`,
        '--serial', 'tty', '--console', 'off', '--event-monitor', `path=${monitor}`,
      ]));
      restored.kill();
      await restored.exited;
      wall.push(ms);
      vmmMs.push(monitorSpanMs(monitor, 'restoring', 'restored'));
      // Where the rest went: the VMM's start before it began restoring, and the guest's way
      // from resumed to its next heartbeat.
      const since = (name: string) => monitorEventMs(monitor, name).toFixed(0);
      process.stdout.write(`  tern ${memMiB} MiB restore ${mode} #${i + 1}: ${ms.toFixed(0)} ms to running, ${vmmMs[i].toFixed(1)} ms in the VMM (restoring ${since('restoring')} ms, restored ${since('restored')} ms after the VMM started)\n`);
    }
    return { wall: median(wall), vmm: median(vmmMs) };
  };
  const copy = await restore('copy');
  const ondemand = await restore('ondemand');
  r.restoreMs = { ternCopy: copy.wall, ternOndemand: ondemand.wall, qemu: 0 };
  r.ternVmmRestoreMs = { copy: copy.vmm, ondemand: ondemand.vmm };
  fs.rmSync(snap, { recursive: true, force: true });
}

async function benchQemu(work: string, memMiB: number, r: SizeResult): Promise<void> {
  const qmpPath = path.join(work, 'qmp.sock');
  const file = path.join(work, 'qemu-state');
  const base = microvmCommand({ kernel: fixture('bzImage'), initrd: fixture('initramfs.img'), cmdline: cmdlineFor(), cpus: 1, memMiB });
  const vm = echoConsole(new GuestProcess(base.file, [...base.args, '-qmp', `unix:${qmpPath},server=on,wait=off`]), `qemu ${memMiB}M`);
  try {
    r.usedBytes.qemu = await waitFilled(vm);
    const qmp = await QmpClient.connect(qmpPath);
    try {
      await qmp.execute('stop');
      process.stdout.write(`  qemu ${memMiB} MiB: stopped, migrating to ${file}\n`);
      const t0 = process.hrtime.bigint();
      await qmp.execute('migrate', { uri: `exec:cat > ${file}` });
      let reported = 0;
      for (;;) {
        const s = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string; ram?: { transferred?: number } };
        if (s.status === 'completed') break;
        if (elapsedMs(t0) - reported > 5000) {
          reported = elapsedMs(t0);
          process.stdout.write(`  qemu ${memMiB} MiB: migrate ${s.status ?? '?'}, ${mib(s.ram?.transferred ?? 0)} after ${sec(reported)}\n`);
        }
        if (s.status === 'failed' || s.status === 'cancelled') throw new Error(`QEMU migrate ${s.status}: ${s['error-desc'] ?? ''}`);
        await new Promise((res) => setTimeout(res, 5));
      }
      r.snapshotMs.qemu = elapsedMs(t0);
    } finally {
      qmp.close();
    }
  } finally {
    vm.kill();
    await vm.exited;
  }
  r.snapshotBytes.qemu = allocatedBytes(file);
  const wall: number[] = [];
  for (let i = 0; i < RESTORES; i++) {
    // The saved VM was stopped, so QEMU keeps it paused after the incoming migration: `cont`
    // once it completes is QEMU's resume=on.
    const incomingQmp = path.join(work, `qmp-in-${i}.sock`);
    const t0 = process.hrtime.bigint();
    const restored = new GuestProcess(base.file, [...base.args, '-incoming', `exec:cat ${file}`, '-qmp', `unix:${incomingQmp},server=on,wait=off`]);
    const running = restored.waitFor(/ALIVE \d+\r?\n/, RUNNING_TIMEOUT);
    const qmp = await QmpClient.connect(incomingQmp);
    try {
      for (;;) {
        const s = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
        if (s.status === 'completed') break;
        if (s.status === 'failed' || s.status === 'cancelled') throw new Error(`QEMU incoming migration ${s.status}: ${s['error-desc'] ?? ''}`);
        await new Promise((res) => setTimeout(res, 5));
      }
      await qmp.execute('cont');
      await running;
    } finally {
      qmp.close();
    }
    const ms = elapsedMs(t0);
    restored.kill();
    await restored.exited;
    wall.push(ms);
    process.stdout.write(`  qemu ${memMiB} MiB restore #${i + 1}: ${ms.toFixed(0)} ms to running\n`);
  }
  r.restoreMs.qemu = median(wall);
  fs.rmSync(file, { force: true });
}

/**
 * MB/s of writing `bytes` of non-zero data in 1 MiB blocks to `dir`, then fsync: the disk's own
 * speed from one 1 MiB buffer, or, from a buffer of `sourceMiB` written over and over, the
 * speed of writing out that much memory (a snapshot reads each page of guest RAM once; a
 * 1 MiB buffer stays in the CPU's caches and TLB, so this shows what reading memory costs).
 */
function diskWriteMBps(dir: string, bytes: number, sourceMiB = 1): number {
  const file = path.join(dir, 'disk-speed');
  const source = Buffer.alloc(sourceMiB * MIB, 0x5a);
  const fd = fs.openSync(file, 'w');
  const t0 = process.hrtime.bigint();
  try {
    for (let done = 0; done < bytes; done += MIB) fs.writeSync(fd, source, (done / MIB % sourceMiB) * MIB, Math.min(MIB, bytes - done));
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  const ms = elapsedMs(t0);
  fs.rmSync(file);
  return bytes / MIB / (ms / 1000);
}

const mib = (b: number) => `${(b / MIB).toFixed(0)} MiB`;
const sec = (ms: number) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`);
const ratio = (a: number, b: number) => (a / b).toFixed(2);

function table(results: SizeResult[]): string {
  const rows = ['| metric | guest RAM | tern | QEMU | tern/QEMU |', '|---|---|---|---|---|'];
  for (const r of results) {
    const g = `${r.memMiB} MiB`;
    rows.push(
      `| guest memory in use (MemTotal - MemFree) | ${g} | ${mib(r.usedBytes.tern)} | ${mib(r.usedBytes.qemu)} | |`,
      `| snapshot time (paused VM) | ${g} | ${sec(r.snapshotMs.tern)} | ${sec(r.snapshotMs.qemu)} | ${ratio(r.snapshotMs.tern, r.snapshotMs.qemu)} |`,
      `| snapshot size on disk | ${g} | ${mib(r.snapshotBytes.tern)} | ${mib(r.snapshotBytes.qemu)} | ${ratio(r.snapshotBytes.tern, r.snapshotBytes.qemu)} |`,
      `| restore, process start to guest running: tern copy | ${g} | ${sec(r.restoreMs.ternCopy)} | ${sec(r.restoreMs.qemu)} | ${ratio(r.restoreMs.ternCopy, r.restoreMs.qemu)} |`,
      `| restore, process start to guest running: tern ondemand | ${g} | ${sec(r.restoreMs.ternOndemand)} | ${sec(r.restoreMs.qemu)} | ${ratio(r.restoreMs.ternOndemand, r.restoreMs.qemu)} |`,
      `| tern restore in the VMM (restoring -> restored): copy / ondemand | ${g} | ${r.ternVmmRestoreMs.copy.toFixed(1)} ms / ${r.ternVmmRestoreMs.ondemand.toFixed(1)} ms | | |`,
      `| snapshot speed / plain write speed of the same bytes | ${g} | ${ratio(r.snapshotBytes.tern / MIB / (r.snapshotMs.tern / 1000), r.diskWriteMBps)} (disk ${r.diskWriteMBps.toFixed(0)} MB/s) | | |`,
      `| snapshot speed / plain write of as many bytes from ${SOURCE_MIB} MiB of memory | ${g} | ${ratio(r.snapshotBytes.tern / MIB / (r.snapshotMs.tern / 1000), r.memoryWriteMBps)} (${r.memoryWriteMBps.toFixed(0)} MB/s) | | |`,
      `| snapshot size / guest memory in use | ${g} | ${ratio(r.snapshotBytes.tern, r.usedBytes.tern)} | ${ratio(r.snapshotBytes.qemu, r.usedBytes.qemu)} | |`,
    );
  }
  return rows.join('\n');
}

async function main(): Promise<void> {
  const results: SizeResult[] = [];
  for (const memMiB of SIZES_MIB) {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), `tern-snapbench-${memMiB}-`));
    try {
      const r: Partial<SizeResult> = { memMiB };
      process.stdout.write(`snapshot bench: ${memMiB} MiB guest\n`);
      await benchTern(work, memMiB, r);
      await benchQemu(work, memMiB, r as SizeResult);
      results.push(r as SizeResult);
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  }
  process.stdout.write(`\nSNAPSHOT-BENCH-TABLE (medians of ${SNAPSHOTS} snapshots and ${RESTORES} restores)\n${table(results)}\n`);
  process.stdout.write('guest: Debian bzImage, 1 vCPU, busybox initramfs; 4/5 of the memory available after boot filled with a tmpfs file; files on the lab\'s tmpfs\n');
}

main().catch((e) => {
  process.stderr.write(`snapshot bench: ${(e as Error).stack}\n`);
  process.exit(1);
});
