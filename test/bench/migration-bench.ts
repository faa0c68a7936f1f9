// Live migration benchmark, run where /dev/kvm can boot Linux (inside the lab): the same
// kernel, initramfs, RAM, vCPUs and guest workload (scripts/guest/migration-workload) migrated
// by tern (vm.receive-migration / vm.send-migration) and by QEMU 7.2 (-incoming tcp:... on the
// destination, `migrate` over QMP on the source), both over TCP on the lab's loopback:
//   - an idle 1 GiB guest (counters only);
//   - a dirtying 1 GiB guest (a 256 MiB tmpfs file rewritten from /dev/urandom without pause);
//   - tern's local migration (memory handed over as file descriptors) at 512 MiB and 2 GiB.
// Per migration: total time and downtime as each VMM reports them (QEMU: query-migrate's
// total-time and downtime), bytes sent, the largest gap between the guest's 100 ms counter lines
// as they reached the host (the pause as an observer of the console sees it, both VMMs' consoles
// included), and the largest interval the guest's own 10 ms ticker saw (its clock's view).
// QEMU's downtime limit is set to tern's default (300 ms) and its bandwidth limit lifted
// (max-bandwidth 100 GiB/s; its default caps the link), so both run under the same rules.
// The QEMU machine is microvm, as in the other benchmarks: same-version live migration is
// supported there (its documentation excludes only migration across QEMU versions).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { microvmCommand } from '../lab/qemu-peer';
import { profileSummary } from './cpu-profile';
import { GuestProcess, fixture } from '../linux/guest-process';
import { counterFaults, gapsIn, largestArrivalGap, recordTickArrivals, ticksIn, workloadCmdline } from '../linux/migration-workload';
import { monitorSeconds } from '../support/monitor-file';
import { waitForPath } from '../support/processes';
import { qemuMigrate } from '../support/qemu-migrate';
import { QmpClient } from '../support/qmp-client';
import { migrate, reported } from '../support/tern-migration';
import { columnCli, columnEnv, columnVmm } from './vmm-columns';

const MIB = 1024 * 1024;
const CPUS = 2;
const DOWNTIME_LIMIT_MS = 300;
const QEMU_MAX_BANDWIDTH = 100 * 1024 * MIB;
const BOOT_TIMEOUT = 10 * 60_000;
const MIGRATION_TIMEOUT = 15 * 60_000;
const DIRTY_FILE_MIB = 256;
/**
 * TERN_BENCH_MIGRATION_VMMS=qemu (or tern) runs one side only; `tern:N` is tern migrating over N
 * TCP connections (connections=N), e.g. tern,tern:3,qemu. Each gets its column.
 */
const VMMS = (process.env.TERN_BENCH_MIGRATION_VMMS ?? 'tern,qemu').split(',');
/** N of `tern:N` (1 for plain tern) */
const connectionsOf = (vmm: string): number => Number(/^tern:(\d+)(?:[+@]|$)/.exec(vmm)?.[1] ?? 1);
/** TERN_BENCH_MIGRATION_PROFILE=1: profile both tern processes and print where their time went. */
const PROFILE = process.env.TERN_BENCH_MIGRATION_PROFILE === '1';
/** Extra options for node in every tern process (TERN_BENCH_NODE_ARGS, space-separated): V8 flags to compare. */
const NODE_ARGS = (process.env.TERN_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
/** TERN_BENCH_MIGRATION_CASES: a comma list of case names (default all). */
const CASES = process.env.TERN_BENCH_MIGRATION_CASES?.split(',');
/** TERN_BENCH_MIGRATION_REPEAT: migrations of each case per VMM, tern's and QEMU's taking turns; the table gives medians. */
const REPEAT = Math.max(1, Number(process.env.TERN_BENCH_MIGRATION_REPEAT ?? 1) || 1);

interface Case {
  name: string;
  memMiB: number;
  fileMiB: number;
  /** tern only: memory as file descriptors over a UNIX socket */
  local?: boolean;
}

const ALL_CASES: Case[] = [
  { name: 'idle-1g', memMiB: 1024, fileMiB: 0 },
  { name: 'dirty-1g', memMiB: 1024, fileMiB: DIRTY_FILE_MIB },
  { name: 'local-512m', memMiB: 512, fileMiB: DIRTY_FILE_MIB, local: true },
  { name: 'local-2g', memMiB: 2048, fileMiB: DIRTY_FILE_MIB, local: true },
];

interface Measured {
  totalMs?: number;
  downtimeMs?: number;
  bytes?: number;
  rounds?: number;
  /** largest interval between 100 ms counter lines reaching the host, around the migration */
  hostGapMs: number;
  /** the TICKs around the host's largest gap (guestSide), and its host times (Date.now()) */
  hostGapAt?: string;
  hostGapWindow?: { fromMs: number; toMs: number };
  /** largest interval the guest's 10 ms ticker saw around the migration */
  guestGapMs: number;
  /** tern: the largest auto-converge throttle its progress showed (percent of vCPU time taken) */
  throttleMaxPercent?: number;
  /** counter faults across the migration (none expected) */
  faults: string[];
  /** the guest's GAP lines from the send on, source and destination (gapLines) */
  gapLines?: string;
  error?: string;
}

/**
 * The host's transparent huge pages now (anonymous, and shared memory such as tern's memfd RAM,
 * allocated and mapped by PMD): whether a VMM's guest RAM got 2 MiB pages, which KVM can map
 * whole.
 */
function hugePagesNow(): string {
  const info = fs.readFileSync('/proc/meminfo', 'utf8');
  return ['AnonHugePages', 'ShmemHugePages', 'ShmemPmdMapped']
    .map((k) => `${k} ${Math.round(Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(info)?.[1] ?? NaN) / 1024)} MiB`)
    .join(', ');
}

/** A failure's text without the VMM's garbage-collection lines, which bury what went wrong. */
const withoutGcLines = (text: string) => text.replace(/^.*"msg":"garbage collection".*\n/gm, '');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let port = 4370;

function progressLog(prefix: string): (vm: GuestProcess) => GuestProcess {
  return (vm) => {
    let pending = '';
    vm.child.stdout.on('data', (d: Buffer) => {
      pending += d.toString('latin1').replace(/\r/g, '');
      const lines = pending.split('\n');
      pending = lines.pop()!;
      for (const l of lines) if (/^(WFILLED|TERN-GUEST|Kernel panic|rcu:|watchdog:)/.test(l)) process.stdout.write(`  [${prefix}] ${l}\n`);
    });
    return vm;
  };
}

/** Until the workload runs (its file written once) and the counters have a few seconds of history. */
async function waitRunning(vm: GuestProcess, c: Case): Promise<void> {
  // (a whole TICK line: its count is read next)
  await vm.waitFor(c.fileMiB > 0 ? /^WFILLED\r?$/m : /^TICK 1 \d+\.\d+\r?\n/m, BOOT_TIMEOUT);
  const ticks = ticksIn(vm.output);
  await vm.waitFor(new RegExp(`^TICK ${ticks[ticks.length - 1].count + 30} `, 'm'), BOOT_TIMEOUT);
}

/** Wait for 3 s of counter lines at the destination; the guest side of the measurement. */
async function guestSide(
  src: GuestProcess,
  dst: GuestProcess,
  srcFrom: number,
  arrivals: Map<number, number>,
  from: number,
  to: number,
): Promise<Pick<Measured, 'hostGapMs' | 'hostGapAt' | 'hostGapWindow' | 'guestGapMs' | 'faults' | 'gapLines'>> {
  const before = ticksIn(src.output);
  const last = before[before.length - 1]?.count ?? 0;
  await dst.waitFor(new RegExp(`^TICK ${last + 30} `, 'm'), 120_000);
  const whole = src.output + dst.output;
  // GAP lines printed from the send on, up to the third one after the cut.
  const gaps = [...gapsIn(src.output.slice(srcFrom)), ...gapsIn(dst.output).slice(0, 3)];
  const hostGap = largestArrivalGap(arrivals, from, to + 2000);
  // Where the host's gap lies: which VMM printed the TICKs around it, and when (ms from the
  // destination's reply, the guest running there), so that a late console shows as such.
  const side = (count: number) => (count <= last ? 'source' : 'destination');
  const at = (e: { count: number; at: number }) => `TICK ${e.count} from the ${side(e.count)} at ${e.at - to} ms`;
  return {
    hostGapMs: hostGap?.ms ?? 0,
    ...(hostGap && { hostGapAt: `${at(hostGap.before)}, ${at(hostGap.after)}`, hostGapWindow: { fromMs: hostGap.before.at, toMs: hostGap.after.at } }),
    guestGapMs: gaps.length ? Math.max(...gaps) : NaN,
    faults: counterFaults(ticksIn(whole)),
    gapLines: `source ${gapLines(src.output.slice(srcFrom))} | destination ${gapLines(dst.output, 3)}`,
  };
}

/**
 * The guest's GAP lines as "ms@uptime": which second of the migration the largest interval fell
 * in (while the rounds ran at the source, or across the pause, the destination's first).
 */
function gapLines(text: string, max = Infinity): string {
  return [...text.matchAll(/^GAP (\d+) (\d+\.\d+)\r?$/gm)].slice(0, max).map((m) => `${m[1]}@${m[2]}`).join(' ') || '-';
}

/** The fields of the JSON log lines of `log` whose msg is `msg`. */
function logLines(log: string, msg: RegExp): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const line of log.split('\n')) {
    if (!msg.test(line)) continue;
    try {
      out.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      /* a line cut short */
    }
  }
  return out;
}

/** A VMM's "migration: pause steps" line: its steps, and the pause on the monotonic clock and in epoch ms. */
function pauseStepsOf(
  log: string,
): { steps: { step: string; ms: number }[]; fromUs: number; toUs: number; fromMs: number; vcpus?: Record<string, number>; lastPages?: number; lastSendingMs?: number } | undefined {
  const l = logLines(log, /"msg":"migration: pause steps"/).pop();
  if (!l || !Array.isArray(l.steps)) return undefined;
  const fromUs = Number(l.from_us);
  const toUs = Number(l.to_us);
  // (the line is written when the pause is over: its time is the pause's end)
  return {
    steps: l.steps as { step: string; ms: number }[],
    fromUs,
    toUs,
    fromMs: Number(l.time) - (toUs - fromUs) / 1000,
    vcpus: l.vcpus as Record<string, number> | undefined,
    lastPages: l.last_pages as number | undefined,
    lastSendingMs: l.last_sending_ms as number | undefined,
  };
}

/**
 * The pause on the monotonic clock, as a VMM logged it: the source's from the moment it paused
 * the guest, the destination's from the final state's arrival, each to its last step.
 */
function pauseWindow(log: string): { fromUs: number; toUs: number } | undefined {
  const p = pauseStepsOf(log);
  return p && p.fromUs < p.toUs ? { fromUs: p.fromUs, toUs: p.toUs } : undefined;
}

/**
 * A VMM's garbage collections of 10 ms or more in the 5 s after its pause ended ("ms at +N"):
 * the JavaScript thread serves the guest's console, so a long one is a stall the guest sees.
 */
function gcAfterPause(log: string): string {
  const p = pauseStepsOf(log);
  if (!p) return '-';
  const end = p.fromMs + (p.toUs - p.fromUs) / 1000;
  const gcs = logLines(log, /"msg":"garbage collection"/)
    .map((g) => ({ at: Number(g.time) - end, ms: Number(g.gc_ms) }))
    .filter((g) => g.at >= 0 && g.at <= 5000 && g.ms >= 10);
  return gcs.map((g) => `${g.ms} ms at +${Math.round(g.at)}`).join(', ') || 'none';
}

/** A VMM's log lines written within [fromMs, toMs] (host time): "msg @ms after fromMs", at most 40. */
function logsBetween(log: string, fromMs: number, toMs: number): string {
  const out: string[] = [];
  for (const l of logLines(log, /"msg":/)) {
    const t = Number(l.time);
    if (t >= fromMs && t <= toMs && out.length < 40) out.push(`${String(l.msg).slice(0, 60)} @${Math.round(t - fromMs)}`);
  }
  return out.join(', ') || 'nothing';
}

/** A VMM's per-round debug lines (`msg`), their fields only. */
function roundLines(log: string, msg: string): string {
  const lines = logLines(log, new RegExp(`"msg":"${msg}"`)).map(({ level: _l, time: _t, pid: _p, name: _n, msg: _m, ...fields }) => JSON.stringify(fields));
  return lines.join(' ') || '-';
}

/**
 * The steps of the pause as a VMM's debug log times them ("paused 0 ms, last pages sent 12 ms,
 * ..."), with the garbage collections that fell inside it.
 */
function pauseSteps(log: string): string {
  const p = pauseStepsOf(log);
  if (!p) return '-';
  const out: string[] = [];
  if (p.vcpus) {
    const { parked_ms, saved_ms, read_ms, encode_ms, dispatch_ms } = p.vcpus;
    out.push(`[vCPUs parked ${parked_ms}, saved ${saved_ms} (read ${read_ms}, encode ${encode_ms}, dispatch ${dispatch_ms})]`);
  }
  const gcs = logLines(log, /"msg":"garbage collection"/).map((g) => ({ at: Number(g.time) - p.fromMs, ms: Number(g.gc_ms) }));
  const end = (p.toUs - p.fromUs) / 1000;
  let g = 0;
  for (const s of p.steps) {
    for (; g < gcs.length && gcs[g].at <= s.ms; g++) if (gcs[g].at >= 0) out.push(`[gc ${gcs[g].ms} ms at ${Math.round(gcs[g].at)}]`);
    out.push(`${s.step} ${s.ms} ms${s.step === 'last pages sent' && p.lastPages !== undefined ? ` (${p.lastPages} pages, ${p.lastSendingMs} ms of it sending)` : ''}`);
  }
  for (; g < gcs.length && gcs[g].at <= end + 1; g++) if (gcs[g].at >= 0) out.push(`[gc ${gcs[g].ms} ms at ${Math.round(gcs[g].at)}]`);
  return out.join(', ');
}

async function benchTern(work: string, c: Case, connections: number, env: Record<string, string>, cli?: string): Promise<Measured> {
  const arrivals = new Map<number, number>();
  let silentBeforePause: { fromUs: number; toUs: number; what: string } | undefined;
  const profiles = (label: string) => path.join(work, `profile-${label}`);
  const tern = (label: string, args: string[]) => {
    const nodeArgs = [...NODE_ARGS, ...(PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${profiles(label)}`] : [])];
    const vm = progressLog(`tern ${c.name} ${label}`)(GuestProcess.tern(args, nodeArgs, env, cli));
    return vm;
  };
  const srcSock = path.join(work, 'src.sock');
  const dstSock = path.join(work, 'dst.sock');
  const srcMon = path.join(work, 'src.events');
  const dstMon = path.join(work, 'dst.events');
  const src = tern('source', [
    '--kernel', fixture('bzImage'), '--initramfs', fixture('initramfs.img'), '--cmdline', workloadCmdline(c.fileMiB),
    '--cpus', `boot=${CPUS}`, '--memory', `size=${c.memMiB}M${c.local ? ',shared=on' : ''}`, '--serial', 'tty', '--console', 'off',
    '--api-socket', `path=${srcSock}`, '--event-monitor', `path=${srcMon}`, '-vv',
  ]);
  recordTickArrivals(src, arrivals);
  let dst: GuestProcess | undefined;
  try {
    await waitRunning(src, c);
    await waitForPath(srcSock);
    dst = tern('destination', ['--api-socket', `path=${dstSock}`, '--event-monitor', `path=${dstMon}`, '-vv']);
    recordTickArrivals(dst, arrivals, () => src.output);
    await waitForPath(dstSock, 60_000);
    const url = c.local ? `unix:${path.join(work, 'migration.sock')}` : `tcp:127.0.0.1:${port++}`;
    const srcFrom = src.output.length;
    const o = await migrate({ vm: src, socket: srcSock, monitor: srcMon }, { vm: dst, socket: dstSock, monitor: dstMon }, { receiverUrl: url, destinationUrl: url, local: c.local, timeoutMs: MIGRATION_TIMEOUT, ...(connections > 1 && !c.local && { connections }) });
    if (o.sendStatus !== 204 || o.receiveStatus !== 204) {
      return { hostGapMs: NaN, guestGapMs: NaN, faults: [], error: `send ${o.sendStatus} ${o.sendBody.trim()}; receive ${o.receiveStatus} ${o.receiveBody.trim()}` };
    }
    const started = o.sourceEvents.find((e) => e.event === 'migration-started');
    const finished = o.sourceEvents.find((e) => e.event === 'migration-finished');
    const side = await guestSide(src, dst, srcFrom, arrivals, o.sentAt, o.receivedAt);
    const srcPause = pauseStepsOf(src.stderr);
    if (side.hostGapWindow && srcPause && side.hostGapWindow.fromMs < srcPause.fromMs) {
      // The source's console fell silent before its pause (its JavaScript thread serves the
      // guest's port exits): what the source logged from its last TICK to its pause.
      const from = side.hostGapWindow.fromMs;
      const to = Math.min(srcPause.fromMs, side.hostGapWindow.toMs);
      process.stdout.write(`  tern ${c.name} the source's log from its last TICK before the host's gap to its pause ${Math.round(srcPause.fromMs - from)} ms later (ms after that TICK): ${logsBetween(src.stderr, from, to)}\n`);
      silentBeforePause = { fromUs: srcPause.fromUs - (srcPause.fromMs - from) * 1000, toUs: srcPause.fromUs - (srcPause.fromMs - to) * 1000, what: 'from the last TICK before the host\'s gap to the pause' };
    }
    process.stdout.write(`  tern ${c.name} huge pages with the guest running at the destination: ${hugePagesNow()}\n`);
    process.stdout.write(`  tern ${c.name} pause, source: ${pauseSteps(src.stderr)}\n  tern ${c.name} pause, destination: ${pauseSteps(dst.stderr)}\n`);
    process.stdout.write(`  tern ${c.name} garbage collections in the 5 s after the pause, destination: ${gcAfterPause(dst.stderr)}\n`);
    const setUp = logLines(dst.stderr, /"msg":"migration: receive set up"/)[0];
    if (setUp && Array.isArray(setUp.steps)) process.stdout.write(`  tern ${c.name} destination set-up before the rounds (ms from Hello): ${(setUp.steps as { step: string; ms: number }[]).map((s) => `${s.step} ${s.ms}`).join(', ')}\n`);
    const rehearsed = logLines(src.stderr, /"msg":"migration: pause rehearsed"/)[0];
    process.stdout.write(`  tern ${c.name} the source's rehearsal of its pause, just before it: ${rehearsed ? `${String(rehearsed.ms)} ms` : '-'}\n`);
    const caughtUp = logLines(src.stderr, /"msg":"migration: destination caught up"/)[0];
    process.stdout.write(`  tern ${c.name} the source's wait for the destination to apply every round, before its pause: ${caughtUp ? `${String(caughtUp.ms)} ms` : '-'}\n`);
    process.stdout.write(`  tern ${c.name} rounds, source: ${roundLines(src.stderr, 'migration: pages sent')}\n  tern ${c.name} dirty after each round, source: ${roundLines(src.stderr, 'migration: dirty after the round')}\n  tern ${c.name} rounds, destination: ${roundLines(dst.stderr, 'migration: round received')}\n`);
    if (started) {
      const t0 = monitorSeconds(started);
      const timeline = o.sourceEvents.map((e) => `${e.event.replace('migration-', '')} ${((monitorSeconds(e) - t0) * 1000).toFixed(0)}`).join(', ');
      process.stdout.write(`  tern ${c.name} source events (ms from start): ${timeline}\n`);
    }
    return {
      totalMs: reported(o, 'total_ms') ?? (started && finished ? (monitorSeconds(finished) - monitorSeconds(started)) * 1000 : undefined),
      downtimeMs: reported(o, 'downtime_ms', 'downtime'),
      bytes: (o.destinationProgress?.bytes_transferred as number | undefined) ?? reported(o, 'bytes_transferred'),
      rounds: o.sourceEvents.filter((e) => e.event === 'migration-memory-iteration').length,
      throttleMaxPercent: Math.max(0, ...o.progress.map((p) => Number(p.throttle_percent) || 0)),
      ...side,
      ...(o.sourceExit?.code !== 0 && { error: `the source VMM did not exit cleanly: ${JSON.stringify(o.sourceExit)}` }),
    };
  } finally {
    // What went wrong in either VMM, if anything: its warnings and errors, and guest resets.
    for (const [label, vm] of [['source', src], ['destination', dst]] as const) {
      const notable = (vm?.stderr ?? '').split('\n').filter((l) => /"level":(4|5|6)\d|"msg":"guest reset/.test(l));
      if (notable.length) process.stdout.write(`  tern ${c.name} ${label} warnings:\n${notable.slice(0, 20).map((l) => `    ${l.slice(0, 400)}`).join('\n')}\n`);
    }
    for (const vm of [src, dst]) {
      // SIGTERM first, so that Node writes its profile on the way out
      if (PROFILE && vm && vm.child.exitCode === null) {
        vm.child.kill('SIGTERM');
        await Promise.race([vm.exited, sleep(30_000)]);
      }
      vm?.kill();
      await vm?.exited;
    }
    if (PROFILE) {
      for (const [label, vm] of [['source', src], ['destination', dst]] as const) {
        process.stdout.write(profileSummary(`tern ${c.name} ${label}`, profiles(label)));
        const window = pauseWindow(vm?.stderr ?? '');
        if (window) process.stdout.write(profileSummary(`tern ${c.name} ${label}`, profiles(label), window));
        // (a source console silent before the pause: what the source's JavaScript thread ran then)
        if (silentBeforePause && label === 'source') process.stdout.write(profileSummary(`tern ${c.name} ${label}`, profiles(label), silentBeforePause));
        // (a guest that stalls after it resumed: whether the destination's JavaScript thread was busy then)
        if (window && label === 'destination') {
          process.stdout.write(profileSummary(`tern ${c.name} ${label}`, profiles(label), { fromUs: window.toUs, toUs: window.toUs + 2e6, what: 'in the 2 s after the pause' }));
        }
      }
    }
  }
}

async function benchQemu(work: string, c: Case): Promise<Measured> {
  const arrivals = new Map<number, number>();
  const base = microvmCommand({ kernel: fixture('bzImage'), initrd: fixture('initramfs.img'), cmdline: workloadCmdline(c.fileMiB), cpus: CPUS, memMiB: c.memMiB });
  const srcQmp = path.join(work, 'src.qmp');
  const dstQmp = path.join(work, 'dst.qmp');
  const src = progressLog(`qemu ${c.name} source`)(new GuestProcess(base.file, [...base.args, '-qmp', `unix:${srcQmp},server=on,wait=off`]));
  recordTickArrivals(src, arrivals);
  let dst: GuestProcess | undefined;
  const url = `tcp:127.0.0.1:${port++}`;
  try {
    await waitRunning(src, c);
    dst = progressLog(`qemu ${c.name} destination`)(new GuestProcess(base.file, [...base.args, '-incoming', url, '-qmp', `unix:${dstQmp},server=on,wait=off`]));
    recordTickArrivals(dst, arrivals, () => src.output);
    const dq = await QmpClient.connect(dstQmp);
    dq.close(); // listening once QMP answers
    const srcFrom = src.output.length;
    const sentAt = Date.now();
    const info = await qemuMigrate(srcQmp, url, { downtimeLimitMs: DOWNTIME_LIMIT_MS, maxBandwidth: QEMU_MAX_BANDWIDTH, timeoutMs: MIGRATION_TIMEOUT, pollMs: 50 });
    const doneAt = Date.now();
    const side = await guestSide(src, dst, srcFrom, arrivals, sentAt, doneAt);
    process.stdout.write(`  qemu ${c.name} huge pages with the guest running at the destination: ${hugePagesNow()}\n`);
    return {
      // (a completed QEMU migration now and then reports 0 for both: no figure, not a zero one)
      totalMs: info['total-time'] || undefined,
      downtimeMs: info['total-time'] ? info.downtime : undefined,
      bytes: info.ram?.transferred,
      rounds: info.ram?.['dirty-sync-count'],
      ...side,
    };
  } finally {
    for (const vm of [src, dst]) {
      vm?.kill();
      await vm?.exited;
    }
  }
}

const fmtMs = (v?: number) => (v === undefined || Number.isNaN(v) ? '-' : v >= 10_000 ? `${(v / 1000).toFixed(1)} s` : `${v.toFixed(0)} ms`);
const fmtMiB = (v?: number) => (v === undefined ? '-' : `${(v / MIB).toFixed(0)} MiB`);
const fmtN = (v?: number) => (v === undefined ? '-' : String(v));
const ratio = (a?: number, b?: number) => (a === undefined || b === undefined || !b || Number.isNaN(a) || Number.isNaN(b) ? '' : (a / b).toFixed(2));

/** The median of the runs that did not fail; undefined when none has the value. */
function median(runs: Measured[], f: (m: Measured) => number | undefined): number | undefined {
  const v = runs.filter((m) => !m.error).map(f).filter((x): x is number => x !== undefined && !Number.isNaN(x)).sort((a, b) => a - b);
  if (!v.length) return undefined;
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
}

const columnName = (vmm: string): string =>
  vmm === 'qemu'
    ? 'QEMU'
    : [
        connectionsOf(vmm) > 1 ? `tern, ${connectionsOf(vmm)} connections` : 'tern',
        ...(columnCli(vmm) ? [`build ${columnCli(vmm)}`] : []),
        ...Object.entries(columnEnv(vmm)).map(([k, v]) => `${k}=${v}`),
      ].join(', ');

function table(results: CaseResults[]): string {
  const terns = VMMS.filter((v) => v !== 'qemu');
  const ratios = VMMS.includes('qemu') ? terns.map((v) => `${columnName(v)}/QEMU`) : [];
  const head = [...terns.map(columnName), ...(VMMS.includes('qemu') ? ['QEMU'] : []), ...ratios];
  const rows = [`| metric | guest | ${head.join(' | ')} |`, `|---|---|${head.map(() => '---|').join('')}`];
  for (const { c, runs } of results) {
    const g = `${c.name} (${c.memMiB} MiB${c.fileMiB ? `, ${c.fileMiB} MiB rewritten` : ', idle'}${c.local ? ', tern local fds' : ''})`;
    const cell = (rs: Measured[], v: number | undefined, fmt: (v?: number) => string) => (!rs.length ? 'n/a' : rs.every((m) => m.error) ? 'failed' : fmt(v));
    const row = (metric: string, f: (m: Measured) => number | undefined, fmt: (v?: number) => string) => {
      const q = runs.get('qemu') ?? [];
      const b = median(q, f);
      const cells = terns.map((v) => cell(runs.get(v) ?? [], median(runs.get(v) ?? [], f), fmt));
      const qcell = VMMS.includes('qemu') ? [c.local ? 'n/a' : cell(q, b, fmt)] : [];
      const rs = VMMS.includes('qemu') ? terns.map((v) => ratio(median(runs.get(v) ?? [], f), b)) : [];
      rows.push(`| ${metric} | ${g} | ${[...cells, ...qcell, ...rs].join(' | ')} |`);
    };
    row('total time (VMM-reported)', (m) => m.totalMs, fmtMs);
    row('downtime (VMM-reported)', (m) => m.downtimeMs, fmtMs);
    row('largest gap between 100 ms counter lines at the host', (m) => m.hostGapMs, fmtMs);
    row('largest interval seen by the guest\'s 10 ms ticker', (m) => m.guestGapMs, fmtMs);
    row('bytes sent (QEMU: RAM)', (m) => m.bytes, fmtMiB);
    row('memory rounds (QEMU: dirty syncs)', (m) => m.rounds, fmtN);
    row('largest auto-converge throttle (tern, % of vCPU time)', (m) => m.throttleMaxPercent, fmtN);
  }
  return rows.join('\n');
}

interface CaseResults {
  c: Case;
  /** by VMMS entry */
  runs: Map<string, Measured[]>;
}

async function main(): Promise<void> {
  const cases = ALL_CASES.filter((c) => !CASES || CASES.includes(c.name));
  const results: CaseResults[] = [];
  let failed = false;
  for (const c of cases) {
    const r: CaseResults = { c, runs: new Map() };
    for (let run = 1; run <= REPEAT; run++) {
      for (const vmm of VMMS) {
        if (vmm === 'qemu' && c.local) continue;
        if (c.local && connectionsOf(vmm) > 1) continue;
        // (a column may name a build's directory: only its first word goes into the path)
        const work = fs.mkdtempSync(path.join(os.tmpdir(), `tern-migbench-${columnVmm(vmm)}-`));
        process.stdout.write(`migration bench: ${c.name} under ${vmm}${REPEAT > 1 ? `, run ${run} of ${REPEAT}` : ''}\n`);
        let m: Measured;
        try {
          m = vmm === 'qemu' ? await benchQemu(work, c) : await benchTern(work, c, connectionsOf(vmm), columnEnv(vmm), columnCli(vmm));
        } catch (e) {
          m = { hostGapMs: NaN, guestGapMs: NaN, faults: [], error: withoutGcLines((e as Error).message).slice(-6000) };
        } finally {
          fs.rmSync(work, { recursive: true, force: true });
        }
        r.runs.set(vmm, [...(r.runs.get(vmm) ?? []), m]);
        if (m.error) failed = true;
        if (m.faults.length) failed = true;
        process.stdout.write(`  ${vmm} ${c.name}: ${m.error ? `FAILED: ${m.error}` : JSON.stringify(m)}\n`);
      }
    }
    results.push(r);
  }
  process.stdout.write(`\nMIGRATION-BENCH-TABLE (${REPEAT > 1 ? `median of ${REPEAT} migrations each` : 'one migration each'})\n${table(results)}\n`);
  process.stdout.write(
    `guest: Debian bzImage, ${CPUS} vCPUs, busybox initramfs, scripts/guest/migration-workload; tern and QEMU microvm over TCP on the lab's loopback; ` +
      `QEMU set to tern's default downtime limit (downtime-limit ${DOWNTIME_LIMIT_MS} ms) and to max-bandwidth ${QEMU_MAX_BANDWIDTH / MIB / 1024} GiB/s (its default limits the link)\n`,
  );
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  process.stderr.write(`migration bench: ${(e as Error).stack}\n`);
  process.exit(1);
});
