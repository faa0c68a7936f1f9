// Boot benchmark, run where /dev/kvm can boot Linux (inside the lab): the same kernel and
// initramfs under tern and under QEMU microvm, alternating, N runs each. Reports medians of
// process start -> first guest userspace output, and VMM memory apart from guest RAM.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { guestCmdline, microvmCommand, GUEST_USERSPACE_MARKER } from '../lab/qemu-peer';
import { vmmOverheadKiB } from './process-memory';
import { median } from './median';

const FIXTURES = process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures';
const TERN = path.resolve(__dirname, '..', '..', 'bin', 'tern.js');
const RUNS = Number(process.env.TERN_BENCH_RUNS ?? 5);
const MEM_MIB = 512;
const CPUS = 1;

interface Sample {
  bootMs: number;
  overheadKiB: number;
}

function measure(file: string, args: string[]): Promise<Sample> {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    let done = false;
    const timer = setTimeout(() => finish(new Error(`${path.basename(file)} did not reach userspace in time`)), 300_000);
    const finish = (err: Error | null, s?: Sample) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      if (err) reject(err);
      else resolve(s!);
    };
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString('latin1');
      if (out.includes(GUEST_USERSPACE_MARKER)) {
        const bootMs = Number(process.hrtime.bigint() - start) / 1e6;
        try {
          const { overheadKiB } = vmmOverheadKiB(child.pid!, MEM_MIB * 1024);
          finish(null, { bootMs, overheadKiB });
        } catch (e) {
          finish(e as Error);
        }
      }
    });
    child.on('exit', (code) => finish(new Error(`${path.basename(file)} exited (${code}) before userspace:\n${out.slice(-2000)}`)));
  });
}

async function main(): Promise<void> {
  const kernel = path.join(FIXTURES, 'bzImage');
  const initrd = path.join(FIXTURES, 'initramfs.img');
  const cmdline = guestCmdline({ cmd: 'true' });
  const qemu = microvmCommand({ kernel, initrd, cmdline, cpus: CPUS, memMiB: MEM_MIB });
  const tern = [TERN, '--kernel', kernel, '--initramfs', initrd, '--cmdline', cmdline,
    '--cpus', `boot=${CPUS}`, '--memory', `size=${MEM_MIB}M`, '--serial', 'tty', '--console', 'off'];
  const results: Record<'tern' | 'qemu', Sample[]> = { tern: [], qemu: [] };
  for (let i = 0; i < RUNS; i++) {
    // Alternate so drift in the emulated machine hits both sides alike.
    results.qemu.push(await measure(qemu.file, qemu.args));
    results.tern.push(await measure(process.execPath, tern));
    process.stdout.write(`run ${i + 1}/${RUNS}: tern ${results.tern[i].bootMs.toFixed(0)} ms, qemu ${results.qemu[i].bootMs.toFixed(0)} ms\n`);
  }
  const t = { boot: median(results.tern.map((s) => s.bootMs)), mem: median(results.tern.map((s) => s.overheadKiB)) };
  const q = { boot: median(results.qemu.map((s) => s.bootMs)), mem: median(results.qemu.map((s) => s.overheadKiB)) };
  const rows = [
    '| metric (median of ' + RUNS + ') | tern | QEMU microvm | tern/QEMU |',
    '|---|---|---|---|',
    `| process start to first guest userspace output | ${(t.boot / 1000).toFixed(2)} s | ${(q.boot / 1000).toFixed(2)} s | ${(t.boot / q.boot).toFixed(2)} |`,
    `| VMM resident memory apart from guest RAM | ${(t.mem / 1024).toFixed(1)} MiB | ${(q.mem / 1024).toFixed(1)} MiB | ${(t.mem / q.mem).toFixed(2)} |`,
  ];
  process.stdout.write(`\nBOOT-BENCH-TABLE\n${rows.join('\n')}\n`);
  process.stdout.write(`guest: Debian bzImage, ${CPUS} vCPU, ${MEM_MIB} MiB, busybox initramfs, cmdline: ${cmdline}\n`);
}

main().catch((e) => {
  process.stderr.write(`boot bench: ${(e as Error).stack}\n`);
  process.exit(1);
});
