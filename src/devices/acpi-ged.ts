// The ACPI Generic Event Device (_HID ACPI0013) of the hardware-reduced platform: with no
// SCI and no GPE blocks, the only way for the VMM to tell the guest about the power button is
// an interrupt the GED owns, whose _EVT method reads this device's event register and
// notifies \_SB.PWRB. The line is level-triggered: it stays high while an event is pending,
// so a press made while the guest has the interrupt masked (early boot, or the GED driver
// running its threaded handler) is delivered once it unmasks, and nothing is lost to an edge.
//
// Register (one byte, system I/O at ACPI_GED_PORT):
//   read:  pending event bits
//   write: write-1-to-clear; clearing the last pending bit lowers the line
// The ACPI table builder imports the constants below, so the DSDT and the device agree.
import { Type } from '@sinclair/typebox';
import * as aml from '../boot/aml';
import { eventCreator } from '../state/slice';
import { Count, DeviceId, Exact, IntIn, U8 } from '../state/state-schema';
import { type Effect, type IoAccess, type TransitionResult, data32 } from './device';
import {
  type DeviceAcpi,
  type DeviceInstance,
  type DeviceModel,
  type DeviceStateBase,
  Gsi,
  deviceAccessEventTypes,
} from './model';

export const ACPI_GED_KIND = 'acpi-ged' as const;
export const ACPI_GED_SCHEMA_VERSION = 1;
export const ACPI_GED_LABEL = 'ACPI GED';

/** Event register port: next to the ACPI PM registers (0x600..0x603), outside their range. */
export const ACPI_GED_PORT = 0x610;
export const ACPI_GED_LENGTH = 1;
/**
 * IOAPIC pin of the GED interrupt: ISA IRQ 9, free on this platform (PIT 0/2, i8042 1/12,
 * COM1 4, RTC 8 without an interrupt resource), and the pin PCs traditionally give to ACPI.
 */
export const ACPI_GED_GSI = 9;

/** Event bits of the register. */
export const GedEvent = {
  PowerButton: 1 << 0,
} as const;

export const AcpiGedEvents = {
  RegisterRead: '[ACPI GED] Register Read',
  RegisterWritten: '[ACPI GED] Register Written',
  /** host input: the power button was pressed (payload null) */
  PowerButtonPressed: '[ACPI GED] Power Button Pressed',
} as const;

export interface AcpiGedState extends DeviceStateBase {
  kind: typeof ACPI_GED_KIND;
  gsi: number;
  /** event bits raised and not yet acknowledged; the interrupt line is high while non-zero */
  pending: number;
  /** power-button presses since power-on */
  powerButtonPresses: number;
}

export function acpiGedInitialState(opts: { id?: string; gsi?: number } = {}): AcpiGedState {
  return {
    kind: ACPI_GED_KIND,
    id: opts.id ?? 'ged0',
    schemaVersion: ACPI_GED_SCHEMA_VERSION,
    gsi: opts.gsi ?? ACPI_GED_GSI,
    pending: 0,
    powerButtonPresses: 0,
  };
}

export function acpiGedDevice(opts: { id?: string; gsi?: number } = {}): DeviceInstance<AcpiGedState> {
  return { state: acpiGedInitialState(opts), ranges: [{ space: 'pio', base: ACPI_GED_PORT, length: ACPI_GED_LENGTH }] };
}

/** The input event for a press on device `id`. */
const powerButtonPressed = eventCreator<null>(AcpiGedEvents.PowerButtonPressed);

export function powerButtonPressedEvent(id = 'ged0') {
  return powerButtonPressed(null, id);
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

function withPending(s: AcpiGedState, pending: number, powerButtonPresses = s.powerButtonPresses): TransitionResult<AcpiGedState> {
  const next: AcpiGedState = { ...s, pending, powerButtonPresses };
  // Only the line's transitions are effects: the guest sees one rising level per batch of events.
  if (s.pending === 0 && pending !== 0) return { state: next, effects: [{ type: 'irq.level', gsi: s.gsi, level: 1 }] };
  if (s.pending !== 0 && pending === 0) return { state: next, effects: [{ type: 'irq.level', gsi: s.gsi, level: 0 }] };
  return { state: next, effects: NO_EFFECTS };
}

export function acpiGedTransition(state: AcpiGedState, access: IoAccess): TransitionResult<AcpiGedState> {
  // Bytes beyond the event register are reserved: read as zero, writes ignored.
  if (access.direction === 'read') return { state, effects: NO_EFFECTS, value: access.offset === 0 ? state.pending : 0 };
  if (access.offset !== 0) return { state, effects: NO_EFFECTS };
  const clear = data32(access) & 0xff & state.pending;
  return clear ? withPending(state, state.pending & ~clear) : { state, effects: NO_EFFECTS };
}

/** A press latches the power-button event and raises the line if it was low. */
export function acpiGedPowerButton(state: AcpiGedState, _payload?: unknown): TransitionResult<AcpiGedState> {
  return withPending(state, state.pending | GedEvent.PowerButton, state.powerButtonPresses + 1);
}

/** The state's shape, checked when a state comes from outside (restore). */
export const AcpiGedStateSchema = Exact({ kind: Type.Literal(ACPI_GED_KIND), id: DeviceId(), schemaVersion: IntIn(ACPI_GED_SCHEMA_VERSION, ACPI_GED_SCHEMA_VERSION), gsi: Gsi(), pending: U8(), powerButtonPresses: Count() });

/** ACPI event number of a notification: 0x80 on a power button means "pressed". */
const NOTIFY_BUTTON_PRESSED = 0x80;

/**
 * The control-method power button (PWRB) and the GED that notifies it: one level-triggered
 * interrupt whose _EVT reads the pending events from the GED register, acknowledges exactly
 * those (which lowers the line once none is left), and then notifies the devices they belong
 * to. Acknowledging before notifying means a press that arrives during the Notify raises the
 * line again instead of being cleared unseen.
 */
export function acpiGedAcpi(device: DeviceInstance<AcpiGedState>): DeviceAcpi {
  const { gsi } = device.state;
  const { base, length } = device.ranges[0];
  const pending = aml.local(0);
  return {
    sb: [
      aml.device('PWRB', [aml.name('_HID', aml.eisaId('PNP0C0C')), aml.name('_UID', 0)]),
      aml.device('GED0', [
        aml.name('_HID', 'ACPI0013'),
        aml.name('_UID', 0),
        aml.name('_CRS', aml.resourceTemplate([aml.Resource.interrupt({ edge: false }, [gsi])])),
        aml.operationRegion('GDRG', aml.RegionSpace.SystemIO, base, length),
        aml.field('GDRG', { access: aml.FieldAccess.Byte }, [{ name: 'GDST', bits: 8 }]),
        aml.method('_EVT', { args: 1, serialized: true }, [
          aml.ifThen(aml.lEqual(aml.arg(0), gsi), [
            aml.store(aml.path('GDST'), pending),
            aml.store(pending, aml.path('GDST')),
            aml.ifThen(aml.and(pending, GedEvent.PowerButton), [aml.notify(aml.path('\\_SB.PWRB'), NOTIFY_BUTTON_PRESSED)]),
          ]),
        ]),
      ]),
    ],
  };
}

export const acpiGedModel: DeviceModel<AcpiGedState> = {
  kind: ACPI_GED_KIND,
  label: ACPI_GED_LABEL,
  schemaVersion: ACPI_GED_SCHEMA_VERSION,
  events: deviceAccessEventTypes(ACPI_GED_LABEL),
  transition: acpiGedTransition,
  stateSchema: AcpiGedStateSchema,
  inputs: { [AcpiGedEvents.PowerButtonPressed]: acpiGedPowerButton },
  acpi: acpiGedAcpi,
};
