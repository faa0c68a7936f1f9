// The HTTP API without a running guest (no /dev/kvm needed): status codes and error bodies as
// Cloud Hypervisor sends them, request checking (JSON, types, ids, sizes), the lifecycle of a
// created-but-not-booted VM, the socket's mode and lock, and the event stream. Every reply is
// checked against the OpenAPI contract at the end.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { firstValueFrom, take, toArray } from 'rxjs';

import { TernApiError, TernClient } from '../../src/api/client';
import { ApiServer, ApiSocketInUseError } from '../../src/api/server';
import { VmmApi } from '../../src/api/vmm-api';
import type { TernEvent } from '../../src/api/schema';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import {
  Contract,
  ReplyRecorder,
  bodyJson,
  contractTest,
  parseResponses,
  rawExchange,
  startApi,
  tempDir,
  type ApiRig,
} from './api-harness';

const recorder = new ReplyRecorder();
const dir = tempDir('tern-api-server-');
let rig: ApiRig;

test.before(async () => {
  rig = await startApi(recorder, dir);
});
test.after.always(async () => {
  await rig?.close();
});

function isErrorChain(t: import('ava').ExecutionContext, r: { body: Buffer }, ...expected: RegExp[]): void {
  const chain = bodyJson(r);
  t.true(Array.isArray(chain) && chain.length > 0 && chain.every((s) => typeof s === 'string'), `error body ${r.body}`);
  for (const re of expected) t.true((chain as string[]).some((s) => re.test(s)), `${re} in ${JSON.stringify(chain)}`);
}

const goodConfig = (dirPath: string) => ({
  payload: { kernel: path.join(dirPath, 'no-such-kernel'), cmdline: 'console=ttyS0' },
  cpus: { boot_vcpus: 2, max_vcpus: 2 },
  memory: { size: 64 << 20 },
  serial: { mode: 'Null' },
  disks: [{ path: '/tmp/disk0.img', id: 'disk0', readonly: true }],
  net: [{ tap: 'tap0', id: 'net0', mac: '12:34:56:78:9a:bc' }],
  fs: [{ tag: 'share', socket: '/tmp/virtiofsd.sock', num_queues: 1, queue_size: 1024 }],
  rng: { src: '/dev/urandom' },
  vsock: { cid: 3, socket: '/tmp/vsock.sock' },
});

test.serial('vmm.ping: 200 with version, pid and features', async (t) => {
  const r = await rig.call('GET', 'vmm.ping');
  t.is(r.status, 200);
  t.is(r.headers['content-type'], 'application/json');
  const body = bodyJson(r) as Record<string, unknown>;
  t.is(body.pid, process.pid);
  t.is(typeof body.version, 'string');
  t.is(typeof body.build_version, 'string');
  t.true(Array.isArray(body.features));
});

test.serial('no VM yet: info, boot, pause, resume, shutdown, reboot, power-button, snapshot are 404; counters 500; delete is 204', async (t) => {
  for (const [method, ep] of [
    ['GET', 'vm.info'],
    ['PUT', 'vm.boot'],
    ['PUT', 'vm.pause'],
    ['PUT', 'vm.resume'],
    ['PUT', 'vm.shutdown'],
    ['PUT', 'vm.reboot'],
    ['PUT', 'vm.power-button'],
  ] as const) {
    const r = await rig.call(method, ep);
    t.is(r.status, 404, ep);
    isErrorChain(t, r, /no VM has been created/);
  }
  const snapshot = await rig.call('PUT', 'vm.snapshot', { destination_url: `file://${dir}/never-written` });
  t.is(snapshot.status, 404);
  t.false(fs.existsSync(path.join(dir, 'never-written')));
  // The contract lists no 404 for counters; Cloud Hypervisor answers "not running".
  const counters = await rig.call('GET', 'vm.counters');
  t.is(counters.status, 500);
  isErrorChain(t, counters, /no VM has been created/);
  t.is((await rig.call('PUT', 'vm.delete')).status, 204, 'deleting nothing succeeds, as in Cloud Hypervisor');
});

const contract = Contract.load();
/** the contract's enums Tern takes in vm.create, and a config that uses each value */
const VM_CONFIG_ENUMS: Record<string, (v: string) => Record<string, unknown>> = {
  // (one tty for one device: the console is Off when the serial port takes the tty)
  ConsoleMode: (v) => ({ serial: { mode: v }, console: { mode: v === 'Tty' ? 'Off' : v } }),
  CoreSchedulingMode: (v) => ({ cpus: { boot_vcpus: 1, max_vcpus: 1, core_scheduling: v } }),
  ImageType: (v) => ({ disks: [{ path: '/d', image_type: v }] }),
  LockGranularity: (v) => ({ disks: [{ path: '/d', lock_granularity: v }] }),
};
/** enums elsewhere: replies (VmState), vm.restore (tested below), migration (api-migration.test.ts) */
const OTHER_ENUMS = ['VmState', 'MemoryRestoreMode', 'MigrationMode', 'TimeoutStrategy'];

(contract ? test.serial : test.serial.skip)('vm.create takes every value of every enum in the contract, spelled as the contract spells it', async (t) => {
  const schemas = contract!.doc.components.schemas as Record<string, { enum?: string[] }>;
  const enums = Object.keys(schemas).filter((n) => schemas[n].enum);
  t.deepEqual(enums.filter((n) => !OTHER_ENUMS.includes(n)).sort(), Object.keys(VM_CONFIG_ENUMS).sort(), 'every enum of the contract is covered');
  for (const [name, use] of Object.entries(VM_CONFIG_ENUMS)) {
    for (const value of schemas[name].enum!) {
      const r = await rig.call('PUT', 'vm.create', { payload: { kernel: '/k' }, ...use(value) });
      t.is(r.status, 204, `${name} ${value}: ${r.body}`);
      await rig.call('PUT', 'vm.delete');
    }
  }
  const r = await rig.call('PUT', 'vm.create', { payload: { kernel: '/k' }, serial: { mode: 'Tty' }, console: { mode: 'Tty' } });
  t.is(r.status, 400, 'the tty named for both the serial port and the console');
  t.regex(r.body.toString(), /Console mode tty specified for both serial and console/);
});

test.serial('vm.restore takes memory_restore_mode in the contract spelling (Copy, OnDemand) and in lowercase', async (t) => {
  for (const mode of ['Copy', 'OnDemand', 'copy', 'ondemand']) {
    const source = path.join(dir, `no-snapshot-${mode}`);
    const r = await rig.call('PUT', 'vm.restore', { source_url: `file://${source}`, memory_restore_mode: mode, prefault: false, resume: false });
    // accepted: it gets as far as reading the snapshot, which is not there
    t.is(r.status, 500, `${mode}: ${r.body}`);
    isErrorChain(t, r, /could not be restored/, new RegExp(source.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
  }
  // what ch-remote sends: every RestoreConfig field, the fds as null
  const chRemote = await rig.call(
    'PUT',
    'vm.restore',
    `{"source_url":"file://${dir}/none","prefault":false,"memory_restore_mode":"OnDemand","net_fds":null,"vfio_fds":null,"iommufd_fd":null,"resume":true,"zone_updates":[]}`,
  );
  t.is(chRemote.status, 500, chRemote.body.toString());
  for (const mode of ['COPY', 'on_demand', 'Ondemand', 'constructor', 3]) {
    const r = await rig.call('PUT', 'vm.restore', { source_url: `file://${dir}/none`, memory_restore_mode: mode });
    t.is(r.status, 400, String(mode));
    isErrorChain(t, r, /memory_restore_mode must be one of "Copy", "OnDemand"/);
  }
  // Tern's addition: the tap each restored card opens.
  const taps = await rig.call('PUT', 'vm.restore', { source_url: `file://${dir}/none`, net: [{ id: '_net0', tap: 'tap7' }] });
  t.is(taps.status, 500, 'taken: it gets as far as reading the snapshot');
  for (const net of [{ id: '_net0', tap: 'tap7' }, [{ id: '_net0' }], [{ id: '_net0', tap: 'a/b' }], [{ id: '_net0', tap: 'x'.repeat(16) }], [{ id: '', tap: 't' }], [{ id: 'n', tap: 't', mac: '52:54:00:00:00:01' }]]) {
    const r = await rig.call('PUT', 'vm.restore', { source_url: `file://${dir}/none`, net });
    t.is(r.status, 400, JSON.stringify(net));
    isErrorChain(t, r, /net must be a list of/);
  }
  t.is(rig.vmm.state.vm.status, 'NotCreated');
});

test.serial('unknown paths and endpoints of later releases are 404 with an error body, whatever the method', async (t) => {
  for (const [method, ep] of [
    ['PUT', 'vm.resize-zone'],
    ['PUT', 'vm.add-disk'],
    ['PUT', 'vm.coredump'],
    ['GET', 'vm.nope'],
    ['PUT', 'vmm.nope'],
  ] as const) {
    const r = await rig.call(method, ep, method === 'PUT' ? { destination_url: 'file:///tmp/x' } : undefined);
    t.is(r.status, 404, ep);
    isErrorChain(t, r);
  }
  const raw = await rawExchange(rig.socket, 'GET /not/the/api HTTP/1.1\r\nHost: x\r\n\r\n');
  const [resp] = parseResponses(raw.data);
  t.is(resp.status, 404);
  recorder.add({ method: 'GET', endpoint: '/not/the/api', status: resp.status, contentType: resp.headers['content-type'], body: resp.body });
});

test.serial('a method the endpoint does not take is 400 with an error body', async (t) => {
  for (const [method, ep] of [
    ['PUT', 'vmm.ping'],
    ['GET', 'vm.boot'],
    ['GET', 'vm.create'],
    ['PUT', 'vm.info'],
    ['GET', 'vmm.shutdown'],
  ] as const) {
    const r = await rig.call(method, ep);
    t.is(r.status, 400, `${method} ${ep}`);
    isErrorChain(t, r, /accepts (GET|PUT) only/);
  }
  for (const method of ['POST', 'DELETE', 'PATCH', 'OPTIONS']) {
    const raw = await rawExchange(rig.socket, `${method} /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\n\r\n`);
    const [resp] = parseResponses(raw.data);
    t.is(resp.status, 400, method);
    recorder.add({ method, endpoint: 'vm.boot', status: resp.status, contentType: resp.headers['content-type'], body: resp.body });
  }
});

test.serial('a body where none belongs is 400', async (t) => {
  for (const ep of ['vm.boot', 'vm.pause', 'vm.delete', 'vmm.shutdown']) {
    const r = await rig.call('PUT', ep, { something: 1 });
    t.is(r.status, 400, ep);
    isErrorChain(t, r, /takes no body/);
  }
  const r = await rig.call('GET', 'vmm.ping', '{}');
  t.is(r.status, 400);
  t.is(rig.vmmShutdowns, 0, 'the refused vmm.shutdown did nothing');
});

test.serial('vm.create: malformed JSON, wrong types, missing fields, deep nesting, bad UTF-8 and oversize are 400', async (t) => {
  const cases: [string, string | Buffer, RegExp][] = [
    ['truncated JSON', '{"payload": {"kernel": "/k"', /malformed JSON/],
    ['not JSON', 'payload=kernel', /malformed JSON/],
    ['a string', '"hello"', /not a VmConfig/],
    ['an array', '[1,2,3]', /not a VmConfig/],
    ['no payload', '{"cpus":{"boot_vcpus":1,"max_vcpus":1}}', /payload/],
    ['boot_vcpus as a string', '{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":"2","max_vcpus":2}}', /boot_vcpus/],
    ['memory size negative', '{"payload":{"kernel":"/k"},"memory":{"size":-1}}', /memory\/size/],
    ['serial mode unknown', '{"payload":{"kernel":"/k"},"serial":{"mode":"Printer"}}', /serial\/mode/],
    ['disks not an array', '{"payload":{"kernel":"/k"},"disks":{"path":"/d"}}', /disks/],
    ['pci_device_id out of u8', '{"payload":{"kernel":"/k"},"disks":[{"path":"/d","pci_device_id":300}]}', /pci_device_id/],
    ['vsock cid below 3', '{"payload":{"kernel":"/k"},"vsock":{"cid":2,"socket":"/s"}}', /vsock\/cid/],
    ['payload without kernel or firmware', '{"payload":{"cmdline":"x"}}', /kernel or a firmware/],
    ['max_vcpus below boot_vcpus', '{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":4,"max_vcpus":2}}', /max_vcpus/],
    ['nesting 200 deep', `{"payload":{"kernel":"/k"},"x":${'['.repeat(200)}${']'.repeat(200)}}`, /nested deeper/],
    ['invalid UTF-8', Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]), /UTF-8/],
  ];
  for (const [what, body, re] of cases) {
    const r = await rig.call('PUT', 'vm.create', body);
    t.is(r.status, 400, what);
    isErrorChain(t, r, re);
  }
  const empty = await rig.call('PUT', 'vm.create');
  t.is(empty.status, 400, 'no body');
  isErrorChain(t, empty, /needs a JSON body/);
  const big = `{"payload":{"kernel":"/k","cmdline":"${'x'.repeat(4 << 20)}"}}`;
  const r = await rig.call('PUT', 'vm.create', big);
  t.is(r.status, 400, 'over 4 MiB');
  isErrorChain(t, r, /exceeds 4194304 bytes/);
  t.is(rig.vmm.state.vm.status, 'NotCreated', 'nothing was created');
});

test.serial('vm.create: two devices with one id is 409', async (t) => {
  const cfg = goodConfig(dir);
  const r = await rig.call('PUT', 'vm.create', { ...cfg, pmem: [{ file: '/tmp/p', id: 'disk0' }] });
  t.is(r.status, 409);
  isErrorChain(t, r, /device id 'disk0' is used more than once/);
  const r2 = await rig.call('PUT', 'vm.create', { payload: cfg.payload, devices: [{ path: '/sys/x' }, { path: '/sys/x' }] });
  t.is(r2.status, 409);
  t.is(rig.vmm.state.vm.status, 'NotCreated');
});

test.serial('vm.create stores the config (device lists too, unknown fields and nulls dropped); info reads the store', async (t) => {
  const cfg = { ...goodConfig(dir), not_in_the_contract: { a: 1 }, balloon: null, console: { mode: 'Off', iommu: null } };
  const r = await rig.call('PUT', 'vm.create', cfg);
  t.is(r.status, 204, r.body.toString());
  t.is(r.body.length, 0);
  const stored = rig.vmm.state.vm.config as Record<string, unknown>;
  t.false('not_in_the_contract' in stored);
  t.false('balloon' in stored);
  t.deepEqual(stored.console, { mode: 'Off' });
  t.deepEqual(stored.disks, cfg.disks);
  t.deepEqual(stored.fs, cfg.fs);
  const info = bodyJson(await rig.call('GET', 'vm.info')) as { state: string; config: Record<string, unknown>; memory_actual_size: number };
  t.is(info.state, 'Created');
  t.is(info.memory_actual_size, 64 << 20);
  t.deepEqual(info.config.net, cfg.net);
  t.deepEqual(info.config.cpus, { boot_vcpus: 2, max_vcpus: 2 });
  t.deepEqual(info.config.vsock, cfg.vsock);
  const again = await rig.call('PUT', 'vm.create', goodConfig(dir));
  t.is(again.status, 500, 'a second create is refused by the state machine');
  isErrorChain(t, again, /could not be created/, /Created/);
});

test.serial('created, not booted: actions the state machine refuses are 500 (shutdown too); a failed boot leaves it Created', async (t) => {
  for (const ep of ['vm.pause', 'vm.resume', 'vm.reboot', 'vm.power-button', 'vm.shutdown']) {
    const r = await rig.call('PUT', ep);
    t.is(r.status, 500, ep);
    isErrorChain(t, r);
  }
  t.is((bodyJson(await rig.call('GET', 'vm.info')) as { state: string }).state, 'Created', 'a refused shutdown changes nothing');
  const counters = await rig.call('GET', 'vm.counters');
  t.is(counters.status, 500);
  isErrorChain(t, counters, /not running/);
  // The kernel file is missing; on a host without /dev/kvm the boot fails earlier, at KVM.
  const boot = await rig.call('PUT', 'vm.boot');
  t.is(boot.status, 500);
  isErrorChain(t, boot, /could not be booted/);
  t.is(rig.vmm.state.vm.status, 'Created');
  t.is(rig.vmm.state.vm.lastFailure?.operation, 'Booting');
  t.is((await rig.call('PUT', 'vm.shutdown')).status, 500, 'a failed boot left nothing to shut down');
  t.is((await rig.call('PUT', 'vm.delete')).status, 204);
  t.is((await rig.call('GET', 'vm.info')).status, 404);
});

test.serial('the client throws TernApiError with the chain; success methods resolve', async (t) => {
  const err = await t.throwsAsync(rig.client.boot(), { instanceOf: TernApiError });
  t.is(err!.status, 404);
  t.true(err!.chain.length >= 2);
  const ping = await rig.client.ping();
  t.is(ping.pid, process.pid);
  await rig.client.create(goodConfig(dir) as never);
  t.is((await rig.client.info()).state, 'Created');
  await rig.client.delete();
});

test.serial('pipelined requests on one connection each get their reply, in order', async (t) => {
  const req = (m: string, p: string) => `${m} /api/v1/${p} HTTP/1.1\r\nHost: localhost\r\n\r\n`;
  const raw = await rawExchange(rig.socket, req('GET', 'vmm.ping') + req('GET', 'vm.info') + req('PUT', 'vm.delete') + req('GET', 'vmm.ping'));
  const replies = parseResponses(raw.data);
  t.deepEqual(replies.map((r) => r.status), [200, 404, 204, 200]);
  for (const [i, [method, ep]] of [['GET', 'vmm.ping'], ['GET', 'vm.info'], ['PUT', 'vm.delete'], ['GET', 'vmm.ping']].entries()) {
    recorder.add({ method, endpoint: ep, status: replies[i].status, contentType: replies[i].headers['content-type'], body: replies[i].body });
  }
});

test.serial('a request the way ch-remote sends it (no Content-Type, Content-Length only) works', async (t) => {
  const body = JSON.stringify({ payload: { kernel: '/k' } });
  const raw = await rawExchange(
    rig.socket,
    `PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: ${body.length}\r\n\r\n${body}` +
      'PUT /api/v1/vm.delete HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n',
  );
  const replies = parseResponses(raw.data);
  t.deepEqual(replies.map((r) => r.status), [204, 204]);
  t.false('content-length' in replies[0].headers && replies[0].headers['content-length'] !== '0', '204 carries no body');
});

test.serial('oversized headers get a 400 with an error body', async (t) => {
  const raw = await rawExchange(rig.socket, `GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(32 << 10)}\r\n\r\n`);
  const [resp] = parseResponses(raw.data);
  t.is(resp.status, 400);
  t.regex(resp.body.toString(), /headers exceed/);
  recorder.add({ method: 'GET', endpoint: 'vmm.ping', status: resp.status, contentType: resp.headers['content-type'], body: resp.body });
});

test.serial('the socket is mode 0600 and its lock keeps a second VMM off a live socket', async (t) => {
  t.is(fs.statSync(rig.socket).mode & 0o777, 0o600);
  t.true(fs.existsSync(`${rig.socket}.lock`));
  const other = new Vmm({ log: silentLogger() });
  await t.throwsAsync(ApiServer.listen({ path: rig.socket }, { api: new VmmApi(other), log: silentLogger() }), {
    instanceOf: ApiSocketInUseError,
  });
  t.is((await rig.call('GET', 'vmm.ping')).status, 200, 'the first VMM still answers');
});

test.serial('a stale socket file (no lock holder) is replaced; a non-socket file is not', async (t) => {
  const stalePath = path.join(dir, 'stale.sock');
  // A process killed while listening leaves its socket file behind, with nobody on it.
  try {
    execFileSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stalePath)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  } catch {
    /* it died by SIGKILL, as intended */
  }
  t.true(fs.lstatSync(stalePath).isSocket());
  const vmm = new Vmm({ log: silentLogger() });
  const server = await ApiServer.listen({ path: stalePath }, { api: new VmmApi(vmm), log: silentLogger() });
  const client = new TernClient(stalePath);
  t.is((await client.ping()).pid, process.pid);
  client.close();
  await server.close();
  t.false(fs.existsSync(stalePath), 'closing removes the socket file');
  const plain = path.join(dir, 'plain-file');
  fs.writeFileSync(plain, 'data');
  await t.throwsAsync(ApiServer.listen({ path: plain }, { api: new VmmApi(vmm), log: silentLogger() }), { message: /not a socket/ });
  t.is(fs.readFileSync(plain, 'utf8'), 'data');
});

test.serial('vmm.events streams the monitor events live, in order; Last-Event-ID replays the journal', async (t) => {
  const seen = firstValueFrom(rig.client.events().pipe(take(3), toArray()));
  await new Promise((r) => setTimeout(r, 100)); // let the stream subscribe
  const startSeq = rig.vmm.store.seq;
  await rig.client.create(goodConfig(dir) as never);
  await t.throwsAsync(rig.client.boot());
  await t.throwsAsync(rig.client.shutdown());
  await rig.client.delete();
  await rig.client.create(goodConfig(dir) as never);
  await rig.client.delete();
  const events = await seen;
  // Cloud Hypervisor reports no "created"; a failed boot reports booting and nothing more.
  t.deepEqual(events.map((e: TernEvent) => `${e.source}:${e.event}`), ['vm:booting', 'vm:deleted', 'vm:deleted']);
  for (const e of events) {
    t.true(Number.isInteger(e.timestamp.secs) && Number.isInteger(e.timestamp.nanos));
    t.is(e.properties, null);
  }
  const replay = await firstValueFrom(rig.client.events({ afterSeq: startSeq }).pipe(take(3), toArray()));
  t.deepEqual(replay.map((e) => e.event), ['booting', 'deleted', 'deleted']);
});

contractTest(test, recorder, 'api-server', [
  'GET vmm.ping', 'GET vm.info', 'PUT vm.boot', 'PUT vm.pause', 'PUT vm.resume', 'PUT vm.shutdown', 'PUT vm.reboot',
  'GET vm.counters', 'PUT vm.power-button', 'PUT vm.delete', 'PUT vm.create', 'PUT vm.snapshot', 'PUT vm.restore',
  'PUT vmm.shutdown', 'PUT vm.resize-zone', 'GET /not/the/api', 'POST vm.boot',
]);
