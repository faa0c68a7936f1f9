// A typed client for Tern's (and Cloud Hypervisor's) HTTP API on a UNIX socket: one method per
// endpoint, errors as TernApiError carrying the server's message chain, and the live event
// stream as an Observable. It loads nothing from the VMM side (no native addon, no store).
import http from 'node:http';
import { requestWithFds } from './fd-request';
import { Observable, filter } from 'rxjs';
import type { MigrationProgress } from '../migration/migration-options';
import {
  isMigrationEvent,
  type ConsoleConfig,
  type MigrationEvent,
  type ReceiveMigrationData,
  type SendMigrationData,
  type SerialConfig,
  type TernEvent,
  type VmConfig,
  type VmCounters,
  type VmInfo,
  type VmmPingResponse,
} from './schema';

export interface TernClientOptions {
  /** path of the VMM's API socket */
  socketPath: string;
  /** per-request timeout in ms (default 30 s; 0 = none). Not applied to events() or receiveMigration(). */
  timeoutMs?: number;
}

/** A non-2xx reply, or a reply that was not what the API promises. */
export class TernApiError extends Error {
  constructor(
    readonly status: number,
    /** the server's messages, outermost first */
    readonly chain: string[],
    readonly endpoint: string,
  ) {
    super(`${endpoint}: HTTP ${status}${chain.length ? `: ${chain.join(': ')}` : ''}`);
    this.name = 'TernApiError';
  }
}

export interface RawReply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

export interface EventsOptions {
  /** replay journaled events with a larger seq first (the SSE Last-Event-ID) */
  afterSeq?: number;
  /** called once the VMM has accepted the stream: every event from then on will be delivered */
  opened?: () => void;
}

/** The chain of an error body; anything else becomes a one-line chain. */
function chainOf(body: Buffer): string[] {
  const text = body.toString('utf8');
  try {
    const v = JSON.parse(text) as unknown;
    if (Array.isArray(v) && v.every((s) => typeof s === 'string')) return v;
  } catch {
    /* not JSON */
  }
  return text ? [text] : [];
}

export class TernClient {
  readonly socketPath: string;
  private readonly timeoutMs: number;
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 4 });

  constructor(opts: TernClientOptions | string) {
    const o = typeof opts === 'string' ? { socketPath: opts } : opts;
    this.socketPath = o.socketPath;
    this.timeoutMs = o.timeoutMs ?? 30_000;
  }

  /** Send one request to /api/v1/<endpoint>; resolves with any status. `timeoutMs` overrides the client's. */
  request(method: 'GET' | 'PUT', endpoint: string, body?: unknown, timeoutMs = this.timeoutMs): Promise<RawReply> {
    // strings and buffers go as they are (tern-remote create sends the file untouched)
    const payload =
      body === undefined ? undefined : Buffer.isBuffer(body) ? body : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          socketPath: this.socketPath,
          agent: this.agent,
          method,
          path: `/api/v1/${endpoint}`,
          headers: {
            Host: 'localhost',
            Accept: 'application/json',
            ...(payload && { 'Content-Type': 'application/json', 'Content-Length': payload.length }),
          },
          timeout: timeoutMs || undefined,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`${endpoint}: no reply within ${timeoutMs} ms`)));
      req.on('error', reject);
      req.end(payload);
    });
  }

  private async call(method: 'GET' | 'PUT', endpoint: string, body?: unknown, timeoutMs?: number): Promise<Buffer> {
    const r = await this.request(method, endpoint, body, timeoutMs);
    if (r.status < 200 || r.status > 299) throw new TernApiError(r.status, chainOf(r.body), endpoint);
    return r.body;
  }

  private async getJson<T>(endpoint: string): Promise<T> {
    const body = await this.call('GET', endpoint);
    try {
      return JSON.parse(body.toString('utf8')) as T;
    } catch {
      throw new TernApiError(200, ['the reply is not JSON'], endpoint);
    }
  }

  private async put(endpoint: string, body?: unknown): Promise<void> {
    await this.call('PUT', endpoint, body);
  }

  ping(): Promise<VmmPingResponse> {
    return this.getJson('vmm.ping');
  }

  /** Ends the VMM (deleting its VM first). */
  shutdownVmm(): Promise<void> {
    return this.put('vmm.shutdown');
  }

  create(config: VmConfig): Promise<void> {
    return this.put('vm.create', config);
  }

  /** Add a disk to a VM that is not running (cold add): it is there from the next boot. */
  addDisk(disk: NonNullable<VmConfig['disks']>[number]): Promise<void> {
    return this.put('vm.add-disk', disk);
  }

  /**
   * Add a net card to a VM that is not running (cold add): its tap opens at the next boot.
   * `fds`: taps of this process to hand over (one per queue pair), sent with the request as
   * SCM_RIGHTS, as ch-remote sends `fd=`; the VMM gets its own copies.
   */
  async addNet(net: NonNullable<VmConfig['net']>[number], fds: readonly number[] = []): Promise<void> {
    if (!fds.length) return this.put('vm.add-net', net);
    const r = await requestWithFds(this.socketPath, 'PUT', 'vm.add-net', net, fds, this.timeoutMs);
    if (r.status < 200 || r.status > 299) throw new TernApiError(r.status, chainOf(r.body), 'vm.add-net');
  }

  /** Snapshot the paused VM into a new directory (destination_url: file:///DIR). */
  snapshot(destinationUrl: string): Promise<void> {
    return this.put('vm.snapshot', { destination_url: destinationUrl });
  }

  /**
   * Restore a VM from a snapshot directory (only when the VMM has no VM). `serial`, `console`
   * and `net` (Tern's additions) choose the consoles' host ends and the cards' taps instead of
   * the snapshot's.
   */
  restore(config: {
    source_url: string;
    prefault?: boolean;
    resume?: boolean;
    memory_restore_mode?: 'Copy' | 'OnDemand' | 'copy' | 'ondemand';
    serial?: SerialConfig;
    console?: ConsoleConfig;
    /** the tap each card opens instead of the one its snapshot names */
    net?: { id: string; tap: string }[];
  }): Promise<void> {
    return this.put('vm.restore', config);
  }

  boot(): Promise<void> {
    return this.put('vm.boot');
  }

  delete(): Promise<void> {
    return this.put('vm.delete');
  }

  shutdown(): Promise<void> {
    return this.put('vm.shutdown');
  }

  reboot(): Promise<void> {
    return this.put('vm.reboot');
  }

  pause(): Promise<void> {
    return this.put('vm.pause');
  }

  resume(): Promise<void> {
    return this.put('vm.resume');
  }

  powerButton(): Promise<void> {
    return this.put('vm.power-button');
  }

  info(): Promise<VmInfo> {
    return this.getJson('vm.info');
  }

  counters(): Promise<VmCounters> {
    return this.getJson('vm.counters');
  }

  /**
   * Start sending the VM to a VMM that is receiving (destination_url: tcp:HOST:PORT or
   * unix:/path). Resolves once the migration has started; follow it with migrationEvents()
   * or migrationProgress(). A null tls_dir means none, as ch-remote writes it.
   */
  sendMigration(data: Omit<SendMigrationData, 'tls_dir'> & { tls_dir?: string | null }): Promise<void> {
    return this.put('vm.send-migration', data);
  }

  /**
   * Receive a VM (only when this VMM has none). Resolves when the VM runs here, which can take
   * as long as the sender's timeout_s: the client's per-request timeout does not apply.
   * Rejects with the VMM's reasons when the migration failed.
   */
  async receiveMigration(data: ReceiveMigrationData): Promise<void> {
    await this.call('PUT', 'vm.receive-migration', data, 0);
  }

  /** The migration in progress or the last one (Tern's); TernApiError 404 if there was none. */
  migrationProgress(): Promise<MigrationProgress> {
    return this.getJson('vm.migration-progress');
  }

  /** Cancel the migration in progress on this side (Tern's); TernApiError 404 if none runs. */
  cancelMigration(): Promise<void> {
    return this.put('vm.migration-cancel');
  }

  /** events(), only the migration events, typed. */
  migrationEvents(opts: EventsOptions = {}): Observable<MigrationEvent> {
    return this.events(opts).pipe(filter(isMigrationEvent));
  }

  /**
   * The VMM's events as they happen (GET /api/v1/vmm.events, Server-Sent Events). Completes
   * when the VMM ends the stream (vmm.shutdown); unsubscribing closes the connection.
   */
  events(opts: EventsOptions = {}): Observable<TernEvent> {
    return new Observable<TernEvent>((subscriber) => {
      const req = http.request({
        socketPath: this.socketPath,
        method: 'GET',
        path: '/api/v1/vmm.events',
        headers: {
          Host: 'localhost',
          Accept: 'text/event-stream',
          ...(opts.afterSeq !== undefined && { 'Last-Event-ID': String(opts.afterSeq) }),
        },
      });
      req.on('response', (res) => {
        if (res.statusCode !== 200) {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => subscriber.error(new TernApiError(res.statusCode ?? 0, chainOf(Buffer.concat(chunks)), 'vmm.events')));
          return;
        }
        opts.opened?.();
        res.setEncoding('utf8');
        let buffer = '';
        res.on('data', (text: string) => {
          buffer += text.replace(/\r\n?/g, '\n');
          let end: number;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = block
              .split('\n')
              .filter((l) => l.startsWith('data:'))
              .map((l) => l.slice(5).replace(/^ /, ''))
              .join('\n');
            if (!data) continue; // a comment or keep-alive
            try {
              subscriber.next(JSON.parse(data) as TernEvent);
            } catch (e) {
              subscriber.error(e);
              req.destroy();
              return;
            }
          }
        });
        res.on('end', () => subscriber.complete());
        res.on('error', (e) => subscriber.error(e));
      });
      req.on('error', (e) => subscriber.error(e));
      req.end();
      return () => req.destroy();
    });
  }

  /** Close idle keep-alive connections (the process can then exit on its own). */
  close(): void {
    this.agent.destroy();
  }
}
