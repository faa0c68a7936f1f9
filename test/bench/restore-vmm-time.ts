// Tern's own restore time on this host's real CPU (the lab's emulated CPU inflates every
// VMM-side millisecond): a tiny-kernel VM of each size is snapshotted, then restored N times
// in copy and ondemand mode; the time is the event monitor's restoring -> restored. Ondemand
// maps the memory file, so its cost must not grow with RAM size.
// Run with `node dist/test/bench/restore-vmm-time.js` on any host whose /dev/kvm runs the
// tiny kernel.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startTern, startTinyVm } from '../host/tiny-kernel';
import { monitorSpanMs } from '../support/monitor-file';
import { ternRemote, waitForPath } from '../support/processes';
import { median } from './median';

const SIZES_MIB = (process.env.TERN_BENCH_SNAPSHOT_SIZES ?? '512,2048').split(',').map(Number);
const RUNS = Number(process.env.TERN_BENCH_RESTORES ?? 5);
const T = 60_000;

async function main(): Promise<void> {
  const rows = ['| guest RAM | copy (median) | ondemand (median) |', '|---|---|---|'];
  for (const memMiB of SIZES_MIB) {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-restore-time-'));
    try {
      const socket = path.join(work, 'api.sock');
      const vm = await startTinyVm(['--api-socket', `path=${socket}`, '--memory', `size=${memMiB}M`]);
      const snap = path.join(work, 'snap');
      try {
        await vm.waitFor(/^COUNT 3\n/m, T);
        await waitForPath(socket);
        await ternRemote(socket, 'pause');
        await ternRemote(socket, 'snapshot', `file://${snap}`);
      } finally {
        vm.kill();
        await vm.exited;
      }
      const times: Record<'copy' | 'ondemand', number[]> = { copy: [], ondemand: [] };
      for (let i = 0; i < RUNS; i++) {
        for (const mode of ['copy', 'ondemand'] as const) {
          const monitor = path.join(work, `${mode}-${i}.events`);
          const r = await startTern(['--restore', `source_url=file://${snap},resume=on,memory_restore_mode=${mode}`, '--serial', 'tty', '--console', 'off', '--event-monitor', `path=${monitor}`]);
          try {
            await r.waitFor(/^COUNT \d+\n/m, T);
          } finally {
            r.kill();
            await r.exited;
          }
          times[mode].push(monitorSpanMs(monitor, 'restoring', 'restored'));
        }
      }
      process.stdout.write(`${memMiB} MiB: copy ${times.copy.map((x) => x.toFixed(1)).join(', ')} ms; ondemand ${times.ondemand.map((x) => x.toFixed(1)).join(', ')} ms\n`);
      rows.push(`| ${memMiB} MiB | ${median(times.copy).toFixed(1)} ms | ${median(times.ondemand).toFixed(1)} ms |`);
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  }
  process.stdout.write(`\nRESTORE-VMM-TIME (tiny kernel, restoring -> restored, median of ${RUNS})\n${rows.join('\n')}\n`);
}

main().catch((e) => {
  process.stderr.write(`restore time: ${(e as Error).stack}\n`);
  process.exit(1);
});
