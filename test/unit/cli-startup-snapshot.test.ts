// `tern` as installed starts from its V8 startup snapshot: the VMM it starts serves the API,
// logs as itself (its own pid, the time now), stamps its events with the time since it started
// (not since the snapshot was built), creates a VM and shuts down; and where the
// snapshot was built by another node binary, the same launcher starts the plain bundle; where
// snapshots for several kinds of CPU lie side by side, it starts from this CPU's.
import test, { type ExecutionContext } from 'ava';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { monitorSeconds, readMonitorFile } from '../support/monitor-file';
import { waitForListening } from '../support/processes';

const REPO = path.resolve(__dirname, '..', '..', '..');
const BIN = path.join(REPO, 'dist', 'bin');

/** The startup snapshot the build made for this CPU: [blob, stamp] file names in BIN. */
function builtSnapshot(): [string, string] {
  const stamps = fs.readdirSync(BIN).filter((f) => /^tern\.[0-9a-f]{16}\.blob\.node$/.test(f));
  if (stamps.length !== 1) throw new Error(`expected one startup snapshot in ${BIN}, found ${stamps.join(', ') || 'none'}`);
  return [stamps[0].slice(0, -'.node'.length), stamps[0]];
}

function request(socket: string, method: string, p: string, body?: unknown): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? '' : JSON.stringify(body);
    const req = http.request({ socketPath: socket, method, path: `/api/v1/${p}`, headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) } }, (res) => {
      let out = '';
      res.on('data', (d) => (out += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: out }));
    });
    req.on('error', reject);
    req.end(data);
  });
}

/** The first two lines of a stamp made for the launcher in `bin` by this node binary. */
function stampLines(bin: string): string {
  return `${fs.realpathSync(bin)}\n${fs.realpathSync(process.execPath)}`;
}

/** The CPU flags line of the build's stamp. */
const stampCpu = (stampFile: string): string => fs.readFileSync(path.join(BIN, stampFile), 'utf8').split('\n')[2];

/** Give `file` the modification time of `like`, to the nanosecond, as the build does. */
function sameTimeAs(file: string, like: string): void {
  execFileSync('touch', ['-r', like, file]);
}

/** Give a copied file the original's times. */
function copyTimes(copy: string, file: string): void {
  const st = fs.statSync(path.join(BIN, file));
  fs.utimesSync(path.join(copy, file), st.atime, st.mtime);
}

/** The launcher's default (scripts/bundle.js; README, Memory per idle VM). */
const MALLOC_ARENAS = 1;

/** For a launcher copied out of the build: the addon stays where the build put it. */
const addonEnv: NodeJS.ProcessEnv = { ...process.env, TERN_NATIVE_ADDON: path.join(REPO, 'build', 'Release', 'tern_native.node') };

const environ = (pid: number): string[] => fs.readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');

async function startTern(launcher: string, env: NodeJS.ProcessEnv = process.env, args: (dir: string) => string[] = () => []): Promise<{ child: ChildProcess; socket: string; dir: string; stderr: () => string; exited: Promise<number | null> }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-snapshot-cli-'));
  const socket = path.join(dir, 'api.sock');
  const child = spawn(launcher, ['-v', '--api-socket', `path=${socket}`, ...args(dir)], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  for (let i = 0; i < 1000 && !fs.existsSync(socket) && child.exitCode === null; i++) await new Promise((r) => setTimeout(r, 10));
  if (child.exitCode === null && fs.existsSync(socket)) await waitForListening(socket, 10_000);
  return { child, socket, dir, stderr: () => stderr, exited };
}

/**
 * Start `launcher`, check that its VMM serves the API and shuts down cleanly, and return the
 * startup snapshot node was started from (undefined: the plain bundle).
 */
async function blobUsed(t: ExecutionContext, launcher: string, env: NodeJS.ProcessEnv, what = launcher): Promise<string | undefined> {
  const vmm = await startTern(launcher, env);
  try {
    const cmdline = fs.readFileSync(`/proc/${vmm.child.pid}/cmdline`, 'utf8').split('\0');
    t.is((await request(vmm.socket, 'GET', 'vmm.ping')).status, 200, `${what}: ${vmm.stderr()}`);
    await request(vmm.socket, 'PUT', 'vmm.shutdown');
    t.is(await vmm.exited, 0, vmm.stderr());
    return cmdline.includes('--snapshot-blob') ? cmdline[cmdline.indexOf('--snapshot-blob') + 1] : undefined;
  } finally {
    vmm.child.kill('SIGKILL');
    fs.rmSync(vmm.dir, { recursive: true, force: true });
  }
}

test.serial('tern started from its startup snapshot serves the API, logs as itself and shuts down', async (t) => {
  const [blob] = builtSnapshot();
  t.true(fs.existsSync(path.join(BIN, blob)), 'the build made a startup snapshot');
  const before = Date.now();
  const vmm = await startTern(path.join(BIN, 'tern'), process.env, (dir) => ['--event-monitor', `path=${path.join(dir, 'events')}`]);
  try {
    const cmdline = fs.readFileSync(`/proc/${vmm.child.pid}/cmdline`, 'utf8').split('\0');
    t.true(cmdline.includes('--snapshot-blob'), `started from the snapshot: ${cmdline.join(' ')}`);
    t.true(environ(vmm.child.pid!).includes(`MALLOC_ARENA_MAX=${MALLOC_ARENAS}`), 'the launcher gives the VMM its malloc arenas');
    const ping = await request(vmm.socket, 'GET', 'vmm.ping');
    t.is(ping.status, 200, ping.body);
    t.regex(JSON.parse(ping.body).version, /^\d+\.\d+\.\d+/);
    // The contract's checks (compiled into the snapshot) still refuse a bad body...
    const bad = await request(vmm.socket, 'PUT', 'vm.create', { cpus: { boot_vcpus: 'two' } });
    t.is(bad.status, 400, bad.body);
    // ...and take a good one.
    const created = await request(vmm.socket, 'PUT', 'vm.create', { payload: { kernel: '/nonexistent/vmlinux' }, memory: { size: 64 << 20 } });
    t.is(created.status, 204, created.body);
    const info = await request(vmm.socket, 'GET', 'vm.info');
    t.is(info.status, 200, info.body);
    t.is(JSON.parse(info.body).state, 'Created');
    const down = await request(vmm.socket, 'PUT', 'vmm.shutdown');
    t.is(down.status, 204, down.body);
    t.is(await vmm.exited, 0, vmm.stderr());
    const lifetimeS = (Date.now() - before) / 1000;
    // Its events' times are since it started: none later than this test has waited for it.
    const events = readMonitorFile(path.join(vmm.dir, 'events'));
    t.deepEqual(events.map((e) => e.event).filter((e) => e === 'starting' || e === 'shutdown'), ['starting', 'shutdown']);
    for (const e of events) t.true(monitorSeconds(e) <= lifetimeS, `${e.event} at ${monitorSeconds(e)} s, the VMM lived ${lifetimeS} s`);
    // Its log lines are its own: this process's pid, this moment's time (not the build's).
    const lines = vmm
      .stderr()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { pid: number; time: number; msg: string });
    t.true(lines.some((l) => l.msg === 'HTTP API listening'), vmm.stderr());
    for (const l of lines) {
      t.is(l.pid, vmm.child.pid!);
      t.true(l.time >= before && l.time <= Date.now(), `log time ${l.time}`);
    }
  } finally {
    vmm.child.kill('SIGKILL');
    fs.rmSync(vmm.dir, { recursive: true, force: true });
  }
});

test.serial('the launcher runs no program but node: with only node on the PATH, named by a relative path or through a link, it starts from the startup snapshot', async (t) => {
  const only = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-only-node-'));
  try {
    fs.symlinkSync(process.execPath, path.join(only, 'node'));
    fs.symlinkSync(path.join(BIN, 'tern'), path.join(only, 'tern'));
    const cases: [string, string][] = [
      ['only node on the PATH', path.join(BIN, 'tern')],
      ['a relative path', path.relative(process.cwd(), path.join(BIN, 'tern')).replace(/^(?!\.|\/)/, './')],
      ['a symbolic link', path.join(only, 'tern')],
    ];
    for (const [how, launcher] of cases) {
      const env = how === 'only node on the PATH' ? { ...process.env, PATH: only } : process.env;
      const used = await blobUsed(t, launcher, env, how);
      t.is(used && path.basename(used), builtSnapshot()[0], how);
    }
  } finally {
    fs.rmSync(only, { recursive: true, force: true });
  }
});

test.serial('with V8 flags in NODE_OPTIONS (which node would refuse the snapshot for, and exit) tern starts from the plain bundle and serves the API', async (t) => {
  for (const options of ['--max-old-space-size=200', '--stack-trace-limit=20 --enable-source-maps']) {
    t.is(await blobUsed(t, path.join(BIN, 'tern'), { ...process.env, NODE_OPTIONS: options }, options), undefined, options);
  }
  t.is(path.basename((await blobUsed(t, path.join(BIN, 'tern'), { ...process.env, NODE_OPTIONS: '' }, 'an empty NODE_OPTIONS')) ?? ''), builtSnapshot()[0]);
});

test.serial('a MALLOC_ARENA_MAX the user set reaches the VMM unchanged', async (t) => {
  const vmm = await startTern(path.join(BIN, 'tern'), { ...process.env, MALLOC_ARENA_MAX: '4' });
  try {
    t.true(environ(vmm.child.pid!).includes('MALLOC_ARENA_MAX=4'));
  } finally {
    vmm.child.kill('SIGKILL');
    await vmm.exited;
    fs.rmSync(vmm.dir, { recursive: true, force: true });
  }
});

test.serial('a snapshot built elsewhere, by another node binary or on a CPU with other features is not used: the launcher starts the plain bundle, or this CPU\'s snapshot beside it', async (t) => {
  const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-snapshot-bin-'));
  try {
    // A moved build: its stamp names the directory it was built in.
    const [blob, stampFile] = builtSnapshot();
    for (const f of ['tern', 'tern.js', 'tern-snapshot.js', blob, stampFile]) fs.copyFileSync(path.join(BIN, f), path.join(copy, f));
    copyTimes(copy, 'tern-snapshot.js');
    sameTimeAs(path.join(copy, blob), path.join(copy, 'tern-snapshot.js'));
    fs.chmodSync(path.join(copy, 'tern'), 0o755);
    t.true(fs.readFileSync(path.join(copy, stampFile), 'utf8').startsWith(`${fs.realpathSync(BIN)}\n`));
    const vmm = await startTern(path.join(copy, 'tern'), addonEnv);
    try {
      const cmdline = fs.readFileSync(`/proc/${vmm.child.pid}/cmdline`, 'utf8').split('\0');
      t.false(cmdline.includes('--snapshot-blob'), cmdline.join(' '));
      t.true(cmdline.includes(path.join(copy, 'tern.js')), cmdline.join(' '));
      t.is((await request(vmm.socket, 'GET', 'vmm.ping')).status, 200);
      await request(vmm.socket, 'PUT', 'vmm.shutdown');
      t.is(await vmm.exited, 0, vmm.stderr());
    } finally {
      vmm.child.kill('SIGKILL');
      fs.rmSync(vmm.dir, { recursive: true, force: true });
    }
    // Built here, but by another node binary, or by a binary at node's path that was replaced
    // since (by a newer one, or an older one as a package's can be); or on a CPU with other
    // features (V8 refuses such a snapshot, and node would exit instead of starting).
    const here = stampLines(copy);
    const cpu = stampCpu(stampFile);
    t.regex(cpu, /^: .*\bsse2\b/, 'the stamp records the CPU feature flags');
    const nodeChanged = fs.statSync(process.execPath).mtime;
    for (const [stamp, time] of [
      [`${fs.realpathSync(copy)}\n/usr/local/bin/some-other-node\n${cpu}\n`, undefined],
      [`${here}\n${cpu}\n`, new Date(nodeChanged.getTime() - 60_000)],
      [`${here}\n${cpu}\n`, new Date(nodeChanged.getTime() + 60_000)],
      [`${here}\n: fpu sse sse2\n`, undefined],
    ] as const) {
      fs.writeFileSync(path.join(copy, stampFile), stamp);
      if (time) fs.utimesSync(path.join(copy, stampFile), time, time);
      else sameTimeAs(path.join(copy, stampFile), process.execPath);
      t.is(await blobUsed(t, path.join(copy, 'tern'), addonEnv, stamp), undefined, stamp);
    }
    // The same stamp with this CPU's flags: the snapshot is used (so the check above is the
    // CPU's), and it is picked from among those built for other kinds of CPU beside it (each
    // a blob that no node could load: were one of them tried, the VMM would not start).
    fs.writeFileSync(path.join(copy, stampFile), `${here}\n${cpu}\n`);
    sameTimeAs(path.join(copy, stampFile), process.execPath);
    for (const other of ['0000000000000000', 'ffffffffffffffff']) {
      fs.writeFileSync(path.join(copy, `tern.${other}.blob`), 'not a snapshot');
      fs.writeFileSync(path.join(copy, `tern.${other}.blob.node`), `${here}\n: fpu sse sse2 ${other}\n`);
    }
    t.is(await blobUsed(t, path.join(copy, 'tern'), addonEnv), path.join(fs.realpathSync(copy), blob));
  } finally {
    fs.rmSync(copy, { recursive: true, force: true });
  }
});

test.serial('a startup snapshot kept outside a read-only build (TERN_STARTUP_SNAPSHOT_DIR) is used; not from a directory others may write to, nor once the bundle it was made of was replaced', async (t) => {
  const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-snapshot-bin-'));
  const own = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-snapshot-own-'));
  try {
    // The build: no snapshot in it. The machine's own directory: this CPU's, made for it.
    const [blob, stampFile] = builtSnapshot();
    for (const f of ['tern', 'tern.js', 'tern-snapshot.js']) fs.copyFileSync(path.join(BIN, f), path.join(copy, f));
    fs.chmodSync(path.join(copy, 'tern'), 0o755);
    copyTimes(copy, 'tern-snapshot.js');
    fs.copyFileSync(path.join(BIN, blob), path.join(own, blob));
    const cpu = stampCpu(stampFile);
    sameTimeAs(path.join(own, blob), path.join(copy, 'tern-snapshot.js'));
    fs.writeFileSync(path.join(own, stampFile), `${stampLines(copy)}\n${cpu}\n`);
    sameTimeAs(path.join(own, stampFile), process.execPath);
    const env = { ...addonEnv, TERN_STARTUP_SNAPSHOT_DIR: own };
    const launcher = path.join(copy, 'tern');
    t.is(await blobUsed(t, launcher, env), path.join(own, blob));
    // A directory others may write to is not the machine's own: what is in it is not run.
    for (const mode of [0o770, 0o707]) {
      fs.chmodSync(own, mode);
      t.is(await blobUsed(t, launcher, env), undefined, `a snapshot directory of mode ${mode.toString(8)} is ignored`);
    }
    fs.chmodSync(own, 0o700);
    t.is(await blobUsed(t, launcher, env), path.join(own, blob));
    // A new build of the bundle (here: the same bytes, a new time) makes that snapshot stale.
    const later = new Date(Date.now() + 5000);
    fs.utimesSync(path.join(copy, 'tern-snapshot.js'), later, later);
    t.is(await blobUsed(t, launcher, env), undefined, 'a snapshot of another bundle is not used');
    // An older bundle put in place (as a package or a copy that keeps times would) is another one too.
    const earlier = new Date('2000-01-01T00:00:00Z');
    fs.utimesSync(path.join(copy, 'tern-snapshot.js'), earlier, earlier);
    t.is(await blobUsed(t, launcher, env), undefined, 'a snapshot of an older bundle is not used');
  } finally {
    fs.rmSync(copy, { recursive: true, force: true });
    fs.rmSync(own, { recursive: true, force: true });
  }
});
