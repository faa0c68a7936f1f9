// Following a migration from the source VMM (`tern-remote send-migration --wait`): how it ends
// comes from the migration events on vmm.events, subscribed before the migration is started so
// none is missed; its numbers come from vm.migration-progress, read a few times a second. On a
// terminal that is one line rewritten in place; otherwise plain lines, at most one a second, so
// a log file does not fill with them. Interrupting the follower does not cancel the migration.
import type { Subscription } from 'rxjs';
import type { TernClient } from '../api/client';
import type { MigrationProgress } from '../migration/migration-options';

export interface ProgressOutput {
  isTTY?: boolean;
  write(text: string): unknown;
}

export interface FollowOptions {
  /** how often vm.migration-progress is read (default 250 ms) */
  pollMs?: number;
  /** least time between two plain progress lines (default 1000 ms) */
  lineIntervalMs?: number;
  now?: () => number;
}

export type FollowOutcome = { ok: true; progress?: MigrationProgress } | { ok: false; reason: string };

const MIB = 1 << 20;
const BAR_WIDTH = 20;

/** the share of what is to be sent that has been sent, as the last dirty log counts it */
function percentSent(p: MigrationProgress): number {
  if (p.phase === 'finished') return 100;
  const total = p.bytes_transferred + p.bytes_remaining;
  return total > 0 ? Math.min(100, Math.floor((p.bytes_transferred / total) * 100)) : 0;
}

function eta(p: MigrationProgress): string {
  if (p.phase === 'finished') return '0:00';
  if (!(p.link_rate_bytes_per_s > 0)) return '--:--';
  const s = Math.ceil(p.bytes_remaining / p.link_rate_bytes_per_s);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

const rate = (p: MigrationProgress): string => `${(p.link_rate_bytes_per_s / MIB).toFixed(1)} MiB/s`;

/** The terminal's line: phase, memory round, a bar and percent, link rate, time left. */
export function progressBar(p: MigrationProgress): string {
  const pct = percentSent(p);
  const filled = Math.round((pct / 100) * BAR_WIDTH);
  return `${p.phase.padEnd(10)} round ${p.iteration} [${'#'.repeat(filled)}${'-'.repeat(BAR_WIDTH - filled)}] ${String(pct).padStart(3)}% ${rate(p)} ETA ${eta(p)}`;
}

/** The same, as a line of a log. */
export function progressLine(p: MigrationProgress): string {
  return `migration: ${p.phase}, round ${p.iteration}, ${percentSent(p)}% sent, ${rate(p)}, ETA ${eta(p)}`;
}

const delay = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * Subscribe to the migration events, run `start` (the vm.send-migration request; what it throws
 * is thrown), then show the progress until the migration finishes or fails.
 */
export async function followMigration(client: TernClient, start: () => Promise<void>, out: ProgressOutput, opts: FollowOptions = {}): Promise<FollowOutcome> {
  const pollMs = opts.pollMs ?? 250;
  const lineIntervalMs = opts.lineIntervalMs ?? 1000;
  const now = opts.now ?? Date.now;
  const tty = out.isTTY === true;
  let shownWidth = 0;
  let lastLineAt = -Infinity;
  const show = (p: MigrationProgress): void => {
    if (tty) {
      const text = progressBar(p);
      out.write(`\r${text.padEnd(shownWidth)}`);
      shownWidth = text.length;
    } else if (now() - lastLineAt >= lineIntervalMs) {
      out.write(`${progressLine(p)}\n`);
      lastLineAt = now();
    }
  };

  let ended: 'finished' | 'failed' | undefined;
  let streamGone = false;
  let wake: () => void = () => undefined;
  let opened!: () => void;
  const streamReady = new Promise<void>((resolve) => (opened = resolve));
  const gone = (): void => {
    streamGone = true;
    opened(); // a VMM without vmm.events (Cloud Hypervisor) is followed by polling alone
    wake();
  };
  const sub: Subscription = client.migrationEvents({ opened }).subscribe({
    next: (e) => {
      if (e.event === 'migration-finished') ended = 'finished';
      else if (e.event === 'migration-failed') ended = 'failed';
      else return;
      wake();
    },
    error: gone,
    complete: gone,
  });
  try {
    await streamReady;
    await start();
    let last: MigrationProgress | undefined;
    for (;;) {
      await Promise.race([delay(pollMs), new Promise<void>((resolve) => (wake = resolve))]);
      let pollError: unknown;
      try {
        last = await client.migrationProgress();
        show(last);
        if (last.phase === 'finished' || last.phase === 'failed') ended ??= last.phase;
      } catch (e) {
        pollError = e;
      }
      if (ended) {
        // The event can come before the progress says so: read it again for the last numbers
        // (and a failure's reason).
        for (let i = 0; i < 5 && last?.phase !== ended; i++) {
          await delay(50);
          last = await client.migrationProgress().catch(() => last);
          if (last?.phase === ended) show(last);
        }
        if (tty) out.write('\n');
        if (ended === 'finished') return { ok: true, progress: last };
        const reason = last?.phase === 'failed' && last.error ? last.error : 'the VMM reported migration-failed';
        return { ok: false, reason };
      }
      if (pollError !== undefined && streamGone) {
        if (tty && shownWidth) out.write('\n');
        return { ok: false, reason: `lost the VMM before the migration ended: ${(pollError as Error).message}` };
      }
    }
  } finally {
    sub.unsubscribe();
  }
}
