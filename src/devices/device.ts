// The contract every emulated device follows: its state is a plain, JSON-serializable slice
// of the store, and every guest access or host input is a pure transition
//   (state, access) -> { state, effects, value }
// Effects (bytes to a console, interrupt edges, power actions) are data; the VMM runs them
// after the store has taken the new state, never inside the reducer.

interface IoAccessCommon {
  /** 'pio' for port I/O, 'mmio' for memory-mapped I/O */
  space: 'pio' | 'mmio';
  direction: 'read' | 'write';
  /** offset from the device's base address/port */
  offset: number;
  /**
   * Host time of the access in nanoseconds since the Unix epoch, supplied by the VMM so that
   * transitions that need wall-clock time (the RTC) stay pure and replayable.
   */
  nowNs: number;
}

/** An access of up to 4 bytes (every port access): the value written fits a number. */
export interface NarrowIoAccess extends IoAccessCommon {
  size: 1 | 2 | 4;
  /** value written (writes only; 0 for reads) */
  data: number;
}

/**
 * An 8-byte MMIO access: the value written is a bigint, since a number holds only 53 bits
 * exactly and 64-bit registers (PCI BARs, MSI-X tables) need all 64.
 */
export interface WideIoAccess extends IoAccessCommon {
  size: 8;
  /** value written (writes only; 0n for reads) */
  data: bigint;
}

/** A guest access to a device register, in device-relative terms. */
export type IoAccess = NarrowIoAccess | WideIoAccess;

/** The low 32 bits of the value written, as a number: all a register of up to 4 bytes takes. */
export function data32(access: IoAccess): number {
  return typeof access.data === 'bigint' ? Number(BigInt.asUintN(32, access.data)) : access.data;
}

export type Effect =
  /** bytes the guest sent out through a console device */
  | { type: 'console.output'; device: string; bytes: number[] }
  /** the guest took input from a console device: it has room for more of what the host holds */
  | { type: 'console.input-room'; device: string }
  /** an edge on a legacy interrupt line (GSI) */
  | { type: 'irq.pulse'; gsi: number }
  /** drive a level-triggered interrupt line */
  | { type: 'irq.level'; gsi: number; level: 0 | 1 }
  /** the guest asked for a reset (i8042 pulse, ACPI reset register) */
  | { type: 'vm.reset'; source: string }
  /** the guest asked to power off (ACPI S5) */
  | { type: 'vm.poweroff'; source: string }
  /** the guest entered a sleep state the VMM does not implement */
  | { type: 'vm.sleep'; source: string; state: number }
  /** firmware/kernel boot progress code on the debug port */
  | { type: 'boot.progress'; code: number }
  /** a PCI function sends MSI-X `vector` now (its route is in KVM's GSI routing) */
  | { type: 'msi.send'; device: string; vector: number }
  /** a function's MSI-X table or enable bits changed: KVM's GSI routing is rebuilt from the store */
  | { type: 'msi.routes-changed'; device: string }
  /** a function's command register or BARs changed: what it decodes, and its doorbells, moved */
  | { type: 'pci.bars-changed'; device: string }
  /** a virtio driver set DRIVER_OK: the host serves the device's queues from now on */
  | { type: 'virtio.activated'; device: string }
  /** a virtio driver reset the device */
  | { type: 'virtio.reset'; device: string }
  /** a queue doorbell that reached the VMM as an exit rather than through its ioeventfd */
  | { type: 'virtio.notify'; device: string; queue: number };

export interface TransitionResult<S> {
  state: S;
  effects: Effect[];
  /** value the guest reads (reads only); a bigint for a 64-bit register read by an 8-byte access */
  value?: number | bigint;
}

export type DeviceTransition<S> = (state: S, access: IoAccess) => TransitionResult<S>;

/** Where a device sits on the I/O buses. */
export interface DeviceRange {
  space: 'pio' | 'mmio';
  base: number;
  length: number;
}
