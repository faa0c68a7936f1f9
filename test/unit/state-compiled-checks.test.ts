// The build generates the checks of the state's schemas (scripts/compile-state-checks.js), so a
// restore or a migration's destination checks its first state without generating them then.
import test from 'ava';
import { platformDevices, deviceModels } from '../../src/devices';
import { PCI_SEGMENT_ID, pciFunctionModels } from '../../src/devices/pci/segment';
import { createStore, deviceEvents, rootSlices, validateState, vmEvents } from '../../src/state';
import { compiledCheckCode } from '../../src/state/compiled-checks';
import { checksCompiledAtRuntime, schemaFingerprint } from '../../src/state/state-schema';

test('the build generated the check of every slice, device model and PCI function schema', (t) => {
  const schemas = {
    ...Object.fromEntries(Object.values(rootSlices).map((s) => [`slice ${s.name}`, s.schema])),
    ...Object.fromEntries(Object.entries(deviceModels).map(([kind, m]) => [`device ${kind}`, m.stateSchema])),
    ...Object.fromEntries(Object.entries(pciFunctionModels).map(([kind, m]) => [`PCI function ${kind}`, m.stateSchema])),
  };
  const missing = Object.entries(schemas)
    .filter(([, schema]) => compiledCheckCode(schemaFingerprint(schema)) === undefined)
    .map(([name]) => name);
  t.deepEqual(missing, [], 'run `npm run build`: it generates them after tsc');
  t.true(Object.keys(schemas).length >= 10);
});

test('a saved state is checked with no check compiled then, and a generated check still names the field it refuses', (t) => {
  const store = createStore();
  store.dispatch(vmEvents.created({ payload: { kernel: '/k' }, memory: { size: 64 << 20 } } as never));
  for (const d of platformDevices({ memorySize: 64 << 20, serial: true })) store.dispatch(deviceEvents.added(d));
  const saved = JSON.parse(JSON.stringify(store.getState()));
  const before = checksCompiledAtRuntime();
  t.notThrows(() => validateState(saved));
  t.is(checksCompiledAtRuntime(), before, 'every schema met had its generated check');

  const tampered = JSON.parse(JSON.stringify(saved));
  tampered.devices.instances[PCI_SEGMENT_ID].configAddress = 'everything';
  t.throws(() => validateState(tampered), { message: /configAddress/ });
  const badSlice = JSON.parse(JSON.stringify(saved));
  badSlice.vm.status = 'Flying';
  t.throws(() => validateState(badSlice), { message: /slice 'vm' field \/status/ });
});
