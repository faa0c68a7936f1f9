// The whole VM lifecycle over HTTP with the tiny PVH kernel running: every endpoint's success
// and refusal, counters read from the store, and the event stream's order. Every reply is
// checked against the OpenAPI contract at the end.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { firstValueFrom, toArray } from 'rxjs';

import type { TernEvent } from '../../src/api/schema';
import { sleep } from './harness';
import { ReplyRecorder, bodyJson, contractTest, startApi, tempDir, type ApiRig } from '../unit/api-harness';
import { buildTinyKernel, countsIn } from './tiny-kernel';

const recorder = new ReplyRecorder();
const dir = tempDir('tern-api-lifecycle-');
const serialFile = path.join(dir, 'serial.out');
let rig: ApiRig;

test.before(async () => {
  rig = await startApi(recorder, dir);
});
test.after.always(async () => {
  await rig?.close();
});

async function waitFor(what: string, cond: () => boolean, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

const serial = (): string => (fs.existsSync(serialFile) ? fs.readFileSync(serialFile, 'latin1') : '');
const lastCount = (): number => countsIn(serial()).at(-1) ?? -1;
/** how many times the kernel has started (the serial file is appended to across boots) */
const boots = (): number => serial().split('TINY-KERNEL-BOOT').length - 1;
const state = async (): Promise<string> => (bodyJson(await rig.call('GET', 'vm.info')) as { state: string }).state;

async function expectStatus(t: import('ava').ExecutionContext, method: 'GET' | 'PUT', ep: string, status: number): Promise<void> {
  const r = await rig.call(method, ep);
  t.is(r.status, status, `${method} ${ep}: ${r.body.toString()}`);
}

test.serial('create, boot, pause, resume, reboot, shutdown, boot again, delete: status codes, state and events', async (t) => {
  const all = firstValueFrom(rig.client.events().pipe(toArray()));
  await sleep(100);

  const create = await rig.call('PUT', 'vm.create', {
    payload: { kernel: await buildTinyKernel(), cmdline: 'api lifecycle' },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: serialFile },
    console: { mode: 'Off' },
  });
  t.is(create.status, 204, create.body.toString());
  await expectStatus(t, 'PUT', 'vm.boot', 204);
  t.is(await state(), 'Running');
  await waitFor('COUNT lines on the serial port', () => lastCount() >= 2);

  const counters = bodyJson(await rig.call('GET', 'vm.counters')) as Record<string, Record<string, number>>;
  t.true(counters.serial0.tx_bytes > 0, JSON.stringify(counters));
  const storeTx = (rig.vmm.state.devices.instances.serial0 as unknown as { txBytes: number }).txBytes;
  t.true(counters.serial0.tx_bytes <= storeTx, 'counters are read from the store');
  t.deepEqual(Object.keys(counters.bus).sort(), ['mmio_unhandled_reads', 'mmio_unhandled_writes', 'pio_unhandled_reads', 'pio_unhandled_writes']);

  t.is((await rig.call('PUT', 'vm.create', { payload: { kernel: '/k' } })).status, 500, 'a second create');
  await expectStatus(t, 'PUT', 'vm.boot', 500);
  await expectStatus(t, 'PUT', 'vm.resume', 500); // resume while Running

  await expectStatus(t, 'PUT', 'vm.pause', 204);
  t.is(await state(), 'Paused');
  await expectStatus(t, 'PUT', 'vm.pause', 500);
  await expectStatus(t, 'PUT', 'vm.reboot', 500); // reboot while Paused
  t.is((await rig.call('GET', 'vm.counters')).status, 200, 'counters while Paused');
  const pausedAt = lastCount();
  await sleep(400);
  t.is(lastCount(), pausedAt, 'no output while paused');

  await expectStatus(t, 'PUT', 'vm.resume', 204);
  t.is(await state(), 'Running');
  await waitFor('output after resume', () => lastCount() > pausedAt);

  await expectStatus(t, 'PUT', 'vm.reboot', 204);
  t.is(await state(), 'Running');
  await waitFor('the kernel starting again after reboot', () => boots() === 2 && lastCount() >= 1);

  await expectStatus(t, 'PUT', 'vm.shutdown', 204);
  t.is(await state(), 'Shutdown');
  await expectStatus(t, 'GET', 'vm.counters', 500);
  await expectStatus(t, 'PUT', 'vm.pause', 500);

  await expectStatus(t, 'PUT', 'vm.boot', 204); // a shut-down VM boots again from its config
  t.is(await state(), 'Running');
  await waitFor('output after the second boot', () => boots() === 3 && lastCount() >= 1);

  await expectStatus(t, 'PUT', 'vm.delete', 204); // running: shut down, then deleted
  await expectStatus(t, 'GET', 'vm.info', 404);
  await expectStatus(t, 'PUT', 'vmm.shutdown', 204);
  await waitFor('the vmm.shutdown callback', () => rig.vmmShutdowns === 1, 2000);
  await rig.server.close(); // ends the stream
  const events: TernEvent[] = await all;

  t.deepEqual(
    events.map((e) => `${e.source}:${e.event}`),
    [
      'vm:booting', 'vm:booted',
      'vm:pausing', 'vm:paused',
      'vm:resuming', 'vm:resumed',
      'vm:rebooting', 'vm:rebooted',
      'vm:shutdown',
      'vm:booting', 'vm:booted',
      'vm:shutdown', 'vm:deleted',
      'vmm:shutdown',
    ],
  );
  const times = events.map((e) => e.timestamp.secs * 1e9 + e.timestamp.nanos);
  t.deepEqual(times, [...times].sort((a, b) => a - b), 'timestamps never go back');
});

contractTest(test, recorder, 'api-lifecycle', [
  'PUT vm.create', 'PUT vm.boot', 'GET vm.info', 'GET vm.counters', 'PUT vm.pause', 'PUT vm.resume', 'PUT vm.reboot',
  'PUT vm.shutdown', 'PUT vm.delete', 'PUT vmm.shutdown',
]);
