// Schema evolution: a state.json written by a build with root schema 1 (before the kvm slice)
// is lifted by the upgrade registry to this build's schema, and states from a newer build are
// refused. The fixture is a real version-1 serialization, kept as a file.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';

import { canonicalJson, stateChecksum } from '../../src/migration/snapshot';
import { platformDevices } from '../../src/devices';
import {
  ROOT_SCHEMA_VERSION,
  STATE_UPGRADES,
  createStore,
  deserializeState,
  deviceEvents,
  kvmInitialState,
  upgradeState,
  validateState,
  vmEvents,
} from '../../src/state';

const FIXTURE = path.resolve(__dirname, '..', '..', '..', 'test', 'unit', 'fixtures', 'state-v1.json');
const v1 = (): Record<string, unknown> => JSON.parse(fs.readFileSync(FIXTURE, 'utf8'));

test('the fixture is schema 1 and this build refuses it without upgrading', (t) => {
  const s = v1();
  t.is(s.schemaVersion, 1);
  t.false('kvm' in s);
  t.throws(() => deserializeState(JSON.stringify(s)), { message: new RegExp(`schemaVersion 1 is not the supported ${ROOT_SCHEMA_VERSION}`) });
});

test('upgradeState lifts schema 1 to the current schema by adding the kvm slice', (t) => {
  const input = v1();
  const frozenCopy = canonicalJson(input);
  const up = upgradeState(input);
  t.is(up.schemaVersion, ROOT_SCHEMA_VERSION);
  t.deepEqual(up.kvm, kvmInitialState());
  t.is((up.vm as { guestStop: unknown }).guestStop, null, 'no guest stop waits in an older state');
  t.notThrows(() => validateState(up));
  t.is(canonicalJson(input), frozenCopy, 'upgrades are pure: the input is untouched');
  // The upgraded state works in a store.
  const store = createStore({ preloadedState: up as never });
  t.is(store.getState().vm.status, 'Created');
  store.dispatch(vmEvents.deleted());
  t.is(store.getState().vm.status, 'NotCreated');
});

test('a current state is returned as is; newer or malformed versions are refused', (t) => {
  const cur = upgradeState(v1());
  t.is(upgradeState(cur), cur);
  t.throws(() => upgradeState({ ...cur, schemaVersion: ROOT_SCHEMA_VERSION + 1 }), { message: /newer than this build's/ });
  t.throws(() => upgradeState({ ...cur, schemaVersion: 0 }), { message: /not a positive integer/ });
  t.throws(() => upgradeState({ ...cur, schemaVersion: 1 }, 2, {}), { message: /no upgrade from state schemaVersion 1/ });
  t.true(Object.keys(STATE_UPGRADES).every((k) => Number(k) < ROOT_SCHEMA_VERSION));
});

test('the state checksum ignores key order and catches any change', (t) => {
  const s = v1();
  const reordered = Object.fromEntries(Object.entries(s).reverse());
  t.is(stateChecksum(reordered), stateChecksum(s));
  t.not(stateChecksum({ ...s, schemaVersion: 3 }), stateChecksum(s));
});

const SCHEMA2_SNAPSHOT_STATE = path.resolve(__dirname, '..', '..', '..', 'test', 'fixtures', 'snapshot-schema2', 'state.json');

test('schema 2 -> 3 gives a paused schema-2 VM the RAM layout schema-2 builds used', (t) => {
  const env = JSON.parse(fs.readFileSync(SCHEMA2_SNAPSHOT_STATE, 'utf8'));
  t.is(env.state.schemaVersion, 2);
  t.false('memory' in env.state);
  const up = upgradeState(env.state);
  t.is(up.schemaVersion, ROOT_SCHEMA_VERSION);
  t.deepEqual((up.memory as { regions: unknown }).regions, [{ guestAddress: 0, size: 64 * 1024 * 1024 }]);
  t.notThrows(() => validateState(up));
  // Above the 3 GiB hole the rest of RAM starts at 4 GiB; a VM that is not running has none.
  const big = { ...env.state, vm: { ...env.state.vm, config: { ...env.state.vm.config, memory: { size: 4 * 1024 ** 3 } } } };
  t.deepEqual((STATE_UPGRADES[2](big).memory as { regions: unknown }).regions, [
    { guestAddress: 0, size: 3 * 1024 ** 3 },
    { guestAddress: 4 * 1024 ** 3, size: 1024 ** 3 },
  ]);
  const created = { ...env.state, vm: { ...env.state.vm, status: 'Created' } };
  t.deepEqual((STATE_UPGRADES[2](created).memory as { regions: unknown }).regions, []);
});

test('schema 5 -> 6: a schema-5 VM keeps the devices it had, with no PCI segment, and validates; schema-5 builds refuse a schema-6 state', (t) => {
  const env = JSON.parse(fs.readFileSync(SCHEMA2_SNAPSHOT_STATE, 'utf8'));
  const v5 = upgradeState(env.state, 5);
  t.is(v5.schemaVersion, 5);
  const up = STATE_UPGRADES[5](v5);
  t.is(up.schemaVersion, 6);
  const kinds = (s: Record<string, unknown>) => Object.values((s.devices as { instances: Record<string, { kind: string }> }).instances).map((d) => d.kind).sort();
  t.deepEqual(kinds(up), kinds(v5), 'restore adds no device the guest was never told of');
  t.false(kinds(up).includes('pci-segment'));
  t.notThrows(() => validateState(up));
  // A VM of this build has the segment; a build that reads schema 5 refuses it by version.
  const store = createStore();
  store.dispatch(vmEvents.created({ payload: { kernel: '/k' }, memory: { size: 64 << 20 } } as never));
  for (const d of platformDevices({ memorySize: 64 << 20, serial: true })) store.dispatch(deviceEvents.added(d));
  const now = JSON.parse(JSON.stringify(store.getState()));
  t.true(kinds(now).includes('pci-segment'));
  t.notThrows(() => validateState(now));
  t.throws(() => upgradeState(now, 5), { message: /schemaVersion 6 is newer than this build's 5/ });
});
