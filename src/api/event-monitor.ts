// The event monitor: store events as Cloud Hypervisor reports them. The store's event log is
// the only source; this module maps event types to Cloud Hypervisor's (source, event) pairs and
// writes them in its monitor format: pretty-printed JSON (two-space indent, as serde's pretty
// printer writes it), each event followed by a blank line, timestamps since VMM start.
import fs from 'node:fs';
import type { Logger } from 'pino';
import type { Subscription } from 'rxjs';
import {
  GuestEvents,
  MigrationEvents,
  VmEvents,
  VmmEvents,
  type GuestPanicPayload,
  type MigrationIterationPayload,
  type Store,
  type StoreEvent,
} from '../state';
import { VirtioEvents, type VirtioDevicePayload } from '../devices/virtio/transport';
import { openOwnFile } from './host-file';
import type { TernEvent } from './schema';

/** store event type -> Cloud Hypervisor (source, event) */
export const MONITOR_EVENT_NAMES: Readonly<Record<string, { source: string; event: string }>> = {
  [VmmEvents.Starting]: { source: 'vmm', event: 'starting' },
  [VmmEvents.Shutdown]: { source: 'vmm', event: 'shutdown' },
  [VmEvents.Booting]: { source: 'vm', event: 'booting' },
  [VmEvents.Booted]: { source: 'vm', event: 'booted' },
  [VmEvents.Pausing]: { source: 'vm', event: 'pausing' },
  [VmEvents.Paused]: { source: 'vm', event: 'paused' },
  [VmEvents.Resuming]: { source: 'vm', event: 'resuming' },
  [VmEvents.Resumed]: { source: 'vm', event: 'resumed' },
  [VmEvents.Shutdown]: { source: 'vm', event: 'shutdown' },
  [VmEvents.Rebooting]: { source: 'vm', event: 'rebooting' },
  [VmEvents.Rebooted]: { source: 'vm', event: 'rebooted' },
  [VmEvents.Deleted]: { source: 'vm', event: 'deleted' },
  [VmEvents.PowerButtonPressed]: { source: 'vm', event: 'power-button' },
  [VmEvents.Snapshotting]: { source: 'vm', event: 'snapshotting' },
  [VmEvents.Snapshotted]: { source: 'vm', event: 'snapshotted' },
  [VmEvents.Restoring]: { source: 'vm', event: 'restoring' },
  [VmEvents.Restored]: { source: 'vm', event: 'restored' },
  [GuestEvents.Panic]: { source: 'guest', event: 'panic' },
  // Cloud Hypervisor reports no reason with migration-failed: clients read it from
  // vm.migration-progress.
  [MigrationEvents.Started]: { source: 'vm', event: 'migration-started' },
  [MigrationEvents.MemoryIteration]: { source: 'vm', event: 'migration-memory-iteration' },
  [MigrationEvents.Finished]: { source: 'vm', event: 'migration-finished' },
  [MigrationEvents.Failed]: { source: 'vm', event: 'migration-failed' },
  [MigrationEvents.ReceiveReady]: { source: 'vm', event: 'migration-receive-ready' },
  [MigrationEvents.ReceiveStarted]: { source: 'vm', event: 'migration-receive-started' },
  [MigrationEvents.ReceiveFinished]: { source: 'vm', event: 'migration-receive-finished' },
  [MigrationEvents.ReceiveFailed]: { source: 'vm', event: 'migration-receive-failed' },
  [VirtioEvents.Activated]: { source: 'virtio-device', event: 'activated' },
  [VirtioEvents.Reset]: { source: 'virtio-device', event: 'reset' },
};

function propertiesOf(ev: StoreEvent): Record<string, string> | null {
  if (ev.type === GuestEvents.Panic) return { event: String((ev.payload as GuestPanicPayload)?.event ?? 'panic') };
  // the round number, as Cloud Hypervisor's "id" (a string, like every property)
  if (ev.type === MigrationEvents.MemoryIteration) return { id: String((ev.payload as MigrationIterationPayload)?.id ?? 0) };
  if (ev.type === VirtioEvents.Activated || ev.type === VirtioEvents.Reset) return { id: String((ev.payload as VirtioDevicePayload)?.device ?? '') };
  return null;
}

/** The monitor's view of a store event, or null for events Cloud Hypervisor does not report. */
export function toTernEvent(ev: StoreEvent): TernEvent | null {
  const name = MONITOR_EVENT_NAMES[ev.type];
  if (!name) return null;
  return {
    timestamp: { secs: ev.timestamp.secs, nanos: ev.timestamp.nanos },
    source: name.source,
    event: name.event,
    properties: propertiesOf(ev),
  };
}

/** One event in the monitor's on-disk format. */
export function formatMonitorEvent(e: TernEvent): string {
  return `${JSON.stringify(e, null, 2)}\n\n`;
}

export interface MonitorTarget {
  path?: string;
  fd?: number;
}

/**
 * Writes every mapped store event to a file or an inherited fd. Writes are synchronous so the
 * file is complete when the process exits; an fd that would block (a full non-blocking pipe)
 * gets the rest on a timer rather than stalling the VMM, and a reader that went away stops the
 * monitor instead of the VMM.
 */
export class EventMonitor {
  private pending: Buffer[] = [];
  private retry?: NodeJS.Timeout;
  private readonly sub: Subscription;
  private closed = false;

  private constructor(
    private readonly fd: number,
    private readonly ownsFd: boolean,
    store: Store<unknown>,
    private readonly log?: Logger,
  ) {
    this.sub = store.events$.subscribe((ev) => {
      const e = toTernEvent(ev);
      if (e) this.write(Buffer.from(formatMonitorEvent(e)));
    });
  }

  /**
   * Open `target` and start writing. A path is created (0600) or truncated, as Cloud
   * Hypervisor does, but never through a symlink or into a file with other names; a named
   * pipe is written as it is. An inherited fd is used as it is.
   */
  static open(store: Store<unknown>, target: MonitorTarget, log?: Logger): EventMonitor {
    if (target.fd !== undefined) {
      fs.fstatSync(target.fd); // fail now, with EBADF, rather than on the first event
      return new EventMonitor(target.fd, false, store, log);
    }
    if (!target.path) throw new Error('the event monitor needs path= or fd=');
    const fd = openOwnFile(target.path, { role: 'the event monitor file', truncate: true, allowFifo: true });
    return new EventMonitor(fd, true, store, log);
  }

  private write(buf: Buffer): void {
    if (this.closed) return;
    this.pending.push(buf);
    if (this.pending.length === 1) this.flush();
  }

  /** Write what is pending; true when nothing is left. */
  private flush(): boolean {
    while (this.pending.length && !this.closed) {
      const buf = this.pending[0];
      let n: number;
      try {
        n = fs.writeSync(this.fd, buf);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN') {
          this.retry ??= setTimeout(() => {
            this.retry = undefined;
            this.flush();
          }, 10);
          return false;
        }
        this.log?.warn({ err: e }, 'event monitor stopped: its file or reader is gone');
        this.stop();
        return false;
      }
      if (n < buf.length) this.pending[0] = buf.subarray(n);
      else this.pending.shift();
    }
    return true;
  }

  private stop(): void {
    this.closed = true;
    this.pending = [];
    this.sub.unsubscribe();
    if (this.retry) clearTimeout(this.retry);
  }

  /** Flush what can be written without blocking, then stop (the fd is closed if we opened it). */
  close(): void {
    if (this.closed) return;
    this.flush();
    this.stop();
    if (this.ownsFd) fs.closeSync(this.fd);
  }
}
