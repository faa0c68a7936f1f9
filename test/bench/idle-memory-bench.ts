// `npm run bench -- idle-memory` (or `node dist/test/bench/idle-memory-bench.js` on any host
// whose /dev/kvm runs the tiny kernel): what one more idle VM costs the host. N VMMs (default
// 10) each run the tiny kernel in a 512 MiB guest, all at once; tern is started as users start
// it (`dist/bin/tern`, the launcher), QEMU 7.2 as `-M microvm` with the same
// kernel and serial port. Once all N run, each process's mappings are read from
// /proc/PID/smaps, guest RAM excluded: its unique set (pages only it maps: what one more VMM
// adds), its resident set, and the shared rest (the node or qemu executable and libraries,
// paid once however many VMMs run). TERN_BENCH_IDLE_VMMS picks the columns (default tern,qemu;
// `tern+NAME=VALUE` adds NAME=VALUE to that column's environment, vmm-columns.ts).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildTinyKernel } from '../host/tiny-kernel';
import { GuestProcess, TERN_LAUNCHER } from '../linux/guest-process';
import { median } from './median';
import { vmmMemory, type VmmMemory } from './process-memory';
import { columnEnv, columnVmm } from './vmm-columns';

const VMS = Number(process.env.TERN_BENCH_IDLE_VMS ?? 10);
const MEM_MIB = 512;
/** how long the VMMs idle, all running, before they are measured */
const SETTLE_MS = 3000;
const START_TIMEOUT_MS = 120_000;

interface Vmm {
  name: string;
  argv: (kernel: string, socket: string) => [string, ...string[]];
}

const KINDS: Vmm[] = [
  {
    name: 'tern',
    argv: (kernel, socket) => [TERN_LAUNCHER, '--kernel', kernel, '--cmdline', 'tiny', '--cpus', 'boot=1',
      '--memory', `size=${MEM_MIB}M`, '--serial', 'tty', '--console', 'off', '--api-socket', `path=${socket}`],
  },
  {
    name: 'qemu',
    argv: (kernel, socket) => ['qemu-system-x86_64', '-accel', 'kvm', '-M', 'microvm', '-smp', '1', '-m', `${MEM_MIB}M`,
      '-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio', '-kernel', kernel, '-append', 'tiny',
      '-qmp', `unix:${socket},server=on,wait=off`],
  },
];

const COLUMNS = (process.env.TERN_BENCH_IDLE_VMMS ?? 'tern,qemu').split(',').filter(Boolean);

async function measureVmm(column: string, kernel: string, work: string): Promise<VmmMemory[]> {
  const vmm = KINDS.find((k) => k.name === columnVmm(column));
  if (!vmm) throw new Error(`TERN_BENCH_IDLE_VMMS: no VMM named ${column}`);
  const vms: GuestProcess[] = [];
  try {
    for (let i = 0; i < VMS; i++) {
      const [file, ...args] = vmm.argv(kernel, path.join(work, `${vmm.name}-${i}.sock`));
      const vm = new GuestProcess(file, args, { env: columnEnv(column) });
      vms.push(vm);
      await vm.waitFor(/^COUNT 3\r?\n/m, START_TIMEOUT_MS);
    }
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    return vms.map((vm) => vmmMemory(vm.child.pid!, MEM_MIB * 1024));
  } finally {
    for (const vm of vms) vm.kill();
    await Promise.all(vms.map((vm) => vm.exited));
  }
}

const mib = (kib: number) => `${(kib / 1024).toFixed(1)} MiB`;

async function main(): Promise<void> {
  const kernel = await buildTinyKernel();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-idle-memory-'));
  const results: Record<string, VmmMemory[]> = {};
  try {
    for (const column of COLUMNS) {
      results[column] = await measureVmm(column, kernel, work);
      const m = results[column];
      process.stdout.write(`${column}: ${VMS} VMMs, unique ${m.map((x) => (x.ussKiB / 1024).toFixed(1)).join(', ')} MiB\n`);
    }
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
  const med = (name: string, f: (m: VmmMemory) => number) => median(results[name].map(f));
  // Each tern column against QEMU's, when QEMU ran.
  const terns = COLUMNS.filter((c) => columnVmm(c) === 'tern');
  const qemu = COLUMNS.find((c) => columnVmm(c) === 'qemu');
  const rows = [
    `| per VMM, guest RAM excluded (median of ${VMS} running at once) | ${COLUMNS.map((c) => (c === 'qemu' ? 'QEMU microvm' : c)).join(' | ')} |${qemu ? terns.map((c) => ` ${c}/QEMU |`).join('') : ''}`,
    `|---|${COLUMNS.map(() => '---|').join('')}${qemu ? terns.map(() => '---|').join('') : ''}`,
  ];
  const row = (label: string, f: (m: VmmMemory) => number) => {
    const cells = COLUMNS.map((c) => ` ${mib(med(c, f))} |`).join('');
    const ratios = qemu ? terns.map((c) => ` ${(med(c, f) / med(qemu, f)).toFixed(2)} |`).join('') : '';
    rows.push(`| ${label} |${cells}${ratios}`);
  };
  row('unique set (USS): what one more idle VM costs', (m) => m.ussKiB);
  row('proportional set (PSS)', (m) => m.pssKiB);
  row('resident set (RSS)', (m) => m.rssKiB);
  row('shared with other processes (RSS - USS)', (m) => m.rssKiB - m.ussKiB);
  row('of which the executable (node, qemu-system-x86_64)', (m) => m.executableRssKiB);
  process.stdout.write(`\nIDLE-MEMORY-BENCH-TABLE\n${rows.join('\n')}\n`);
  process.stdout.write(`guest: the tiny kernel (a 10 Hz counter on the serial port), 1 vCPU, ${MEM_MIB} MiB; ${VMS} VMMs of each column\n`);
}

main().catch((e) => {
  process.stderr.write(`idle-memory bench: ${(e as Error).stack}\n`);
  process.exit(1);
});
