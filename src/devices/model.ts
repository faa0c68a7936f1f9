// What the store needs to know about a kind of device: how its events are named and which
// pure transitions handle them. Device modules export one DeviceModel each; they never import
// the store, so they stay testable as plain functions.
import type { TSchema } from '@sinclair/typebox';
import type { AmlCode } from '../boot/aml';
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
   * Why a state that did not come from this model's transitions (a snapshot, a migration
   * stream) is unusable, or null. Every field a transition relies on is checked for its type
   * and range, so an untrusted state cannot make a device misbehave or grow without bound.
   */
  check: (state: S) => string | null;
}

/** Field checks for DeviceModel.check: each returns the first problem, or null. */
export const fieldCheck = {
  int(s: object, field: string, min: number, max: number): string | null {
    const v = (s as Record<string, unknown>)[field];
    return Number.isSafeInteger(v) && (v as number) >= min && (v as number) <= max ? null : `${field} must be an integer in ${min}..${max}`;
  },
  byte(s: object, field: string): string | null {
    return fieldCheck.int(s, field, 0, 0xff);
  },
  count(s: object, field: string): string | null {
    return fieldCheck.int(s, field, 0, Number.MAX_SAFE_INTEGER);
  },
  bool(s: object, field: string): string | null {
    return typeof (s as Record<string, unknown>)[field] === 'boolean' ? null : `${field} must be a boolean`;
  },
  bytes(s: object, field: string, minLength: number, maxLength: number): string | null {
    const v = (s as Record<string, unknown>)[field];
    if (!Array.isArray(v) || v.length < minLength || v.length > maxLength) return `${field} must be an array of ${minLength}..${maxLength} bytes`;
    return v.every((b) => Number.isInteger(b) && b >= 0 && b <= 0xff) ? null : `${field} must hold bytes only`;
  },
  /** the first problem of several */
  first(...problems: (string | null)[]): string | null {
    return problems.find((p) => p !== null) ?? null;
  },
};

/** An IOAPIC pin (KVM's in-kernel IOAPIC has 24). */
export const MAX_GSI = 23;

/** A device's part of the ACPI tables. */
export interface DeviceAcpi {
  /** objects in \_SB */
  sb?: AmlCode[];
  /** top-level objects (\_S5) */
  root?: AmlCode[];
  /** the FADT IA-PC boot flag the device stands for: an 8042 to probe, a CMOS RTC to use */
  legacy?: 'i8042' | 'rtc';
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
