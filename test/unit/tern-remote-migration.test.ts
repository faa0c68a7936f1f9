// tern-remote's migration commands: ch-remote's argument spellings and the bodies it sends for
// them, and `send-migration` following a migration (unless --no-wait) (a bar rewritten in place on a
// terminal, a line a second otherwise) against an API server whose Vmm plays a migration.
import test from 'ava';
import { spawnSync } from 'node:child_process';

import { TernClient } from '../../src/api/client';
import { followMigration, progressBar } from '../../src/cli/migration-follow';
import { RemoteUsageError, parseTernRemoteArgs, receiveMigrationBody, sendMigrationBody } from '../../src/cli/tern-remote-args';
import type { MigrationProgress, SendMigrationOptions } from '../../src/migration/migration-options';
import { migrationEvents } from '../../src/state';
import { TERN_REMOTE, runTernRemote } from '../support/processes';
import { ReplyRecorder, startApi, tempDir, type ApiRig } from './api-harness';

const MIB = 1 << 20;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
let rig: ApiRig;

test.before(async () => {
  rig = await startApi(new ReplyRecorder(), tempDir('tern-remote-migration-'));
});
test.after.always(async () => {
  await rig?.close();
});

// ---- arguments ----------------------------------------------------------------------------

test('send-migration: ch-remote\'s option string becomes the body ch-remote sends, defaults and field order included', (t) => {
  t.is(
    JSON.stringify(sendMigrationBody('destination_url=tcp:10.0.0.2:6000')),
    '{"destination_url":"tcp:10.0.0.2:6000","local":false,"preserve_source":false,"downtime_ms":300,"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Precopy"}',
  );
  t.like(sendMigrationBody('destination_url=unix:/run/m.sock,local=on,downtime_ms=100,timeout_s=30,timeout_strategy=ignore,memory_mode=PreCopy'), {
    destination_url: 'unix:/run/m.sock',
    local: true,
    downtime_ms: 100,
    timeout_s: 30,
    timeout_strategy: 'Ignore',
    memory_mode: 'Precopy',
  });
  t.like(sendMigrationBody('timeout_strategy=Cancel,destination_url=tcp:[::1]:6000,connections=4,local=off'), { timeout_strategy: 'Cancel', connections: 4, local: false });
  // ch-remote before its option string: a bare URL, --local for local=on
  t.like(sendMigrationBody('unix:/run/m.sock', true), { destination_url: 'unix:/run/m.sock', local: true });
});

test('send-migration: what ch-remote refuses before sending, tern-remote refuses too (exit 2)', (t) => {
  for (const [arg, re] of [
    ['local=on', /destination_url is required/],
    ['destination_url=tcp:h:1,connections=0', /connections must be non-zero/],
    ['destination_url=tcp:h:1,connections=129', /connections=129 must not exceed 128/],
    ['destination_url=tcp:h:1,downtime_ms=0', /downtime_ms must be non-zero/],
    ['destination_url=tcp:h:1,timeout_s=-5', /timeout_s=-5 is not a whole number/],
    ['destination_url=tcp:h:1,timeout_strategy=abort', /timeout_strategy=abort must be cancel or ignore/],
    ['destination_url=tcp:h:1,memory_mode=lazy', /memory_mode=lazy must be precopy or postcopy/],
    ['destination_url=tcp:h:1,local=on', /local=on needs a unix: destination_url/],
    ['destination_url=unix:/m.sock,connections=2', /unix: socket takes one connection/],
    ['destination_url=tcp:h:1,local=maybe', /local=maybe must be on or off/],
    ['destination_url=tcp:h:1,speed=9', /unknown parameter "speed"/],
    ['destination_url=file:///tmp/x', /destination_url "file:\/\/\/tmp\/x": a migration URL is tcp:HOST:PORT or unix:\/path/],
    ['destination_url=tcp:h', /tcp:HOST:PORT/],
  ] as const) {
    t.throws(() => sendMigrationBody(arg), { instanceOf: RemoteUsageError, message: re }, arg);
  }
});

test('receive-migration: ch-remote\'s option string and body; file-descriptor options are refused', (t) => {
  t.is(
    JSON.stringify(receiveMigrationBody('receiver_url=tcp:0.0.0.0:6000')),
    '{"receiver_url":"tcp:0.0.0.0:6000","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,"zone_updates":[]}',
  );
  t.like(receiveMigrationBody('unix:/run/m.sock'), { receiver_url: 'unix:/run/m.sock' });
  t.deepEqual(receiveMigrationBody('receiver_url=tcp:0.0.0.0:6000,zone_updates=[mem0@1,mem1@0]').zone_updates, [
    { id: 'mem0', host_numa_node: 1 },
    { id: 'mem1', host_numa_node: 0 },
  ]);
  t.throws(() => receiveMigrationBody('receiver_url=unix:/m.sock,iommufd_fd=5'), { message: /iommufd_fd passes file descriptors/ });
  t.throws(() => receiveMigrationBody('receiver_url=unix:/m.sock,tls_dir=/etc/tls'), { message: /TLS works over tcp: only/ });
  t.throws(() => receiveMigrationBody('memory_mode=precopy'), { message: /receiver_url is required/ });
});

test('the command line: --wait, --no-wait and --local belong to send-migration, the CONFIG is required', (t) => {
  const run = parseTernRemoteArgs(['--api-socket', '/s', 'send-migration', '--wait', 'destination_url=tcp:h:1']);
  t.like(run, { kind: 'run', command: 'send-migration', arg: 'destination_url=tcp:h:1' });
  t.true(run.kind === 'run' && run.flags.has('--wait') && !run.flags.has('--local'));
  t.throws(() => parseTernRemoteArgs(['--api-socket', '/s', 'receive-migration', '--wait', 'unix:/m']), { message: 'receive-migration takes no --wait' });
  t.throws(() => parseTernRemoteArgs(['--api-socket', '/s', 'pause', '--local']), { message: 'pause takes no --local' });
  t.throws(() => parseTernRemoteArgs(['--api-socket', '/s', 'send-migration']), { message: 'send-migration needs an argument' });
  t.throws(() => parseTernRemoteArgs(['--api-socket', '/s', 'migration-progress', 'x']), { message: 'too many arguments for migration-progress' });
  const noWait = parseTernRemoteArgs(['--api-socket', '/s', 'send-migration', '--no-wait', 'unix:/m']);
  t.true(noWait.kind === 'run' && noWait.flags.has('--no-wait'));
  t.throws(() => parseTernRemoteArgs(['--api-socket', '/s', 'receive-migration', '--no-wait', 'unix:/m']), { message: 'receive-migration takes no --no-wait' });
});

// ---- against a server -----------------------------------------------------------------------

const progress = (over: Partial<MigrationProgress>): MigrationProgress => ({
  role: 'send',
  phase: 'memory',
  url: 'tcp:dest:6000',
  local: false,
  iteration: 0,
  bytes_transferred: 0,
  bytes_remaining: 512 * MIB,
  dirty_rate_bytes_per_s: 0,
  link_rate_bytes_per_s: 0,
  estimated_downtime_ms: 0,
  throttle_percent: 0,
  elapsed_ms: 0,
  ...over,
});

/**
 * Make the rig's Vmm play a migration once asked: `rounds` memory rounds `stepMs` apart, then
 * finished (or failed with `failure`). Returns what it was asked.
 */
let playing = 0;
function playMigration(r: ApiRig, rounds: number, stepMs: number, failure?: string): SendMigrationOptions[] {
  // a migration an earlier test left playing stops: its events would end this test's
  const generation = ++playing;
  const asked: SendMigrationOptions[] = [];
  let current: MigrationProgress | null = null;
  r.vmm.migrationProgress = () => current;
  r.vmm.sendMigration = async (opts) => {
    asked.push(opts);
    current = progress({ phase: 'handshake' });
    const store = r.vmm.store;
    store.dispatch(migrationEvents.started({ destination_url: opts.destination_url, local: false }));
    let round = 0;
    const step = () => {
      if (generation !== playing) return;
      if (round < rounds) {
        const sent = (round + 1) * 100 * MIB;
        current = progress({ iteration: round, bytes_transferred: sent, bytes_remaining: Math.max(0, 500 * MIB - sent), link_rate_bytes_per_s: 200 * MIB, elapsed_ms: (round + 1) * stepMs });
        store.dispatch(migrationEvents.memoryIteration({ id: round, pages: 1, bytes: 4096 }));
        round++;
        setTimeout(step, stepMs);
      } else if (failure) {
        current = progress({ phase: 'failed', iteration: round, error: failure });
        store.dispatch(migrationEvents.failed({ reason: failure }));
      } else {
        current = progress({ phase: 'finished', iteration: round, bytes_transferred: 600 * MIB, bytes_remaining: 0, elapsed_ms: 4321 });
        store.dispatch(migrationEvents.finished({ downtime_ms: 40, total_ms: 900, bytes: 4096, iterations: 2 }));
      }
    };
    setTimeout(step, stepMs);
  };
  return asked;
}

test.serial('send-migration --no-wait returns at once after the 204, as ch-remote does', async (t) => {
  const asked = playMigration(rig, 30, 100);
  const started = Date.now();
  const r = await runTernRemote(rig.socket, ['send-migration', '--no-wait', 'destination_url=tcp:dest:6000,downtime_ms=200']);
  t.is(r.code, 0, r.stderr);
  t.is(r.stdout, '');
  t.true(Date.now() - started < 2500, 'it did not wait for the 3 s migration');
  t.like(asked[0], { destination_url: 'tcp:dest:6000', downtime_ms: 200, timeout_s: 3600, timeout_strategy: 'Cancel' });
});

test.serial('send-migration (followed by default), not on a terminal: plain progress lines, at most one a second, then exit 0', async (t) => {
  playMigration(rig, 12, 200);
  const started = Date.now();
  const r = await runTernRemote(rig.socket, ['send-migration', 'destination_url=tcp:dest:6000']);
  const seconds = (Date.now() - started) / 1000;
  t.is(r.code, 0, r.stderr);
  t.false(r.stdout.includes('\r'), 'no carriage returns in a log');
  const lines = r.stdout.trimEnd().split('\n');
  t.is(lines.pop(), 'migration finished in 4.3 s');
  t.true(lines.length >= 2, r.stdout);
  t.true(lines.length <= Math.ceil(seconds) + 1, `${lines.length} lines in ${seconds} s`);
  for (const l of lines) t.regex(l, /^migration: (handshake|memory|finished), round \d+, \d{1,3}% sent, \d+\.\d MiB\/s, ETA (\d+:\d\d|--:--)$/);
  t.true(lines.some((l) => /^migration: memory, round \d+, \d+% sent, 200\.0 MiB\/s, ETA \d:\d\d$/.test(l)), r.stdout);
});

test.serial('send-migration --wait exits 1 with the reason when the migration fails', async (t) => {
  playMigration(rig, 2, 100, 'the destination refused the VM: it has 4 vCPUs, this one 8');
  const r = await runTernRemote(rig.socket, ['send-migration', '--wait', 'destination_url=tcp:dest:6000']);
  t.is(r.code, 1);
  t.regex(r.stderr, /the migration failed: the destination refused the VM: it has 4 vCPUs, this one 8/);
});

test.serial('send-migration --wait: an error reply to the request itself is reported as for any command', async (t) => {
  playMigration(rig, 2, 100);
  const r = await runTernRemote(rig.socket, ['send-migration', '--wait', 'destination_url=unix:/run/mig.sock,local=on,preserve_source=on']);
  t.is(r.code, 1);
  t.regex(r.stderr, /send-migration failed: HTTP 400 Bad Request\n {2}0: The migration could not be started\n[\s\S]*preserve_source/);
});

test.serial('on a terminal: one line rewritten in place with phase, round, bar, percent, MiB/s and ETA', async (t) => {
  playMigration(rig, 4, 150);
  let text = '';
  const client = new TernClient(rig.socket);
  try {
    const outcome = await followMigration(client, () => client.sendMigration({ destination_url: 'tcp:dest:6000' }), { isTTY: true, write: (s) => (text += s) }, { pollMs: 40 });
    t.true(outcome.ok);
  } finally {
    client.close();
  }
  t.true(text.endsWith('\n'), 'the line is ended once the migration is');
  const frames = text.slice(0, -1).split('\r').slice(1);
  t.false(text.slice(0, -1).includes('\n'), 'nothing but the one line until the end');
  t.true(frames.length >= 4, `${frames.length} frames`);
  t.true(
    frames.some((f) => /^memory {4} round 1 \[#{8}-{12}\]  40% 200\.0 MiB\/s ETA 0:02 *$/.test(f)),
    JSON.stringify(frames),
  );
  t.regex(frames[frames.length - 1], /^finished {2} round 4 \[#{20}\] 100% 0\.0 MiB\/s ETA 0:00 *$/);
  // a shorter line wipes what a longer one left
  for (let i = 1; i < frames.length; i++) t.true(frames[i].length >= frames[i - 1].trimEnd().length);
});

const hasScript = spawnSync('script', ['--version']).status === 0;

(hasScript ? test.serial : test.serial.skip)('the tern-remote binary draws the bar when its output is a terminal (script(1) gives it one)', async (t) => {
  playMigration(rig, 3, 150);
  const command = `${process.execPath} ${TERN_REMOTE} --api-socket ${rig.socket} send-migration --wait destination_url=tcp:dest:6000`;
  const { spawn } = await import('node:child_process');
  const child = spawn('script', ['-qec', command, '/dev/null'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  t.is(code, 0, out);
  t.regex(out, /\r(handshake|memory) {2,}round \d \[[#-]{20}\] +\d+% /);
  t.regex(out, /\rfinished {3}round 3 \[#{20}\] 100% 0\.0 MiB\/s ETA 0:00 *\r?\n/);
  t.regex(out, /migration finished in 4\.3 s/);
});

test.serial('following: a VMM that goes away before the migration ends is a failure, not a hang', async (t) => {
  const gone = await startApi(new ReplyRecorder(), tempDir('tern-remote-migration-gone-'));
  playMigration(gone, 100, 100);
  const client = new TernClient(gone.socket);
  let text = '';
  try {
    const following = followMigration(client, () => client.sendMigration({ destination_url: 'tcp:dest:6000' }), { isTTY: false, write: (s) => (text += s) }, { pollMs: 50 });
    await sleep(400);
    await gone.server.close();
    const outcome = await following;
    t.false(outcome.ok);
    t.regex(outcome.ok ? '' : outcome.reason, /^lost the VMM before the migration ended: /);
    t.regex(text, /^migration: (handshake|memory), round \d+/, 'it was following before the VMM went');
  } finally {
    client.close();
    playing++;
    await gone.close();
  }
});

test('the terminal line for the phases before any rate is known', (t) => {
  t.is(progressBar(progress({ phase: 'handshake', bytes_remaining: 0 })), 'handshake  round 0 [--------------------]   0% 0.0 MiB/s ETA --:--');
});

test.serial('receive-migration waits for the migration; migration-progress and migration-cancel', async (t) => {
  let received = 0;
  rig.vmm.receiveMigration = () => new Promise((resolve) => setTimeout(() => resolve(void received++), 400));
  const r = await runTernRemote(rig.socket, ['receive-migration', 'receiver_url=tcp:0.0.0.0:6000']);
  t.is(r.code, 0, r.stderr);
  t.is(received, 1, 'it returned after the migration ended');
  rig.vmm.receiveMigration = () => Promise.reject(new Error('the source went away in round 3'));
  const failed = await runTernRemote(rig.socket, ['receive-migration', 'unix:/run/m.sock']);
  t.is(failed.code, 1);
  t.regex(failed.stderr, /receive-migration failed: HTTP 500 Internal Server Error\n {2}0: The migration could not be received\n {2}1: the source went away in round 3/);

  rig.vmm.migrationProgress = () => progress({ phase: 'receiving', role: 'receive', iteration: 2 });
  const shown = await runTernRemote(rig.socket, ['migration-progress']);
  t.is(shown.code, 0, shown.stderr);
  t.deepEqual(JSON.parse(shown.stdout), progress({ phase: 'receiving', role: 'receive', iteration: 2 }));
  let cancelled = 0;
  rig.vmm.cancelMigration = () => void cancelled++;
  t.is((await runTernRemote(rig.socket, ['migration-cancel'])).code, 0);
  t.is(cancelled, 1);
  rig.vmm.migrationProgress = () => null;
  const none = await runTernRemote(rig.socket, ['migration-cancel']);
  t.is(none.code, 1);
  t.regex(none.stderr, /migration-cancel failed: HTTP 404 Not Found\n {2}0: The migration could not be cancelled\n {2}1: no migration is in progress/);
});
