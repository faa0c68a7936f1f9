// One live migration by QEMU, driven over the source's QMP socket the way an operator runs it:
// its parameters set, `migrate` to the destination's `-incoming` URL, `query-migrate` polled
// until it completed, then the source told to quit, as a tern (or Cloud Hypervisor) source
// does by itself once the VM runs at the destination (its teardown then shares the host with
// the guest in both benchmarks).
import { QmpClient } from './qmp-client';

export interface QemuMigrateInfo {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  ram?: { transferred?: number; 'dirty-sync-count'?: number };
}

export interface QemuMigrateOptions {
  /** `downtime-limit` (ms) */
  downtimeLimitMs: number;
  /** `max-bandwidth` (bytes/s): QEMU's default caps the link */
  maxBandwidth: number;
  /** the whole migration's limit */
  timeoutMs: number;
  /** how often query-migrate is asked */
  pollMs: number;
}

/** Migrate the QEMU behind `qmp` (its source's socket) to `url`; the completed query-migrate. */
export async function qemuMigrate(qmp: string, url: string, o: QemuMigrateOptions): Promise<QemuMigrateInfo> {
  const q = await QmpClient.connect(qmp);
  const sentAt = Date.now();
  try {
    await q.execute('migrate-set-parameters', { 'downtime-limit': o.downtimeLimitMs, 'max-bandwidth': o.maxBandwidth });
    await q.execute('migrate', { uri: url });
    for (;;) {
      const info = (await q.execute('query-migrate')) as QemuMigrateInfo;
      if (info.status === 'completed') {
        await q.execute('quit').catch(() => undefined);
        return info;
      }
      if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`QEMU migrate ${info.status}: ${info['error-desc'] ?? ''}`);
      if (Date.now() - sentAt > o.timeoutMs) throw new Error(`QEMU migrate still ${info.status} after ${o.timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, o.pollMs));
    }
  } finally {
    q.close();
  }
}
