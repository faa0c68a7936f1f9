// The virtio devices a VM config asks for, as PCI functions placed on segment 0: a slot each
// from 01.0 on, in a fixed order, and BAR 0 assigned in the 32-bit window as firmware would,
// so a kernel booted directly (no firmware) finds its devices already placed inside the root
// bridge's window and keeps them there. Same config, same placement: a restored or migrated
// VM's functions are where the guest left them.
import type { DiskConfig, NetConfig } from '../../api/schema';
import { DEFAULT_CONSOLE_MODE, type VmConfig } from '../../config/vm-config';
import { PCI_MMIO32_SIZE, PCI_MMIO32_START, alignUp } from '../../boot/layout';
import { PciBarBits } from '../pci/config-space';
import type { PciFunctionState } from '../pci/function';
import { pciSlot } from '../pci/segment';
import { SECTOR_SIZE, VIRTIO_BLK_DEFAULT_QUEUE_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_MIN_QUEUE_SIZE, blkSegMax, virtioBlockModel } from './block';
import { VIRTIO_CONSOLE_ID, VIRTIO_CONSOLE_QUEUE_SIZE, virtioConsoleModel } from './console';
import { VIRTIO_NET_DEFAULT_QUEUE_SIZE, VIRTIO_NET_DEFAULT_QUEUES, virtioNetModel, virtioNetQueueCount } from './net';
import { VIRTIO_RNG_QUEUE_SIZE, virtioRngModel } from './rng';
import { VirtioBar, type VirtioFunctionState } from './transport';

/** Cloud Hypervisor's id of its entropy device, which a config without `rng.id` gets. */
export const DEFAULT_RNG_ID = '__rng';

/** Cloud Hypervisor's ids of disks given none: _disk0, _disk1, ... by their place in the list. */
export function diskIdOf(disk: DiskConfig, index: number): string {
  return disk.id ?? `_disk${index}`;
}

/** Cloud Hypervisor's ids of net devices given none: _net0, _net1, ... by their place in the list. */
export function netIdOf(net: NetConfig, index: number): string {
  return net.id ?? `_net${index}`;
}

/**
 * What only the host ends know: each disk image's size in bytes, by device id; each net
 * card's MAC (the config's, or one chosen when its tap was opened); the console's terminal size.
 */
export interface BackendFacts {
  diskSizes: ReadonlyMap<string, number>;
  netMacs?: ReadonlyMap<string, number[]>;
  consoleSize?: { cols: number; rows: number };
}

/** Whether `config` gives the guest a virtio console (hvc0): any console mode but Off, as in Cloud Hypervisor. */
export function hasVirtioConsole(config: VmConfig): boolean {
  return (config.console?.mode ?? DEFAULT_CONSOLE_MODE) !== 'Off';
}

/** The virtio functions of `config`, in slot order: the disks, the net cards, the entropy device, the console. */
export function virtioFunctionsOf(config: VmConfig, facts: BackendFacts = { diskSizes: new Map() }): VirtioFunctionState[] {
  const out: VirtioFunctionState[] = [];
  (config.disks ?? []).forEach((disk, index) => {
    const id = diskIdOf(disk, index);
    const size = facts.diskSizes.get(id);
    if (size === undefined) throw new Error(`disk '${id}' has no image open`);
    const queues = disk.num_queues ?? 1;
    const queueSize = disk.queue_size ?? VIRTIO_BLK_DEFAULT_QUEUE_SIZE;
    if (queueSize < VIRTIO_BLK_MIN_QUEUE_SIZE) throw new RangeError(`disk '${id}': queue_size ${queueSize} is below ${VIRTIO_BLK_MIN_QUEUE_SIZE}`);
    // Like Cloud Hypervisor, a disk without a serial answers GET_ID with its id.
    const serial = (disk.serial ?? id).replace(/[^\x20-\x7e]/g, '?').slice(0, VIRTIO_BLK_ID_BYTES);
    out.push(
      virtioBlockModel.create(id, { capacity: Math.floor(size / SECTOR_SIZE), readonly: disk.readonly ?? false, serial, numQueues: queues, segMax: blkSegMax(queueSize) }, new Array(queues).fill(queueSize)),
    );
  });
  (config.net ?? []).forEach((net, index) => {
    const id = netIdOf(net, index);
    const mac = facts.netMacs?.get(id);
    if (!mac) throw new Error(`net device '${id}' has no tap open`);
    const queues = net.num_queues ?? VIRTIO_NET_DEFAULT_QUEUES;
    const offloads = { csum: net.offload_csum ?? true, tso: net.offload_tso ?? true, ufo: net.offload_ufo ?? true };
    // (the control queue, when the card has one, is as large as the others, as in Cloud Hypervisor)
    const queueSizes = new Array(virtioNetQueueCount(queues / 2)).fill(net.queue_size ?? VIRTIO_NET_DEFAULT_QUEUE_SIZE);
    out.push(virtioNetModel.create(id, { mac, mtu: net.mtu ?? 0, queuePairs: queues / 2, offloads }, queueSizes));
  });
  if (config.rng) out.push(virtioRngModel.create(config.rng.id ?? DEFAULT_RNG_ID, {}, [VIRTIO_RNG_QUEUE_SIZE]));
  if (hasVirtioConsole(config)) {
    const size = facts.consoleSize ?? { cols: 0, rows: 0 };
    out.push(virtioConsoleModel.create(VIRTIO_CONSOLE_ID, { cols: size.cols, rows: size.rows }, [VIRTIO_CONSOLE_QUEUE_SIZE, VIRTIO_CONSOLE_QUEUE_SIZE]));
  }
  return out;
}

/** `functions` on slots 01.0, 02.0, ..., each BAR 0 at the next free aligned address of the 32-bit window. */
export function placeVirtioFunctions(functions: readonly VirtioFunctionState[]): Record<string, PciFunctionState> {
  if (functions.length > 31) throw new RangeError(`${functions.length} PCI devices: segment 0 has room for 31`);
  const out: Record<string, PciFunctionState> = {};
  let next = PCI_MMIO32_START;
  functions.forEach((fn, i) => {
    const base = alignUp(next, VirtioBar.SIZE);
    if (base + VirtioBar.SIZE > PCI_MMIO32_START + PCI_MMIO32_SIZE) throw new RangeError('the PCI 32-bit window is full');
    next = base + VirtioBar.SIZE;
    const config = fn.config.slice();
    config[4 + VirtioBar.INDEX] = (base | PciBarBits.MEM_TYPE_64) >>> 0;
    config[5 + VirtioBar.INDEX] = 0;
    out[pciSlot(i + 1, 0)] = { ...fn, config };
  });
  return out;
}
