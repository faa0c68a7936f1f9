// A bench run lost to the nested lab rather than measured: the guest kernel panicked (now and then
// a guest takes the lab's emulated-SVM double fault, seen at entry_SYSCALL_64 under tern and QEMU
// alike) or the guest fell silent until the run's time limit (seen under QEMU and under tern, the
// guest silent after reaching user space). Such a run says nothing about the VMM's speed: the
// bench runs it again instead of giving up every pair, and says so in its output, with the whole
// console (and for tern the health report it logged) on stderr, since a stall could also be the
// VMM's own.
//
// One stall the health report names: the vCPU faults for good on its own instruction fetch, its
// CR3 outside guest RAM. Every such stall seen had the lab kernel's own state in the guest's
// registers: rip was kvm_amd's instruction after VMRUN (module base + 0x1420c, a page offset of
// 0x20c in each lab boot) and CR3 a page-table root beyond the guest's RAM, in the lab's own.
import type { VcpuSample } from '../../src/vmm/vcpu-sample';
import { GUEST_EXIT_RE, type PeerRun } from '../lab/qemu-peer';
import type { GuestProcess } from '../linux/guest-process';

export const GUEST_PANIC_RE = /Kernel panic - not syncing[^\n]*/;

export class LabGuestFault extends Error {
  /** `report`: the VMM's health report lines, kept whole (the output is cut to its end) */
  constructor(readonly vmm: 'tern' | 'qemu', what: string, output: string, report = '') {
    super(`the ${vmm} guest ${what}: ${output.slice(-3000)}${report && `\n${report}`}`);
  }
}

/** The panic line in a guest's console output, if its kernel panicked. */
export function panicLine(output: string): string | undefined {
  return GUEST_PANIC_RE.exec(output)?.[0];
}

/**
 * The fault a failed run's console shows (a panic), or else a stall if the run hit its time
 * limit, or else (QEMU, started with -no-reboot) a guest that reset itself mid-run: QEMU ended
 * with no panic and no exit status from the guest, the lab's triple fault.
 */
export function labGuestFault(vmm: 'tern' | 'qemu', output: string, timedOutMs?: number, opts: { resetEndsVmm?: boolean; report?: string; cause?: string } = {}): LabGuestFault | undefined {
  const panic = panicLine(output);
  if (panic) return new LabGuestFault(vmm, `kernel panicked (${panic.trim()})`, output, opts.report);
  if (timedOutMs !== undefined) return new LabGuestFault(vmm, `gave no result within ${timedOutMs / 1000} s${opts.cause ? ` (${opts.cause})` : ''}`, output, opts.report);
  if (opts.resetEndsVmm && !GUEST_EXIT_RE.test(output)) return new LabGuestFault(vmm, 'ended before its jobs did (QEMU exited with no panic and no exit status: a reset)', output);
  return undefined;
}

/** The health report lines of a tern's stderr (pino JSON, one line each). */
function healthReportLines(stderr: string): string {
  return stderr.split('\n').filter((l) => l.includes('"health report"')).join('\n');
}

/**
 * What a tern health report's vCPU samples say of a stall, when they show a vCPU whose page
 * tables are not in its RAM: every fetch faults, so it faults at one address for good.
 */
export function stalledVcpuCause(report: string): string | undefined {
  for (const line of report.split('\n')) {
    let parsed: { vcpuSamples?: { samples?: VcpuSample[][] } };
    try {
      parsed = JSON.parse(line) as typeof parsed;
    } catch {
      continue;
    }
    const vcpus = parsed.vcpuSamples?.samples ?? [];
    for (const [id, samples] of vcpus.entries()) {
      const s = samples.find((x) => x.pageTableRootInRam === false);
      if (s) return `vCPU ${id} faults on its own fetch at ${s.rip} (exception ${s.exception?.vector ?? 'none'}), its CR3 ${s.cr3} outside guest RAM`;
    }
  }
  return undefined;
}

/** How long a bench's tern guest may print nothing before tern is asked where its vCPUs are. */
export const QUIET_BEFORE_HEALTH_MS = 30_000;
/** How long tern has to log the health report it was asked for. */
const HEALTH_REPORT_WAIT_MS = 5_000;

/**
 * Watch a bench's tern: whenever its guest has printed nothing for `quietMs`, ask for a health
 * report (SIGUSR2), and settle `dead` once one shows a vCPU that can never run again. A run
 * lost that way is given up at once instead of at its time limit (4 minutes for the net bench).
 */
export function watchForDeadVcpu(vm: GuestProcess, quietMs = QUIET_BEFORE_HEALTH_MS): { dead: Promise<{ cause: string; report: string }>; stop: () => void } {
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const later = (fn: () => void, ms: number) => {
    if (!stopped) timer = setTimeout(fn, ms);
  };
  const dead = new Promise<{ cause: string; report: string }>((resolve) => {
    let seen = vm.output.length;
    const look = () => {
      if (vm.output.length !== seen) {
        seen = vm.output.length;
        return later(look, quietMs);
      }
      const from = vm.stderr.length;
      vm.child.kill('SIGUSR2');
      const askedAt = Date.now();
      const read = () => {
        const report = healthReportLines(vm.stderr.slice(from));
        const cause = stalledVcpuCause(report);
        if (cause) return resolve({ cause, report });
        if (!report && Date.now() - askedAt < HEALTH_REPORT_WAIT_MS) return later(read, 100);
        seen = vm.output.length;
        later(look, quietMs);
      };
      later(read, 100);
    };
    later(look, quietMs);
  });
  return {
    dead,
    stop: () => {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

/**
 * Wait for a bench's tern to exit 0. A VMM still running at `timeoutMs` is a stalled run (its
 * health report, which the timeout asked for, goes with it), and so is one whose guest went
 * quiet with a vCPU that can never run again (watchForDeadVcpu), found sooner; a non-zero exit
 * is a lab fault when the console shows a panic, and an error otherwise.
 */
export async function ternRunEnded(vm: GuestProcess, timeoutMs: number, quietMs = QUIET_BEFORE_HEALTH_MS): Promise<void> {
  const watch = watchForDeadVcpu(vm, quietMs);
  const dead = watch.dead.then((d): never => {
    throw new LabGuestFault('tern', `can never run again (${d.cause})`, vm.output, d.report);
  });
  dead.catch(() => undefined); // (only the race below reports it)
  let code: number | null;
  try {
    ({ code } = await Promise.race([vm.exit(timeoutMs), dead]));
  } catch (e) {
    if (e instanceof LabGuestFault || vm.child.exitCode !== null) throw e;
    // (the health report the timeout asked for goes whole: where the vCPU was is at its end)
    const report = healthReportLines(vm.stderr);
    const cause = stalledVcpuCause(report);
    throw labGuestFault('tern', `${vm.output}\n${vm.stderr.slice(-3000)}`, timeoutMs, { report, cause })!;
  } finally {
    watch.stop();
  }
  if (code === 0) return;
  throw labGuestFault('tern', vm.output) ?? new Error(`tern exited ${code}: ${vm.output.slice(-2000)}\n${vm.stderr.slice(-2000)}`);
}

/** Check a QEMU peer's run (QEMU runs with -no-reboot): its guest must have ended with status 0. */
export function checkPeerRun(r: PeerRun, timeoutMs: number): void {
  if (r.guestStatus === 0) return;
  throw labGuestFault('qemu', r.output, r.timedOut ? timeoutMs : undefined, { resetEndsVmm: true }) ?? new Error(`QEMU guest ended with ${r.guestStatus}: ${r.output.slice(-2000)}\n${r.stderr.slice(-1000)}`);
}
