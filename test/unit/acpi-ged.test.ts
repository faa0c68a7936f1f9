import test from 'ava';
import {
  ACPI_GED_GSI,
  ACPI_GED_PORT,
  AcpiGedEvents,
  GedEvent,
  type AcpiGedState,
  acpiGedDevice,
  acpiGedInitialState,
  acpiGedModel,
  acpiGedPowerButton,
  acpiGedTransition,
  powerButtonPressedEvent,
} from '../../src/devices/acpi-ged';
import { deviceModels } from '../../src/devices';
import { deepFreeze } from '../../src/state/json';
import { createStore, deviceEvents, dispatchIo, vmEvents } from '../../src/state';
import { DeviceHarness } from './device-harness';
import { config } from './state-fixtures';

const ged = (s: AcpiGedState = acpiGedInitialState()) => new DeviceHarness<AcpiGedState>(s, acpiGedTransition);

function press(h: DeviceHarness<AcpiGedState>): void {
  deepFreeze(h.state);
  const r = acpiGedPowerButton(h.state, null);
  h.state = r.state;
  h.effects.push(...r.effects);
}

test('the GED sits at its port and GSI, registered as a device model with a press input', (t) => {
  t.deepEqual(acpiGedDevice().ranges, [{ space: 'pio', base: 0x610, length: 1 }]);
  t.is(ACPI_GED_PORT, 0x610);
  t.is(ACPI_GED_GSI, 9);
  t.is(deviceModels['acpi-ged'], acpiGedModel);
  t.is(acpiGedModel.inputs[AcpiGedEvents.PowerButtonPressed], acpiGedPowerButton);
  t.deepEqual(acpiGedInitialState(), { kind: 'acpi-ged', id: 'ged0', schemaVersion: 1, gsi: 9, pending: 0, powerButtonPresses: 0 });
});

test('a press raises the level; the guest reads the cause and its write-1-to-clear lowers it', (t) => {
  const h = ged();
  t.is(h.in(0), 0);
  press(h);
  t.deepEqual(h.take(), [{ type: 'irq.level', gsi: 9, level: 1 }]);
  t.is(h.state.powerButtonPresses, 1);
  t.is(h.in(0), GedEvent.PowerButton);
  h.out(0, GedEvent.PowerButton);
  t.deepEqual(h.take(), [{ type: 'irq.level', gsi: 9, level: 0 }]);
  t.is(h.in(0), 0);
  t.is(h.state.powerButtonPresses, 1, 'acknowledging does not forget the press');
});

test('presses while the line is high are coalesced; the line rises once', (t) => {
  const h = ged();
  press(h);
  press(h);
  t.deepEqual(h.take(), [{ type: 'irq.level', gsi: 9, level: 1 }]);
  t.is(h.state.powerButtonPresses, 2);
  t.is(h.state.pending, GedEvent.PowerButton);
});

test('writes that clear nothing pending change nothing; reserved bytes read zero', (t) => {
  const h = ged();
  h.out(0, 0xff);
  t.deepEqual(h.take(), []);
  press(h);
  h.take();
  const before = h.state;
  h.out(0, 0x02); // not a pending bit
  h.out(1, 0xff); // beyond the register
  t.is(h.state, before);
  t.deepEqual(h.take(), []);
  t.is(h.in(0, 4), GedEvent.PowerButton, 'a wide read sees the register in its low byte');
  t.is(h.in(1), 0);
});

test('a press after the acknowledgment raises the line again', (t) => {
  const h = ged();
  press(h);
  h.out(0, h.in(0));
  press(h);
  t.deepEqual(h.take(), [
    { type: 'irq.level', gsi: 9, level: 1 },
    { type: 'irq.level', gsi: 9, level: 0 },
    { type: 'irq.level', gsi: 9, level: 1 },
  ]);
});

test('through the store: the press event yields the interrupt, the guest access lowers it', (t) => {
  const store = createStore({ checkJson: true });
  store.dispatch(vmEvents.created(config));
  store.dispatch(deviceEvents.added(acpiGedDevice({ id: 'ged0', gsi: 5 })));
  const r = store.dispatch(powerButtonPressedEvent('ged0'));
  t.deepEqual(r.effects, [{ type: 'irq.level', gsi: 5, level: 1 }]);
  const s = store.getState().devices.instances.ged0 as AcpiGedState;
  t.is(s.pending, 1);
  t.is(s.powerButtonPresses, 1);
  const io = (direction: 'read' | 'write', data = 0) =>
    dispatchIo(store, { space: 'pio', direction, address: ACPI_GED_PORT, size: 1, data, nowNs: 0 });
  t.is(io('read').value, 1);
  t.deepEqual(io('write', 1).effects, [{ type: 'irq.level', gsi: 5, level: 0 }]);
  t.is((store.getState().devices.instances.ged0 as AcpiGedState).pending, 0);
});
