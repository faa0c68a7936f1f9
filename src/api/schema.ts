// The request and reply bodies of the HTTP API, shaped like Cloud Hypervisor's API 0.3.0
// contract: one TypeBox definition gives both the TypeScript type (for TernClient) and the JSON
// Schema the server checks request bodies with. Field names and types follow the contract;
// integer formats become ranges, because serde rejects an out-of-range u8 and so do we.
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { CPU_PROFILES } from '../boot/cpu-profile';
import { MAX_MIGRATION_CONNECTIONS } from '../migration/migration-options';

const Int = (min?: number, max?: number) =>
  Type.Integer({ ...(min !== undefined && { minimum: min }), ...(max !== undefined && { maximum: max }) });
const U8 = () => Int(0, 0xff);
const I8 = () => Int(-0x80, 0x7f);
const U16 = () => Int(0, 0xffff);
const I16 = () => Int(-0x8000, 0x7fff);
const U32 = () => Int(0, 0xffff_ffff);
const I32 = () => Int(-0x8000_0000, 0x7fff_ffff);
/** sizes and counts: u64 in Cloud Hypervisor, limited to what a JS number holds exactly */
const U64 = () => Int(0, Number.MAX_SAFE_INTEGER);
const I64 = () => Int(Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
const Str = () => Type.String();
const Bool = () => Type.Boolean();
const Opt = <T extends TSchema>(t: T) => Type.Optional(t);
const Enum = <T extends string>(...values: T[]) => Type.Union(values.map((v) => Type.Literal(v)));

/** PCI placement every PCI device config shares */
const pciCommon = {
  id: Opt(Str()),
  pci_segment: Opt(I16()),
  pci_device_id: Opt(U8()),
};

export const PayloadConfigSchema = Type.Object({
  firmware: Opt(Str()),
  kernel: Opt(Str()),
  cmdline: Opt(Str()),
  initramfs: Opt(Str()),
  igvm: Opt(Str()),
  host_data: Opt(Str()),
});

export const CpusConfigSchema = Type.Object({
  boot_vcpus: Int(1, 0xffff_ffff),
  max_vcpus: Int(1, 0xffff_ffff),
  topology: Opt(
    Type.Object({
      threads_per_core: Opt(U16()),
      cores_per_die: Opt(U16()),
      dies_per_package: Opt(U16()),
      packages: Opt(U16()),
    }),
  ),
  kvm_hyperv: Opt(Bool()),
  max_phys_bits: Opt(U8()),
  nested: Opt(Bool()),
  affinity: Opt(Type.Array(Type.Object({ vcpu: U32(), host_cpus: Type.Array(U32()) }))),
  features: Opt(Type.Object({ amx: Opt(Bool()) })),
  core_scheduling: Opt(Enum('Vm', 'Vcpu', 'Off')),
  /** Tern's own: the contract has no CPU profile field (src/boot/cpu-profile.ts) */
  tern_profile: Opt(Enum(...CPU_PROFILES)),
});

export const MemoryZoneConfigSchema = Type.Object({
  id: Str(),
  size: U64(),
  file: Opt(Str()),
  mergeable: Opt(Bool()),
  shared: Opt(Bool()),
  hugepages: Opt(Bool()),
  hugepage_size: Opt(U64()),
  host_numa_node: Opt(I32()),
  hotplug_size: Opt(U64()),
  hotplugged_size: Opt(U64()),
  prefault: Opt(Bool()),
  reserve: Opt(Bool()),
});

export const MemoryConfigSchema = Type.Object({
  size: U64(),
  hotplug_size: Opt(U64()),
  hotplugged_size: Opt(U64()),
  mergeable: Opt(Bool()),
  hotplug_method: Opt(Str()),
  shared: Opt(Bool()),
  hugepages: Opt(Bool()),
  hugepage_size: Opt(U64()),
  prefault: Opt(Bool()),
  reserve: Opt(Bool()),
  thp: Opt(Bool()),
  zones: Opt(Type.Array(MemoryZoneConfigSchema)),
});

const TokenBucketSchema = Type.Object({ size: U64(), one_time_burst: Opt(U64()), refill_time: U64() });
export const RateLimiterConfigSchema = Type.Object({ bandwidth: Opt(TokenBucketSchema), ops: Opt(TokenBucketSchema) });
const VirtQueueAffinitySchema = Type.Object({ queue_index: U16(), host_cpus: Type.Array(U32()) });

export const DiskConfigSchema = Type.Object({
  path: Opt(Str()),
  readonly: Opt(Bool()),
  direct: Opt(Bool()),
  iommu: Opt(Bool()),
  num_queues: Opt(U16()),
  queue_size: Opt(U16()),
  vhost_user: Opt(Bool()),
  vhost_socket: Opt(Str()),
  rate_limiter_config: Opt(RateLimiterConfigSchema),
  ...pciCommon,
  serial: Opt(Str()),
  rate_limit_group: Opt(Str()),
  queue_affinity: Opt(Type.Array(VirtQueueAffinitySchema)),
  backing_files: Opt(Bool()),
  sparse: Opt(Bool()),
  image_type: Opt(Enum('FixedVhd', 'Qcow2', 'Raw', 'Vhdx', 'Unknown')),
  lock_granularity: Opt(Enum('ByteRange', 'Full')),
});

export const NetConfigSchema = Type.Object({
  tap: Opt(Str()),
  ip: Opt(Str()),
  mask: Opt(Str()),
  mac: Opt(Str()),
  host_mac: Opt(Str()),
  mtu: Opt(U16()),
  iommu: Opt(Bool()),
  num_queues: Opt(U16()),
  queue_size: Opt(U16()),
  vhost_user: Opt(Bool()),
  vhost_socket: Opt(Str()),
  vhost_mode: Opt(Str()),
  // Taps this process holds, one per queue pair (Cloud Hypervisor's NetConfig has them too).
  // Only the command line gives them: numbers in an API body or a saved config are dropped.
  fds: Opt(Type.Array(I32(), { maxItems: 16 })),
  ...pciCommon,
  rate_limiter_config: Opt(RateLimiterConfigSchema),
  offload_tso: Opt(Bool()),
  offload_ufo: Opt(Bool()),
  offload_csum: Opt(Bool()),
});

export const RngConfigSchema = Type.Object({ src: Str(), iommu: Opt(Bool()), ...pciCommon });
export const RtcConfigSchema = Type.Object({ iommu: Opt(Bool()), ...pciCommon });
export const BalloonConfigSchema = Type.Object({
  size: U64(),
  iommu: Opt(Bool()),
  deflate_on_oom: Opt(Bool()),
  free_page_reporting: Opt(Bool()),
  ...pciCommon,
});
export const FsConfigSchema = Type.Object({
  tag: Str(),
  socket: Str(),
  num_queues: U16(),
  queue_size: U16(),
  ...pciCommon,
});
export const GenericVhostUserConfigSchema = Type.Object({
  socket: Str(),
  queue_sizes: Type.Array(U16()),
  device_type: U32(),
  ...pciCommon,
});
export const PmemConfigSchema = Type.Object({
  file: Str(),
  size: Opt(U64()),
  iommu: Opt(Bool()),
  discard_writes: Opt(Bool()),
  ...pciCommon,
});

export const ConsoleModeSchema = Enum('Off', 'Pty', 'Tty', 'File', 'Socket', 'Null');
export const SerialConfigSchema = Type.Object({ mode: ConsoleModeSchema, file: Opt(Str()), socket: Opt(Str()) });
export const ConsoleConfigSchema = Type.Object({
  mode: ConsoleModeSchema,
  file: Opt(Str()),
  socket: Opt(Str()),
  iommu: Opt(Bool()),
  ...pciCommon,
});
export const DebugConsoleConfigSchema = Type.Object({ mode: ConsoleModeSchema, file: Opt(Str()), iobase: Opt(U16()) });

export const DeviceConfigSchema = Type.Object({
  path: Opt(Str()),
  iommu: Opt(Bool()),
  ...pciCommon,
  x_nv_gpudirect_clique: Opt(I8()),
  x_exclude_mmap_bars: Opt(Type.Array(I64())),
});
export const UserDeviceConfigSchema = Type.Object({ socket: Str(), ...pciCommon });
export const VdpaConfigSchema = Type.Object({ path: Str(), num_queues: U16(), iommu: Opt(Bool()), ...pciCommon });
export const VsockConfigSchema = Type.Object({ cid: Int(3, Number.MAX_SAFE_INTEGER), socket: Str(), iommu: Opt(Bool()), ...pciCommon });
export const NumaConfigSchema = Type.Object({
  guest_numa_id: I32(),
  cpus: Opt(Type.Array(I32())),
  distances: Opt(Type.Array(Type.Object({ destination: I32(), distance: I32() }))),
  memory_zones: Opt(Type.Array(Str())),
  pci_segments: Opt(Type.Array(I32())),
  device_id: Opt(Str()),
});
export const PciSegmentConfigSchema = Type.Object({
  pci_segment: I16(),
  mmio32_aperture_weight: Opt(I32()),
  mmio64_aperture_weight: Opt(I32()),
});
export const PlatformConfigSchema = Type.Object({
  num_pci_segments: Opt(I16()),
  iommu_segments: Opt(Type.Array(I16())),
  iommu_address_width_bits: Opt(U8()),
  system_serial_number: Opt(Str()),
  serial_number: Opt(Str()),
  system_uuid: Opt(Str()),
  uuid: Opt(Str()),
  oem_strings: Opt(Type.Array(Str())),
  system_manufacturer: Opt(Str()),
  system_product_name: Opt(Str()),
  system_version: Opt(Str()),
  system_family: Opt(Str()),
  system_sku_number: Opt(Str()),
  chassis_asset_tag: Opt(Str()),
  tdx: Opt(Bool()),
  sev_snp: Opt(Bool()),
  iommufd: Opt(Bool()),
  vfio_p2p_dma: Opt(Bool()),
});

export const VmConfigSchema = Type.Object({
  cpus: Opt(CpusConfigSchema),
  memory: Opt(MemoryConfigSchema),
  payload: PayloadConfigSchema,
  rate_limit_groups: Opt(Type.Array(Type.Object({ id: Str(), rate_limiter_config: RateLimiterConfigSchema }))),
  disks: Opt(Type.Array(DiskConfigSchema)),
  net: Opt(Type.Array(NetConfigSchema)),
  rng: Opt(RngConfigSchema),
  balloon: Opt(BalloonConfigSchema),
  fs: Opt(Type.Array(FsConfigSchema)),
  generic_vhost_user: Opt(Type.Array(GenericVhostUserConfigSchema)),
  pmem: Opt(Type.Array(PmemConfigSchema)),
  serial: Opt(SerialConfigSchema),
  console: Opt(ConsoleConfigSchema),
  debug_console: Opt(DebugConsoleConfigSchema),
  devices: Opt(Type.Array(DeviceConfigSchema)),
  user_devices: Opt(Type.Array(UserDeviceConfigSchema)),
  vdpa: Opt(Type.Array(VdpaConfigSchema)),
  vsock: Opt(VsockConfigSchema),
  numa: Opt(Type.Array(NumaConfigSchema)),
  iommu: Opt(Bool()),
  watchdog: Opt(Bool()),
  rtc: Opt(RtcConfigSchema),
  pvpanic: Opt(Bool()),
  pci_segments: Opt(Type.Array(PciSegmentConfigSchema)),
  platform: Opt(PlatformConfigSchema),
  tpm: Opt(Type.Object({ socket: Str() })),
  landlock_enable: Opt(Bool()),
  landlock_rules: Opt(Type.Array(Type.Object({ path: Str(), access: Str() }))),
});

export type PayloadConfig = Static<typeof PayloadConfigSchema>;
export type CpusConfig = Static<typeof CpusConfigSchema>;
export type MemoryConfig = Static<typeof MemoryConfigSchema>;
export type DiskConfig = Static<typeof DiskConfigSchema>;
export type NetConfig = Static<typeof NetConfigSchema>;
export type RngConfig = Static<typeof RngConfigSchema>;
export type FsConfig = Static<typeof FsConfigSchema>;
export type PmemConfig = Static<typeof PmemConfigSchema>;
export type ConsoleMode = Static<typeof ConsoleModeSchema>;
export type SerialConfig = Static<typeof SerialConfigSchema>;
export type ConsoleConfig = Static<typeof ConsoleConfigSchema>;
export type DeviceConfig = Static<typeof DeviceConfigSchema>;
export type VsockConfig = Static<typeof VsockConfigSchema>;
/** The body of vm.create and the `config` of vm.info. */
export type VmConfig = Static<typeof VmConfigSchema>;

/** Cloud Hypervisor's VmState (Tern never reports BreakPoint). */
export type VmState = 'Created' | 'Running' | 'Shutdown' | 'Paused' | 'BreakPoint';

export interface VmmPingResponse {
  build_version?: string;
  version: string;
  pid?: number;
  features?: string[];
}

export interface DeviceNode {
  id?: string;
  resources?: Record<string, unknown>[];
  children?: string[];
  pci_bdf?: string;
}

export interface VmInfo {
  config: VmConfig;
  state: VmState;
  memory_actual_size?: number;
  device_tree?: Record<string, DeviceNode>;
}

/** counters by device (or "bus"), then by counter name */
export type VmCounters = Record<string, Record<string, number>>;

/** One event as the event monitor writes it and the vmm.events stream sends it. */
export interface TernEvent {
  /** time since VMM start */
  timestamp: { secs: number; nanos: number };
  /** 'vmm', 'vm', 'guest', ... */
  source: string;
  /** e.g. 'booting', 'paused', 'shutdown' */
  event: string;
  properties: Record<string, string> | null;
}

/** An error reply's body: messages, outermost first. */
export type ApiErrorBody = string[];

// ---- live migration ---------------------------------------------------------------------------

/** Cloud Hypervisor's limit for SendMigrationData.connections */
export { MAX_MIGRATION_CONNECTIONS };

export const TimeoutStrategySchema = Enum('Cancel', 'Ignore');
export const MigrationModeSchema = Enum('Precopy', 'Postcopy');

/** The body of vm.send-migration. */
export const SendMigrationDataSchema = Type.Object({
  destination_url: Str(),
  local: Opt(Bool()),
  /**
   * Not in the 0.3.0 document, but Cloud Hypervisor's SendMigrationData has it and ch-remote
   * always sends it (false unless asked): typed here so that `true` can be refused.
   */
  preserve_source: Opt(Bool()),
  downtime_ms: Opt(Int(1, Number.MAX_SAFE_INTEGER)),
  timeout_s: Opt(Int(1, Number.MAX_SAFE_INTEGER)),
  timeout_strategy: Opt(TimeoutStrategySchema),
  connections: Opt(Int(1, MAX_MIGRATION_CONNECTIONS)),
  tls_dir: Opt(Str()),
  memory_mode: Opt(MigrationModeSchema),
});

export const VmMemoryZoneUpdateDataSchema = Type.Object({ id: Type.String({ minLength: 1 }), host_numa_node: U32() });

/** The body of vm.receive-migration. */
export const ReceiveMigrationDataSchema = Type.Object({
  receiver_url: Str(),
  tls_dir: Opt(Str()),
  memory_mode: Opt(MigrationModeSchema),
  zone_updates: Opt(Type.Array(VmMemoryZoneUpdateDataSchema)),
});

export type TimeoutStrategy = Static<typeof TimeoutStrategySchema>;
export type MigrationMode = Static<typeof MigrationModeSchema>;
export type SendMigrationData = Static<typeof SendMigrationDataSchema>;
export type ReceiveMigrationData = Static<typeof ReceiveMigrationDataSchema>;

/** Cloud Hypervisor's migration events (source "vm"), in the order a migration reports them. */
export const MIGRATION_EVENT_NAMES = [
  'migration-started',
  'migration-memory-iteration',
  'migration-finished',
  'migration-failed',
  'migration-receive-ready',
  'migration-receive-started',
  'migration-receive-finished',
  'migration-receive-failed',
] as const;
export type MigrationEventName = (typeof MIGRATION_EVENT_NAMES)[number];

/** A migration event as the monitor and vmm.events report it. */
export type MigrationEvent =
  | (TernEvent & { source: 'vm'; event: 'migration-memory-iteration'; properties: { id: string } })
  | (TernEvent & { source: 'vm'; event: Exclude<MigrationEventName, 'migration-memory-iteration'>; properties: null });

export function isMigrationEvent(e: TernEvent): e is MigrationEvent {
  return e.source === 'vm' && (MIGRATION_EVENT_NAMES as readonly string[]).includes(e.event);
}
