// The VM configuration, shaped exactly like Cloud Hypervisor's VmConfig (API 0.3.0), so the
// same JSON is accepted by `vm.create`, written as a snapshot's config.json and built by the CLI.
import type { CpuProfile } from '../boot/cpu-profile';

export type ConsoleMode = 'Off' | 'Pty' | 'Tty' | 'File' | 'Socket' | 'Null';

export interface PayloadConfig {
  firmware?: string;
  kernel?: string;
  cmdline?: string;
  initramfs?: string;
}

export interface CpusConfig {
  boot_vcpus: number;
  max_vcpus: number;
  max_phys_bits?: number;
  kvm_hyperv?: boolean;
  nested?: boolean;
  /**
   * Tern's own field (Cloud Hypervisor's API has no CPU profile): the baseline the guest's
   * CPUID is reduced to, src/boot/cpu-profile.ts. Absent: 'host'.
   */
  tern_profile?: CpuProfile;
}

export interface MemoryConfig {
  size: number;
  shared?: boolean;
  hugepages?: boolean;
  mergeable?: boolean;
  prefault?: boolean;
  thp?: boolean;
  hotplug_size?: number;
}

export interface SerialConfig {
  mode: ConsoleMode;
  file?: string;
  socket?: string;
}

export type ConsoleConfig = SerialConfig;

/** Device lists that are accepted and stored; their devices arrive in later releases. */
export type DeviceListConfig = Record<string, unknown>;

export interface VmConfig {
  payload: PayloadConfig;
  cpus?: CpusConfig;
  memory?: MemoryConfig;
  serial?: SerialConfig;
  console?: ConsoleConfig;
  disks?: DeviceListConfig[];
  net?: DeviceListConfig[];
  rng?: DeviceListConfig;
  fs?: DeviceListConfig[];
  pmem?: DeviceListConfig[];
  vsock?: DeviceListConfig;
  devices?: DeviceListConfig[];
  [other: string]: unknown;
}

export const DEFAULT_MEMORY_SIZE = 512 * 1024 * 1024;

/** Fill in Cloud Hypervisor's defaults so every consumer sees a complete config. */
export function withDefaults(config: VmConfig): VmConfig & { cpus: CpusConfig; memory: MemoryConfig; serial: SerialConfig; console: ConsoleConfig } {
  const boot = config.cpus?.boot_vcpus ?? 1;
  return {
    ...config,
    cpus: { ...config.cpus, boot_vcpus: boot, max_vcpus: config.cpus?.max_vcpus ?? boot },
    memory: { ...config.memory, size: config.memory?.size ?? DEFAULT_MEMORY_SIZE, shared: config.memory?.shared ?? false },
    serial: config.serial ?? { mode: 'Null' },
    console: config.console ?? { mode: 'Tty' },
  };
}
