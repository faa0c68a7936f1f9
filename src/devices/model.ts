// What the store needs to know about a kind of device: how its events are named and which
// pure transitions handle them. Device modules export one DeviceModel each; they never import
// the store, so they stay testable as plain functions.
import type { TSchema } from '@sinclair/typebox';
import type { AmlCode } from '../boot/aml';
import { IOAPIC_PINS } from '../boot/layout';
import { IntIn } from '../state/state-schema';
import type { DeviceRange, DeviceTransition, TransitionResult } from './device';

/** Fields every device slice carries, so a devices map can be checked and migrated by kind. */
export interface DeviceStateBase {
  /** device model, e.g. 'serial-16550a' */
  kind: string;
  /** instance id, the key in the devices slice and the `source` of its events */
  id: string;
  schemaVersion: number;
}

/** A host-side input to a device (bytes typed on a console, ...). Pure like a guest access. */
export type DeviceInput<S, P> = (state: S, payload: P) => TransitionResult<S>;

/** Event type names for guest register accesses to a device labelled `label`. */
export interface DeviceAccessEventTypes {
  read: string;
  write: string;
}

export function deviceAccessEventTypes(label: string): DeviceAccessEventTypes {
  return { read: `[${label}] Register Read`, write: `[${label}] Register Written` };
}

export interface DeviceModel<S extends DeviceStateBase = DeviceStateBase> {
  kind: S['kind'];
  /** the "[Source]" part of the device's event names */
  label: string;
  schemaVersion: number;
  events: DeviceAccessEventTypes;
  transition: DeviceTransition<S>;
  /** the state's shape (TypeBox): a restored device state is checked against it */
  stateSchema: TSchema;
  /** host-side input events: event type -> transition */
  inputs: Record<string, DeviceInput<S, any>>;
  /**
   * How the device describes itself in ACPI, from its own state and bus ranges: the DSDT is
   * assembled from the devices a VM has, so a device that is absent is not described.
   */
  acpi?: (device: DeviceInstance<S>) => DeviceAcpi;
  /**
   * What stateSchema cannot say (relations between fields), for a state that did not come
   * from this model's transitions: the first problem as "/field: why", or null.
   */
  checkState?: (state: S) => string | null;
}

/** An IOAPIC pin: a restored device naming any other would raise a line KVM does not have. */
export const Gsi = (): TSchema => IntIn(0, IOAPIC_PINS - 1);

/** A device's part of the ACPI tables. */
export interface DeviceAcpi {
  /** objects in \_SB */
  sb?: AmlCode[];
  /** top-level objects (\_S5) */
  root?: AmlCode[];
  /** the FADT IA-PC boot flag the device stands for: an 8042 to probe, a CMOS RTC to use */
  legacy?: 'i8042' | 'rtc';
  /** complete tables of its own (a PCI segment's MCFG), listed in the XSDT */
  tables?: Uint8Array[];
}

/**
 * Where a device sits on a bus. `deviceOffset` is the device-relative offset of the range's
 * first byte, so one device can own scattered ports (the i8042 at 0x60 and 0x64).
 */
export interface BusRangeSpec extends DeviceRange {
  deviceOffset?: number;
}

/** A device instance ready to be added to the store: its initial slice and its bus ranges. */
export interface DeviceInstance<S extends DeviceStateBase = DeviceStateBase> {
  state: S;
  ranges: BusRangeSpec[];
}

/** Mask for an access of `size` bytes, as a number (sizes up to 4). */
export function sizeMask(size: number): number {
  return size >= 4 ? 0xffffffff : (1 << (size * 8)) - 1;
}
