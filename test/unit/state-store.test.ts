import test from 'ava';
import type { Effect } from '../../src/devices/device';
import { serialDevice, serialInputEvent } from '../../src/devices/serial-16550a';
import { i8042Device } from '../../src/devices/i8042';
import type { EventTimestamp } from '../../src/state/clock';
import { DeviceConflictError, UnknownDeviceError } from '../../src/state/errors';
import { dispatchIo, ioEvent } from '../../src/state/io';
import { applyStatePatches, applyStatePatchesInPlace, diffState, produceStateWithPatches, type StatePatch, type StatePatchSet } from '../../src/state/patches';
import { Type } from '@sinclair/typebox';
import { createSlice, pure, type EventInput, type StoreEvent } from '../../src/state/slice';
import { BusEvents } from '../../src/state/slices/bus';
import { DeviceEvents, deviceEvents } from '../../src/state/slices/devices';
import { vmEvents } from '../../src/state/slices/vm';
import { StoreEvents, createStore } from '../../src/state/store';
import { config, pio, populatedStore } from './state-fixtures';

// A toy slice exercising every handler style.
interface Counter {
  schemaVersion: number;
  n: number;
  log: string[];
}

const counterSlice = createSlice({
  name: 'counter',
  schemaVersion: 1,
  initialState: { schemaVersion: 1, n: 0, log: [] } as Counter,
  schema: Type.Object({ schemaVersion: Type.Integer(), n: Type.Integer(), log: Type.Array(Type.String()) }),
  handlers: {
    '[Counter] Incremented': (draft, by: number) => {
      draft.n += by;
    },
    '[Counter] Reset': () => ({ schemaVersion: 1, n: 0, log: [] }),
    '[Counter] Logged': (draft, line: string) => {
      draft.log.push(line);
      return [draft, [{ type: 'boot.progress', code: draft.log.length }]] as const;
    },
    '[Counter] Read': pure((s: Counter) => ({ state: s, effects: [], value: s.n })),
    '[Counter] Doubled': pure((s: Counter) => [{ ...s, n: s.n * 2 }, [{ type: 'vm.reset', source: 'counter' }]] as const),
    '[Counter] Exploded': (draft) => {
      draft.n = -1;
      throw new Error('boom');
    },
  },
});

const otherSlice = createSlice({
  name: 'other',
  schemaVersion: 3,
  initialState: () => ({ schemaVersion: 3, seen: 0 }),
  schema: Type.Object({ schemaVersion: Type.Integer(), seen: Type.Integer() }),
  handlers: {
    '[Counter] Incremented': (d) => {
      d.seen += 1;
    },
    '[Counter] Exploded': pure((s: { schemaVersion: number; seen: number }) => ({ ...s, seen: 100 })),
  },
});

function toyStore(opts = {}) {
  return createStore({ slices: { counter: counterSlice, other: otherSlice }, ...opts });
}

test('draft mutators, returned states, tuples and results all work', (t) => {
  const store = toyStore();
  t.deepEqual(store.dispatch(counterSlice.events['[Counter] Incremented'](5)).effects, []);
  t.is(store.getState().counter.n, 5);
  t.is(store.getState().other.seen, 1, 'two slices handle the same event');
  t.deepEqual(store.dispatch({ type: '[Counter] Logged', payload: 'x' }).effects, [{ type: 'boot.progress', code: 1 }]);
  t.deepEqual(store.getState().counter.log, ['x']);
  const r = store.dispatch({ type: '[Counter] Read', payload: null });
  t.is(r.value, 5);
  t.deepEqual(store.dispatch({ type: '[Counter] Doubled', payload: null }).effects, [{ type: 'vm.reset', source: 'counter' }]);
  t.is(store.getState().counter.n, 10);
  store.dispatch({ type: '[Counter] Reset', payload: null });
  t.deepEqual(store.getState().counter, { schemaVersion: 1, n: 0, log: [] });
  t.true(Object.isFrozen(store.getState().counter.log));
});

test('a handler that throws leaves the state, seq and journal untouched', (t) => {
  const store = toyStore();
  store.dispatch({ type: '[Counter] Incremented', payload: 1 });
  const before = store.getState();
  t.throws(() => store.dispatch({ type: '[Counter] Exploded', payload: null }), { message: 'boom' });
  t.is(store.getState(), before);
  t.is(store.seq, 1);
  t.is(store.journal().length, 1);
});

test('reads that change nothing keep the same state object', (t) => {
  const store = toyStore();
  const before = store.getState();
  store.dispatch({ type: '[Counter] Read', payload: null });
  store.dispatch({ type: '[Nobody] Listens', payload: 1 });
  t.is(store.getState(), before);
  t.is(store.seq, 2, 'events nobody handles are still recorded');
});

test('events$ sees every event in order with seq, timestamp and source', (t) => {
  let tick = 0;
  const store = toyStore({ clock: (): EventTimestamp => ({ secs: 1, nanos: tick++ }) });
  const seen: StoreEvent[] = [];
  const states: number[] = [];
  store.events$.subscribe((e) => {
    seen.push(e);
    states.push(store.getState().counter.n); // committed before notification
  });
  for (let i = 1; i <= 5; i++) store.dispatch({ type: '[Counter] Incremented', payload: 1, source: i % 2 ? 'vm' : undefined });
  t.deepEqual(seen.map((e) => e.seq), [1, 2, 3, 4, 5]);
  t.deepEqual(seen.map((e) => e.timestamp.nanos), [0, 1, 2, 3, 4]);
  t.deepEqual(seen.map((e) => e.source), ['vm', 'vmm', 'vm', 'vmm', 'vm']);
  t.deepEqual(states, [1, 2, 3, 4, 5]);
  t.true(seen.every((e) => e.type === '[Counter] Incremented' && e.payload === 1 && Object.isFrozen(e)));
});

test('a subscriber that dispatches does not reorder events$', (t) => {
  const store = toyStore();
  const order: number[] = [];
  store.events$.subscribe((e) => {
    if (e.type === '[Counter] Incremented' && e.payload === 1) store.dispatch({ type: '[Counter] Logged', payload: 'reaction' });
  });
  store.events$.subscribe((e) => order.push(e.seq));
  store.dispatch({ type: '[Counter] Incremented', payload: 1 });
  store.dispatch({ type: '[Counter] Incremented', payload: 2 });
  t.deepEqual(order, [1, 2, 3]);
  t.deepEqual(store.journal().map((e) => e.type), ['[Counter] Incremented', '[Counter] Logged', '[Counter] Incremented']);
});

test('real timestamps are monotonic and measured from VMM start', (t) => {
  const store = toyStore();
  for (let i = 0; i < 50; i++) store.dispatch({ type: '[Counter] Incremented', payload: 1 });
  const ts = store.journal().map((e) => e.timestamp.secs * 1e9 + e.timestamp.nanos);
  t.true(ts.every((v, i) => i === 0 || v >= ts[i - 1]));
  t.true(ts[0] >= 0 && ts[0] < process.uptime() * 1e9 + 1e9);
  t.true(store.journal().every((e) => e.timestamp.nanos >= 0 && e.timestamp.nanos < 1e9));
});

test('the journal keeps the last N events', (t) => {
  const store = toyStore({ journalSize: 5 });
  for (let i = 0; i < 12; i++) store.dispatch({ type: '[Counter] Incremented', payload: i });
  t.deepEqual(store.journal().map((e) => e.seq), [8, 9, 10, 11, 12]);
  t.deepEqual(toyStore({ journalSize: 0 }).journal(), []);
});

test('state$ replays the current state and emits only on change', (t) => {
  const store = toyStore();
  store.dispatch({ type: '[Counter] Incremented', payload: 1 });
  const seen: number[] = [];
  store.state$.subscribe((s) => seen.push(s.counter.n));
  store.dispatch({ type: '[Counter] Read', payload: null });
  store.dispatch({ type: '[Counter] Incremented', payload: 1 });
  t.deepEqual(seen, [1, 2]);
});

test('dispatching from inside a reducer is refused', (t) => {
  let store: { dispatch(e: EventInput): unknown } | undefined;
  const sneaky = createSlice({
    name: 'sneaky',
    schemaVersion: 1,
    initialState: { schemaVersion: 1 },
    schema: Type.Object({ schemaVersion: Type.Integer() }),
    handlers: { '[Sneaky] Go': pure((s: { schemaVersion: number }) => (store!.dispatch({ type: 'x', payload: 0 }), s)) },
  });
  const real = createStore({ slices: { sneaky } });
  store = real;
  t.throws(() => real.dispatch({ type: '[Sneaky] Go', payload: null }), { message: /inside a reducer/ });
});

test('patches$ streams diffs that rebuild the state elsewhere', (t) => {
  const sets: StatePatchSet[] = [];
  const store = populatedStore({ recordPatches: true });
  const mirror = { state: store.getState() };
  store.patches$.subscribe((p) => {
    sets.push(p);
    mirror.state = applyStatePatches(mirror.state, p.patches);
  });
  dispatchIo(store, pio('read', 0x3f8));
  dispatchIo(store, pio('write', 0x3ff, 0x5a));
  store.dispatch(vmEvents.pausing());
  store.dispatch(vmEvents.paused());
  t.deepEqual(mirror.state, store.getState());
  t.is(sets.length, 4);
  // a scratch write is one small replace, not a copy of the tree
  t.deepEqual(sets[1].patches, [{ op: 'replace', path: ['devices', 'instances', 'serial0', 'scr'], value: 0x5a }]);
});

test('diffState + applyStatePatches between arbitrary states', (t) => {
  const a = populatedStore().getState();
  const b = createStore().getState();
  t.deepEqual(applyStatePatches(a, diffState(a, b)), b);
  t.deepEqual(applyStatePatches(b, diffState(b, a)), a);
  t.deepEqual(diffState(a, a), []);
  const [next, patches, inverse] = produceStateWithPatches(b, (d) => {
    d.vm.bootCount = 7;
  });
  t.deepEqual(applyStatePatches(b, patches), next);
  t.deepEqual(applyStatePatches(next, inverse), b);
});

test('patches applied in place to a parsed copy give what immer gives; bad paths and __proto__ are refused', (t) => {
  const a = populatedStore().getState();
  const b = createStore().getState();
  const parsed = (s: unknown) => JSON.parse(JSON.stringify(s));
  // (a migration destination's shadow: the wire's copies of both the state and the patches)
  t.deepEqual(applyStatePatchesInPlace(parsed(a), parsed(diffState(a, b))), applyStatePatches(a, diffState(a, b)));
  t.deepEqual(applyStatePatchesInPlace(parsed(b), parsed(diffState(b, a))), a);
  const arrays = { list: [1, 2, 3], 'odd/key~': { x: 1 } };
  const ops: StatePatch[] = [
    { op: 'add', path: ['list', 1], value: 9 },
    { op: 'remove', path: ['list', 0] },
    { op: 'replace', path: ['odd/key~', 'x'], value: 2 },
  ];
  t.deepEqual(applyStatePatchesInPlace(parsed(arrays), ops), applyStatePatches(arrays, ops));
  t.deepEqual(applyStatePatchesInPlace(parsed(arrays), [{ op: 'replace', path: [], value: { whole: true } }]), { whole: true });
  for (const bad of [
    { op: 'replace', path: ['missing', 'x'], value: 1 },
    { op: 'remove', path: ['list', 7] },
    { op: 'remove', path: ['list', 3] },
    { op: 'replace', path: ['list', 3], value: 1 },
    { op: 'add', path: ['missing', 'deeper', 'x'], value: 1 },
    { op: 'add', path: ['list', 9], value: 1 },
    { op: 'add', path: ['__proto__', 'polluted'], value: 1 },
  ] as StatePatch[]) {
    t.throws(() => applyStatePatchesInPlace(parsed(arrays), [bad]), undefined, JSON.stringify(bad));
  }
  t.is(({} as Record<string, unknown>).polluted, undefined);
});

test('replaceState swaps the whole tree as a recorded event', (t) => {
  const source = populatedStore();
  const target = createStore();
  const types: string[] = [];
  target.events$.subscribe((e) => types.push(e.type));
  target.replaceState(source.getState(), 'migration');
  t.deepEqual(target.getState(), source.getState());
  t.deepEqual(types, [StoreEvents.StateReplaced]);
  t.is(target.journal()[0].source, 'migration');
  t.throws(() => target.replaceState({ ...source.getState(), schemaVersion: 9 }));
});

test('guest accesses become device events; effects and read values come back', (t) => {
  const store = createStore();
  store.dispatch(vmEvents.created(config));
  store.dispatch(deviceEvents.added(serialDevice({ id: 'com1' })));
  store.dispatch(deviceEvents.added(i8042Device()));

  const ev = ioEvent(store.getState(), pio('write', 0x3f8, 0x21));
  t.deepEqual(ev, {
    type: '[Serial] Register Written',
    source: 'com1',
    payload: { space: 'pio', direction: 'write', offset: 0, size: 1, data: 0x21, nowNs: pio('read', 0).nowNs },
  });
  const w = store.dispatch(ev);
  t.deepEqual(w.effects, [{ type: 'console.output', device: 'com1', bytes: [0x21] }] as Effect[]);
  t.is(w.value, undefined);

  t.is(dispatchIo(store, pio('read', 0x3fb)).value, 0x03, 'LCR');
  dispatchIo(store, pio('write', 0x64, 0xaa));
  t.is(dispatchIo(store, pio('read', 0x60)).value, 0x55);
  t.deepEqual(dispatchIo(store, pio('write', 0x64, 0xfe)).effects, [{ type: 'vm.reset', source: 'i8042' }] as Effect[]);

  const miss = dispatchIo(store, pio('read', 0x2f8, 0, 2));
  t.is(miss.value, 0xffff);
  t.is(store.journal().at(-1)?.type, BusEvents.UnhandledAccess);
  t.deepEqual(store.getState().bus.unhandled.pio, { reads: 1, writes: 0 });

  store.dispatch(serialInputEvent('com1', Uint8Array.of(0x71)));
  t.is(dispatchIo(store, pio('read', 0x3f8)).value, 0x71);
});

test('device events for a missing or mismatched device are refused', (t) => {
  const store = createStore();
  store.dispatch(deviceEvents.added(serialDevice()));
  store.dispatch(deviceEvents.added(i8042Device()));
  const access = { space: 'pio', direction: 'read', offset: 0, size: 1, data: 0, nowNs: 0 };
  t.throws(() => store.dispatch({ type: '[Serial] Register Read', payload: access, source: 'nope' }), { instanceOf: UnknownDeviceError });
  t.throws(() => store.dispatch({ type: '[Serial] Register Read', payload: access, source: 'i8042' }), { instanceOf: UnknownDeviceError });
  t.throws(() => store.dispatch(deviceEvents.added(serialDevice())), { instanceOf: DeviceConflictError });
  // same id elsewhere is fine for the devices slice but the bus refuses the overlapping range
  const before = store.getState();
  t.throws(() => store.dispatch(deviceEvents.added(serialDevice({ id: 'serial1' }))), { instanceOf: DeviceConflictError });
  t.is(store.getState(), before, 'neither slice kept its half of the event');
  store.dispatch(deviceEvents.removed('serial0'));
  t.deepEqual(Object.keys(store.getState().devices.instances), ['i8042']);
  t.is(store.getState().bus.pio.length, 2);
  t.is(store.journal().at(-1)?.type, DeviceEvents.Removed);
});

// A migration source rehearses its pause in a scratch store made from its live state: that copy
// must not check every slice again (in a VMM that never loaded a state, that compiles every
// validator, on the thread that serves the running guest).
test('a store preloaded from another store\'s state takes it as it is; any other preloaded state is checked', (t) => {
  const live = populatedStore().getState();
  const broken = { ...live, vm: { ...live.vm, status: 'Dancing' } } as unknown as typeof live;
  t.throws(() => createStore({ preloadedState: broken }));
  const scratch = createStore({ preloadedState: broken, preloadedFromStore: true });
  t.is(scratch.getState().vm.status as string, 'Dancing');
  t.true(Object.isFrozen(scratch.getState()));
  const copy = createStore({ preloadedState: live, preloadedFromStore: true });
  copy.dispatch(vmEvents.pausing());
  t.is(copy.getState().vm.pending, 'Pausing', 'the copy runs the same reducers');
  t.is(live.vm.pending, null, 'and leaves the state it was made from alone');
});
