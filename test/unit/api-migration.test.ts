// The migration endpoints with the Vmm's migration methods stubbed (no guest, no /dev/kvm):
// vm.send-migration and vm.receive-migration as Cloud Hypervisor's contract has them (bodies,
// 204 or an error chain), what Tern refuses before anything starts, the receive that outlasts
// the server's request and idle timeouts, and Tern's vm.migration-progress and
// vm.migration-cancel. Replies of the contract's endpoints are checked against it at the end.
import test from 'ava';
import net from 'node:net';
import { firstValueFrom, takeWhile, toArray } from 'rxjs';

import { TernApiError, TernClient } from '../../src/api/client';
import type { MigrationEvent } from '../../src/api/schema';
import { VmmEvents, migrationEvents } from '../../src/state';
import type { MigrationProgress, ReceiveMigrationOptions, SendMigrationOptions } from '../../src/migration/migration-options';
import { ReplyRecorder, bodyJson, contractTest, parseResponses, startApi, tempDir, type ApiRig } from './api-harness';

const recorder = new ReplyRecorder();
const dir = tempDir('tern-api-migration-');
let rig: ApiRig;

/** What the stubbed Vmm was asked, and how it answers. */
interface Stub {
  sends: SendMigrationOptions[];
  receives: ReceiveMigrationOptions[];
  cancels: number;
  sendResult: () => Promise<void>;
  receiveResult: () => Promise<void>;
  progress: MigrationProgress | null;
  cancelThrows?: Error;
}

let stub: Stub;

function stubVmm(r: ApiRig): Stub {
  const s: Stub = { sends: [], receives: [], cancels: 0, sendResult: async () => undefined, receiveResult: async () => undefined, progress: null };
  r.vmm.sendMigration = (opts) => {
    s.sends.push(opts);
    return s.sendResult();
  };
  r.vmm.receiveMigration = (opts) => {
    s.receives.push(opts);
    return s.receiveResult();
  };
  r.vmm.migrationProgress = () => s.progress;
  r.vmm.cancelMigration = () => {
    if (s.cancelThrows) throw s.cancelThrows;
    s.cancels++;
  };
  return s;
}

test.before(async () => {
  rig = await startApi(recorder, dir);
});
test.beforeEach(() => {
  stub = stubVmm(rig);
});
test.after.always(async () => {
  await rig?.close();
});

const chain = (r: { body: Buffer }) => bodyJson(r) as string[];
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const progress = (over: Partial<MigrationProgress> = {}): MigrationProgress => ({
  role: 'send',
  phase: 'memory',
  url: 'tcp:dest:6000',
  local: false,
  iteration: 2,
  bytes_transferred: 300 << 20,
  bytes_remaining: 100 << 20,
  dirty_rate_bytes_per_s: 10 << 20,
  link_rate_bytes_per_s: 200 << 20,
  estimated_downtime_ms: 500,
  throttle_percent: 0,
  elapsed_ms: 1500,
  ...over,
});

test.serial('vm.send-migration: 204 once the Vmm has started it, with the options the body gave', async (t) => {
  const r = await rig.call('PUT', 'vm.send-migration', { destination_url: 'tcp:dest.example:6000', downtime_ms: 150, timeout_s: 60, timeout_strategy: 'Ignore' });
  t.is(r.status, 204, r.body.toString());
  t.is(r.body.length, 0);
  t.deepEqual(stub.sends, [{ destination_url: 'tcp:dest.example:6000', local: undefined, downtime_ms: 150, timeout_s: 60, timeout_strategy: 'Ignore' }]);
  // exactly what ch-remote sends: every field, tls_dir null, the enums in the contract's spelling
  const chRemote = await rig.call(
    'PUT',
    'vm.send-migration',
    '{"destination_url":"unix:/run/mig.sock","local":true,"preserve_source":false,"downtime_ms":300,"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Precopy"}',
  );
  t.is(chRemote.status, 204, chRemote.body.toString());
  t.deepEqual(stub.sends[1], { destination_url: 'unix:/run/mig.sock', local: true, downtime_ms: 300, timeout_s: 3600, timeout_strategy: 'Cancel', connections: 1 });
});

test.serial('vm.send-migration: the Vmm refusing to start is 500 with its reason', async (t) => {
  stub.sendResult = () => Promise.reject(new Error('cannot connect to tcp:dest:6000: connection refused'));
  const r = await rig.call('PUT', 'vm.send-migration', { destination_url: 'tcp:dest:6000' });
  t.is(r.status, 500);
  t.deepEqual(chain(r), ['The migration could not be started', 'cannot connect to tcp:dest:6000: connection refused']);
});

test.serial('vm.send-migration: malformed bodies and wrong spellings are 400 and start nothing', async (t) => {
  const cases: [unknown, RegExp][] = [
    [undefined, /needs a JSON body/],
    ['{"destination_url":', /malformed JSON/],
    [[], /not a SendMigrationData/],
    [{}, /destination_url/],
    [{ destination_url: 5 }, /destination_url/],
    [{ destination_url: 'tcp:d:1', local: 'yes' }, /\/local/],
    [{ destination_url: 'tcp:d:1', timeout_strategy: 'cancel' }, /\/timeout_strategy: must be one of "Cancel", "Ignore"/],
    [{ destination_url: 'tcp:d:1', timeout_strategy: 'Abort' }, /\/timeout_strategy: must be one of "Cancel", "Ignore"/],
    [{ destination_url: 'tcp:d:1', memory_mode: 'precopy' }, /\/memory_mode: must be one of "Precopy", "Postcopy"/],
    [{ destination_url: 'tcp:d:1', downtime_ms: 0 }, /\/downtime_ms/],
    [{ destination_url: 'tcp:d:1', timeout_s: 1.5 }, /\/timeout_s/],
    [{ destination_url: 'tcp:d:1', connections: 0 }, /\/connections/],
    [{ destination_url: 'tcp:d:1', connections: 129 }, /\/connections/],
  ];
  for (const [body, re] of cases) {
    const r = await rig.call('PUT', 'vm.send-migration', body);
    t.is(r.status, 400, JSON.stringify(body));
    // a missing or unparsable body is refused by the server before the endpoint sees it
    if (body !== undefined && typeof body !== 'string') t.is(chain(r)[0], 'The migration could not be started');
    t.true(chain(r).some((m) => re.test(m)), `${re} in ${r.body}`);
  }
  t.deepEqual(stub.sends, []);
});

test.serial('vm.send-migration: what Tern cannot do (connections > 1 over unix:, TLS over unix:, Postcopy, local over tcp, preserve_source) is 400', async (t) => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ destination_url: 'unix:/m.sock', connections: 2 }, /connections 2: more than one connection is for tcp: URLs only/],
    [{ destination_url: 'unix:/m.sock', local: true, connections: 128 }, /connections 128/],
    [{ destination_url: 'unix:/m.sock', tls_dir: '/etc/tls' }, /tls_dir: TLS is for tcp: URLs only/],
    [{ destination_url: 'tcp:d:1', memory_mode: 'Postcopy' }, /memory_mode "Postcopy"/],
    [{ destination_url: 'tcp:d:1', local: true }, /local: .*unix: socket/],
    [{ destination_url: 'unix:/m.sock', local: true, preserve_source: true }, /preserve_source/],
  ];
  for (const [body, re] of cases) {
    const r = await rig.call('PUT', 'vm.send-migration', body);
    t.is(r.status, 400, JSON.stringify(body));
    t.deepEqual(chain(r).slice(0, 2), ['The migration could not be started', 'The request asks for what Tern does not support']);
    t.regex(chain(r)[2], re);
  }
  t.deepEqual(stub.sends, []);
  t.is((await rig.call('PUT', 'vm.send-migration', { destination_url: 'tcp:d:1', connections: 1, memory_mode: 'Precopy' })).status, 204);
  // TLS over tcp: goes to the VMM with its directory
  t.is((await rig.call('PUT', 'vm.send-migration', { destination_url: 'tcp:d:1', tls_dir: '/etc/tern/tls' })).status, 204);
  t.is((stub.sends[stub.sends.length - 1] as { tls_dir?: string }).tls_dir, '/etc/tern/tls');
  // several connections over tcp: go to the VMM with their number
  t.is((await rig.call('PUT', 'vm.send-migration', { destination_url: 'tcp:d:1', connections: 4 })).status, 204);
  t.is((stub.sends[stub.sends.length - 1] as { connections?: number }).connections, 4);
});

test.serial('migration URLs: tcp:HOST:PORT and unix:/abs/path only, anything else a 400 naming the URL', async (t) => {
  const bad = ['file:///tmp/x', 'tcp:host', 'tcp::6000', 'tcp:host:0', 'tcp:host:65536', 'tcp:host:60x', 'tcp:a b:1', 'tcp:::1:6000', 'unix:', 'unix:rel/x.sock', `unix:/${'x'.repeat(120)}`, 'http://host:80', 'TCP:host:1'];
  for (const url of bad) {
    for (const [ep, field] of [['vm.send-migration', 'destination_url'], ['vm.receive-migration', 'receiver_url']] as const) {
      const r = await rig.call('PUT', ep, { [field]: url });
      t.is(r.status, 400, `${ep} ${url}`);
      t.regex(chain(r)[2], new RegExp(`^${field} "`), `${ep} ${url}: ${r.body}`);
      t.true(chain(r)[2].includes(JSON.stringify(url).slice(1, 40)), `the message names ${url}`);
    }
  }
  t.deepEqual([stub.sends, stub.receives], [[], []]);
  for (const url of ['tcp:192.168.1.20:6000', 'tcp:[::1]:6000', 'tcp:dest-2.example.org:65535', 'unix:/run/tern/mig.sock']) {
    t.is((await rig.call('PUT', 'vm.send-migration', { destination_url: url })).status, 204, url);
    t.is((await rig.call('PUT', 'vm.receive-migration', { receiver_url: url })).status, 204, url);
  }
  t.is(stub.sends.length, 4);
  t.is(stub.receives.length, 4);
});

test.serial('vm.receive-migration: 204 when the Vmm has received the VM, 500 with the reason when it failed', async (t) => {
  // ch-remote's body: every field, the fds null, no zone updates
  const ok = await rig.call('PUT', 'vm.receive-migration', '{"receiver_url":"tcp:0.0.0.0:6000","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,"zone_updates":[]}');
  t.is(ok.status, 204, ok.body.toString());
  t.deepEqual(stub.receives, [{ receiver_url: 'tcp:0.0.0.0:6000' }]);
  t.is((await rig.call('PUT', 'vm.receive-migration', { receiver_url: 'tcp:0.0.0.0:6000', tls_dir: '/etc/tern/tls' })).status, 204);
  t.deepEqual(stub.receives.pop(), { receiver_url: 'tcp:0.0.0.0:6000', tls_dir: '/etc/tern/tls' });
  stub.receiveResult = () => Promise.reject(new Error('the source closed the connection after 3 memory rounds'));
  const failed = await rig.call('PUT', 'vm.receive-migration', { receiver_url: 'unix:/run/mig.sock' });
  t.is(failed.status, 500);
  t.deepEqual(chain(failed), ['The migration could not be received', 'the source closed the connection after 3 memory rounds']);
});

test.serial('vm.receive-migration: TLS over unix:, Postcopy, zone updates and wrong spellings are 400 and receive nothing', async (t) => {
  const cases: [unknown, RegExp][] = [
    [{}, /receiver_url/],
    [{ receiver_url: 'unix:/m.sock', tls_dir: '/etc/tls' }, /tls_dir: TLS is for tcp: URLs only/],
    [{ receiver_url: 'unix:/m.sock', memory_mode: 'Postcopy' }, /memory_mode "Postcopy"/],
    [{ receiver_url: 'unix:/m.sock', memory_mode: 'PRECOPY' }, /must be one of "Precopy", "Postcopy"/],
    [{ receiver_url: 'unix:/m.sock', zone_updates: [{ id: 'mem0', host_numa_node: 1 }] }, /zone_updates: Tern has no memory zones/],
    [{ receiver_url: 'unix:/m.sock', zone_updates: [{ id: '', host_numa_node: 1 }] }, /zone_updates/],
  ];
  for (const [body, re] of cases) {
    const r = await rig.call('PUT', 'vm.receive-migration', body);
    t.is(r.status, 400, JSON.stringify(body));
    t.is(chain(r)[0], 'The migration could not be received');
    t.true(chain(r).some((m) => re.test(m)), `${re} in ${r.body}`);
  }
  t.deepEqual(stub.receives, []);
});

test.serial('vm.receive-migration outlasts the request and idle timeouts, and one is received at a time', async (t) => {
  const short = await startApi(new ReplyRecorder(), tempDir('tern-api-migration-short-'), { requestTimeoutMs: 150, idleTimeoutMs: 150 });
  try {
    const s = stubVmm(short);
    let finish!: () => void;
    s.receiveResult = () => new Promise<void>((resolve) => (finish = resolve));
    const started = Date.now();
    const receiving = short.call('PUT', 'vm.receive-migration', { receiver_url: 'tcp:0.0.0.0:6000' });
    await sleep(700); // several request timeouts and idle timeouts
    const second = await short.call('PUT', 'vm.receive-migration', { receiver_url: 'tcp:0.0.0.0:6001' });
    t.is(second.status, 500);
    t.deepEqual(chain(second), ['The migration could not be received', 'a migration is already being received']);
    finish();
    const r = await receiving;
    t.is(r.status, 204, r.body.toString());
    t.true(Date.now() - started >= 700);
    t.is(s.receives.length, 1);
    // and an ordinary silent connection is still closed after the idle timeout
    const silent = net.connect(short.socket);
    const closedAfter = await new Promise<number>((resolve) => {
      const t0 = Date.now();
      silent.on('close', () => resolve(Date.now() - t0));
      silent.on('error', () => undefined);
    });
    t.true(closedAfter < 2000, `closed after ${closedAfter} ms`);
  } finally {
    await short.close();
  }
});

test.serial('vm.receive-migration: a client that goes away does not cancel the migration', async (t) => {
  let finish!: () => void;
  stub.receiveResult = () => new Promise<void>((resolve) => (finish = resolve));
  const body = JSON.stringify({ receiver_url: 'unix:/run/mig.sock' });
  const c = net.connect(rig.socket);
  await new Promise<void>((resolve) => c.on('connect', resolve));
  c.write(`PUT /api/v1/vm.receive-migration HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
  while (stub.receives.length === 0) await sleep(10);
  c.destroy();
  await sleep(100);
  t.is(stub.cancels, 0, 'the migration was not cancelled');
  finish();
  await sleep(20);
  // the VMM serves on, and takes the next receive
  t.is((await rig.call('GET', 'vmm.ping')).status, 200);
  stub.receiveResult = async () => undefined;
  t.is((await rig.call('PUT', 'vm.receive-migration', { receiver_url: 'unix:/run/mig.sock' })).status, 204);
});

test.serial('vm.migration-progress: 404 before any migration, then the progress as JSON', async (t) => {
  const none = await rig.client.request('GET', 'vm.migration-progress');
  t.is(none.status, 404);
  t.deepEqual(chain(none), ['The migration progress is not available', 'no migration has been started']);
  stub.progress = progress();
  const r = await rig.client.request('GET', 'vm.migration-progress');
  t.is(r.status, 200);
  t.is(r.headers['content-type'], 'application/json');
  t.deepEqual(bodyJson(r), progress());
  t.is((await rig.client.request('PUT', 'vm.migration-progress')).status, 400, 'GET only');
});

test.serial('vm.migration-cancel: 204 while one runs, 404 when none does, 500 when the Vmm cannot', async (t) => {
  const none = await rig.client.request('PUT', 'vm.migration-cancel');
  t.is(none.status, 404);
  t.deepEqual(chain(none), ['The migration could not be cancelled', 'no migration is in progress']);
  stub.progress = progress({ phase: 'finished' });
  t.is((await rig.client.request('PUT', 'vm.migration-cancel')).status, 404, 'a finished migration is not in progress');
  t.is(stub.cancels, 0);
  for (const phase of ['memory', 'listening'] as const) {
    stub.progress = progress({ phase });
    const r = await rig.client.request('PUT', 'vm.migration-cancel');
    t.is(r.status, 204, phase);
    t.is(r.body.length, 0);
  }
  t.is(stub.cancels, 2);
  stub.cancelThrows = new Error('the final round has begun');
  const late = await rig.client.request('PUT', 'vm.migration-cancel');
  t.is(late.status, 500);
  t.deepEqual(chain(late), ['The migration could not be cancelled', 'the final round has begun']);
  t.is((await rig.client.request('GET', 'vm.migration-cancel')).status, 400, 'PUT only');
});

test.serial('a raw ch-remote style request gets micro_http framing from the migration endpoints', async (t) => {
  const body = '{"destination_url":"tcp:10.0.0.2:6000"}';
  const c = net.connect(rig.socket);
  const data = await new Promise<Buffer>((resolve) => {
    const chunks: Buffer[] = [];
    c.on('data', (d) => {
      chunks.push(d);
      if (Buffer.concat(chunks).includes('\r\n\r\n')) {
        c.destroy();
        resolve(Buffer.concat(chunks));
      }
    });
    c.write(`PUT /api/v1/vm.send-migration HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
  });
  const [resp] = parseResponses(data);
  t.is(resp.status, 204);
  t.false('content-length' in resp.headers, 'no Content-Length on 204, as micro_http');
});

test.serial('TernClient: sendMigration, receiveMigration (past its own timeout), migrationProgress, cancelMigration', async (t) => {
  const client = new TernClient({ socketPath: rig.socket, timeoutMs: 150 });
  try {
    await client.sendMigration({ destination_url: 'tcp:dest:6000', timeout_strategy: 'Ignore' });
    t.deepEqual(stub.sends, [{ destination_url: 'tcp:dest:6000', local: undefined, downtime_ms: undefined, timeout_s: undefined, timeout_strategy: 'Ignore' }]);
    stub.receiveResult = () => sleep(600);
    await client.receiveMigration({ receiver_url: 'unix:/run/mig.sock' });
    t.deepEqual(stub.receives, [{ receiver_url: 'unix:/run/mig.sock' }]);
    const noProgress = await t.throwsAsync(client.migrationProgress(), { instanceOf: TernApiError });
    t.is(noProgress!.status, 404);
    stub.progress = progress({ phase: 'receiving', role: 'receive' });
    t.deepEqual(await client.migrationProgress(), progress({ phase: 'receiving', role: 'receive' }));
    await client.cancelMigration();
    t.is(stub.cancels, 1);
    stub.receiveResult = () => Promise.reject(new Error('checksum mismatch in round 4'));
    const failed = await t.throwsAsync(client.receiveMigration({ receiver_url: 'unix:/run/mig.sock' }), { instanceOf: TernApiError });
    t.deepEqual([failed!.status, failed!.chain], [500, ['The migration could not be received', 'checksum mismatch in round 4']]);
    const bad = await t.throwsAsync(client.sendMigration({ destination_url: 'unix:/run/mig.sock', connections: 4 }), { instanceOf: TernApiError });
    t.is(bad!.status, 400);
  } finally {
    client.close();
  }
});

test.serial('TernClient.migrationEvents: only the migration events, typed, the round number as properties.id', async (t) => {
  let opened!: () => void;
  const isOpen = new Promise<void>((resolve) => (opened = resolve));
  const collected = firstValueFrom(
    rig.client.migrationEvents({ opened }).pipe(
      takeWhile((e) => e.event !== 'migration-finished', true),
      toArray(),
    ),
  );
  await isOpen;
  const store = rig.vmm.store;
  store.dispatch(migrationEvents.started({ destination_url: 'tcp:dest:6000', local: false }));
  store.dispatch({ type: VmmEvents.Starting, payload: null });
  store.dispatch(migrationEvents.memoryIteration({ id: 0, pages: 10, bytes: 40960 }));
  store.dispatch(migrationEvents.memoryIteration({ id: 1, pages: 2, bytes: 8192 }));
  store.dispatch(migrationEvents.finished({ downtime_ms: 40, total_ms: 900, bytes: 4096, iterations: 2 }));
  const events: MigrationEvent[] = await collected;
  t.deepEqual(
    events.map((e) => [e.source, e.event, e.event === 'migration-memory-iteration' ? e.properties.id : e.properties]),
    [
      ['vm', 'migration-started', null],
      ['vm', 'migration-memory-iteration', '0'],
      ['vm', 'migration-memory-iteration', '1'],
      ['vm', 'migration-finished', null],
    ],
  );
});

contractTest(test, recorder, 'api-migration', ['PUT vm.send-migration', 'PUT vm.receive-migration']);
