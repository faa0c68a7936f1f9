import test from 'ava';
import { type CmosRtcState, deviceModels } from '../../src/devices';
import { decodeVcpuState } from '../../src/state/codec';
import { NotJsonSafeError, SchemaVersionError } from '../../src/state/errors';
import { dispatchIo } from '../../src/state/io';
import { assertJsonSafe, isJsonSafe } from '../../src/state/json';
import { ROOT_SCHEMA_VERSION, type RootState, initialRootState } from '../../src/state/root';
import { deserializeState, serializeState, validateAndFreezeState, validateState } from '../../src/state/serialize';
import { InvalidStateError } from '../../src/state/state-schema';
import { createStore } from '../../src/state/store';
import { nativeVcpu, pio, populatedStore } from './state-fixtures';

function allFrozen(v: unknown): boolean {
  if (typeof v !== 'object' || v === null) return true;
  return Object.isFrozen(v) && Object.values(v).every(allFrozen);
}

test('every slice is populated, frozen and plain JSON', (t) => {
  const s = populatedStore().getState();
  t.is(s.schemaVersion, ROOT_SCHEMA_VERSION);
  t.is(s.vm.status, 'Running');
  t.is(s.vm.config?.memory?.size, 512 * 1024 * 1024);
  t.deepEqual(Object.keys(s.vcpus.saved).sort(), ['0', '1']);
  t.deepEqual(Object.keys(s.devices.instances).sort(), ['acpi-pm', 'debug-port', 'ged0', 'i8042', 'rtc', 'serial0']);
  t.is(s.bus.pio.length, 7);
  t.deepEqual(s.bus.unhandled.pio, { reads: 1, writes: 1 });
  for (const key of ['vm', 'vcpus', 'devices', 'bus'] as const) t.is(typeof s[key].schemaVersion, 'number');
  for (const inst of Object.values(s.devices.instances)) t.is(inst.schemaVersion, deviceModels[inst.kind].schemaVersion);
  t.notDeepEqual(s, initialRootState());
  t.true(allFrozen(s));
  t.notThrows(() => assertJsonSafe(s));
});

test('JSON.stringify/parse gives back a deep-equal tree', (t) => {
  const s = populatedStore().getState();
  t.deepEqual(JSON.parse(JSON.stringify(s)), s);
});

test('serializeState/deserializeState round-trip into a working store', (t) => {
  const original = populatedStore();
  const json = serializeState(original.getState());
  const restored = deserializeState(json);
  t.deepEqual(restored, original.getState());
  t.true(allFrozen(restored));
  const store = createStore({ preloadedState: restored });
  // the guest still finds the bytes typed before the snapshot
  const lsr = dispatchIo(store, pio('read', 0x3fd)).value as number;
  t.is(lsr & 1, 1);
  t.is(dispatchIo(store, pio('read', 0x3f8)).value, 0x6c);
});

test('saved vCPU state decodes to exactly the native values', (t) => {
  const s = deserializeState(serializeState(populatedStore().getState()));
  t.deepEqual(decodeVcpuState(s.vcpus.saved['1']), nativeVcpu(1));
});

test('non-JSON values are refused with their path', (t) => {
  const bad: [unknown, string][] = [
    [{ a: 1n }, '/a'],
    [{ a: new Map() }, '/a'],
    [{ a: new Set() }, '/a'],
    [{ a: undefined }, '/a'],
    [{ a: [1, , 3] }, '/a/1'], // eslint-disable-line no-sparse-arrays
    [{ a: { b: NaN } }, '/a/b'],
    [{ a: new Date(0) }, '/a'],
    [{ a: new Uint8Array(2) }, '/a'],
    [{ a: () => 1 }, '/a'],
  ];
  for (const [value, path] of bad) {
    const e = t.throws(() => assertJsonSafe(value), { instanceOf: NotJsonSafeError });
    t.is(e?.path, path);
  }
  const e = t.throws(() => assertJsonSafe({ msrs: [{ data: 1n }] }, '/vcpus/saved/0'), { instanceOf: NotJsonSafeError });
  t.is(e?.path, '/vcpus/saved/0/msrs/0/data', 'a path given is the prefix of the one reported');
  t.true(isJsonSafe({ a: [1, 'x', null, true, { b: [] }] }));
  t.true(isJsonSafe(Object.create(null)));
});

test('a state checked and frozen shares its slices with later states; a changed slice is still checked', (t) => {
  const checked = validateAndFreezeState(JSON.parse(serializeState(populatedStore().getState())) as unknown);
  t.true(Object.isFrozen(checked.devices) && Object.isFrozen(checked.vcpus.saved));
  // the migrated state as the store takes it: the checked slices, one of them replaced
  t.notThrows(() => validateState({ ...checked, vm: { ...checked.vm, pending: null } }));
  const bad = { ...checked, vm: { ...checked.vm, bootCount: -1 } };
  t.throws(() => validateState(bad), { instanceOf: InvalidStateError });
  t.throws(() => validateState({ ...checked, devices: { ...checked.devices, bogus: 1 } }));
  t.throws(() => validateState({ ...checked, vm: 'not a slice' }));
  t.throws(() => validateState({ ...checked, extra: {} }), { message: /unknown slices: extra/ });
});

test('a snapshot with another schema version is refused', (t) => {
  const s = JSON.parse(serializeState(populatedStore().getState())) as Record<string, any>;
  const variants: [string, (x: any) => void][] = [
    ['root', (x) => (x.schemaVersion = 99)],
    ['slice', (x) => (x.vm.schemaVersion = 99)],
    ['device', (x) => (x.devices.instances.serial0.schemaVersion = 7)],
  ];
  for (const [what, mutate] of variants) {
    const copy = structuredClone(s);
    mutate(copy);
    t.throws(() => deserializeState(JSON.stringify(copy)), { instanceOf: SchemaVersionError }, what);
  }
});

test('a store can be built from the initial state serialized', (t) => {
  const s: RootState = deserializeState(serializeState(initialRootState()));
  t.deepEqual(s, createStore().getState());
});

test('a snapshot whose device state a guest could not have produced is refused, naming the device and field', (t) => {
  const s = JSON.parse(serializeState(populatedStore().getState())) as Record<string, any>;
  t.notThrows(() => deserializeState(JSON.stringify(s)));
  const variants: [string, RegExp, (x: any) => void][] = [
    ['an RTC offset past the calendar', /'rtc'.*offsetNs/, (x) => (x.devices.instances.rtc.offsetNs = 1e300)],
    ['a CMOS byte that is not one', /'rtc'.*cmos/, (x) => (x.devices.instances.rtc.cmos[3] = 256)],
    ['a UART buffer beyond its capacity', /'serial0'.*rx/, (x) => (x.devices.instances.serial0.rx = new Array(100_000).fill(65))],
    ['a UART buffer longer than its own capacity', /'serial0'.*\/rx: holds 65 bytes, more than rxCapacity 64/, (x) => (x.devices.instances.serial0.rx = new Array(65).fill(65))],
    ['a UART capacity without bound', /'serial0'.*rxCapacity/, (x) => (x.devices.instances.serial0.rxCapacity = 1e12)],
    ['a negative counter', /'serial0'.*txBytes/, (x) => (x.devices.instances.serial0.txBytes = -1)],
    ['an interrupt pin KVM does not have', /'ged0'.*gsi/, (x) => (x.devices.instances.ged0.gsi = 99)],
    ['a keyboard interrupt past the IOAPIC', /'i8042'.*kbdGsi/, (x) => (x.devices.instances.i8042.kbdGsi = 24)],
    ['an unknown i8042 channel', /'i8042'.*outChannel/, (x) => (x.devices.instances.i8042.outChannel = 'mouse')],
    ['a sleep type of 8 bits', /'acpi-pm'.*sleepType/, (x) => (x.devices.instances['acpi-pm'].sleepType = 200)],
    ['a debug code of 16 bits', /'debug-port'.*lastCode/, (x) => (x.devices.instances['debug-port'].lastCode = 0x1234)],
    ['a guest stop that is neither a reboot nor a shutdown', /'vm'.*guestStop/, (x) => (x.vm.guestStop = { action: 'explode', reason: 'x', detail: 'y' })],
  ];
  for (const [what, message, mutate] of variants) {
    const copy = structuredClone(s);
    mutate(copy);
    t.throws(() => deserializeState(JSON.stringify(copy)), { instanceOf: InvalidStateError, message }, what);
  }
});

test('an RTC a guest set decades away from the host clock survives a snapshot', (t) => {
  // offsetNs counts from the host's clock in ns: a guest that sets its RTC to 1990 is 1e18 ns
  // away, far past the range of exact integers, and its snapshot must still restore.
  for (const offsetNs of [-1.1e18, 2.5e18, -3.1e20]) {
    const s = JSON.parse(serializeState(populatedStore().getState())) as Record<string, any>;
    s.devices.instances.rtc.offsetNs = offsetNs;
    t.is((deserializeState(JSON.stringify(s)).devices.instances.rtc as CmosRtcState).offsetNs, offsetNs);
  }
});
