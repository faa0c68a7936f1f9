// The platform devices of every Tern VM, from its config: what the machine attaches
// to the buses and what the DSDT describes, so the two cannot disagree.
import { acpiGedDevice } from './acpi-ged';
import { acpiPmDevice } from './acpi-pm';
import { cmosDevice } from './cmos-rtc';
import { debugPortDevice } from './debug-port';
import { i8042Device } from './i8042';
import type { AnyDeviceState } from './index';
import type { DeviceInstance } from './model';
import { pciSegmentDevice } from './pci/segment';
import { serialDevice } from './serial-16550a';
import type { PciFunctionState } from './pci/function';

export const PLATFORM_SERIAL_ID = 'serial0';
export const PLATFORM_GED_ID = 'ged0';

export interface PlatformOptions {
  /** guest RAM in bytes (the CMOS reports it; the PCI 64-bit window starts above it) */
  memorySize: number;
  /** a 16550A at COM1; false for --serial off */
  serial: boolean;
  /** PCI functions besides the host bridge, by slot (the virtio devices, placed) */
  pciFunctions?: Record<string, PciFunctionState>;
}

export function platformDevices(opts: PlatformOptions): DeviceInstance<AnyDeviceState>[] {
  const devices: DeviceInstance<AnyDeviceState>[] = [
    i8042Device(),
    cmosDevice({ memorySize: opts.memorySize }),
    acpiPmDevice(),
    acpiGedDevice({ id: PLATFORM_GED_ID }),
    debugPortDevice(),
    // PCI segment 0 with its host bridge at 00:00.0; PCI devices become its functions.
    pciSegmentDevice({ memorySize: opts.memorySize, functions: opts.pciFunctions }),
  ];
  if (opts.serial) devices.unshift(serialDevice({ id: PLATFORM_SERIAL_ID }));
  return devices;
}
