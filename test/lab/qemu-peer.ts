// QEMU microvm as a reference VMM ("peer") for comparisons with Tern. It
// needs a /dev/kvm that can boot Linux, i.e. it runs inside the lab (see
// lab.ts), not on this host.
import { spawn } from 'node:child_process';
import { shq } from './lab';

export const GUEST_USERSPACE_MARKER = 'TERN-GUEST-USERSPACE';
export const GUEST_EXIT_RE = /TERN-GUEST-EXIT (\d+)/;

export interface GuestCmdlineOptions {
  /** Shell command for the guest /init (sh -c); none gives an interactive shell. */
  cmd?: string;
  /** Adds `quiet` (default true). */
  quiet?: boolean;
  /**
   * How /init ends the VM: poweroff -f (default; needs ACPI) or reboot -f
   * with reboot=t (a triple fault, which -no-reboot turns into QEMU's exit;
   * without ACPI the kernel's other reboot methods just restart the firmware).
   */
  exit?: 'poweroff' | 'reboot';
  /** More kernel parameters. */
  extra?: string[];
}

/**
 * Kernel command line for the fixtures' initramfs: console on ttyS0,
 * panic=-1, and the command as tern.cmd="..." (or base64 tern.cmd64= when it
 * contains a double quote or a newline, which tern.cmd cannot carry).
 */
export function guestCmdline(o: GuestCmdlineOptions = {}): string {
  const parts = ['console=ttyS0'];
  if (o.quiet ?? true) parts.push('quiet');
  parts.push('panic=-1');
  if (o.exit === 'reboot') parts.push('reboot=t', 'tern.exit=reboot');
  parts.push(...(o.extra ?? []));
  if (o.cmd !== undefined) {
    if (/["\n]/.test(o.cmd)) parts.push(`tern.cmd64=${Buffer.from(o.cmd).toString('base64')}`);
    else parts.push(`tern.cmd="${o.cmd}"`);
  }
  return parts.join(' ');
}

export interface MicrovmOptions {
  /** bzImage or the PVH vmlinux. */
  kernel: string;
  initrd?: string;
  cmdline: string;
  /** vCPUs (default 1). */
  cpus?: number;
  /** Memory in MiB (default 512). */
  memMiB?: number;
  /** QEMU binary (default qemu-system-x86_64). */
  qemu?: string;
  /** Accelerator (default kvm). */
  accel?: string;
  /** The machine type (default microvm; q35 where a peer needs a full PCI host bridge). */
  machine?: string;
  /** Extra machine properties, e.g. ['acpi=off']. */
  machineOptions?: string[];
  /** Appended verbatim, e.g. devices. */
  extraArgs?: string[];
}

export interface Command {
  file: string;
  args: string[];
}

/**
 * The QEMU microvm command line:
 *   qemu-system-x86_64 -M microvm -accel kvm -m 512 -smp 2 -nographic
 *     -monitor none -serial stdio -no-reboot -kernel K -initrd I -append C
 * -monitor none because -nographic with -serial stdio otherwise fails
 * ("cannot use stdio by multiple character devices"); -no-reboot makes a
 * guest reboot or triple fault end QEMU instead of looping.
 */
export function microvmCommand(o: MicrovmOptions): Command {
  const machine = [o.machine ?? 'microvm', ...(o.machineOptions ?? [])].join(',');
  const args = [
    '-M', machine, '-accel', o.accel ?? 'kvm',
    '-m', String(o.memMiB ?? 512), '-smp', String(o.cpus ?? 1),
    '-nographic', '-monitor', 'none', '-serial', 'stdio', '-no-reboot',
    '-kernel', o.kernel,
  ];
  if (o.initrd) args.push('-initrd', o.initrd);
  args.push('-append', o.cmdline, ...(o.extraArgs ?? []));
  return { file: o.qemu ?? 'qemu-system-x86_64', args };
}

/** The command as one sh-quoted line (for logs, reports and lab scripts). */
export function commandLine(c: Command): string {
  return [c.file, ...c.args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : shq(a))).join(' ');
}

export interface PeerRun {
  /** Console output (\r removed). */
  output: string;
  /** ms from spawn to the TERN-GUEST-USERSPACE line, -1 if never seen. */
  userspaceMs: number;
  /** ms from spawn to TERN-GUEST-EXIT, -1 if never seen. */
  guestExitMs: number;
  /** Status in TERN-GUEST-EXIT, or -1. */
  guestStatus: number;
  /** ms from spawn to QEMU's exit. */
  totalMs: number;
  qemuExitCode: number | null;
  stderr: string;
  timedOut: boolean;
}

export interface PeerInput {
  /** Console text to wait for (e.g. the shell prompt "tern# "). */
  after: string;
  /** Typed into the serial console once `after` appeared. */
  text: string;
}

/**
 * Runs the command to completion, timing the guest's markers. Never rejects
 * on guest failure; check the fields. With `input`, stdin is a pipe kept open
 * (an early EOF or bytes sent before the UART is set up would be lost). `onSpawn` gets QEMU's
 * pid (a bench reads its CPU time).
 */
export function runPeer(c: Command, timeoutMs: number, onOutput?: (s: string) => void, input?: PeerInput, onSpawn?: (pid: number) => void): Promise<PeerRun> {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    const ms = () => Number(process.hrtime.bigint() - start) / 1e6;
    const child = spawn(c.file, c.args, { stdio: [input ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
    if (child.pid !== undefined) onSpawn?.(child.pid);
    let typed = false;
    const r: PeerRun = {
      output: '', userspaceMs: -1, guestExitMs: -1, guestStatus: -1,
      totalMs: -1, qemuExitCode: null, stderr: '', timedOut: false,
    };
    let grace: NodeJS.Timeout | undefined;
    const finish = (code: number | null) => {
      clearTimeout(timer);
      clearTimeout(grace);
      if (r.totalMs >= 0) return;
      r.totalMs = ms();
      r.qemuExitCode = code;
      resolve(r);
    };
    const timer = setTimeout(() => {
      r.timedOut = true;
      child.kill('SIGKILL');
      // A QEMU blocked inside a KVM ioctl may not die at once: do not wait for it.
      grace = setTimeout(() => finish(null), 10_000);
    }, timeoutMs);
    child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
      const text = chunk.replace(/\r/g, '');
      r.output += text;
      if (r.userspaceMs < 0 && r.output.includes(GUEST_USERSPACE_MARKER)) r.userspaceMs = ms();
      if (r.guestExitMs < 0) {
        const m = GUEST_EXIT_RE.exec(r.output);
        if (m) {
          r.guestExitMs = ms();
          r.guestStatus = Number(m[1]);
        }
      }
      if (input && !typed && r.output.includes(input.after)) {
        typed = true;
        child.stdin!.write(input.text);
      }
      onOutput?.(text);
    });
    child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
      r.stderr += chunk;
    });
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.once('close', (code) => finish(code));
  });
}
