// What a client asks of a live migration (Cloud Hypervisor's SendMigrationData and
// ReceiveMigrationData, with their defaults), and what `vm.migration-progress` reports.

export type TimeoutStrategy = 'Cancel' | 'Ignore';

/** Cloud Hypervisor's limit of a migration's TCP connections (SendMigrationData.connections) */
export const MAX_MIGRATION_CONNECTIONS = 128;

export interface SendMigrationOptions {
  /** tcp:HOST:PORT or unix:/path */
  destination_url: string;
  /** memory moves as memfds over SCM_RIGHTS (unix: URLs, memory shared=on) */
  local?: boolean;
  /** the pause the final round aims for (default 300) */
  downtime_ms?: number;
  /** the whole migration's limit (default 3600) */
  timeout_s?: number;
  /** at the timeout: Cancel gives up, Ignore pauses and finishes whatever the downtime */
  timeout_strategy?: TimeoutStrategy;
  /** TLS over tcp: URLs: ca-cert.pem, client-cert.pem and client-key.pem (migration-tls.ts) */
  tls_dir?: string;
  /** TCP connections guest memory is spread over (tcp: URLs; default 1; memory-streams.ts) */
  connections?: number;
}

export interface ReceiveMigrationOptions {
  /** tcp:ADDRESS:PORT or unix:/path */
  receiver_url: string;
  /** TLS over tcp: URLs: ca-cert.pem, server-cert.pem and server-key.pem (migration-tls.ts) */
  tls_dir?: string;
}

export const MIGRATION_DEFAULTS = {
  downtime_ms: 300,
  timeout_s: 3600,
  timeout_strategy: 'Cancel' as TimeoutStrategy,
};

export type MigrationPhase =
  /** source: connecting and exchanging the handshake */
  | 'handshake'
  /** rounds of memory while the guest runs */
  | 'memory'
  /** the guest is paused: last dirty pages and the saved vCPU/device state */
  | 'final'
  /** waiting for the destination to say the VM runs there */
  | 'completing'
  | 'finished'
  | 'failed'
  /** destination: listening */
  | 'listening'
  /** destination: receiving */
  | 'receiving';

/** Body of GET vm.migration-progress. */
export interface MigrationProgress {
  role: 'send' | 'receive';
  phase: MigrationPhase;
  /** the url the client gave */
  url: string;
  local: boolean;
  /** memory round in progress (0 = all non-zero RAM) */
  iteration: number;
  /** bytes of frames written (source) or read (destination) */
  bytes_transferred: number;
  /** source: dirty bytes still to send, as of the last round's dirty log */
  bytes_remaining: number;
  /** bytes per second the guest dirtied during the last round */
  dirty_rate_bytes_per_s: number;
  /** bytes per second the link carried during the last round */
  link_rate_bytes_per_s: number;
  /** bytes_remaining / link rate: the pause the final round would take now */
  estimated_downtime_ms: number;
  /** percent of vCPU time taken away by auto-converge (0 = none) */
  throttle_percent: number;
  elapsed_ms: number;
  /** source, once finished: from the pause here to the destination's word that the VM runs */
  downtime_ms?: number;
  /** why it failed (phase 'failed') */
  error?: string;
}
