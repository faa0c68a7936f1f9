// Lab smoke check (not an ava test): in one lab boot, boots the guest fixtures
// under QEMU microvm with KVM and reports boot timings and what the guest saw.
//   node dist/test/lab/smoke.js            run (builds fixtures as needed)
//   node dist/test/lab/smoke.js --inner    the part that runs inside the lab
//   SMOKE_ONLY=name,name                   runs only these variants
// Exit status 0 when the reference run (2 vCPUs, 512 MiB, bzImage) printed
// TERN-GUEST-USERSPACE, nproc 2 and MemTotal, and every run ended QEMU.
import { writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { ensureGuestFixtures, guestFixtures } from './fixtures';
import { runInLab, shq } from './lab';
import { commandLine, guestCmdline, microvmCommand, MicrovmOptions, PeerInput, runPeer } from './qemu-peer';

const RESULT = 'SMOKE-RESULT ';
const CMD = 'nproc; grep MemTotal /proc/meminfo';

interface Variant {
  name: string;
  opts: Omit<MicrovmOptions, 'cmdline'> & { cmd?: string; exit?: 'poweroff' | 'reboot' };
  input?: PeerInput;
}

interface VariantResult {
  name: string;
  command: string;
  userspaceMs: number;
  guestExitMs: number;
  totalMs: number;
  guestStatus: number;
  qemuExitCode: number | null;
  timedOut: boolean;
  nproc?: number;
  memTotalKiB?: number;
  extra: string[];
  stderr: string;
}

function variants(): Variant[] {
  const fx = guestFixtures();
  const disk = '/tmp/tern-smoke-disk.img';
  writeFileSync(disk, Buffer.alloc(1 << 20));
  const blk = ['-drive', `file=${disk},if=none,format=raw,id=d0`, '-device', 'virtio-blk-device,drive=d0'];
  const blkCmd = 'ls /sys/bus/virtio/devices; cat /sys/block/vda/size';
  const base = { kernel: fx.bzImage, initrd: fx.initramfs, memMiB: 512 };
  return [
    { name: 'bzImage-2cpu', opts: { ...base, cpus: 2, cmd: CMD } },
    { name: 'bzImage-1cpu', opts: { ...base, cpus: 1, cmd: CMD } },
    { name: 'vmlinux-pvh-2cpu', opts: { ...base, kernel: fx.vmlinux, cpus: 2, cmd: CMD } },
    { name: 'vmlinux-pvh-1cpu', opts: { ...base, kernel: fx.vmlinux, cpus: 1, cmd: CMD } },
    // No tern.cmd: the interactive shell on ttyS0; its exit status ends the VM.
    {
      name: 'interactive-shell-1cpu',
      opts: { ...base, cpus: 1 },
      input: { after: 'tern# ', text: 'echo shell-says-$((6*7)); tty; exit 3\n' },
    },
    // Without ACPI, poweroff only halts (QEMU keeps running): /init must reboot.
    { name: 'acpi-off-reboot-1cpu', opts: { ...base, cpus: 1, machineOptions: ['acpi=off'], exit: 'reboot', cmd: CMD } },
    { name: 'virtio-blk-legacy-mmio', opts: { ...base, cpus: 1, extraArgs: blk, cmd: blkCmd } },
    {
      name: 'virtio-blk-modern-mmio',
      opts: { ...base, cpus: 1, extraArgs: [...blk, '-global', 'virtio-mmio.force-legacy=false'], cmd: blkCmd },
    },
    // This kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES: without ACPI the device is not found.
    {
      name: 'virtio-blk-acpi-off',
      opts: { ...base, cpus: 1, machineOptions: ['acpi=off'], exit: 'reboot', extraArgs: blk, cmd: blkCmd },
    },
  ];
}

async function inner(): Promise<void> {
  console.log(`inner: node up ${Math.round(process.uptime() * 1000)} ms; kernel ${execFileSync('uname', ['-r']).toString().trim()}`);
  const only = process.env.SMOKE_ONLY?.split(',');
  for (const v of variants().filter((x) => !only || only.includes(x.name))) {
    const { cmd, exit, ...rest } = v.opts;
    const c = microvmCommand({ ...rest, cmdline: guestCmdline({ cmd, exit }) });
    console.log(`--- ${v.name}: ${commandLine(c)}`);
    let pending = '';
    const r = await runPeer(c, 150_000, (text) => {
      // Live, line by line, so a stuck boot shows how far it got.
      pending += text;
      const lines = pending.split('\n');
      pending = lines.pop()!;
      for (const l of lines) console.log(`  | ${l}`);
    }, v.input);
    if (pending) console.log(`  | ${pending}`);
    const out = r.output.slice(Math.max(0, r.output.indexOf('TERN-GUEST-USERSPACE')));
    const after = out.split('\n').slice(1);
    const res: VariantResult = {
      name: v.name,
      command: commandLine(c),
      userspaceMs: Math.round(r.userspaceMs),
      guestExitMs: Math.round(r.guestExitMs),
      totalMs: Math.round(r.totalMs),
      guestStatus: r.guestStatus,
      qemuExitCode: r.qemuExitCode,
      timedOut: r.timedOut,
      nproc: (() => {
        const l = after.find((x) => /^\d+$/.test(x.trim()));
        return l === undefined ? undefined : Number(l);
      })(),
      memTotalKiB: (() => {
        const m = /MemTotal:\s+(\d+) kB/.exec(out);
        return m ? Number(m[1]) : undefined;
      })(),
      extra: after.filter((l) => /virtio|^\d+$|failed/.test(l)).slice(0, 8),
      stderr: r.stderr.slice(-500),
    };
    console.log(RESULT + JSON.stringify(res));
  }
}

async function outer(): Promise<number> {
  const fx = await ensureGuestFixtures();
  const verbose = process.argv.includes('--verbose');
  console.log(`fixtures: ${fx.dir}`);
  const r = await runInLab({
    script: `exec node ${shq(__filename)} --inner`,
    env: process.env.SMOKE_ONLY ? { SMOKE_ONLY: process.env.SMOKE_ONLY } : undefined,
    timeoutMs: 20 * 60_000,
    onOutput: verbose ? (s) => process.stdout.write(s) : undefined,
  });
  if (!verbose) process.stdout.write(r.output);
  const results: VariantResult[] = r.output
    .split('\n')
    .filter((l) => l.startsWith(RESULT))
    .map((l) => JSON.parse(l.slice(RESULT.length)));

  console.log(
    `\n=== lab (${r.mode}): waited ${r.queuedMs} ms for the lab lock; script started ${r.bootMs} ms after QEMU start; ` +
      `whole run ${r.durationMs} ms; exit ${r.exitCode}`,
  );
  for (const x of results) {
    console.log(
      `${x.name.padEnd(24)} userspace ${String(x.userspaceMs).padStart(6)} ms  guest-exit ${String(x.guestExitMs).padStart(6)} ms  ` +
        `qemu-exit ${String(x.totalMs).padStart(6)} ms (code ${x.qemuExitCode}${x.timedOut ? ', TIMED OUT' : ''})  ` +
        `nproc ${x.nproc ?? '-'}  MemTotal ${x.memTotalKiB ?? '-'} kB  status ${x.guestStatus}`,
    );
  }
  // The reference run must show all it should; every run must end QEMU by itself.
  const ref = results.find((x) => x.name === 'bzImage-2cpu');
  const refOk =
    !!ref && ref.userspaceMs >= 0 && ref.nproc === 2 && ref.memTotalKiB !== undefined && ref.guestStatus === 0;
  const ok =
    r.exitCode === 0 && results.length > 0 && (refOk || (!ref && !!process.env.SMOKE_ONLY)) &&
    results.every((x) => x.userspaceMs >= 0 && x.qemuExitCode === 0 && !x.timedOut);
  console.log(ok ? 'SMOKE OK' : 'SMOKE FAILED');
  return ok ? 0 : 1;
}

if (require.main === module) {
  (process.argv.includes('--inner') ? inner().then(() => 0) : outer()).then(
    (code) => process.exit(code),
    (e) => {
      console.error(e);
      process.exit(1);
    },
  );
}
