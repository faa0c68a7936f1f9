// The event monitor: store events mapped to Cloud Hypervisor's (source, event) names and written
// in its exact file format (pretty JSON, two-space indent, a blank line after each event).
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { EventMonitor, MONITOR_EVENT_NAMES, formatMonitorEvent, toTernEvent } from '../../src/api/event-monitor';
import { virtioEvents } from '../../src/devices/virtio/transport';
import { HostFileError } from '../../src/api/host-file';
import { MIGRATION_EVENT_NAMES, isMigrationEvent } from '../../src/api/schema';
import { migrationEvents } from '../../src/state/migration-events';
import type { EventTimestamp } from '../../src/state/clock';
import { createStore } from '../../src/state/store';
import { VmEvents, vmEvents } from '../../src/state/slices/vm';
import { GuestEvents, VmmEvents, vmmEvents } from '../../src/state/vmm-events';
import { config } from './state-fixtures';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-monitor-'));
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));

function steppingClock(): () => EventTimestamp {
  let n = 0;
  return () => {
    n++;
    return { secs: n, nanos: n * 1000 };
  };
}

test('the format is serde-style pretty JSON followed by a blank line', (t) => {
  const text = formatMonitorEvent({ timestamp: { secs: 3, nanos: 45 }, source: 'vm', event: 'booted', properties: null });
  t.is(
    text,
    '{\n  "timestamp": {\n    "secs": 3,\n    "nanos": 45\n  },\n  "source": "vm",\n  "event": "booted",\n  "properties": null\n}\n\n',
  );
  const withProps = formatMonitorEvent({ timestamp: { secs: 0, nanos: 1 }, source: 'guest', event: 'panic', properties: { event: 'panic' } });
  t.true(withProps.includes('"properties": {\n    "event": "panic"\n  }\n}\n\n'));
});

test('every lifecycle event Cloud Hypervisor reports has a mapping', (t) => {
  const names = Object.values(MONITOR_EVENT_NAMES).map((n) => `${n.source}:${n.event}`);
  for (const want of [
    'vmm:starting', 'vmm:shutdown', 'vm:booting', 'vm:booted', 'vm:pausing', 'vm:paused', 'vm:resuming', 'vm:resumed',
    'vm:shutdown', 'vm:rebooting', 'vm:rebooted', 'vm:deleted', 'vm:power-button', 'guest:panic',
  ]) {
    t.true(names.includes(want), want);
  }
  t.false(VmEvents.Created in MONITOR_EVENT_NAMES, 'Cloud Hypervisor reports no "created"');
  t.is(toTernEvent({ seq: 1, timestamp: { secs: 0, nanos: 0 }, source: 'serial0', type: '[Serial] Register Written', payload: {} }), null);
  t.deepEqual(
    toTernEvent({ seq: 1, timestamp: { secs: 1, nanos: 2 }, source: 'vm', type: GuestEvents.Panic, payload: { event: 'crash_loaded' } }),
    { timestamp: { secs: 1, nanos: 2 }, source: 'guest', event: 'panic', properties: { event: 'crash_loaded' } },
  );
});

test('virtio devices report "activated" and "reset" with their id, as Cloud Hypervisor\'s virtio-device source does', (t) => {
  const at = { seq: 1, timestamp: { secs: 2, nanos: 0 } };
  t.deepEqual(toTernEvent({ ...at, ...virtioEvents.activated('pci0', '__rng'), source: 'pci0' }), {
    timestamp: at.timestamp,
    source: 'virtio-device',
    event: 'activated',
    properties: { id: '__rng' },
  });
  t.deepEqual(toTernEvent({ ...at, ...virtioEvents.reset('pci0', '_disk0'), source: 'pci0' })?.properties, { id: '_disk0' });
  t.is(toTernEvent({ ...at, ...virtioEvents.reset('pci0', '_disk0'), source: 'pci0' })?.event, 'reset');
  // What the VMM records for its own bookkeeping is not reported.
  t.is(toTernEvent({ ...at, ...virtioEvents.queueServed('pci0', '__rng', { queue: 0, nextAvail: 1, nextUsed: 1, interrupt: true }), source: 'pci0' }), null);
});

test('the monitor writes the store events it maps, in order, with their timestamps, to a path', (t) => {
  const store = createStore({ clock: steppingClock() });
  const file = path.join(dir, 'events.json');
  fs.writeFileSync(file, 'old contents that must go');
  const monitor = EventMonitor.open(store, { path: file });
  store.dispatch(vmmEvents.starting({ version: 'x', pid: 1 }));
  store.dispatch(vmEvents.created(config));
  store.dispatch(vmEvents.booting());
  store.dispatch(vmEvents.booted());
  store.dispatch(vmEvents.powerButtonPressed());
  store.dispatch(vmEvents.shutdown('vm'));
  store.dispatch(vmEvents.deleted());
  store.dispatch(vmmEvents.shutdown(null));
  monitor.close();
  store.dispatch(vmEvents.created(config)); // after close: not written
  const text = fs.readFileSync(file, 'utf8');
  const blocks = text.split('\n\n').filter(Boolean);
  const events = blocks.map((b) => JSON.parse(b));
  t.deepEqual(
    events.map((e) => [e.timestamp.secs, e.source, e.event]),
    [
      [1, 'vmm', 'starting'],
      [3, 'vm', 'booting'],
      [4, 'vm', 'booted'],
      [5, 'vm', 'power-button'],
      [6, 'vm', 'shutdown'],
      [7, 'vm', 'deleted'],
      [8, 'vmm', 'shutdown'],
    ],
  );
  t.is(text, events.map((e) => formatMonitorEvent(e)).join(''), 'byte for byte the monitor format');
});

test('migration events are written under Cloud Hypervisor\'s names, the memory round as its "id" property', (t) => {
  const store = createStore({ clock: steppingClock() });
  const file = path.join(dir, 'migration-events.json');
  const monitor = EventMonitor.open(store, { path: file });
  store.dispatch(migrationEvents.receiveReady({ receiver_url: 'tcp:0.0.0.0:6000' }));
  store.dispatch(migrationEvents.receiveStarted({ receiver_url: 'tcp:0.0.0.0:6000' }));
  store.dispatch(migrationEvents.receiveFailed({ reason: 'the source went away' }));
  store.dispatch(migrationEvents.receiveFinished(null));
  store.dispatch(migrationEvents.started({ destination_url: 'tcp:dest:6000', local: false }));
  store.dispatch(migrationEvents.memoryIteration({ id: 0, pages: 1000, bytes: 4096000 }));
  store.dispatch(migrationEvents.memoryIteration({ id: 12, pages: 3, bytes: 12288 }));
  store.dispatch(migrationEvents.failed({ reason: 'timed out' }));
  store.dispatch(migrationEvents.finished({ downtime_ms: 40, total_ms: 900, bytes: 4096, iterations: 2 }));
  monitor.close();
  const events = fs
    .readFileSync(file, 'utf8')
    .split('\n\n')
    .filter(Boolean)
    .map((b) => JSON.parse(b) as { source: string; event: string; properties: unknown });
  t.deepEqual(
    events.map((e) => [e.source, e.event, e.properties]),
    [
      ['vm', 'migration-receive-ready', null],
      ['vm', 'migration-receive-started', null],
      ['vm', 'migration-receive-failed', null],
      ['vm', 'migration-receive-finished', null],
      ['vm', 'migration-started', null],
      ['vm', 'migration-memory-iteration', { id: '0' }],
      ['vm', 'migration-memory-iteration', { id: '12' }],
      ['vm', 'migration-failed', null],
      ['vm', 'migration-finished', null],
    ],
  );
  t.true(events.every((e) => isMigrationEvent(e as never)));
  const mapped = Object.values(MONITOR_EVENT_NAMES).filter((n) => n.event.startsWith('migration-')).map((n) => n.event);
  t.deepEqual(mapped.sort(), [...MIGRATION_EVENT_NAMES].sort(), 'the client\'s list of migration events is the monitor\'s');
});

test('the monitor writes to an inherited fd and leaves it open', (t) => {
  const store = createStore({ clock: steppingClock() });
  const file = path.join(dir, 'fd-events.json');
  const fd = fs.openSync(file, 'w');
  const monitor = EventMonitor.open(store, { fd });
  store.dispatch({ type: VmmEvents.Starting, payload: null });
  monitor.close();
  fs.writeSync(fd, 'still open');
  fs.closeSync(fd);
  t.true(fs.readFileSync(file, 'utf8').endsWith('"event": "starting",\n  "properties": null\n}\n\nstill open'));
  t.throws(() => EventMonitor.open(store, { fd: 987654 }), { code: 'EBADF' });
});

test('a reader that goes away stops the monitor, not the store', (t) => {
  const store = createStore({ clock: steppingClock() });
  const [r, w] = pipe();
  const monitor = EventMonitor.open(store, { fd: w });
  fs.closeSync(r);
  t.notThrows(() => store.dispatch({ type: VmmEvents.Starting, payload: null }));
  t.notThrows(() => store.dispatch({ type: VmmEvents.Shutdown, payload: null }));
  monitor.close();
  fs.closeSync(w);
});

/** A pipe as two fds (Node has no pipe(2); a FIFO gives the same thing). */
function pipe(): [number, number] {
  const fifo = path.join(dir, `fifo-${Math.random().toString(36).slice(2)}`);
  require('node:child_process').execFileSync('mkfifo', [fifo]);
  const r = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const w = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  return [r, w];
}

test('a monitor path that is a symlink is refused and its target left untouched; a new file is 0600', (t) => {
  const store = createStore({ clock: steppingClock() });
  const target = path.join(dir, 'precious.txt');
  fs.writeFileSync(target, 'precious', { mode: 0o644 });
  const link = path.join(dir, 'planted-events.json');
  fs.symlinkSync(target, link);
  t.throws(() => EventMonitor.open(store, { path: link }), { instanceOf: HostFileError, message: /planted-events\.json: the event monitor file is a symbolic link/ });
  t.is(fs.readFileSync(target, 'utf8'), 'precious', 'not truncated');
  t.is(fs.statSync(target).mode & 0o777, 0o644, 'mode unchanged');

  const dangling = path.join(dir, 'dangling-events.json');
  const nowhere = path.join(dir, 'created-through-a-link');
  fs.symlinkSync(nowhere, dangling);
  t.throws(() => EventMonitor.open(store, { path: dangling }), { instanceOf: HostFileError });
  t.false(fs.existsSync(nowhere), 'nothing created through the link');

  const linked = path.join(dir, 'hard-linked-events.json');
  fs.linkSync(target, linked);
  t.throws(() => EventMonitor.open(store, { path: linked }), { message: /2 hard links/ });
  t.is(fs.readFileSync(target, 'utf8'), 'precious', 'a second name for a file is not truncated either');

  const fresh = path.join(dir, 'fresh-events.json');
  const monitor = EventMonitor.open(store, { path: fresh });
  monitor.close();
  t.is(fs.statSync(fresh).mode & 0o777, 0o600);
});
