// The package's public entry: the typed API client and the contract's types. Importing it loads
// no native code, so tools that only talk to a running VMM can use it anywhere Node runs.
export { TernClient, TernApiError, type TernClientOptions, type EventsOptions, type RawReply } from './api/client';
export type {
  ApiErrorBody,
  ConsoleConfig,
  ConsoleMode,
  CpusConfig,
  DeviceConfig,
  DeviceNode,
  DiskConfig,
  FsConfig,
  MemoryConfig,
  NetConfig,
  PayloadConfig,
  PmemConfig,
  RngConfig,
  SerialConfig,
  TernEvent,
  VmConfig,
  VmCounters,
  VmInfo,
  VmmPingResponse,
  VmState,
  VsockConfig,
} from './api/schema';
export { TERN_VERSION } from './version';
