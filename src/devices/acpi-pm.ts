// The hardware-reduced ACPI power-management registers the FADT points at: sleep control,
// sleep status and reset, one byte each. The ACPI table builder imports the constants below,
// so the tables and the device cannot disagree.
import { Type } from '@sinclair/typebox';
import * as aml from '../boot/aml';
import { DeviceId, Exact, IntIn, U8 } from '../state/state-schema';
import { type Effect, type IoAccess, type TransitionResult, data32 } from './device';
import {
  type DeviceAcpi,
  type DeviceInstance,
  type DeviceModel,
  type DeviceStateBase,
  deviceAccessEventTypes,
} from './model';

export const ACPI_PM_KIND = 'acpi-pm' as const;
export const ACPI_PM_SCHEMA_VERSION = 1;
export const ACPI_PM_LABEL = 'ACPI PM';

export const ACPI_PM_BASE = 0x600;
export const ACPI_PM_LENGTH = 4;
/** FADT SLEEP_CONTROL_REG (8-bit system I/O) */
export const ACPI_SLEEP_CONTROL_PORT = 0x600;
/** FADT SLEEP_STATUS_REG (8-bit system I/O) */
export const ACPI_SLEEP_STATUS_PORT = 0x601;
/** FADT RESET_REG (8-bit system I/O) */
export const ACPI_RESET_PORT = 0x602;
/** FADT RESET_VALUE */
export const ACPI_RESET_VALUE = 0x06;
/** register width in bits, for the Generic Address Structures */
export const ACPI_PM_REGISTER_BIT_WIDTH = 8;

export const SLP_EN = 0x20;
export const SLP_TYP_SHIFT = 2;
export const SLP_TYP_MASK = 0x07 << SLP_TYP_SHIFT;
/** SLP_TYP value the \_S5 package advertises */
export const SLP_TYP_S5 = 5;
export const WAK_STS = 0x80;

export const AcpiPmEvents = {
  RegisterRead: '[ACPI PM] Register Read',
  RegisterWritten: '[ACPI PM] Register Written',
} as const;

const SLEEP_CONTROL = ACPI_SLEEP_CONTROL_PORT - ACPI_PM_BASE;
const SLEEP_STATUS = ACPI_SLEEP_STATUS_PORT - ACPI_PM_BASE;
const RESET = ACPI_RESET_PORT - ACPI_PM_BASE;

export interface AcpiPmState extends DeviceStateBase {
  kind: typeof ACPI_PM_KIND;
  /** last SLP_TYP written to sleep control (SLP_EN itself is write-only) */
  sleepType: number;
  /** sleep status register; WAK_STS is write-1-to-clear */
  sleepStatus: number;
}

export function acpiPmInitialState(opts: { id?: string } = {}): AcpiPmState {
  return { kind: ACPI_PM_KIND, id: opts.id ?? 'acpi-pm', schemaVersion: ACPI_PM_SCHEMA_VERSION, sleepType: 0, sleepStatus: 0 };
}

export function acpiPmDevice(opts: { id?: string } = {}): DeviceInstance<AcpiPmState> {
  return { state: acpiPmInitialState(opts), ranges: [{ space: 'pio', base: ACPI_PM_BASE, length: ACPI_PM_LENGTH }] };
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

function readByte(s: AcpiPmState, offset: number): number {
  switch (offset) {
    case SLEEP_CONTROL:
      return s.sleepType << SLP_TYP_SHIFT;
    case SLEEP_STATUS:
      return s.sleepStatus;
    default:
      return 0; // RESET_REG reads as zero; the last byte is reserved
  }
}

function writeByte(s: AcpiPmState, offset: number, value: number, effects: Effect[]): AcpiPmState {
  switch (offset) {
    case SLEEP_CONTROL: {
      const sleepType = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
      if (value & SLP_EN) {
        effects.push(
          sleepType === SLP_TYP_S5
            ? { type: 'vm.poweroff', source: 'acpi' }
            : { type: 'vm.sleep', source: 'acpi', state: sleepType },
        );
      }
      return sleepType === s.sleepType ? s : { ...s, sleepType };
    }
    case SLEEP_STATUS:
      return value & s.sleepStatus ? { ...s, sleepStatus: s.sleepStatus & ~value } : s;
    case RESET:
      if (value === ACPI_RESET_VALUE) effects.push({ type: 'vm.reset', source: 'acpi' });
      return s;
    default:
      return s;
  }
}

// Each register is one byte; wider accesses are split so they touch consecutive registers.
export function acpiPmTransition(state: AcpiPmState, access: IoAccess): TransitionResult<AcpiPmState> {
  const n = Math.min(access.size, 4);
  if (access.direction === 'read') {
    let value = 0;
    for (let i = 0; i < n; i++) value |= readByte(state, access.offset + i) << (8 * i);
    return { state, effects: NO_EFFECTS, value: value >>> 0 };
  }
  const effects: Effect[] = [];
  let s = state;
  for (let i = 0; i < n; i++) s = writeByte(s, access.offset + i, (data32(access) >>> (8 * i)) & 0xff, effects);
  return { state: s, effects: effects.length ? effects : NO_EFFECTS };
}

/** The state's shape, checked when a state comes from outside (restore). */
export const AcpiPmStateSchema = Exact({ kind: Type.Literal(ACPI_PM_KIND), id: DeviceId(), schemaVersion: IntIn(ACPI_PM_SCHEMA_VERSION, ACPI_PM_SCHEMA_VERSION), sleepType: IntIn(0, 7), sleepStatus: U8() });

/** \_S5: SLP_TYPa, SLP_TYPb, reserved, reserved. Hardware-reduced sleep writes SLP_TYPa. */
export function acpiPmAcpi(): DeviceAcpi {
  return { root: [aml.name('_S5', aml.pkg([SLP_TYP_S5, SLP_TYP_S5, 0, 0]))] };
}

export const acpiPmModel: DeviceModel<AcpiPmState> = {
  kind: ACPI_PM_KIND,
  label: ACPI_PM_LABEL,
  schemaVersion: ACPI_PM_SCHEMA_VERSION,
  events: deviceAccessEventTypes(ACPI_PM_LABEL),
  transition: acpiPmTransition,
  stateSchema: AcpiPmStateSchema,
  inputs: {},
  acpi: acpiPmAcpi,
};
