// The host bridge at 00:00.0: the function through which the guest sees the root complex.
// It has no BARs and no capabilities; its identity is Cloud Hypervisor's (Intel vendor ID,
// device 0x0d57, "virtual PCIe host"), which firmware written for Cloud Hypervisor expects.
import { Type } from '@sinclair/typebox';
import { Exact } from '../../state/state-schema';
import { PciConfigSchema } from './config-space';
import { type PciFunctionState, definePciFunction } from './function';

export const PCI_HOST_BRIDGE_KIND = 'pci-host-bridge' as const;
export const PCI_VENDOR_ID_INTEL = 0x8086;
export const PCI_DEVICE_ID_VIRT_HOST_BRIDGE = 0x0d57;
/** Base class 0x06 (bridge), subclass 0x00 (host bridge), interface 0. */
export const PCI_CLASS_HOST_BRIDGE = 0x06_00_00;

export interface PciHostBridgeState extends PciFunctionState {
  kind: typeof PCI_HOST_BRIDGE_KIND;
}

export const pciHostBridgeModel = definePciFunction<PciHostBridgeState>({
  kind: PCI_HOST_BRIDGE_KIND,
  layout: {
    vendorId: PCI_VENDOR_ID_INTEL,
    deviceId: PCI_DEVICE_ID_VIRT_HOST_BRIDGE,
    revisionId: 0,
    classCode: PCI_CLASS_HOST_BRIDGE,
    subsystemVendorId: 0,
    subsystemId: 0,
    bars: [null, null, null, null, null, null],
    capabilities: [],
    interruptPin: 0,
  },
  initialFields: () => ({}),
  stateSchema: Exact({ kind: Type.Literal(PCI_HOST_BRIDGE_KIND), config: PciConfigSchema() }),
});
