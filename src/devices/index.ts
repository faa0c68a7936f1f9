// The device models the store knows, by kind.
import type { DeviceAcpi, DeviceInstance, DeviceModel, DeviceStateBase } from './model';
import { serialModel, type Serial16550aState } from './serial-16550a';
import { i8042Model, type I8042State } from './i8042';
import { cmosModel, type CmosRtcState } from './cmos-rtc';
import { acpiPmModel, type AcpiPmState } from './acpi-pm';
import { debugPortModel, type DebugPortState } from './debug-port';
import { acpiGedModel, type AcpiGedState } from './acpi-ged';
import { pciSegmentModel, type PciSegmentState } from './pci/segment';

export * from './device';
export * from './model';
export * from './bus';
export * from './serial-16550a';
export * from './i8042';
export * from './cmos-rtc';
export * from './acpi-pm';
export * from './debug-port';
export * from './acpi-ged';
export * from './platform';
export * from './pci/index';

/** Every device slice the devices map may hold. */
export type AnyDeviceState = Serial16550aState | I8042State | CmosRtcState | AcpiPmState | DebugPortState | AcpiGedState | PciSegmentState;

export const deviceModels: Readonly<Record<string, DeviceModel<any>>> = Object.freeze({
  [serialModel.kind]: serialModel,
  [i8042Model.kind]: i8042Model,
  [cmosModel.kind]: cmosModel,
  [acpiPmModel.kind]: acpiPmModel,
  [debugPortModel.kind]: debugPortModel,
  [acpiGedModel.kind]: acpiGedModel,
  [pciSegmentModel.kind]: pciSegmentModel,
});

export function deviceModel(kind: string): DeviceModel<DeviceStateBase> | undefined {
  return deviceModels[kind];
}

/** Each device's own ACPI description, in order: what the DSDT is assembled from. */
export function devicesAcpi(devices: readonly DeviceInstance<AnyDeviceState>[]): DeviceAcpi[] {
  const out: DeviceAcpi[] = [];
  for (const d of devices) {
    const described = deviceModels[d.state.kind]?.acpi?.(d);
    if (described) out.push(described);
  }
  return out;
}
