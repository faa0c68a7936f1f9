// The VM configuration, shaped exactly like Cloud Hypervisor's VmConfig (API 0.3.0), so the
// same JSON is accepted by `vm.create`, written as a snapshot's config.json and built by the CLI;
// and its defaults.
import type { ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, SerialConfig, VmConfig } from '../api/schema';

// One VmConfig: the type the contract's schema defines (src/api/schema.ts), the same one
// vm.create validates against, so a field cannot exist in one and not the other.
export type { ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, PayloadConfig, SerialConfig, VmConfig } from '../api/schema';

export const DEFAULT_MEMORY_SIZE = 512 * 1024 * 1024;
/** Cloud Hypervisor's defaults: the serial port discards its output, the virtio console is the tty. */
export const DEFAULT_SERIAL_MODE = 'Null' satisfies ConsoleMode;
export const DEFAULT_CONSOLE_MODE = 'Tty' satisfies ConsoleMode;

/** Fill in Cloud Hypervisor's defaults so every consumer sees a complete config. */
export function withDefaults(config: VmConfig): VmConfig & { cpus: CpusConfig; memory: MemoryConfig & { thp: boolean }; serial: SerialConfig; console: ConsoleConfig } {
  const boot = config.cpus?.boot_vcpus ?? 1;
  return {
    ...config,
    cpus: { ...config.cpus, boot_vcpus: boot, max_vcpus: config.cpus?.max_vcpus ?? boot },
    memory: { ...config.memory, size: config.memory?.size ?? DEFAULT_MEMORY_SIZE, shared: config.memory?.shared ?? false, thp: config.memory?.thp ?? true },
    serial: config.serial ?? { mode: DEFAULT_SERIAL_MODE },
    console: config.console ?? { mode: DEFAULT_CONSOLE_MODE },
  };
}

/**
 * Cloud Hypervisor's rule: one tty, one device reading it. Serial Tty with the console left at
 * its default (Tty) is refused too, so such a config says `console: Off` (`--console off`).
 */
export function doubleTtyProblem(config: Pick<VmConfig, 'serial' | 'console'>): string | null {
  const serial = config.serial?.mode ?? DEFAULT_SERIAL_MODE;
  const console = config.console?.mode ?? DEFAULT_CONSOLE_MODE;
  return serial === 'Tty' && console === 'Tty' ? 'Console mode tty specified for both serial and console' : null;
}
