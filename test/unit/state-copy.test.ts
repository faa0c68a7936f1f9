import test from 'ava';
import { copyRecord, freezeNew, recordCopier, withKey } from '../../src/state/copy';
import { copySerialState, serialInitialState } from '../../src/devices/serial-16550a';
import { copyI8042State, i8042InitialState } from '../../src/devices/i8042';
import { cmosInitialState, copyCmosState } from '../../src/devices/cmos-rtc';

test('device copy functions copy every field', (t) => {
  for (const [s, copy] of [
    [serialInitialState(), copySerialState],
    [i8042InitialState(), copyI8042State],
    [cmosInitialState({ memorySize: 1 << 26 }), copyCmosState],
  ] as [object, (s: any) => object][]) {
    const c = copy(s);
    t.not(c, s);
    t.deepEqual(c, s);
    t.deepEqual(Object.keys(c), Object.keys(s));
  }
});

test('record copies are shallow, fresh and exact', (t) => {
  const o = { a: 1, b: { c: 2 }, 'we"ird\u2028key': 3 };
  const c = recordCopier<typeof o>(Object.keys(o))(o);
  t.not(c, o);
  t.deepEqual(c, o);
  t.is(c.b, o.b);
});

test('a __proto__ key is copied as data, not as a prototype', (t) => {
  const o = JSON.parse('{"__proto__": {"polluted": true}, "x": 1}');
  const c = copyRecord(o);
  t.is(Object.getPrototypeOf(c), Object.prototype);
  t.deepEqual(Object.keys(c), ['__proto__', 'x']);
  t.is((c as any).polluted, undefined);
});

test('withKey adds and replaces keys, and later copies keep added keys', (t) => {
  const a = { x: 1 };
  const b = withKey(a as Record<string, number>, 'y', 2);
  const c = withKey(b, 'x', 3);
  const d = withKey(c, 'z', 4);
  const e = withKey(d, 'x', 5);
  t.deepEqual(a, { x: 1 });
  t.deepEqual(b, { x: 1, y: 2 });
  t.deepEqual(c, { x: 3, y: 2 });
  t.deepEqual(e, { x: 5, y: 2, z: 4 });
});

test('freezeNew freezes new objects and stops at frozen ones', (t) => {
  const old = Object.freeze({ deep: { notFrozen: true } });
  const fresh = { a: [1, { b: 2 }], old };
  freezeNew(fresh);
  t.true(Object.isFrozen(fresh));
  t.true(Object.isFrozen(fresh.a));
  t.true(Object.isFrozen(fresh.a[1]));
  t.false(Object.isFrozen(old.deep), 'frozen subtrees are trusted, not walked');
});
