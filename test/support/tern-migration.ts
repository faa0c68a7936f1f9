// Driving one live migration between two tern processes through their API sockets, the way an
// operator would: the destination VMM (started with nothing but --api-socket) gets
// vm.receive-migration, which answers once the VM runs there; once it listens, the source gets
// vm.send-migration, which answers at once. The source's progress is sampled while it runs, and
// the source VMM must end by itself when the VM has moved.
import fs from 'node:fs';
import { TernClient } from '../../src/api/client';
import type { GuestProcess } from '../linux/guest-process';
import { readMonitorFile, type MonitorRecord } from './monitor-file';

export interface TernEnd {
  vm: GuestProcess;
  socket: string;
  /** --event-monitor path of that process */
  monitor: string;
}

export interface MigrationRequest {
  /** tcp:HOST:PORT or unix:/path, as the destination listens */
  receiverUrl: string;
  /** the same place as the source reaches it */
  destinationUrl: string;
  local?: boolean;
  downtimeMs?: number;
  /** TCP connections (connections=N) */
  connections?: number;
  /** limit for the whole migration (default 10 minutes) */
  timeoutMs?: number;
}

export interface MigrationOutcome {
  /** HTTP status of vm.send-migration (204 expected) and its error chain if any */
  sendStatus: number;
  sendBody: string;
  /** HTTP status of vm.receive-migration (204 once the VM runs at the destination) */
  receiveStatus: number;
  receiveBody: string;
  /** how the source VMM process ended (null: still running at the limit) */
  sourceExit: { code: number | null; signal: NodeJS.Signals | null } | null;
  /** ms (Date.now()) when vm.send-migration was sent, and when vm.receive-migration answered */
  sentAt: number;
  receivedAt: number;
  /**
   * What the source logged when it finished (`-v`: its "migration finished" line: downtime_ms,
   * total_ms, bytes); its progress cannot be asked for then, as it exits at once.
   */
  sourceReport: Record<string, number> | null;
  /** the source's vm.migration-progress bodies, in order (the last one before it exited) */
  progress: Record<string, unknown>[];
  /** the destination's vm.migration-progress after the migration */
  destinationProgress: Record<string, unknown> | null;
  /** the source's and destination's monitor events about the migration */
  sourceEvents: MonitorRecord[];
  destinationEvents: MonitorRecord[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `p`, or `fallback` after ms; the timer goes when p settles (a pending one would keep a test process alive). */
async function within<T>(p: Promise<T>, ms: number, fallback: T): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<T>((r) => (timer = setTimeout(() => r(fallback), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

const migrationEvents = (file: string): MonitorRecord[] =>
  fs.existsSync(file) ? readMonitorFile(file).filter((e) => e.event.startsWith('migration-')) : [];

async function progressOf(client: TernClient): Promise<Record<string, unknown> | null> {
  try {
    const r = await client.request('GET', 'vm.migration-progress');
    return r.status === 200 ? (JSON.parse(r.body.toString('utf8')) as Record<string, unknown>) : null;
  } catch {
    return null; // the source ends when the VM has moved: its socket goes away
  }
}

/** Moves the VM from `source` to `destination` (which must have no VM); never rejects on a failed migration. */
export async function migrate(source: TernEnd, destination: TernEnd, req: MigrationRequest): Promise<MigrationOutcome> {
  const limit = req.timeoutMs ?? 10 * 60_000;
  const dst = new TernClient({ socketPath: destination.socket, timeoutMs: limit });
  const src = new TernClient({ socketPath: source.socket, timeoutMs: 60_000 });
  const srcEventsBefore = migrationEvents(source.monitor).length;
  const dstEventsBefore = migrationEvents(destination.monitor).length;
  let receivedAt = 0;
  const receive = dst.request('PUT', 'vm.receive-migration', { receiver_url: req.receiverUrl }).then(
    (r) => ((receivedAt = Date.now()), { status: r.status, body: r.body.toString('utf8') }),
    (e: Error) => ((receivedAt = Date.now()), { status: 0, body: e.message }),
  );
  try {
    // The destination reports that it listens; an early answer to receive-migration is a refusal.
    let settled = false;
    void receive.then(() => (settled = true));
    const listenEnd = Date.now() + 60_000;
    while (!settled && !migrationEvents(destination.monitor).slice(dstEventsBefore).some((e) => e.event === 'migration-receive-ready')) {
      if (Date.now() > listenEnd) return failed(0, 'the destination did not report migration-receive-ready within 60 s');
      await sleep(50);
    }
    if (settled) {
      const early = await receive;
      return failed(early.status, early.body);
    }

    const sentAt = Date.now();
    const body: Record<string, unknown> = { destination_url: req.destinationUrl };
    if (req.local !== undefined) body.local = req.local;
    if (req.downtimeMs !== undefined) body.downtime_ms = req.downtimeMs;
    if (req.connections !== undefined) body.connections = req.connections;
    const sent = await src.request('PUT', 'vm.send-migration', body);
    const progress: Record<string, unknown>[] = [];
    let sourceExit: MigrationOutcome['sourceExit'] = null;
    void source.vm.exited.then((x) => (sourceExit = x));
    if (sent.status === 204) {
      let answered = false;
      void receive.then(() => (answered = true));
      const end = Date.now() + limit;
      // Sample the source until it ends (it exits once the VM runs at the destination).
      while (sourceExit === null && Date.now() < end && !(answered && Date.now() > receivedAt + 60_000)) {
        const p = await progressOf(src);
        if (p) progress.push(p);
        await sleep(100);
      }
    }
    const received = sent.status === 204 ? await within(receive, limit, { status: 0, body: 'no answer' }) : { status: 0, body: 'not sent' };
    if (sent.status === 204 && sourceExit === null) sourceExit = await within(source.vm.exited, 30_000, null);
    return {
      sourceReport: finishedReport(source.vm.stderr),
      sendStatus: sent.status,
      sendBody: sent.body.toString('utf8'),
      receiveStatus: received.status,
      receiveBody: received.body,
      sourceExit,
      sentAt,
      receivedAt,
      progress,
      destinationProgress: received.status === 204 ? await progressOf(dst) : null,
      sourceEvents: migrationEvents(source.monitor).slice(srcEventsBefore),
      destinationEvents: migrationEvents(destination.monitor).slice(dstEventsBefore),
    };
  } finally {
    src.close();
    dst.close();
  }

  function failed(status: number, bodyText: string): MigrationOutcome {
    return {
      sourceReport: null, sendStatus: 0, sendBody: `not sent: vm.receive-migration answered ${status}`, receiveStatus: status, receiveBody: bodyText, sourceExit: null,
      sentAt: 0, receivedAt, progress: [], destinationProgress: null,
      sourceEvents: migrationEvents(source.monitor).slice(srcEventsBefore),
      destinationEvents: migrationEvents(destination.monitor).slice(dstEventsBefore),
    };
  }
}

/** The numbers of the source's "migration finished" log line (pino JSON on stderr, with -v). */
export function finishedReport(stderr: string): Record<string, number> | null {
  for (const line of stderr.split('\n')) {
    if (!line.includes('"migration finished"')) continue;
    try {
      const o = JSON.parse(line) as Record<string, unknown>;
      return Object.fromEntries(Object.entries(o).filter(([, v]) => typeof v === 'number')) as Record<string, number>;
    } catch {
      /* not a log line */
    }
  }
  return null;
}

/** The first number among `keys` in the source's finished report, else its last progress sample that has one. */
export function reported(o: MigrationOutcome, ...keys: string[]): number | undefined {
  const places: Record<string, unknown>[] = [o.sourceReport ?? {}, ...[...o.progress].reverse()];
  for (const p of places) {
    for (const k of keys) {
      const v = Number(p[k]);
      if (p[k] !== undefined && p[k] !== null && Number.isFinite(v)) return v;
    }
  }
  return undefined;
}
