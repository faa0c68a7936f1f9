import test from 'ava';
import {
  ACPI_PM_BASE,
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_STATUS_PORT,
  SLP_EN,
  SLP_TYP_S5,
  SLP_TYP_SHIFT,
  WAK_STS,
  type AcpiPmState,
  acpiPmDevice,
  acpiPmInitialState,
  acpiPmTransition,
} from '../../src/devices/acpi-pm';
import { DeviceHarness } from './device-harness';

const CONTROL = ACPI_SLEEP_CONTROL_PORT - ACPI_PM_BASE;
const STATUS = ACPI_SLEEP_STATUS_PORT - ACPI_PM_BASE;
const RESET = ACPI_RESET_PORT - ACPI_PM_BASE;

const pm = (s: AcpiPmState = acpiPmInitialState()) => new DeviceHarness<AcpiPmState>(s, acpiPmTransition);

test('ports and values the ACPI tables use', (t) => {
  t.is(ACPI_SLEEP_CONTROL_PORT, 0x600);
  t.is(ACPI_SLEEP_STATUS_PORT, 0x601);
  t.is(ACPI_RESET_PORT, 0x602);
  t.is(ACPI_RESET_VALUE, 0x06);
  t.deepEqual(acpiPmDevice().ranges, [{ space: 'pio', base: 0x600, length: 4 }]);
});

test('SLP_EN with SLP_TYP 5 powers off', (t) => {
  const h = pm();
  h.out(CONTROL, (SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN);
  t.deepEqual(h.take(), [{ type: 'vm.poweroff', source: 'acpi' }]);
  t.is(h.in(CONTROL), SLP_TYP_S5 << SLP_TYP_SHIFT, 'SLP_EN reads back as 0');
});

test('SLP_TYP without SLP_EN does nothing; other sleep types are reported', (t) => {
  const h = pm();
  h.out(CONTROL, SLP_TYP_S5 << SLP_TYP_SHIFT);
  t.deepEqual(h.take(), []);
  h.out(CONTROL, (3 << SLP_TYP_SHIFT) | SLP_EN);
  t.deepEqual(h.take(), [{ type: 'vm.sleep', source: 'acpi', state: 3 }]);
});

test('reset register: only the reset value resets', (t) => {
  const h = pm();
  h.out(RESET, 0x01);
  t.deepEqual(h.take(), []);
  h.out(RESET, ACPI_RESET_VALUE);
  t.deepEqual(h.take(), [{ type: 'vm.reset', source: 'acpi' }]);
});

test('WAK_STS is write-one-to-clear', (t) => {
  const h = pm({ ...acpiPmInitialState(), sleepStatus: WAK_STS });
  t.is(h.in(STATUS), WAK_STS);
  h.out(STATUS, 0);
  t.is(h.in(STATUS), WAK_STS);
  h.out(STATUS, WAK_STS);
  t.is(h.in(STATUS), 0);
});

test('a 16-bit write reaches both byte registers', (t) => {
  const h = pm();
  h.access({ direction: 'write', offset: CONTROL, size: 2, data: ((SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN) });
  t.deepEqual(h.take(), [{ type: 'vm.poweroff', source: 'acpi' }]);
  h.access({ direction: 'write', offset: STATUS, size: 2, data: ACPI_RESET_VALUE << 8 });
  t.deepEqual(h.take(), [{ type: 'vm.reset', source: 'acpi' }]);
});
