// Disk benchmark, run where /dev/kvm can boot Linux (inside the lab): the same guest reads and
// writes the same raw image through virtio-blk-pci under tern and under QEMU (aio=threads, the
// host page cache on both sides), alternating. In the guest, blkbench uses O_DIRECT so every
// request crosses the virtio queue. Reports medians and the ratio tern/QEMU (higher is better).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { guestCmdline, microvmCommand, runPeer } from '../lab/qemu-peer';
// (microvmCommand builds any machine type's command line; the peer here is q35)
import { GuestProcess } from '../linux/guest-process';
import { profileSummary } from './cpu-profile';
import { checkPeerRun, ternRunEnded } from './lab-guest-fault';
import { printRatios, sideBySide, type SideBySideResults } from './side-by-side';
import { benchTernEnv } from './vmm-columns';

const FIXTURES = process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures';
const RUNS = Number(process.env.TERN_BENCH_BLOCK_RUNS ?? process.env.TERN_BENCH_RUNS ?? 3);
const SECONDS = Number(process.env.TERN_BENCH_BLOCK_SECONDS ?? 5);
const IMAGE_MIB = 512;
const MEM_MIB = 512;
const TIMEOUT_MS = 600_000;
/** TERN_BENCH_BLOCK_PROFILE=1: each tern run writes a CPU profile, summarised after its results. */
const PROFILE = process.env.TERN_BENCH_BLOCK_PROFILE === '1';

/** What the guest runs, one blkbench line each. */
const JOBS: { name: string; args: string; metric: 'MiBps' | 'IOPS' }[] = [
  { name: 'sequential write, 1 MiB', args: `seqwrite 1048576 ${SECONDS}`, metric: 'MiBps' },
  { name: 'sequential read, 1 MiB', args: `seqread 1048576 ${SECONDS}`, metric: 'MiBps' },
  { name: 'random read, 4 KiB, depth 1', args: `randread 4096 ${SECONDS} 1`, metric: 'IOPS' },
  { name: 'random read, 4 KiB, depth 4', args: `randread 4096 ${SECONDS} 4`, metric: 'IOPS' },
];

function parse(output: string): number[] {
  return JOBS.map((j) => {
    const m = new RegExp(`^BLKBENCH ${j.args.split(' ')[0]} bs=${j.args.split(' ')[1]} depth=${j.args.split(' ')[3] ?? 1} .*${j.metric}=([\\d.]+)`, 'm').exec(output);
    if (!m) throw new Error(`no result for ${j.name} in:\n${output.slice(-2000)}`);
    return Number(m[1]);
  });
}

async function runTern(kernel: string, initrd: string, cmdline: string, image: string, profileDir: string): Promise<number[]> {
  const vm = GuestProcess.tern(
    ['--kernel', kernel, '--initramfs', initrd, '--cmdline', cmdline, '--cpus', 'boot=1', '--memory', `size=${MEM_MIB}M`, '--serial', 'tty', '--console', 'off', '--disk', `path=${image}`],
    PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`] : [],
    benchTernEnv(),
  );
  try {
    await ternRunEnded(vm, TIMEOUT_MS);
    return parse(vm.output);
  } finally {
    vm.kill();
  }
}

async function runQemu(kernel: string, initrd: string, cmdline: string, image: string): Promise<number[]> {
  const cmd = microvmCommand({
    kernel,
    initrd,
    cmdline,
    cpus: 1,
    memMiB: MEM_MIB,
    // q35: PCI configuration through 0xcf8 and ECAM as on Tern's machine (microvm's PCIe
    // host left this guest kernel without a configuration access method).
    machine: 'q35',
    extraArgs: ['-drive', `id=d0,if=none,file=${image},format=raw,aio=threads,cache=writeback`, '-device', 'virtio-blk-pci,drive=d0'],
  });
  const r = await runPeer(cmd, TIMEOUT_MS);
  checkPeerRun(r, TIMEOUT_MS);
  return parse(r.output);
}

async function main(): Promise<void> {
  const kernel = path.join(FIXTURES, 'vmlinux');
  const initrd = path.join(FIXTURES, 'initramfs.img');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-block-bench-'));
  const image = path.join(dir, 'disk.img');
  // Written through, so neither side reads holes.
  const chunk = Buffer.alloc(1 << 20, 0xa5);
  const fd = fs.openSync(image, 'w', 0o600);
  for (let i = 0; i < IMAGE_MIB; i++) fs.writeSync(fd, chunk);
  fs.closeSync(fd);
  const cmdline = guestCmdline({ cmd: JOBS.map((j) => `blkbench /dev/vda ${j.args}`).join('; ') });
  let results: SideBySideResults;
  try {
    results = await sideBySide(
      'block',
      RUNS,
      (i) => runTern(kernel, initrd, cmdline, image, path.join(dir, `profile-${i}`)),
      () => runQemu(kernel, initrd, cmdline, image),
      (i) => PROFILE && process.stdout.write(profileSummary(`tern run ${i + 1}`, path.join(dir, `profile-${i}`))),
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  printRatios(`virtio-blk, ${IMAGE_MIB} MiB raw image on the lab's tmpfs, guest O_DIRECT, ${SECONDS} s per job, median of ${RUNS}`, JOBS, results);
}

main().catch((e) => {
  process.stderr.write(`block bench: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
