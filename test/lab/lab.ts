// Runs a shell script where /dev/kvm behaves like hardware virtualization.
//
// This host's /dev/kvm (PVM) cannot boot Linux, so by default the script runs
// in the "lab": a QEMU-TCG VM with emulated AMD SVM whose /dev/kvm works. The
// lab mounts the host's / read-only over 9p, chroots into it and runs the
// script with bash in the caller's working directory, so the host's node,
// QEMU, dist/ and the fixtures are all visible under their usual paths.
// Inside the lab only tmpfs mounts (/tmp, /run, /dev/shm) are writable, and
// their contents are lost when the lab powers off.
//
// When /proc/cpuinfo has vmx or svm (real hardware virtualization), the
// script runs directly on the host instead. TERN_LAB_MODE=lab|direct
// overrides the choice.
import { spawn, ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { QmpClient } from '../support/qmp-client';
import { ensureLabFixtures, fixturesDir } from './fixtures';

export interface LabOptions {
  /** bash script; runs with cwd = opts.cwd ?? process.cwd(), stdin /dev/null. */
  script: string;
  /** Wall-clock limit for the whole run, lab boot included. */
  timeoutMs: number;
  /** Lab vCPUs (default 2). */
  smp?: number;
  /** Lab memory in MiB (default LAB_DEFAULT_MEM_MIB). */
  memMiB?: number;
  /** Back all lab RAM with host memory before it boots (labQemuArgs says why). */
  preallocRam?: boolean;
  /** The job's output as it comes (\r removed). */
  onOutput?: (chunk: string) => void;
  /** Working directory of the script (default process.cwd()). */
  cwd?: string;
  /** Extra environment for the script (the lab starts from a clean environment). */
  env?: Record<string, string>;
  /** Wait for other lab runs on this machine to end first (default true; TERN_LAB_PARALLEL=1 sets false). */
  exclusive?: boolean;
  /**
   * Kill the lab when its heartbeat (printed by the lab's init every 10 s) has been missing this
   * long, or when its kernel reports a CPU stuck (soft lockup, RCU stall): a lab that stopped
   * making progress rejects with LabFrozenError in minutes instead of running into timeoutMs.
   * Default LAB_SILENCE_LIMIT_MS; 0 turns the heartbeat check off. Counted from the job's
   * start: the boot before it is held to the default whatever this is. Lab mode only.
   */
  silenceLimitMs?: number;
  /**
   * Seconds between two heartbeats of the lab's init (default 10). Tests of the watchdog itself
   * use a short period so that they can use a short silence limit. Lab mode only.
   */
  heartbeatS?: number;
  /**
   * The lab's own console, a line at a time (firmware, the lab's init, kernel messages: never the
   * job's output, which goes to onOutput). Lab mode only.
   */
  onConsole?: (line: string) => void;
}

export interface LabResult {
  /** The script's exit status (128 + signal number if killed by a signal in direct mode). */
  exitCode: number;
  /** What the script printed (stdout and stderr interleaved, \r removed). */
  output: string;
  /** Wall time of the whole run, lab boot and power-off included (not the wait for the lock). */
  durationMs: number;
  /** Time from QEMU start to the script's start (0 in direct mode). */
  bootMs: number;
  /** Time spent waiting for another lab run to finish (0 in direct mode). */
  queuedMs: number;
  mode: 'lab' | 'direct';
}

export class LabTimeoutError extends Error {
  constructor(
    readonly timeoutMs: number,
    readonly consoleTail: string,
  ) {
    super(`runInLab: timed out after ${timeoutMs} ms; killed the run. Last console output:\n${consoleTail}`);
    this.name = 'LabTimeoutError';
  }
}

/** The lab stopped making progress (its heartbeat stopped, or its kernel reported a stuck CPU). */
export class LabFrozenError extends Error {
  constructor(
    readonly why: string,
    readonly consoleTail: string,
    /** What QEMU's monitor said about the lab's CPUs just before the kill. */
    readonly cpuState = '',
    /** The end of the job's output. */
    readonly outputTail = '',
  ) {
    super(`runInLab: the lab stopped making progress (${why}); killed it. Last job output:\n${outputTail}\n[lab console]\n${consoleTail}`);
    this.name = 'LabFrozenError';
  }
}

export const LAB_SILENCE_LIMIT_MS = 120_000;

/**
 * Kernel reports that mean a lab CPU no longer makes progress. A stuck CPU does not always stop
 * the heartbeat (the other CPU may still print it), so these count as a freeze on their own.
 */
const STUCK_CPU = /watchdog: BUG: soft lockup - CPU#\d+ stuck|rcu: INFO: rcu_\w+ (self-)?detected stalls?/;

export const LAB_DEFAULT_SMP = 2;

/** Started by the lab's init on one CPU (TERN_LAB_KEEPER=0: not started, for comparisons). */
const KVM_KEEPER = path.join(__dirname, 'kvm-keeper.js');
/**
 * Room for the heaviest file, the migration acceptance run: two VMMs with 512 MiB guests side
 * by side, each guest filling a 256 MiB tmpfs file. QEMU allocates the lab's RAM as it is used.
 */
export const LAB_DEFAULT_MEM_MIB = 6144;

/** True when this machine's CPU exposes VMX or SVM, i.e. /dev/kvm can boot Linux here. */
export function hostHasHardwareVirt(cpuinfo?: string): boolean {
  let text = cpuinfo;
  if (text === undefined) {
    try {
      text = readFileSync('/proc/cpuinfo', 'utf8');
    } catch {
      return false;
    }
  }
  return /^flags\s*:.*\b(vmx|svm)\b/m.test(text);
}

export function labMode(): 'lab' | 'direct' {
  const forced = process.env.TERN_LAB_MODE;
  if (forced === 'lab' || forced === 'direct') return forced;
  return hostHasHardwareVirt() ? 'direct' : 'lab';
}

/** Single-quotes a string for sh. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function jobText(opts: LabOptions): string {
  const cwd = path.resolve(opts.cwd ?? process.cwd());
  const env: Record<string, string> = { TERN_FIXTURES: fixturesDir(), ...(opts.env ?? {}) };
  if (process.env.CI !== undefined && env.CI === undefined) env.CI = process.env.CI;
  const exports = Object.entries(env)
    .map(([k, v]) => `export ${k}=${shq(v)}`)
    .join('\n');
  return `cd ${shq(cwd)} || exit 97\n${exports}\n${opts.script}\n`;
}

/**
 * Extra arguments for the lab's own kernel, to compare its settings (TERN_LAB_KERNEL_ARGS, for
 * example "mitigations=off"). None by default: heavy migration benchmark runs panic the lab's
 * kernel now and then (a task's stack guard page hit in exc_page_fault, "corrupted stack end
 * detected inside scheduler") with the default mitigations and with mitigations=off alike.
 */
const LAB_KERNEL_ARGS = process.env.TERN_LAB_KERNEL_ARGS ?? '';

/** QEMU arguments of the lab VM (ENVIRONMENT.md's command line, plus -monitor none, -no-reboot, -nic none). */
export function labQemuArgs(o: {
  kernel: string;
  initramfs: string;
  job: string;
  nonce: string;
  smp?: number;
  memMiB?: number;
  /** QMP socket, so that a frozen lab can be asked where its CPUs are. */
  qmp?: string;
  /** UNIX socket (ours, listening) that the lab's second serial port, the job's output, connects to. */
  jobSocket?: string;
  /** kvm-keeper.js to start on one CPU before the others come up (kvm-keeper.ts says why). */
  keeper?: string;
  /** Seconds between the lab init's heartbeats (the init's default, 10, when absent). */
  heartbeatS?: number;
  /**
   * Back all lab RAM with host memory before the lab boots (-mem-prealloc), for benchmarks: the
   * first touch of a lab page otherwise costs a host page fault that whichever measurement
   * touches it first pays, and one that reuses freed pages does not.
   */
  preallocRam?: boolean;
}): string[] {
  return [
    ...(o.qmp ? ['-qmp', `unix:${o.qmp},server=on,wait=off`] : []),
    // TERN_LAB_ACCEL and TERN_LAB_CPU exist to compare TCG modes and CPU models (freeze-rate.ts).
    '-M', 'q35', '-accel', process.env.TERN_LAB_ACCEL ?? 'tcg', '-cpu', process.env.TERN_LAB_CPU ?? 'EPYC,+svm',
    '-smp', String(o.smp ?? LAB_DEFAULT_SMP), '-m', String(o.memMiB ?? LAB_DEFAULT_MEM_MIB),
    ...(o.preallocRam ? ['-mem-prealloc'] : []),
    // -nographic alone would put the monitor on stdio too, and QEMU refuses
    // two users of stdio; -nic none drops the default NIC and its iPXE ROM.
    '-nographic', '-monitor', 'none', '-serial', 'stdio', '-no-reboot', '-nic', 'none',
    ...(o.jobSocket ? ['-chardev', `socket,id=job,path=${o.jobSocket}`, '-serial', 'chardev:job'] : []),
    '-kernel', o.kernel, '-initrd', o.initramfs,
    '-append',
    `console=ttyS0 panic=-1 quiet ${LAB_KERNEL_ARGS} tern.job=${o.job} tern.nonce=${o.nonce}` +
      (o.keeper ? ` maxcpus=1 tern.keeper=${o.keeper}` : '') +
      (o.heartbeatS ? ` tern.heartbeat=${Math.max(1, Math.round(o.heartbeatS))}` : ''),
    '-virtfs', 'local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap',
  ];
}

// Children run in their own process groups (so a timeout can kill QEMU behind
// flock), which also shields them from a terminal's Ctrl-C: kill them when
// this process exits or is signalled, then let the signal take its course.
const live = new Set<ChildProcess>();
const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
const killAll = () => {
  for (const c of live) killChild(c, true);
};
const onSignal = (sig: NodeJS.Signals) => {
  killAll();
  unhook();
  process.kill(process.pid, sig);
};
function hook(): void {
  process.on('exit', killAll);
  for (const sig of signals) process.on(sig, onSignal);
}
function unhook(): void {
  process.off('exit', killAll);
  for (const sig of signals) process.off(sig, onSignal);
}
function track(child: ChildProcess, group: boolean): void {
  if (live.size === 0) hook();
  live.add(child);
  (child as ChildProcess & { __group?: boolean }).__group = group;
  child.once('close', () => {
    live.delete(child);
    if (live.size === 0) unhook();
  });
}
function killChild(c: ChildProcess, quiet = false): void {
  try {
    if ((c as ChildProcess & { __group?: boolean }).__group && c.pid) process.kill(-c.pid, 'SIGKILL');
    else c.kill('SIGKILL');
  } catch (e) {
    if (!quiet) throw e;
  }
}

const tail = (s: string, n = 4000) => (s.length > n ? s.slice(-n) : s);

/** Runs `opts.script` with bash where /dev/kvm can boot Linux: the lab VM, or this host if it has VMX/SVM. */
export async function runInLab(opts: LabOptions): Promise<LabResult> {
  return labMode() === 'direct' ? runDirect(opts) : runLab(opts);
}

const LOCKED = 'TERN-LAB-LOCKED';

async function runLab(opts: LabOptions): Promise<LabResult> {
  const fx = await ensureLabFixtures();
  mkdirSync(fx.jobsDir, { recursive: true });
  const nonce = randomBytes(8).toString('hex');
  const job = path.join(fx.jobsDir, `${nonce}.sh`);
  if (/\s/.test(job)) throw new Error(`runInLab: the fixtures path must not contain spaces: ${job}`);
  writeFileSync(job, jobText(opts), { mode: 0o644 });

  // The job's output has a serial port of its own (the lab's ttyS1, which QEMU connects to this
  // socket), so the console (ttyS0) carries only the lab's init and kernel and its heartbeat:
  // a kernel message can never land inside a line of the job's output, and nothing the job
  // prints (a nested guest's console, say) can pass for the lab kernel's.
  const jobSocket = path.join(fx.jobsDir, `${nonce}.out`);
  let jobOutput = '';
  let jobDone: () => void = () => {};
  const jobClosed = new Promise<void>((r) => (jobDone = r));
  const jobServer = net.createServer((conn) => {
    conn.setEncoding('utf8');
    conn.on('data', (chunk: string) => {
      const text = chunk.replace(/\r/g, '');
      jobOutput += text;
      opts.onOutput?.(text);
    });
    conn.on('close', () => jobDone());
  });
  await new Promise<void>((resolve, reject) => {
    jobServer.once('error', reject);
    jobServer.listen(jobSocket, () => resolve());
  });

  const qmp = path.join(fx.jobsDir, `${nonce}.qmp`);
  const keeper = process.env.TERN_LAB_KEEPER === '0' || !existsSync(KVM_KEEPER) ? undefined : KVM_KEEPER;
  const args = labQemuArgs({ kernel: fx.kernel, initramfs: fx.initramfs, job, nonce, smp: opts.smp, memMiB: opts.memMiB, preallocRam: opts.preallocRam, qmp, jobSocket, keeper, heartbeatS: opts.heartbeatS });
  // One lab at a time per machine (flock on the fixtures' lab/.run.lock):
  // two TCG labs on a small host starve each other into timeouts and make
  // timings meaningless. The timeout counts from when this run gets the lock.
  const exclusive = opts.exclusive ?? process.env.TERN_LAB_PARALLEL !== '1';
  const child = exclusive
    ? spawn('flock', [path.join(path.dirname(fx.jobsDir), '.run.lock'), 'sh', '-c', `echo ${LOCKED} >&2; exec "$@"`, 'sh', 'qemu-system-x86_64', ...args], {
        stdio: ['ignore', 'pipe', 'pipe'],
        detached: true,
      })
    : spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  track(child, true);

  const heartbeatRe = new RegExp(`^TERN-LAB-ALIVE ${nonce}$`);
  const silenceLimitMs = opts.silenceLimitMs ?? LAB_SILENCE_LIMIT_MS;
  const startRe = new RegExp(`TERN-LAB-START ${nonce}\\n`);
  const exitRe = new RegExp(`TERN-LAB-EXIT ${nonce} (\\d+)`);
  const errRe = new RegExp(`TERN-LAB-ERROR ${nonce} ([^\\n]*)`);
  let consoleText = '';
  let stderr = '';
  let bootMs = -1;
  let start = Date.now();
  const queuedAt = start;

  try {
    return await new Promise<LabResult>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      let watchdog: NodeJS.Timeout | undefined;
      let lastAlive = 0;
      let stuck = '';
      const freeze = (why: string) => {
        clearInterval(watchdog);
        // Before the kill, ask QEMU where the lab's CPUs are: that is the evidence of a freeze.
        void labCpuState(qmp).then((cpus) => {
          killChild(child, true);
          reject(new LabFrozenError(why, tail(consoleText), cpus, tail(jobOutput)));
        });
      };
      const arm = () => {
        start = Date.now();
        lastAlive = start;
        timer = setTimeout(() => {
          killChild(child, true);
          reject(new LabTimeoutError(opts.timeoutMs, tail(jobOutput) + `\n[lab console]\n${tail(consoleText, 2000)}` + (stderr ? `\n[qemu stderr]\n${tail(stderr, 1000)}` : '')));
        }, opts.timeoutMs);
        watchdog = setInterval(() => {
          // (the heartbeat starts with the job: the lab's boot, slower on a loaded host, is held
          // to the default limit whatever shorter one the caller gave for the job)
          const limit = bootMs < 0 ? Math.max(silenceLimitMs, LAB_SILENCE_LIMIT_MS) : silenceLimitMs;
          if (stuck) freeze(`its kernel reported: ${stuck}`);
          else if (silenceLimitMs > 0 && Date.now() - lastAlive > limit) freeze(`no heartbeat for ${Math.round((Date.now() - lastAlive) / 1000)} s`);
        }, 1000);
      };
      // Waiting for another lab is bounded too, by this run's own timeout.
      const lockTimer = exclusive
        ? setTimeout(() => {
            killChild(child, true);
            reject(new Error(`runInLab: another lab run held the lab lock for more than ${opts.timeoutMs} ms`));
          }, opts.timeoutMs)
        : undefined;
      if (!exclusive) arm();
      child.stdout!.setEncoding('utf8');
      child.stderr!.setEncoding('utf8');
      // The console, a line at a time: heartbeats are counted, everything else is the lab's own
      // text (firmware, init, kernel messages) for onConsole.
      let pending = '';
      child.stdout!.on('data', (chunk: string) => {
        pending += chunk.replace(/\r/g, '');
        for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
          const line = pending.slice(0, nl);
          pending = pending.slice(nl + 1);
          if (heartbeatRe.test(line)) {
            lastAlive = Date.now();
            continue;
          }
          consoleText += `${line}\n`;
          if (!stuck) stuck = STUCK_CPU.exec(line)?.[0] ?? '';
          if (bootMs < 0 && startRe.test(consoleText)) {
            bootMs = Date.now() - start;
            lastAlive = Date.now(); // the job's silence counts from its start
          }
          opts.onConsole?.(line);
        }
      });
      child.stderr!.on('data', (chunk: string) => {
        if (exclusive && timer === undefined && (stderr + chunk).includes(LOCKED)) {
          clearTimeout(lockTimer);
          arm();
          stderr = (stderr + chunk).replace(`${LOCKED}\n`, '');
          return;
        }
        stderr += chunk;
      });
      child.once('error', (e) => {
        clearTimeout(timer);
        clearTimeout(lockTimer);
        clearInterval(watchdog);
        reject(new Error(`runInLab: cannot start qemu-system-x86_64: ${e.message}`));
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        clearTimeout(lockTimer);
        clearInterval(watchdog);
        if (pending) consoleText += pending;
        const durationMs = Date.now() - start;
        const s = startRe.exec(consoleText);
        const e = exitRe.exec(consoleText);
        // The job's channel closes with QEMU; wait for its last bytes (briefly: a killed QEMU
        // may never have connected it).
        void Promise.race([jobClosed, new Promise((r) => setTimeout(r, 2000))]).then(() => {
          if (s && e && e.index >= s.index) {
            resolve({ exitCode: Number(e[1]), output: jobOutput, durationMs, bootMs, queuedMs: start - queuedAt, mode: 'lab' });
            return;
          }
          const setupError = errRe.exec(consoleText);
          reject(
            new Error(
              `runInLab: the lab ended (qemu ${signal ?? `exit ${code}`}) ` +
                (setupError ? `with a setup error: ${setupError[1]}` : 'without reporting an exit status') +
                `\n[job output]\n${tail(jobOutput, 2000)}\n[console]\n${tail(consoleText)}\n[qemu stderr]\n${tail(stderr, 2000)}`,
            ),
          );
        });
      });
    });
  } finally {
    jobServer.close();
    rmSync(job, { force: true });
    rmSync(qmp, { force: true });
    rmSync(jobSocket, { force: true });
  }
}

/**
 * The registers of every lab CPU, twice a second apart (a CPU whose RIP does not move is stuck
 * there), from QEMU's monitor; an explanation when QEMU does not answer (a hung QEMU).
 */
async function labCpuState(qmp: string): Promise<string> {
  const ask = async () => {
    const c = await QmpClient.connect(qmp, 5_000);
    try {
      const regs = async () => String(await c.execute('human-monitor-command', { 'command-line': 'info registers -a' }));
      const first = await regs();
      await new Promise((r) => setTimeout(r, 1000));
      const cpus = JSON.stringify(await c.execute('query-cpus-fast'));
      return `[query-cpus-fast] ${cpus}\n[info registers -a]\n${first}\n[1 s later]\n${await regs()}`;
    } finally {
      c.close();
    }
  };
  const timeout = new Promise<string>((r) => setTimeout(() => r('QEMU\'s monitor did not answer within 15 s'), 15_000));
  return Promise.race([ask().catch((e: Error) => `QEMU's monitor: ${e.message}`), timeout]);
}

async function runDirect(opts: LabOptions): Promise<LabResult> {
  const dir = path.join(os.tmpdir(), `tern-lab-${randomBytes(6).toString('hex')}`);
  mkdirSync(dir, { recursive: true });
  const job = path.join(dir, 'job.sh');
  writeFileSync(job, jobText(opts));
  const start = Date.now();
  const child = spawn('bash', [job], { stdio: ['ignore', 'pipe', 'pipe'], detached: true, env: process.env });
  track(child, true);
  let output = '';
  try {
    return await new Promise<LabResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        killChild(child, true);
        reject(new LabTimeoutError(opts.timeoutMs, tail(output)));
      }, opts.timeoutMs);
      const onData = (chunk: string) => {
        const text = chunk.replace(/\r/g, '');
        output += text;
        opts.onOutput?.(text);
      };
      child.stdout!.setEncoding('utf8').on('data', onData);
      child.stderr!.setEncoding('utf8').on('data', onData);
      child.once('error', (e) => {
        clearTimeout(timer);
        reject(new Error(`runInLab: cannot start bash: ${e.message}`));
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        const exitCode = code ?? 128 + (signal ? os.constants.signals[signal] : 0);
        resolve({ exitCode, output, durationMs: Date.now() - start, bootMs: 0, queuedMs: 0, mode: 'direct' });
      });
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
