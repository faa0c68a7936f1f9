// Drives a VMM process (tern or the QEMU peer) the way a user at a terminal would: reads its
// console output, types into it, and waits for it to end.
import { ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const FIXTURES = process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures';
import { REPO } from '../support/processes';

export { REPO };
export const TERN_CLI = path.join(REPO, 'dist', 'bin', 'tern.js');
/** the `tern` users run: starts from the startup snapshot where it was built for this node */
export const TERN_LAUNCHER = path.join(REPO, 'dist', 'bin', 'tern');

export const fixture = (name: string): string => path.join(FIXTURES, name);

export class GuestProcess {
  readonly child: ChildProcessWithoutNullStreams;
  output = '';
  stderr = '';
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private waiters: { re: RegExp; from: number; resolve: (m: RegExpMatchArray) => void; reject: (e: Error) => void }[] = [];
  /** set once the process has exited and its output is all read */
  private closed?: string;
  /** a tern VMM: asked for its health report (SIGUSR2) before a wait fails on its timeout */
  private healthReports = false;
  /** where a tern VMM writes its serial port (`--serial file=...`): a failure shows its tail too */
  private serialFile?: string;

  /** `passFds`: descriptors of this process the child gets as its fds 3, 4, ... */
  constructor(command: string, args: string[], opts: { env?: NodeJS.ProcessEnv; passFds?: number[] } = {}) {
    this.child = spawn(command, args, { env: { ...process.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe', ...(opts.passFds ?? [])] }) as ChildProcessWithoutNullStreams;
    this.child.stdout.on('data', (d: Buffer) => {
      this.output += d.toString('latin1');
      this.check();
    });
    this.child.stderr.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((resolve) => this.child.on('exit', (code, signal) => resolve({ code, signal })));
    // A process that exits can print nothing more: whoever still waits for output fails now,
    // with what it printed, instead of at its timeout.
    this.child.on('close', (code, signal) => {
      this.closed = `exited (${code ?? signal})`;
      for (const w of this.waiters) w.reject(this.failure(`${this.closed} before printing ${w.re}`));
      this.waiters = [];
    });
  }

  private failure(what: string): Error {
    // (a health report is one long line: the stderr tail keeps room for it)
    return new Error(`${what}; output so far:\n${this.output.slice(-3000)}\nstderr:\n${this.stderr.slice(-12000)}${this.serialTail()}`);
  }

  /**
   * The end of the serial file, when the console is elsewhere: a guest kernel that panics
   * (and, with panic=-1, reboots) says why only on its serial port.
   */
  private serialTail(): string {
    if (!this.serialFile) return '';
    try {
      const text = fs.readFileSync(this.serialFile, 'latin1');
      return `\nserial port (${this.serialFile}), last 4000 bytes:\n${text.slice(-4000)}`;
    } catch (e) {
      return `\nserial port (${this.serialFile}): ${(e as Error).message}`;
    }
  }

  /**
   * `nodeArgs`: options for Node itself (a benchmark's --cpu-prof); `env`: added to this
   * environment; `cli`: another build's tern.js (a benchmark comparing two builds).
   */
  static tern(args: string[], nodeArgs: string[] = [], env: NodeJS.ProcessEnv = {}, cli = TERN_CLI): GuestProcess {
    const p = new GuestProcess(process.execPath, [...nodeArgs, cli, ...args], { env });
    p.healthReports = true;
    const serial = args[args.indexOf('--serial') + 1];
    if (args.includes('--serial') && serial?.startsWith('file=')) p.serialFile = serial.slice('file='.length).split(',')[0];
    return p;
  }

  /**
   * A wait timed out: a tern VMM logs its health report on stderr first (vCPU threads, console
   * UART, virtio queues), so the failure tells a stuck device from a stuck guest.
   */
  private async timedOut(what: string): Promise<Error> {
    if (this.healthReports && this.child.exitCode === null && this.child.signalCode === null) {
      const before = this.stderr.length;
      this.child.kill('SIGUSR2');
      for (let i = 0; i < 40 && !this.stderr.slice(before).includes('"health report"'); i++) await new Promise((r) => setTimeout(r, 50));
      if (!this.stderr.slice(before).includes('"health report"')) this.stderr += '\n(no health report within 2 s: the VMM\'s JavaScript thread is busy or stuck)\n';
    }
    return this.failure(what);
  }

  /** `tern ARGS` as users start it (the launcher), for benchmarks of process start-up. */
  static ternLauncher(args: string[]): GuestProcess {
    return new GuestProcess(TERN_LAUNCHER, args);
  }

  private check(): void {
    this.waiters = this.waiters.filter((w) => {
      const m = this.output.slice(w.from).match(w.re);
      if (m) w.resolve(m);
      return !m;
    });
  }

  /** Wait for `re` to appear in the console output after position `from` (default: anywhere). */
  waitFor(re: RegExp, timeoutMs: number, from = 0): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      const waiter = {
        re,
        from,
        resolve: (m: RegExpMatchArray) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        void this.timedOut(`timed out after ${timeoutMs} ms waiting for ${re}`).then(reject);
      }, timeoutMs);
      this.waiters.push(waiter);
      this.check();
      if (this.closed && this.waiters.includes(waiter)) {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        waiter.reject(this.failure(`${this.closed} before printing ${re}`));
      }
    });
  }

  type(text: string): void {
    this.child.stdin.write(text);
  }

  async exit(timeoutMs: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => void this.timedOut(`process did not exit within ${timeoutMs} ms`).then(reject), timeoutMs);
    });
    try {
      return await Promise.race([this.exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}
