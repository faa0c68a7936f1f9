// `npm run bench -- startup`: a VMM started with only its API socket, from exec to a socket
// that answers, then told to shut down. tern (`dist/bin/tern`, from its startup snapshot), the
// same without the snapshot (`node dist/bin/tern.js`), QEMU 7.2 (`-M microvm -S`, QMP on a
// UNIX socket) and a bare Node HTTP server on a UNIX socket, in turns, in one run. Needs no KVM,
// so it runs where it is started (`node dist/test/bench/startup-bench.js`) as well as in the lab.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { median } from './median';

const REPO = path.resolve(__dirname, '..', '..', '..');
const RUNS = Number(process.env.TERN_BENCH_STARTUP_RUNS ?? process.env.TERN_BENCH_RUNS ?? 9);
const TICKS = 100; // clock ticks per second of /proc/PID/stat (USER_HZ on Linux)

interface Sample {
  /** exec to a connection the socket accepts and answers */
  readyMs: number;
  /** CPU the process had used by then (all threads) */
  cpuMs: number;
  /** peak resident set by then */
  hwmKiB: number;
  /** exec to exit after the shutdown request */
  totalMs: number;
  /** whether node was started from a startup snapshot (its command line says) */
  fromSnapshot: boolean;
}

interface Subject {
  name: string;
  argv: (socket: string) => string[];
  /** one request and its answer on the socket: proof that the server runs */
  probe: (socket: string) => Promise<void>;
  /** make it exit */
  shutdown: (socket: string) => Promise<void>;
}

function cpuMsOf(pid: number): number {
  // utime and stime are fields 14 and 15; the command name (field 2) may hold spaces.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return ((Number(f[11]) + Number(f[12])) * 1000) / TICKS;
}

function hwmKiBOf(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

/** Send `request` on a new connection to `socket`, resolve with what came back until `done` says so. */
function exchange(socket: string, request: string, done: (reply: string) => boolean): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = net.connect(socket);
    let reply = '';
    c.on('connect', () => c.write(request));
    c.on('data', (d) => {
      reply += d.toString('latin1');
      if (done(reply)) {
        c.destroy();
        resolve(reply);
      }
    });
    c.on('error', reject);
    c.on('close', () => resolve(reply));
  });
}

const http = (method: string, p: string): string => `${method} ${p} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n`;
const httpDone = (r: string): boolean => /\r\n\r\n/.test(r);

const ternProbe = async (s: string): Promise<void> => {
  const r = await exchange(s, http('GET', '/api/v1/vmm.ping'), httpDone);
  if (!r.startsWith('HTTP/1.1 200')) throw new Error(`vmm.ping answered ${r.split('\r\n')[0]}`);
};
const ternShutdown = async (s: string): Promise<void> => {
  await exchange(s, http('PUT', '/api/v1/vmm.shutdown'), httpDone);
};

const SUBJECTS: Subject[] = [
  {
    name: 'tern (startup snapshot)',
    argv: (s) => [path.join(REPO, 'dist', 'bin', 'tern'), '--api-socket', `path=${s}`],
    probe: ternProbe,
    shutdown: ternShutdown,
  },
  {
    name: 'tern (node tern.js)',
    argv: (s) => [process.execPath, path.join(REPO, 'dist', 'bin', 'tern.js'), '--api-socket', `path=${s}`],
    probe: ternProbe,
    shutdown: ternShutdown,
  },
  {
    name: 'QEMU 7.2 (microvm -S, QMP)',
    argv: (s) => ['qemu-system-x86_64', '-M', 'microvm', '-S', '-nodefaults', '-display', 'none', '-qmp', `unix:${s},server=on,wait=off`],
    // QMP greets every client: the greeting is its answer.
    probe: async (s) => {
      const r = await exchange(s, '', (x) => x.includes('"QMP"'));
      if (!r.includes('"QMP"')) throw new Error('no QMP greeting');
    },
    shutdown: async (s) => {
      await exchange(s, '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n', (x) => (x.match(/"return"/g) ?? []).length >= 2);
    },
  },
  {
    name: 'bare Node HTTP server',
    argv: (s) => [process.execPath, '-e', `require('http').createServer((q,r)=>{r.end();if(q.method==='PUT')process.exit(0)}).listen(${JSON.stringify(s)})`],
    probe: async (s) => {
      await exchange(s, http('GET', '/'), httpDone);
    },
    shutdown: async (s) => {
      await exchange(s, http('PUT', '/'), httpDone);
    },
  },
];

async function once(subject: Subject, dir: string): Promise<Sample> {
  const socket = path.join(dir, 'api.sock');
  fs.rmSync(socket, { force: true });
  const [cmd, ...args] = subject.argv(socket);
  const t0 = performance.now();
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr = (stderr + d.toString()).slice(-2000)));
  const exited = new Promise<number>((resolve) => child.on('exit', (code) => resolve(code ?? -1)));
  let alive = true;
  void exited.then(() => (alive = false));
  // Poll for a socket that answers: its file can exist a moment before anyone accepts on it.
  for (;;) {
    if (!alive) throw new Error(`${subject.name} exited before its socket answered: ${stderr.trim()}`);
    if (performance.now() - t0 > 60_000) throw new Error(`${subject.name}: no answer on its socket within 60 s`);
    if (fs.existsSync(socket)) {
      try {
        await subject.probe(socket);
        break;
      } catch {
        /* not yet */
      }
    }
    await new Promise((r) => setTimeout(r, 2));
  }
  const readyMs = performance.now() - t0;
  const fromSnapshot = fs.readFileSync(`/proc/${child.pid}/cmdline`, 'utf8').split('\0').includes('--snapshot-blob');
  const cpuMs = cpuMsOf(child.pid!);
  const hwmKiB = hwmKiBOf(child.pid!);
  await subject.shutdown(socket);
  const code = await Promise.race([exited, new Promise<number>((r) => setTimeout(() => r(-2), 10_000))]);
  if (code === -2) {
    child.kill('SIGKILL');
    throw new Error(`${subject.name} did not exit after its shutdown request`);
  }
  return { readyMs, cpuMs, hwmKiB, totalMs: performance.now() - t0, fromSnapshot };
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-startup-bench-'));
  const samples = new Map<string, Sample[]>(SUBJECTS.map((s) => [s.name, []]));
  try {
    // One warm-up round (page cache), then the runs, each subject in turn.
    for (let run = -1; run < RUNS; run++) {
      for (const s of SUBJECTS) {
        const r = await once(s, dir);
        if (run >= 0) samples.get(s.name)!.push(r);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const med = (name: string, k: 'readyMs' | 'cpuMs' | 'hwmKiB' | 'totalMs'): number => median(samples.get(name)!.map((x) => x[k]));
  const peer = SUBJECTS[2].name;
  process.stdout.write(`\nSTARTUP-BENCH-TABLE (median of ${RUNS}; ratio against QEMU)\n| VMM | API ready | CPU by then | peak RSS by then | start to exit | ready/QEMU | CPU/QEMU |\n|---|---|---|---|---|---|---|\n`);
  for (const s of SUBJECTS) {
    // The launcher starts tern.js where its snapshot was built for another node or CPU (a
    // host build run in the lab): say so rather than report it as the snapshot's figure.
    const label = s === SUBJECTS[0] && !samples.get(s.name)!.every((x) => x.fromSnapshot) ? 'tern (launcher: no snapshot for this CPU or node, ran tern.js)' : s.name;
    const ready = med(s.name, 'readyMs');
    const cpu = med(s.name, 'cpuMs');
    process.stdout.write(
      `| ${label} | ${ready.toFixed(0)} ms | ${cpu.toFixed(0)} ms | ${(med(s.name, 'hwmKiB') / 1024).toFixed(1)} MiB | ${med(s.name, 'totalMs').toFixed(0)} ms | ${(ready / med(peer, 'readyMs')).toFixed(2)} | ${(cpu / med(peer, 'cpuMs')).toFixed(2)} |\n`,
    );
  }
  process.stdout.write(`node ${process.version}, ${os.cpus().length} CPUs, ${os.cpus()[0]?.model ?? ''}\n`);
}

main().catch((e) => {
  process.stderr.write(`startup bench: ${(e as Error).message}\n`);
  process.exit(1);
});
