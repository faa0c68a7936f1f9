// `npm run bench -- migration-tiny` (or `node dist/test/bench/migration-tiny-bench.js` on any
// host whose /dev/kvm runs the tiny kernel): live migration of the tiny kernel, tern against
// QEMU 7.2 in one run, where the Linux benchmark (migration-bench.ts) cannot run. Its figures
// are the pause's fixed costs on a real CPU (on a shadow-paging host, say) against the same
// costs on the lab's emulated one.
//
// Both VMMs run the same guest: the tiny kernel (a 10 Hz COUNT line on its serial port), one
// vCPU, 1 GiB of RAM, with 100 MiB of random bytes loaded as its initramfs (the RAM an idle
// Linux guest has written, about as much as the Linux benchmark's idle guest sends), over TCP
// on loopback. tern: vm.receive-migration on a tern started with only --api-socket, then
// vm.send-migration (its default downtime limit, 300 ms); QEMU: `-incoming tcp:...` and `migrate`
// over QMP with no bandwidth cap, once with the same downtime limit (300 ms, also QEMU's default)
// and once with 10 ms. QEMU stops the guest as soon as what is left fits in its limit at the
// link's speed, so at 300 ms on a fast link it spends most of it; at 10 ms its downtime is the
// fixed cost of its pause, the figure to hold tern's own against. Per migration: total time and downtime as each VMM
// reports them, bytes sent, and the largest gap between COUNT lines reaching the host from
// either side's console (the pause as an observer of the guest sees it). The runs take turns
// (TERN_BENCH_MIGRATION_TINY_RUNS each, default 5); the table gives medians. A second table has
// tern's local migration (memory shared=on, its memfds handed over a UNIX socket, nothing
// copied) at 512 MiB and 2 GiB (TERN_BENCH_MIGRATION_TINY_LOCAL_MIB): its downtime must not
// grow with RAM.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildTinyKernel } from '../host/tiny-kernel';
import { microvmCommand } from '../lab/qemu-peer';
import { GuestProcess, TERN_LAUNCHER } from '../linux/guest-process';
import { largestArrivalGapMs, recordTickArrivals } from '../linux/migration-workload';
import { waitForPath } from '../support/processes';
import { qemuMigrate } from '../support/qemu-migrate';
import { QmpClient } from '../support/qmp-client';
import { migrate, reported } from '../support/tern-migration';
import { median } from './median';

const MIB = 1024 * 1024;
const MEM_MIB = 1024;
const DATA_MIB = 100;
/** QEMU's downtime limits, a column each (TERN_BENCH_MIGRATION_TINY_QEMU_LIMITS, comma-separated ms) */
const QEMU_LIMITS = (process.env.TERN_BENCH_MIGRATION_TINY_QEMU_LIMITS ?? '300,10').split(',').map(Number).filter((n) => n > 0);
const QEMU_MAX_BANDWIDTH = 100 * 1024 * MIB;
const RUNS = Math.max(1, Number(process.env.TERN_BENCH_MIGRATION_TINY_RUNS ?? 5) || 5);
/** guest RAM sizes (MiB) of the local migrations; empty: none */
const LOCAL_MIB = (process.env.TERN_BENCH_MIGRATION_TINY_LOCAL_MIB ?? '512,2048').split(',').map(Number).filter((n) => n > 0);
const TIMEOUT_MS = 5 * 60_000;
/** the tiny kernel's counter line: one every 100 ms */
const COUNT_LINE = /^COUNT (\d+)\r?$/;

interface Measured {
  totalMs?: number;
  downtimeMs?: number;
  bytes?: number;
  /** largest interval between COUNT lines reaching the host, from the send to 2 s after the end */
  hostGapMs: number;
}

let port = 4470 + (process.pid % 500);

/** Until the guest has counted a few times after `from` (the side of the console it is on). */
async function counting(vm: GuestProcess, times = 3): Promise<void> {
  const seen = [...vm.output.matchAll(/^COUNT (\d+)\r?$/gm)].map((m) => Number(m[1]));
  const next = (seen.length ? seen[seen.length - 1] : 0) + times;
  await vm.waitFor(new RegExp(`^COUNT ${next}\\r?$`, 'm'), TIMEOUT_MS);
}

async function benchTern(work: string, kernel: string, data: string, local?: { memMiB: number }): Promise<Measured> {
  const arrivals = new Map<number, number>();
  const srcSock = path.join(work, 'src.sock');
  const dstSock = path.join(work, 'dst.sock');
  const srcMon = path.join(work, 'src.events');
  const dstMon = path.join(work, 'dst.events');
  // (as users start it: the launcher, from the startup snapshot where there is one)
  const src = new GuestProcess(TERN_LAUNCHER, [
    '--kernel', kernel, '--initramfs', data, '--cmdline', 'tiny', '--cpus', 'boot=1', '--memory', local ? `size=${local.memMiB}M,shared=on` : `size=${MEM_MIB}M`,
    '--serial', 'tty', '--console', 'off', '--api-socket', `path=${srcSock}`, '--event-monitor', `path=${srcMon}`, '-v',
  ]);
  recordTickArrivals(src, arrivals, undefined, COUNT_LINE);
  let dst: GuestProcess | undefined;
  try {
    await counting(src);
    await waitForPath(srcSock);
    dst = new GuestProcess(TERN_LAUNCHER, ['--api-socket', `path=${dstSock}`, '--event-monitor', `path=${dstMon}`, '-v']);
    recordTickArrivals(dst, arrivals, () => src.output, COUNT_LINE);
    await waitForPath(dstSock, 60_000);
    const url = local ? `unix:${path.join(work, 'migration.sock')}` : `tcp:127.0.0.1:${port++}`;
    const o = await migrate({ vm: src, socket: srcSock, monitor: srcMon }, { vm: dst, socket: dstSock, monitor: dstMon }, { receiverUrl: url, destinationUrl: url, local: !!local, timeoutMs: TIMEOUT_MS });
    if (o.sendStatus !== 204 || o.receiveStatus !== 204) throw new Error(`send ${o.sendStatus} ${o.sendBody.trim()}; receive ${o.receiveStatus} ${o.receiveBody.trim()}`);
    await counting(dst, 20);
    return {
      totalMs: reported(o, 'total_ms'),
      downtimeMs: reported(o, 'downtime_ms', 'downtime'),
      bytes: (o.destinationProgress?.bytes_transferred as number | undefined) ?? reported(o, 'bytes_transferred'),
      hostGapMs: largestArrivalGapMs(arrivals, o.sentAt, o.receivedAt + 2000),
    };
  } finally {
    for (const vm of [src, dst]) {
      vm?.kill();
      await vm?.exited;
    }
  }
}

async function benchQemu(work: string, kernel: string, data: string, downtimeLimitMs: number): Promise<Measured> {
  const arrivals = new Map<number, number>();
  const base = microvmCommand({ kernel, initrd: data, cmdline: 'tiny', memMiB: MEM_MIB });
  const qemu = (qmp: string, extra: string[] = []) => new GuestProcess(base.file, [...base.args, '-qmp', `unix:${qmp},server=on,wait=off`, ...extra]);
  const srcQmp = path.join(work, 'src.qmp');
  const dstQmp = path.join(work, 'dst.qmp');
  const url = `tcp:127.0.0.1:${port++}`;
  const src = qemu(srcQmp);
  recordTickArrivals(src, arrivals, undefined, COUNT_LINE);
  let dst: GuestProcess | undefined;
  try {
    await counting(src);
    dst = qemu(dstQmp, ['-incoming', url]);
    recordTickArrivals(dst, arrivals, () => src.output, COUNT_LINE);
    (await QmpClient.connect(dstQmp)).close(); // listening once QMP answers
    const sentAt = Date.now();
    const info = await qemuMigrate(srcQmp, url, { downtimeLimitMs, maxBandwidth: QEMU_MAX_BANDWIDTH, timeoutMs: TIMEOUT_MS, pollMs: 5 });
    const doneAt = Date.now();
    await counting(dst, 20);
    return {
      // (a completed QEMU migration now and then reports 0 for both: no figure, not a zero one)
      totalMs: info['total-time'] || undefined,
      downtimeMs: info['total-time'] ? info.downtime : undefined,
      bytes: info.ram?.transferred,
      hostGapMs: largestArrivalGapMs(arrivals, sentAt, doneAt + 2000),
    };
  } finally {
    for (const vm of [src, dst]) {
      vm?.kill();
      await vm?.exited;
    }
  }
}

const fmtMs = (v?: number) => (v === undefined ? '-' : `${v.toFixed(0)} ms`);
const fmtMiB = (v?: number) => (v === undefined ? '-' : `${(v / MIB).toFixed(0)} MiB`);

async function main(): Promise<void> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-migtiny-'));
  let failed = false;
  try {
    const kernel = await buildTinyKernel();
    const data = path.join(work, 'data.img');
    fs.writeFileSync(data, crypto.randomBytes(DATA_MIB * MIB), { mode: 0o600 });
    const columns = ['tern', ...QEMU_LIMITS.map((l) => `QEMU, limit ${l} ms`)];
    const runs = new Map<string, Measured[]>(columns.map((c) => [c, []]));
    for (let i = 1; i <= RUNS; i++) {
      for (const [k, vmm] of columns.entries()) {
        const dir = fs.mkdtempSync(path.join(work, `${k}-`));
        try {
          const m = k === 0 ? await benchTern(dir, kernel, data) : await benchQemu(dir, kernel, data, QEMU_LIMITS[k - 1]);
          runs.get(vmm)!.push(m);
          process.stdout.write(`  ${vmm} run ${i} of ${RUNS}: ${JSON.stringify(m)}\n`);
        } catch (e) {
          failed = true;
          process.stdout.write(`  ${vmm} run ${i} of ${RUNS}: FAILED: ${(e as Error).message.slice(-3000)}\n`);
        }
      }
    }
    const row = (metric: string, f: (m: Measured) => number | undefined, fmt: (v?: number) => string) => {
      const med = (ms: Measured[]) => {
        const v = ms.map(f).filter((x): x is number => x !== undefined && Number.isFinite(x));
        return v.length ? median(v) : undefined;
      };
      const all = (ms: Measured[]) => ms.map(f).filter((x) => x !== undefined).map((x) => fmt(x).replace(/ (ms|MiB)$/, '')).join(', ');
      const t = med(runs.get('tern')!);
      const cells = columns.map((c) => `${fmt(med(runs.get(c)!))} (${all(runs.get(c)!)})`);
      const ratios = columns.slice(1).map((c) => {
        const q = med(runs.get(c)!);
        return t !== undefined && q ? (t / q).toFixed(2) : '';
      });
      return `| ${metric} | ${[...cells, ...ratios].join(' | ')} |`;
    };
    const head = [...columns, ...columns.slice(1).map((c) => `tern/${c}`)];
    process.stdout.write(
      [
        '',
        `MIGRATION-TINY-BENCH-TABLE (tiny kernel, 1 vCPU, ${MEM_MIB} MiB with ${DATA_MIB} MiB of data, TCP on loopback; median of ${RUNS}, each run in brackets)`,
        `| metric | ${head.join(' | ')} |`,
        `|---|${head.map(() => '---|').join('')}`,
        row('total time (VMM-reported)', (m) => m.totalMs, fmtMs),
        row('downtime (VMM-reported)', (m) => m.downtimeMs, fmtMs),
        row('largest gap between 100 ms COUNT lines at the host', (m) => m.hostGapMs, fmtMs),
        row('bytes sent (QEMU: RAM)', (m) => m.bytes, fmtMiB),
        '',
      ].join('\n'),
    );
    if (LOCAL_MIB.length) {
      const local = new Map<number, Measured[]>(LOCAL_MIB.map((m) => [m, []]));
      for (let i = 1; i <= RUNS; i++) {
        for (const memMiB of LOCAL_MIB) {
          const dir = fs.mkdtempSync(path.join(work, `local-${memMiB}-`));
          try {
            const m = await benchTern(dir, kernel, data, { memMiB });
            local.get(memMiB)!.push(m);
            process.stdout.write(`  tern local ${memMiB} MiB run ${i} of ${RUNS}: ${JSON.stringify(m)}\n`);
          } catch (e) {
            failed = true;
            process.stdout.write(`  tern local ${memMiB} MiB run ${i} of ${RUNS}: FAILED: ${(e as Error).message.slice(-3000)}\n`);
          }
        }
      }
      const cell = (ms: Measured[], f: (m: Measured) => number | undefined) => {
        const v = ms.map(f).filter((x): x is number => x !== undefined && Number.isFinite(x));
        return v.length ? `${median(v).toFixed(0)} ms (${v.map((x) => x.toFixed(0)).join(', ')})` : '-';
      };
      const row = (metric: string, f: (m: Measured) => number | undefined) => `| ${metric} | ${LOCAL_MIB.map((m) => cell(local.get(m)!, f)).join(' | ')} |`;
      process.stdout.write(
        [
          `MIGRATION-TINY-LOCAL-TABLE (tern, local migration: memory shared=on, its memfds over a UNIX socket; tiny kernel with ${DATA_MIB} MiB of data; median of ${RUNS}, each run in brackets)`,
          `| metric | ${LOCAL_MIB.map((m) => `${m} MiB`).join(' | ')} |`,
          `|---|${LOCAL_MIB.map(() => '---|').join('')}`,
          row('total time (VMM-reported)', (m) => m.totalMs),
          row('downtime (VMM-reported)', (m) => m.downtimeMs),
          row('largest gap between 100 ms COUNT lines at the host', (m) => m.hostGapMs),
          '',
        ].join('\n'),
      );
    }
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  process.stderr.write(`migration-tiny bench: ${(e as Error).stack}\n`);
  process.exit(1);
});
