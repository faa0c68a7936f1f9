// Network benchmark, run where /dev/kvm can boot Linux (inside the lab): the same guest moves
// TCP traffic over virtio-net-pci on a tap under tern and under QEMU (vhost off, so both
// VMMs move every frame themselves), alternating. In the guest, netbench streams to the host,
// takes a stream from it, and bounces one byte at a time (request/response); this process is
// the host's end: a sink, a source and an echo on the tap's address. Reports medians and the
// ratio tern/QEMU (higher is better).
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { guestCmdline, microvmCommand, runPeer } from '../lab/qemu-peer';
import { GuestProcess } from '../linux/guest-process';
import { native } from '../../src/native/kvm';
import { guestIrqSnapshots, describeGuestIrqs, GUEST_IRQS_CMD } from './guest-interrupts';
import { describeJobCpu, JobCpuMeter } from './job-cpu';
import { checkPeerRun, GUEST_PANIC_RE, LabGuestFault, ternRunEnded } from './lab-guest-fault';
import { printRatios, sideBySide, type SideBySideResults } from './side-by-side';
import { benchTernEnv } from './vmm-columns';

const FIXTURES = process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures';
const RUNS = Number(process.env.TERN_BENCH_NET_RUNS ?? process.env.TERN_BENCH_RUNS ?? 3);
const SECONDS = Number(process.env.TERN_BENCH_NET_SECONDS ?? 5);
const MEM_MIB = 512;
/** a run takes about 40 s in the lab (boot and three jobs): one with no result by then is stuck */
const TIMEOUT_MS = 240_000;
const TAP = 'tbench0';
const HOST_IP = '192.168.251.1';
const GUEST_IP = '192.168.251.2';
const GUEST_MAC = '52:54:00:be:4e:01';
const PORTS = { send: 5101, recv: 5102, rr: 5103 } as const;

/** What the guest runs, one netbench line each. */
const JOBS: { name: string; mode: keyof typeof PORTS; metric: 'MiBps' | 'tps' }[] = [
  { name: 'TCP guest to host', mode: 'send', metric: 'MiBps' },
  { name: 'TCP host to guest', mode: 'recv', metric: 'MiBps' },
  { name: 'TCP request/response, 1 byte', mode: 'rr', metric: 'tps' },
];

/** The console lines that open and end the jobs: the CPU each took is measured between them. */
const JOB_MARKERS = [/TERN-GUEST-USERSPACE/, ...JOBS.map((j) => new RegExp(`^NETBENCH ${j.mode} `, 'm'))];

/** Per job: the VMM's CPU and KVM's exits, then the interrupts the guest took per queue. */
function printJobCpu(vmm: string, meter: JobCpuMeter, output: string): void {
  const irqs = guestIrqSnapshots(output);
  meter.jobs().forEach((j, k) => {
    const bytes = new RegExp(`^NETBENCH ${JOBS[k].mode} bytes=(\\d+)`, 'm').exec(output);
    const mib = JOBS[k].metric === 'MiBps' && bytes ? Number(bytes[1]) / 2 ** 20 : undefined;
    process.stdout.write(`  ${vmm} ${JOBS[k].name}: ${describeJobCpu(j)}; guest interrupts ${describeGuestIrqs(irqs[k], irqs[k + 1], mib)}\n`);
  });
}

function parse(output: string): number[] {
  return JOBS.map((j) => {
    const m = new RegExp(`^NETBENCH ${j.mode} .*${j.metric}=([\\d.]+)`, 'm').exec(output);
    if (!m) throw new Error(`no result for ${j.name} in:\n${output.slice(-2000)}`);
    return Number(m[1]);
  });
}

/** The host's end: a sink for `send`, a source for `recv`, an echo for `rr`. */
async function hostEnd(): Promise<() => void> {
  const chunk = Buffer.alloc(1 << 16, 0xa5);
  const servers = [
    net.createServer((s) => {
      s.on('data', () => {});
      s.on('error', () => {});
    }),
    net.createServer((s) => {
      s.on('error', () => {});
      const pump = () => {
        while (!s.destroyed && s.write(chunk));
      };
      s.on('drain', pump);
      pump();
    }),
    net.createServer((s) => {
      s.setNoDelay(true);
      s.on('data', (d) => s.write(d));
      s.on('error', () => {});
    }),
  ];
  const ports = [PORTS.send, PORTS.recv, PORTS.rr];
  // (0.0.0.0: the tap and its address come and go with each VMM)
  await Promise.all(servers.map((srv, i) => new Promise<void>((resolve) => srv.listen(ports[i], '0.0.0.0', resolve))));
  // A guest killed with its VMM never closes its connections: their host ends are destroyed
  // here, or they (and the servers, which wait for them) would keep the bench from exiting.
  const open = new Set<net.Socket>();
  for (const srv of servers) {
    srv.on('connection', (c) => {
      open.add(c);
      c.on('close', () => open.delete(c));
    });
  }
  return () => {
    servers.forEach((s) => s.close());
    open.forEach((c) => c.destroy());
  };
}

async function runTern(kernel: string, initrd: string, cmdline: string): Promise<number[]> {
  const vm = GuestProcess.tern([
    '--kernel', kernel, '--initramfs', initrd, '--cmdline', cmdline, '--cpus', 'boot=1', '--memory', `size=${MEM_MIB}M`, '--serial', 'tty', '--console', 'off',
    '--net', `tap=${TAP},ip=${HOST_IP},mask=255.255.255.0,mac=${GUEST_MAC}`,
  ], [], benchTernEnv());
  const meter = new JobCpuMeter(() => vm.child.pid, JOB_MARKERS);
  vm.child.stdout.on('data', (d: Buffer) => meter.feed(d.toString('latin1')));
  try {
    // A guest kernel that panics stays halted: the run ends at the panic, not at the timeout
    // (in the nested lab a guest now and then takes the lab's emulated-SVM double fault).
    const panicked = vm.waitFor(new RegExp(`${GUEST_PANIC_RE.source}\\n`), TIMEOUT_MS).then(
      (m) => Promise.reject(new LabGuestFault('tern', `kernel panicked (${m[0].trim()})`, vm.output)),
      () => new Promise<never>(() => undefined), // the VMM ended first: its exit tells
    );
    await Promise.race([ternRunEnded(vm, TIMEOUT_MS), panicked]);
    const figures = parse(vm.output);
    printJobCpu('tern', meter, vm.output);
    return figures;
  } finally {
    vm.kill();
  }
}

/** QEMU makes its own tap; its host address is set once the tap exists (the guest's netbench retries meanwhile). */
async function runQemu(kernel: string, initrd: string, cmdline: string): Promise<number[]> {
  const cmd = microvmCommand({
    kernel,
    initrd,
    cmdline,
    cpus: 1,
    memMiB: MEM_MIB,
    machine: 'q35',
    // (-cpu host: the guest sees the CPU it sees under tern, whose default profile is the host's)
    extraArgs: ['-cpu', 'host', '-netdev', `tap,id=n0,ifname=${TAP},script=no,downscript=no,vhost=off`, '-device', `virtio-net-pci,netdev=n0,mac=${GUEST_MAC}`],
  });
  let pid: number | undefined;
  const meter = new JobCpuMeter(() => pid, JOB_MARKERS);
  const run = runPeer(cmd, TIMEOUT_MS, (text) => meter.feed(text), undefined, (p) => (pid = p));
  const end = Date.now() + 60_000;
  while (!fs.existsSync(`/sys/class/net/${TAP}`)) {
    if (Date.now() > end) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (fs.existsSync(`/sys/class/net/${TAP}`)) native().configureInterface(TAP, { ip: HOST_IP, mask: '255.255.255.0', up: true });
  const r = await run;
  checkPeerRun(r, TIMEOUT_MS);
  const figures = parse(r.output);
  printJobCpu('qemu', meter, r.output);
  return figures;
}

async function main(): Promise<void> {
  const kernel = path.join(FIXTURES, 'vmlinux');
  const initrd = path.join(FIXTURES, 'initramfs.img');
  const cmd = [
    `ifconfig eth0 ${GUEST_IP} netmask 255.255.255.0 up`,
    GUEST_IRQS_CMD,
    ...JOBS.flatMap((j) => [`netbench ${j.mode} ${HOST_IP} ${PORTS[j.mode]} ${SECONDS}`, GUEST_IRQS_CMD]),
  ].join('; ');
  const cmdline = guestCmdline({ cmd });
  const stop = await hostEnd();
  let results: SideBySideResults;
  try {
    results = await sideBySide('net', RUNS, () => runTern(kernel, initrd, cmdline), () => runQemu(kernel, initrd, cmdline));
  } finally {
    stop();
  }
  printRatios(`virtio-net-pci on a tap (QEMU: vhost=off), 1 vCPU guest, ${SECONDS} s per job, median of ${RUNS}`, JOBS, results);
}

main().catch((e) => {
  process.stderr.write(`net bench: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
