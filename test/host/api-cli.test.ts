// `tern --api-socket` and `tern-remote` as a user runs them: the VMM waits for API calls, a
// guest poweroff does not end it, vmm.shutdown ends it with 0; tern-remote prints replies and
// error chains; the event monitor file and `tern-remote events` carry the same events; the
// socket lock, stale sockets, and fd= sockets.
import test from 'ava';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import { formatMonitorEvent } from '../../src/api/event-monitor';
import type { TernEvent } from '../../src/api/schema';
import { GuestProcess, TERN_CLI } from '../linux/guest-process';
import { TERN_REMOTE, runTernRemote } from '../support/processes';
import { sleep } from './harness';
import { tempDir } from '../unit/api-harness';
import { buildTinyKernel, countsIn } from './tiny-kernel';

const dir = tempDir('tern-api-cli-');

async function waitFor(what: string, cond: () => boolean, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

function parseMonitor(text: string): TernEvent[] {
  return text.split('\n\n').filter(Boolean).map((b) => JSON.parse(b) as TernEvent);
}

test.serial('tern waits on its API socket; tern-remote drives a guest; with --no-shutdown poweroff keeps the VMM; shutdown-vmm exits 0', async (t) => {
  const socket = path.join(dir, 'a.sock');
  const monitorFile = path.join(dir, 'a-events.json');
  const vmm = GuestProcess.tern(['--api-socket', `path=${socket}`, '--event-monitor', `path=${monitorFile}`, '--no-shutdown']);
  try {
    await waitFor('the API socket', () => fs.existsSync(socket));
    t.is(fs.statSync(socket).mode & 0o777, 0o600);

    const ping = await runTernRemote(socket, ['ping']);
    t.is(ping.code, 0, ping.stderr);
    t.is(JSON.parse(ping.stdout).pid, vmm.child.pid);

    const info = await runTernRemote(socket, ['info']);
    t.is(info.code, 1);
    t.regex(info.stderr, /info failed: HTTP 404 Not Found\n {2}0: .+\n {2}1: no VM has been created/);

    // A config from stdin; the serial port is tern's own stdin/stdout, to type a poweroff.
    const config = {
      payload: { kernel: await buildTinyKernel(), cmdline: 'cli' },
      cpus: { boot_vcpus: 1, max_vcpus: 1 },
      memory: { size: 64 << 20 },
      serial: { mode: 'Tty' },
      console: { mode: 'Off' },
    };
    const created = await runTernRemote(socket, ['create', '-'], JSON.stringify(config));
    t.is(created.code, 0, created.stderr);
    t.is(created.stdout, '');
    const file = path.join(dir, 'config.json');
    fs.writeFileSync(file, JSON.stringify(config));
    const again = await runTernRemote(socket, ['create', file]);
    t.is(again.code, 1, 'a second create is refused');
    t.regex(again.stderr, /HTTP 500/);

    const before = connectionsTo(socket);
    const events = spawn(process.execPath, [TERN_REMOTE, '--api-socket', socket, 'events'], { stdio: 'pipe' });
    let eventsOut = '';
    events.stdout.on('data', (d) => (eventsOut += d));
    const eventsExit = new Promise<number | null>((r) => events.on('exit', r));
    // Only once the stream is connected does it see every event from the boot on (tern-remote
    // may take seconds to start on a loaded host); then a moment for its request to be read.
    for (let i = 0; i < 600 && connectionsTo(socket) <= before; i++) await sleep(50);
    await sleep(300);

    for (const cmd of ['boot', 'pause', 'resume']) {
      const r = await runTernRemote(socket, [cmd]);
      t.is(r.code, 0, `${cmd}: ${r.stderr}`);
    }
    await vmm.waitFor(/COUNT 2\n/, 20_000);
    const counters = await runTernRemote(socket, ['counters']);
    t.is(counters.code, 0, counters.stderr);
    t.true(JSON.parse(counters.stdout).serial0.tx_bytes > 0);

    vmm.type('p'); // the tiny kernel powers off through ACPI
    await waitFor('the VM to report Shutdown', () => eventsOut.includes('"event": "shutdown"'));
    await sleep(300);
    t.is(vmm.child.exitCode, null, 'with --no-shutdown, a guest poweroff does not end the VMM');
    t.is(JSON.parse((await runTernRemote(socket, ['info'])).stdout).state, 'Shutdown');

    const boot = await runTernRemote(socket, ['boot']);
    t.is(boot.code, 0, 'a powered-off VM boots again');
    const down = await runTernRemote(socket, ['shutdown-vmm']);
    t.is(down.code, 0, down.stderr);
    t.is((await vmm.exit(15_000)).code, 0);
    t.is(await eventsExit, 0, 'the event stream ends with the VMM');
    t.false(fs.existsSync(socket), 'the socket file is removed on exit');

    const fromFile = parseMonitor(fs.readFileSync(monitorFile, 'utf8'));
    t.deepEqual(
      fromFile.map((e) => `${e.source}:${e.event}`),
      [
        'vmm:starting',
        'vm:booting', 'vm:booted', 'vm:pausing', 'vm:paused', 'vm:resuming', 'vm:resumed',
        'vm:shutdown',
        'vm:booting', 'vm:booted',
        'vm:shutdown', 'vm:deleted', 'vmm:shutdown',
      ],
    );
    t.is(fs.readFileSync(monitorFile, 'utf8'), fromFile.map(formatMonitorEvent).join(''), 'exactly the monitor format');
    // The stream started after "vmm starting": the rest is the same events, byte for byte.
    t.is(eventsOut, fromFile.slice(1).map(formatMonitorEvent).join(''));
  } finally {
    vmm.kill();
  }
});


test.serial('as in Cloud Hypervisor, a guest poweroff ends a VMM with an API socket (exit 0, vm:shutdown then vmm:shutdown)', async (t) => {
  const socket = path.join(dir, 'b.sock');
  const monitorFile = path.join(dir, 'b-events.json');
  const vmm = GuestProcess.tern(['--api-socket', `path=${socket}`, '--event-monitor', `path=${monitorFile}`]);
  try {
    await waitFor('the API socket', () => fs.existsSync(socket));
    const config = {
      payload: { kernel: await buildTinyKernel(), cmdline: 'cli' },
      cpus: { boot_vcpus: 1, max_vcpus: 1 },
      memory: { size: 64 << 20 },
      serial: { mode: 'Tty' },
      console: { mode: 'Off' },
    };
    t.is((await runTernRemote(socket, ['create', '-'], JSON.stringify(config))).code, 0);
    t.is((await runTernRemote(socket, ['boot'])).code, 0);
    await vmm.waitFor(/COUNT 1\n/, 20_000);
    vmm.type('p'); // the tiny kernel powers off through ACPI
    t.is((await vmm.exit(15_000)).code, 0);
    t.false(fs.existsSync(socket), 'the socket file is removed on exit');
    const events = parseMonitor(fs.readFileSync(monitorFile, 'utf8')).map((e) => `${e.source}:${e.event}`);
    t.true(events.includes('vm:shutdown'), events.join(' '));
    t.true(events.indexOf('vm:shutdown') < events.lastIndexOf('vmm:shutdown'), events.join(' '));
    t.is(events[events.length - 1], 'vmm:shutdown', events.join(' '));
  } finally {
    vmm.kill();
  }
});

test.serial('tern --kernel with --api-socket creates and boots through the API path; the lock keeps a second VMM off', async (t) => {
  const socket = path.join(dir, 'b.sock');
  const serial = path.join(dir, 'b.serial');
  const vmm = GuestProcess.tern([
    '--kernel', await buildTinyKernel(), '--cmdline', 'cli boot', '--memory', 'size=64M',
    '--serial', `file=${serial}`, '--api-socket', socket,
  ]);
  try {
    await waitFor('COUNT lines', () => fs.existsSync(serial) && countsIn(fs.readFileSync(serial, 'latin1')).length >= 2);
    const info = JSON.parse((await runTernRemote(socket, ['info'])).stdout);
    t.is(info.state, 'Running');
    t.deepEqual(info.config.serial, { mode: 'File', file: serial });
    t.is(info.config.memory.size, 64 << 20);

    const second = GuestProcess.tern(['--api-socket', `path=${socket}`]);
    const { code } = await second.exit(15_000);
    t.is(code, 1);
    t.regex(second.stderr, /in use by another VMM/);
    t.is((await runTernRemote(socket, ['ping'])).code, 0, 'the first VMM still answers');
    t.true(fs.lstatSync(socket).isSocket());
  } finally {
    vmm.kill();
  }
  await vmm.exited;
  t.true(fs.existsSync(socket), 'a killed VMM leaves its socket file behind');
  const third = GuestProcess.tern(['--api-socket', `path=${socket}`]);
  try {
    await waitFor('the replacement VMM', () => vmm.child.pid !== undefined && third.child.exitCode === null && fs.existsSync(socket));
    let ping = await runTernRemote(socket, ['ping']);
    for (let i = 0; i < 40 && JSON.parse(ping.stdout || '{}').pid !== third.child.pid; i++) {
      await sleep(100);
      ping = await runTernRemote(socket, ['ping']);
    }
    t.is(JSON.parse(ping.stdout).pid, third.child.pid, 'the stale socket was replaced');
  } finally {
    third.kill();
  }
});

test.serial('--api-socket fd=N and --event-monitor fd=N use inherited descriptors', async (t) => {
  const py = spawnSync('python3', ['--version']);
  if (py.status !== 0) {
    t.log('python3 is not available to hand over a listening socket: fd= checked through --event-monitor only');
  }
  const socket = path.join(dir, 'c.sock');
  const monitorFile = path.join(dir, 'c-events.json');
  const monitorFd = fs.openSync(monitorFile, 'w');
  const ternJs = TERN_CLI;
  // python3 binds and listens, then execs tern with the socket as an inherited fd.
  const launcher =
    'import os, socket, sys\n' +
    's = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n' +
    's.bind(sys.argv[1]); s.listen(16); os.set_inheritable(s.fileno(), True)\n' +
    "os.execv(sys.argv[2], [sys.argv[2], sys.argv[3], '--api-socket', 'fd=%d' % s.fileno(), '--event-monitor', 'fd=3'])\n";
  const child = py.status === 0
    ? spawn('python3', ['-c', launcher, socket, process.execPath, ternJs], { stdio: ['pipe', 'pipe', 'pipe', monitorFd] })
    : spawn(process.execPath, [ternJs, '--api-socket', socket, '--event-monitor', 'fd=3'], { stdio: ['pipe', 'pipe', 'pipe', monitorFd] });
  fs.closeSync(monitorFd);
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((r) => child.on('exit', r));
  try {
    await waitFor('the socket', () => fs.existsSync(socket));
    let ping = await runTernRemote(socket, ['ping']);
    for (let i = 0; i < 50 && ping.code !== 0; i++) {
      await sleep(100);
      ping = await runTernRemote(socket, ['ping']);
    }
    t.is(ping.code, 0, `${ping.stderr} ${stderr}`);
    t.is(JSON.parse(ping.stdout).pid, child.pid);
    t.is((await runTernRemote(socket, ['shutdown-vmm'])).code, 0);
    t.is(await exited, 0);
    t.deepEqual(
      parseMonitor(fs.readFileSync(monitorFile, 'utf8')).map((e) => `${e.source}:${e.event}`),
      ['vmm:starting', 'vmm:shutdown'],
    );
  } finally {
    child.kill('SIGKILL');
  }
});

test.serial('tern-remote: usage errors exit 2, an unreachable VMM exits 1', async (t) => {
  const none = await runTernRemote(path.join(dir, 'nobody.sock'), ['ping']);
  t.is(none.code, 1);
  t.regex(none.stderr, /cannot talk to the VMM/);
  const bad = await runTernRemote(path.join(dir, 'nobody.sock'), ['frobnicate']);
  t.is(bad.code, 2);
  t.regex(bad.stderr, /unknown command frobnicate/);
  const help = spawnSync(process.execPath, [TERN_REMOTE, '--help'], { encoding: 'utf8' });
  t.is(help.status, 0);
  for (const cmd of ['ping', 'info', 'counters', 'create', 'boot', 'delete', 'pause', 'resume', 'reboot', 'shutdown', 'power-button', 'shutdown-vmm', 'events']) {
    t.regex(help.stdout, new RegExp(`^  ${cmd}\\b`, 'm'), cmd);
  }
});

/** Connected UNIX sockets bound to `socketPath` (the server's ends of its clients' connections). */
function connectionsTo(socketPath: string): number {
  // /proc/net/unix: "Num RefCount Protocol Flags Type St Inode Path"; St 03 is connected.
  return fs
    .readFileSync('/proc/net/unix', 'utf8')
    .split('\n')
    .filter((l) => {
      const f = l.trim().split(/\s+/);
      return f[5] === '03' && f[7] === socketPath;
    }).length;
}
