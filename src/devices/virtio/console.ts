// virtio-console (virtio 1.2, 5.3): one port, the guest's hvc0, with a receive queue (host to
// guest) and a transmit queue (guest to host). Its state is what the guest can see: the
// terminal size it was offered. Where the bytes go and come from (a tty, a file) is the VMM's
// configuration; input the guest has no buffers for waits in the host's own buffer, as the
// serial port's does, so nothing of a console is held outside the store and the guest.
import { Exact, IntIn } from '../../state/state-schema';
import { defineVirtioFunction } from './transport';

export const VIRTIO_CONSOLE_KIND = 'virtio-console' as const;
export const VIRTIO_ID_CONSOLE = 3;
/** Cloud Hypervisor's id of its console device. */
export const VIRTIO_CONSOLE_ID = '_console';
export const VIRTIO_CONSOLE_QUEUE_SIZE = 256;
/** Queue indexes of port 0 (5.3.2). */
export const VirtioConsoleQueue = { RECEIVE: 0, TRANSMIT: 1 } as const;
/** Feature bits (5.3.3). */
export const VirtioConsoleFeature = { SIZE: 0 } as const;
/**
 * Bytes taken from one transmit chain at most; the rest of it is dropped and counted. Linux
 * sends a page at a time; a chain claiming more cannot make the VMM copy without bound.
 */
export const VIRTIO_CONSOLE_MAX_CHAIN_BYTES = 64 * 1024;

export interface VirtioConsoleDevice {
  /** the terminal size offered with VIRTIO_CONSOLE_F_SIZE; 0 x 0 when the host end is no terminal */
  cols: number;
  rows: number;
}

/** Offered: the size, when there is one to tell. No multiport, no emergency write. */
export function virtioConsoleFeatures(d: VirtioConsoleDevice): bigint {
  return d.cols > 0 && d.rows > 0 ? 1n << BigInt(VirtioConsoleFeature.SIZE) : 0n;
}

/** struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr (the last two unused here). */
export function virtioConsoleConfigBytes(d: VirtioConsoleDevice): Uint8Array {
  const b = new Uint8Array(12);
  const v = new DataView(b.buffer);
  v.setUint16(0, d.cols, true);
  v.setUint16(2, d.rows, true);
  return b;
}

export const virtioConsoleModel = defineVirtioFunction<VirtioConsoleDevice>({
  kind: VIRTIO_CONSOLE_KIND,
  virtioId: VIRTIO_ID_CONSOLE,
  // Simple communication controller, other: what drivers expect of a virtio console.
  classCode: 0x07_80_00,
  vectors: 3,
  maxQueues: 2,
  deviceSchema: Exact({ cols: IntIn(0, 0xffff), rows: IntIn(0, 0xffff) }),
  features: virtioConsoleFeatures,
  configBytes: virtioConsoleConfigBytes,
});
