// Guest memory over several TCP connections at once (SendMigrationData.connections): the
// control connection carries everything it always did, and the extra ones carry Memory frames
// only, each ending every memory round with a RoundEnd frame. Within one round a page is sent
// once, so the frames of a round may land in any order; a page sent again in a later round
// must land after its earlier copy, so no stream writes a round's frames before every stream
// has ended the round before it (RoundBarrier). The control connection's round ends are its
// Round frames and, for the last pages (sent after the Final frame), its Complete frame.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import type { FrameChannel } from './frame-channel';
import { FrameType, MigrationProtocolError, frameJson } from './frames';

/** Memory frames being sent at once at most, whatever the connections: each holds a 16 MiB buffer. */
export const MAX_FRAMES_IN_FLIGHT = 8;

/**
 * The connections a destination grants at most, whatever the source asks (Cloud Hypervisor's
 * limit is 128): a source never has more frames on their way than this, and each connection is
 * memory a source can make the destination hold.
 */
export const MAX_GRANTED_CONNECTIONS = MAX_FRAMES_IN_FLIGHT;

/**
 * What one connection, the control one or an extra one, may hold unread at the destination: two
 * whole Memory frames and some. Beyond it the source waits on TCP instead of the destination
 * taking fresh buffers for frames it cannot write yet.
 */
export const CONNECTION_UNREAD_BYTES = 36 << 20;

/** The destination's word that lets extra connections join this migration (in its Accept). */
export function newJoinToken(): string {
  return randomBytes(16).toString('hex');
}

/** What the source says first on an extra connection. */
export interface JoinRequest {
  token: string;
  /** 1..connections-1 (0 is the control connection) */
  index: number;
}

/** A Join frame from outside, checked against the token and the connections still expected. */
export function checkJoin(raw: unknown, token: string, open: ReadonlySet<number>): number {
  const j = raw as JoinRequest;
  if (typeof j !== 'object' || j === null || typeof j.token !== 'string' || !Number.isInteger(j.index)) throw new MigrationProtocolError('Join: malformed');
  const given = Buffer.from(j.token);
  const want = Buffer.from(token);
  if (given.length !== want.length || !timingSafeEqual(given, want)) throw new MigrationProtocolError('Join: not this migration\'s token');
  if (!open.has(j.index)) throw new MigrationProtocolError(`Join: connection ${j.index} is not one this migration waits for`);
  return j.index;
}

/** A RoundEnd frame's body. */
export interface RoundEnd {
  /** the stream's round ends so far, this one included, minus one (0, 1, 2, ...) */
  round: number;
  /** the last pages (the final round): the stream ends here */
  last: boolean;
}

export function checkRoundEnd(raw: unknown, expectedRound: number): RoundEnd {
  const r = raw as RoundEnd;
  if (typeof r !== 'object' || r === null || !Number.isInteger(r.round) || typeof r.last !== 'boolean') throw new MigrationProtocolError('RoundEnd: malformed');
  if (r.round !== expectedRound) throw new MigrationProtocolError(`RoundEnd: round ${r.round} where round ${expectedRound} ends`);
  return r;
}

/**
 * Destination: `streams` readers each call arrive(stream, round) at the end of a round and go
 * on once all have. A stream that ended (its last round) cannot be waited for later: a round
 * past it fails every waiter, as does fail().
 */
export class RoundBarrier {
  private readonly arrived = new Map<number, Set<number>>();
  private readonly waiters = new Map<number, { resolve: () => void; reject: (e: Error) => void }[]>();
  private readonly endedAt = new Map<number, number>();
  private error?: Error;

  constructor(private readonly streams: number) {}

  arrive(stream: number, round: number, last = false): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    for (const [s, at] of this.endedAt) {
      if (round > at) return this.failWith(new MigrationProtocolError(`round ${round} goes on after connection ${s} ended at round ${at}`));
    }
    if (last) this.endedAt.set(stream, round);
    const set = this.arrived.get(round) ?? new Set<number>();
    set.add(stream);
    this.arrived.set(round, set);
    if (set.size === this.streams) {
      for (const w of this.waiters.get(round) ?? []) w.resolve();
      this.waiters.delete(round);
      this.arrived.delete(round);
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const list = this.waiters.get(round) ?? [];
      list.push({ resolve, reject });
      this.waiters.set(round, list);
    });
  }

  /** Every waiter, now and later, fails with `e`. */
  fail(e: Error): void {
    if (this.error) return;
    this.error = e;
    for (const list of this.waiters.values()) for (const w of list) w.reject(e);
    this.waiters.clear();
  }

  private failWith(e: Error): Promise<never> {
    this.fail(e);
    return Promise.reject(e);
  }
}

/**
 * Source: Memory frames spread over the connections, each frame to the next connection that
 * has room, at most MAX_FRAMES_IN_FLIGHT of them on their way; a frame's buffer goes back to
 * `release` once the kernel has taken it.
 */
export class MemoryFanOut {
  private readonly busy = new Map<FrameChannel, Promise<void>>();
  private next = 0;
  private error?: unknown;

  constructor(private readonly channels: readonly FrameChannel[]) {}

  /** Returns once the frame is on its way (not flushed): the caller fills another buffer meanwhile. */
  async send(payload: Buffer, release: (b: Buffer) => void): Promise<void> {
    const limit = Math.min(this.channels.length, MAX_FRAMES_IN_FLIGHT);
    while (this.busy.size >= limit) await Promise.race(this.busy.values());
    if (this.error !== undefined) throw this.error;
    let ch = this.channels[this.next % this.channels.length];
    for (let k = 0; this.busy.has(ch) && k < this.channels.length; k++) ch = this.channels[++this.next % this.channels.length];
    this.next++;
    const sent = ch
      .sendFlushed(FrameType.Memory, payload)
      .then(() => release(payload))
      .catch((e: unknown) => void (this.error ??= e))
      .finally(() => this.busy.delete(ch));
    this.busy.set(ch, sent);
  }

  /** Every frame given to send() is with the kernel (or the first failure is thrown). */
  async drain(): Promise<void> {
    while (this.busy.size) await Promise.race(this.busy.values());
    if (this.error !== undefined) throw this.error;
  }
}

/** Source: the end of a round on every extra connection (after drain()). */
export async function endRound(extra: readonly FrameChannel[], round: number, last: boolean): Promise<void> {
  await Promise.all(extra.map((ch) => ch.sendJson(FrameType.RoundEnd, { round, last } satisfies RoundEnd)));
}

/**
 * Destination: read one extra connection's frames to its last round: Memory frames go to
 * `add`, each RoundEnd waits at the barrier. Resolves, with the Memory frames it carried, when
 * the stream has ended.
 */
export async function readMemoryStream(ch: FrameChannel, stream: number, barrier: RoundBarrier, add: (payload: Buffer) => Promise<unknown>): Promise<number> {
  let frames = 0;
  for (let round = 0; ; ) {
    const f = await ch.next();
    if (f.type === FrameType.Memory) {
      frames++;
      await add(f.payload);
    } else if (f.type === FrameType.RoundEnd) {
      const end = checkRoundEnd(frameJson(f), round);
      await barrier.arrive(stream, round, end.last);
      round++;
      if (end.last) return frames;
    } else {
      throw new MigrationProtocolError(`a ${FrameType[f.type]} frame on a memory connection`);
    }
  }
}
