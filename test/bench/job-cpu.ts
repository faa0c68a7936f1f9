// Where the CPU went while a guest ran each bench job: the VMM's threads (by name: the
// JavaScript thread, vCPUs, queue threads; QEMU's by its own names) and the whole machine's busy
// share. In the nested lab the two emulated CPUs carry the guest, the VMM and the host's network
// stack at once, so a VMM that spends more CPU per byte leaves less of it to the guest.
import fs from 'node:fs';
import { TICK_MS, threadCpuMsByName } from '../../src/util/thread-cpu';

interface CpuSample {
  /** CPU ms per thread name (the main thread as "main") */
  threads: Map<string, number>;
  /** the machine's busy and total ms, all CPUs */
  busy: number;
  total: number;
  /** wall-clock ms */
  at: number;
  /** KVM's counters of the process's VMs (debugfs, where mounted), summed */
  kvm: Map<string, number>;
}

/** KVM's per-VM counters worth comparing between VMMs: exits by kind, and halt polling's cost. */
const KVM_STATS = ['exits', 'io_exits', 'mmio_exits', 'halt_exits', 'irq_exits', 'irq_injections', 'signal_exits', 'halt_poll_success_ns', 'halt_poll_fail_ns'] as const;
const KVM_DEBUGFS = '/sys/kernel/debug/kvm';

/** The counters of every VM `pid` holds (debugfs names them PID-FD); empty without debugfs. */
function kvmStats(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  let vms: string[];
  try {
    vms = fs.readdirSync(KVM_DEBUGFS).filter((d) => d.startsWith(`${pid}-`));
  } catch {
    return out;
  }
  for (const vm of vms) {
    for (const name of KVM_STATS) {
      try {
        out.set(name, (out.get(name) ?? 0) + Number(fs.readFileSync(`${KVM_DEBUGFS}/${vm}/${name}`, 'utf8')));
      } catch {
        // (a counter this kernel does not have)
      }
    }
  }
  return out;
}

function sample(pid: number): CpuSample | undefined {
  try {
    const threads = threadCpuMsByName(pid);
    if (!threads.size) return undefined; // the process ended
    const cpu = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const total = cpu.slice(0, 8).reduce((a, b) => a + b, 0) * TICK_MS;
    return { threads, busy: total - (cpu[3] + cpu[4]) * TICK_MS, total, at: Date.now(), kvm: kvmStats(pid) };
  } catch {
    return undefined; // the process ended meanwhile
  }
}

export interface JobCpu {
  /** the VMM's CPU ms in the job, all threads */
  vmmMs: number;
  /** the threads that took at least 5% of it, largest first */
  threads: [string, number][];
  /** the machine's busy share over the job, 0..1 */
  busy: number;
  /** the job's wall-clock ms */
  wallMs: number;
  /** KVM's counters over the job (empty without debugfs) */
  kvm: Map<string, number>;
}

/**
 * Fed a guest's console output, samples the VMM's CPU each time the next of `markers` appears:
 * the windows between consecutive markers are the jobs.
 */
export class JobCpuMeter {
  private out = '';
  private readonly samples: (CpuSample | undefined)[] = [];

  constructor(
    private readonly pid: () => number | undefined,
    private readonly markers: readonly RegExp[],
  ) {}

  feed(text: string): void {
    this.out += text;
    while (this.samples.length < this.markers.length && this.markers[this.samples.length].test(this.out)) {
      const pid = this.pid();
      this.samples.push(pid === undefined ? undefined : sample(pid));
    }
  }

  /** One entry per window whose two samples were taken (undefined where one is missing). */
  jobs(): (JobCpu | undefined)[] {
    const jobs: (JobCpu | undefined)[] = [];
    for (let i = 1; i < this.markers.length; i++) {
      const a = this.samples[i - 1];
      const b = this.samples[i];
      if (!a || !b) {
        jobs.push(undefined);
        continue;
      }
      const threads = [...b.threads].map(([n, ms]) => [n, ms - (a.threads.get(n) ?? 0)] as [string, number]);
      const vmmMs = threads.reduce((s, [, ms]) => s + ms, 0);
      jobs.push({
        vmmMs,
        threads: threads.filter(([, ms]) => ms > 0 && ms >= vmmMs * 0.05).sort((x, y) => y[1] - x[1]),
        busy: b.total > a.total ? (b.busy - a.busy) / (b.total - a.total) : 0,
        wallMs: b.at - a.at,
        kvm: new Map([...b.kvm].map(([n, v]) => [n, v - (a.kvm.get(n) ?? 0)])),
      });
    }
    return jobs;
  }
}

/** "VMM 4.21 s CPU in 5.40 s (tern vcpu 0 2.50, ...), machine 98% busy; KVM exits ..." */
export function describeJobCpu(j: JobCpu | undefined): string {
  if (!j) return 'no CPU figures';
  const k = (n: string) => j.kvm.get(n) ?? 0;
  const exits = j.kvm.size
    ? `; KVM exits ${k('exits')} (io ${k('io_exits')}, mmio ${k('mmio_exits')}, halt ${k('halt_exits')}, irq ${k('irq_exits')}, signal ${k('signal_exits')}), ${k('irq_injections')} interrupts injected, halt polling ${((k('halt_poll_success_ns') + k('halt_poll_fail_ns')) / 1e6).toFixed(0)} ms`
    : '';
  return `VMM ${(j.vmmMs / 1000).toFixed(2)} s CPU in ${(j.wallMs / 1000).toFixed(2)} s (${j.threads.map(([n, ms]) => `${n} ${(ms / 1000).toFixed(2)}`).join(', ')}), machine ${(j.busy * 100).toFixed(0)}% busy${exits}`;
}
