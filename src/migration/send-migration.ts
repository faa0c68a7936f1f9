// The source side of a live migration. The VM's state is the store's: it goes out whole once,
// then as the store's own diffs (immer patches) with each round of dirty pages, and last with
// the vCPU/KVM state the pause saved into the store. Guest RAM goes in rounds (all non-zero
// pages, then each round's dirty pages) until what is left fits the downtime the client
// allows; a local migration sends the RAM's memfds instead and no page at all.
//
// The VM never runs on both sides: the source gives it up (Commit) only after the destination
// has built it (Ready), and the destination runs it only after Commit. Before Commit every
// failure resumes the guest here (unless it was paused before), after Commit only a
// destination that is provably gone (its end of the connection closed) lets it run here again.
import type { Logger } from 'pino';
import type { GuestMemory } from '../memory/guest-memory';
import type { CpuidEntry } from '../native/kvm';
import { diffState, migrationEvents, type RootState, type Store } from '../state';
import { TernStateError } from '../state/errors';
import { TERN_VERSION } from '../version';
import type { PauseTiming } from '../vmm/machine';
import { FrameChannel, MigrationPeerError } from './frame-channel';
import { CHECKSUM_NAMES, FrameChecksum, FrameType, MigrationProtocolError, encodeJsonFrame, frameJson } from './frames';
import { MIGRATION_PROTOCOL_VERSION, type Hello } from './handshake';
import { MemoryFrameBuilder, PAGE, addAllNonZeroPages, addDirtyPages, countDirtyPages } from './memory-frames';
import { MemoryFanOut, endRound, type JoinRequest } from './memory-streams';
import { MAX_MIGRATION_CONNECTIONS, MIGRATION_DEFAULTS, type MigrationPhase, type MigrationProgress, type SendMigrationOptions } from './migration-options';
import { connectMigration, describeAddress, parseMigrationUrl, type MigrationAddress } from './migration-url';
import { loadTlsDir, tlsClient, type TlsMaterial } from './migration-tls';
import { PauseSteps } from './pause-steps';
import { sendPreamble } from './preamble';

export class MigrationError extends TernStateError {
  constructor(message: string) {
    super('MigrationFailed', message);
  }
}

/** What the sender needs of the running VM. */
export interface SourceMachine {
  readonly memory: GuestMemory;
  /** KVM's dirty log on or off (the memory rounds make sure it is on) */
  dirtyLogging(on: boolean): void;
  dirtyBitmaps(): Uint8Array[];
  memoryFds(): number[] | undefined;
  cpuFacts(): { cpuid: CpuidEntry[]; msrIndices: number[] };
  /**
   * park the vCPUs and save their state (and KVM's) into the store; resolves to where the time
   * went. It ends the throttle, keeping parked what the throttle had parked.
   */
  pause(): Promise<PauseTiming>;
  /** run the vCPUs again; restoreClock (default true) sets kvmclock back to the pause's */
  resume(opts?: { restoreClock?: boolean }): void;
  /** take `percent` of each period from the vCPUs; 0 ends it, and lets run what it had parked */
  throttle(percent: number): void;
  /** let the disk images' locks go (paused, before the last state goes) */
  releaseDiskLocks(): void;
  /** take them again (the migration failed); throws while another process holds one */
  takeDiskLocks(): void;
  /** run the pause's saving code on stand-in state; returns the state it would leave (Machine.rehearseSave) */
  rehearseSave?(state: RootState): RootState;
}

export interface SourceVm {
  store: Store<RootState>;
  log: Logger;
  /** the machine now; a different one (or none) means the VM was rebooted or shut down */
  machine(): SourceMachine | undefined;
  /** run `fn` with every lifecycle operation held off */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
}

const CONNECT_TIMEOUT_MS = 10_000;
/** how long a failed migration's source waits for the destination to let its disks' locks go */
const RETAKE_LOCKS_MS = 5000;
/** how long the destination may take to answer (it builds the VM before Ready) */
const PEER_IDLE_MS = 60_000;
const MAX_ROUNDS = 30;
/**
 * A last round this small (1 MiB) is not worth another round to shrink: the pause's fixed work
 * (saving and building the vCPUs and devices) outweighs sending it.
 */
const SMALL_LAST_ROUND_PAGES = 256;
/** At most this many rounds are added beyond the one that fits the downtime (see worthAnotherRound). */
const MAX_SHRINKING_ROUNDS = 3;
const THROTTLE_STEP = 20;
const THROTTLE_MAX = 90;

export class MigrationSender {
  readonly opts: Required<Omit<SendMigrationOptions, 'tls_dir'>> & Pick<SendMigrationOptions, 'tls_dir'>;
  private channel?: FrameChannel;
  private readonly startedAt = Date.now();
  private phase: MigrationPhase = 'handshake';
  private iteration = 0;
  /** rounds sent only to shrink the last one (worthAnotherRound) */
  private shrinkingRounds = 0;
  private bytesRemaining = 0;
  private dirtyRate = 0;
  private linkRate = 0;
  private throttlePercent = 0;
  private error?: string;
  private cancelled?: string;
  private forceFinal = false;
  private committed = false;
  private timeoutTimer?: NodeJS.Timeout;
  private machineAtStart?: SourceMachine;
  /** the state the destination has, as of the last frame sent */
  private sentState?: RootState;
  private builder?: MemoryFrameBuilder;
  /** the connections beyond the control one (connections > 1): Memory frames and RoundEnds only */
  private extra: FrameChannel[] = [];
  /** spreads Memory frames over the control connection and the extra ones */
  private fanOut?: MemoryFanOut;
  /** round ends sent on the extra connections so far */
  private roundEnds = 0;
  /** the connections the destination granted (opts.connections at most) */
  private connections = 1;
  /** the destination answers each Round frame with RoundApplied once that round is in its RAM */
  private destinationAppliesRounds = false;
  /** Round frames sent, and RoundApplied frames read */
  private roundFrames = 0;
  private roundsApplied = 0;
  downtimeMs?: number;
  /** settles when the migration ended: true = the destination runs the VM */
  done?: Promise<boolean>;

  constructor(
    private readonly vm: SourceVm,
    opts: SendMigrationOptions,
  ) {
    this.opts = {
      destination_url: opts.destination_url,
      local: opts.local ?? false,
      downtime_ms: opts.downtime_ms ?? MIGRATION_DEFAULTS.downtime_ms,
      timeout_s: opts.timeout_s ?? MIGRATION_DEFAULTS.timeout_s,
      timeout_strategy: opts.timeout_strategy ?? MIGRATION_DEFAULTS.timeout_strategy,
      connections: opts.connections ?? 1,
      ...(opts.tls_dir !== undefined && { tls_dir: opts.tls_dir }),
    };
  }

  /** bytes written on every connection */
  private get bytesWritten(): number {
    return (this.channel?.bytesWritten ?? 0) + this.extra.reduce((n, ch) => n + ch.bytesWritten, 0);
  }

  /** Give up every connection, telling the destination why. */
  private abortAll(reason: string): void {
    this.channel?.abort(reason);
    for (const ch of this.extra) ch.abort(reason);
  }

  progress(): MigrationProgress {
    const ch = this.channel;
    return {
      role: 'send',
      phase: this.phase,
      url: this.opts.destination_url,
      local: this.opts.local,
      iteration: this.iteration,
      bytes_transferred: ch ? this.bytesWritten : 0,
      bytes_remaining: this.bytesRemaining,
      dirty_rate_bytes_per_s: Math.round(this.dirtyRate),
      link_rate_bytes_per_s: Math.round(this.linkRate),
      estimated_downtime_ms: this.linkRate > 0 ? Math.round((this.bytesRemaining / this.linkRate) * 1000) : 0,
      throttle_percent: this.throttlePercent,
      elapsed_ms: Date.now() - this.startedAt,
      ...(this.downtimeMs !== undefined && { downtime_ms: this.downtimeMs }),
      ...(this.error !== undefined && { error: this.error }),
    };
  }

  get active(): boolean {
    return this.phase !== 'finished' && this.phase !== 'failed';
  }

  /**
   * Connect and shake hands; resolves when the destination accepted, with the rest running in
   * the background (`done`). Rejects, with nothing changed here, when it cannot start.
   */
  async start(): Promise<void> {
    try {
      await this.handshake();
    } catch (e) {
      // Nothing started: the API call reports the error, the VM was never touched.
      this.phase = 'failed';
      this.error = errorText(e);
      throw e;
    }
    this.vm.store.dispatch(migrationEvents.started({ destination_url: this.opts.destination_url, local: this.opts.local }));
    this.timeoutTimer = setTimeout(() => this.onTimeout(), this.opts.timeout_s * 1000);
    this.timeoutTimer.unref();
    this.done = this.run();
  }

  private async handshake(): Promise<void> {
    const o = this.opts;
    const address = parseMigrationUrl(o.destination_url, 'destination_url');
    for (const [k, v] of [['downtime_ms', o.downtime_ms], ['timeout_s', o.timeout_s]] as const) {
      if (!Number.isSafeInteger(v) || v < 1) throw new MigrationError(`${k} must be a positive integer`);
    }
    if (o.timeout_strategy !== 'Cancel' && o.timeout_strategy !== 'Ignore') throw new MigrationError('timeout_strategy must be "Cancel" or "Ignore"');
    const state = this.vm.store.getState();
    if (state.vm.status !== 'Running' && state.vm.status !== 'Paused') throw new MigrationError(`the VM is ${state.vm.status}: only a running or paused VM migrates`);
    const machine = this.vm.machine();
    if (!machine) throw new MigrationError('the VM has no machine');
    this.machineAtStart = machine;
    if (o.tls_dir !== undefined && address.kind !== 'tcp') throw new MigrationError('TLS (tls_dir) is for tcp: URLs only');
    if (!Number.isInteger(o.connections) || o.connections < 1 || o.connections > MAX_MIGRATION_CONNECTIONS) throw new MigrationError(`connections must be 1..${MAX_MIGRATION_CONNECTIONS}`);
    if (o.connections > 1 && address.kind !== 'tcp') throw new MigrationError('more than one connection is for tcp: URLs only');
    // (read and checked before anything connects: a bad directory fails the request itself)
    const tlsMaterial = o.tls_dir !== undefined ? loadTlsDir(o.tls_dir, 'client') : undefined;
    let fds: number[] = [];
    if (o.local) {
      if (address.kind !== 'unix') throw new MigrationError('a local migration goes over a unix: URL');
      if (!state.vm.config?.memory?.shared) throw new MigrationError('a local migration needs the VM created with memory shared=on');
      const memFds = machine.memoryFds();
      if (!memFds) throw new MigrationError('this VM\'s RAM is a private mapping of a snapshot file and cannot be handed over; restore it with memory_restore_mode copy');
      fds = memFds;
    }
    let socket = await connectMigration(address, CONNECT_TIMEOUT_MS);
    if (tlsMaterial && address.kind === 'tcp') socket = await tlsClient(socket, address.host, tlsMaterial);
    const channel = new FrameChannel(socket, { idleTimeoutMs: PEER_IDLE_MS, peer: 'destination' });
    this.channel = channel;
    try {
      if (address.kind === 'unix') sendPreamble(socket, MIGRATION_PROTOCOL_VERSION, fds, CONNECT_TIMEOUT_MS);
      const { cpuid, msrIndices } = machine.cpuFacts();
      const hello: Hello = {
        protocol: MIGRATION_PROTOCOL_VERSION,
        schemaVersion: state.schemaVersion,
        tern: TERN_VERSION,
        local: o.local,
        regions: state.memory.regions.map((r) => ({ guestAddress: r.guestAddress, size: r.size })),
        cpuid,
        msrIndices,
        ...(o.connections > 1 && { connections: o.connections }),
        roundsApplied: true,
      };
      await channel.sendJson(FrameType.Hello, hello);
      const accept = frameJson(await channel.expect(FrameType.Accept)) as { checksums?: unknown; connections?: unknown; join?: unknown; rounds_applied?: unknown };
      // (an older destination sends no RoundApplied: the pause then waits for Prepared alone)
      this.destinationAppliesRounds = accept?.rounds_applied === true;
      // A destination that reads XXH64 frames says so; one that does not gets CRC-32 as before.
      if (Array.isArray(accept?.checksums) && accept.checksums.includes(CHECKSUM_NAMES[FrameChecksum.Xxh64Low32])) channel.checksum = FrameChecksum.Xxh64Low32;
      if (o.connections > 1) {
        // The destination grants what it takes, at most what was asked; one that names none
        // (an older Tern) takes one: the memory goes over the first connection alone.
        const granted = typeof accept.join === 'string' && Number.isInteger(accept.connections) ? (accept.connections as number) : 1;
        if (granted < 1 || granted > o.connections) throw new MigrationError(`it granted ${String(accept.connections)} connections of ${o.connections}`);
        if (granted < o.connections) this.vm.log.info({ asked: o.connections, granted }, 'migration: the destination takes fewer connections');
        this.connections = granted;
        if (granted > 1) await this.openExtra(address as Extract<MigrationAddress, { kind: 'tcp' }>, tlsMaterial, accept.join as string, channel.checksum);
      }
    } catch (e) {
      this.abortAll(errorText(e));
      throw new MigrationError(`${describeAddress(address)} refused the migration: ${errorText(e)}`);
    }
  }

  /** The connections beyond the first, each joined to this migration with the destination's token. */
  private async openExtra(address: Extract<MigrationAddress, { kind: 'tcp' }>, tls: TlsMaterial | undefined, token: string, checksum: FrameChecksum): Promise<void> {
    // (nothing comes back on them: the migration's own timeout watches them)
    const idleTimeoutMs = Math.min(2 ** 31 - 1, this.opts.timeout_s * 1000);
    for (let index = 1; index < this.connections; index++) {
      let socket = await connectMigration(address, CONNECT_TIMEOUT_MS);
      if (tls) socket = await tlsClient(socket, address.host, tls);
      const ch = new FrameChannel(socket, { idleTimeoutMs, peer: 'destination' });
      ch.checksum = checksum;
      this.extra.push(ch);
      await ch.sendJson(FrameType.Join, { token, index } satisfies JoinRequest);
    }
    this.fanOut = new MemoryFanOut([this.channel!, ...this.extra]);
  }

  /** Give up (vm.migration-cancel); refused once the VM has been handed over. */
  cancel(reason = 'cancelled by the client'): void {
    if (!this.active) throw new MigrationError('no migration is in progress');
    if (this.committed) throw new MigrationError('too late to cancel: the destination has taken the VM over');
    this.cancelled = reason;
    this.abortAll(reason);
  }

  private onTimeout(): void {
    if (!this.active || this.committed) return;
    if (this.opts.timeout_strategy === 'Ignore') {
      this.vm.log.warn({ timeout_s: this.opts.timeout_s }, 'migration timeout reached: finishing now, whatever the downtime');
      this.forceFinal = true;
    } else {
      this.cancel(`timed out after ${this.opts.timeout_s} s`);
    }
  }

  private checkMachine(): SourceMachine {
    const m = this.vm.machine();
    if (m !== this.machineAtStart) throw new MigrationError('the VM was shut down or rebooted during the migration');
    if (this.cancelled) throw new MigrationError(this.cancelled);
    return m!;
  }

  /** Send the state patches since the last frame in a Round or Final frame. */
  private async sendPatches(type: FrameType.Round | FrameType.Final, extra: Record<string, unknown>): Promise<void> {
    const now = this.vm.store.getState();
    const patches = diffState(this.sentState!, now);
    await this.channel!.sendJson(type, { ...extra, patches });
    this.sentState = now;
  }

  private async run(): Promise<boolean> {
    const ch = this.channel!;
    let paused = false;
    let wasPaused = false;
    let locksReleased = false;
    let steps: PauseSteps | undefined;
    try {
      const state = this.vm.store.getState();
      await ch.sendJson(FrameType.Config, state.vm.config);
      await ch.sendJson(FrameType.State, state);
      this.sentState = state;

      let pending: Uint8Array[] | undefined;
      if (!this.opts.local) pending = await this.memoryRounds();
      // (right before the pause, not before the rounds: V8 drops the bytecode of functions left
      // unused across the rounds' many collections, and the pages the guest dirties meanwhile go
      // in the final round with the rest)
      await this.rehearsePause();
      await this.destinationCaughtUp();

      this.phase = 'final';
      const ok = await this.vm.exclusive(async () => {
        const machine = this.checkMachine();
        wasPaused = this.vm.store.getState().vm.status === 'Paused';
        const pausedAt = Date.now();
        const pause = (steps = new PauseSteps());
        if (!wasPaused) {
          try {
            pause.note({ vcpus: await machine.pause() });
          } catch (e) {
            // Some vCPUs may be parked: let them all run on, with the guest's own clock (the
            // saved one may be an earlier pause's).
            machine.resume({ restoreClock: false });
            throw e;
          }
          paused = true;
        }
        const mark = (step: string) => pause.mark(step);
        mark('paused');
        const last = this.opts.local ? undefined : machine.dirtyBitmaps();
        let lastPages: { pages: number; bytes: number; sending_ms: number } | undefined;
        if (last) mark('dirty log read');
        // The destination may be on this host: it takes the images' locks once the final state came.
        machine.releaseDiskLocks();
        locksReleased = true;
        // The final state goes before the last pages: the destination builds the VM from it
        // while this side scans and sends them.
        await this.sendPatches(FrameType.Final, {});
        mark('state sent');
        if (last) {
          const bitmaps = pending ? [last, pending] : [last];
          // (on the first connection alone: the last round is small, and spreading it would
          // take fresh 16 MiB buffers inside the pause)
          lastPages = await this.sendPages((b, flush) => addDirtyPages(b, machine.memory, bitmaps, flush, true), false);
          await endRound(this.extra, this.roundEnds++, true);
          mark('last pages sent');
          pause.note({ last_pages: lastPages.pages, last_sending_ms: lastPages.sending_ms });
        }
        await ch.send(FrameType.Complete);
        mark('complete sent');
        // (no state changes with it, the final state is sent already; and the event's subscribers
        // run while the destination takes the last pages, not before they go)
        if (lastPages) this.vm.store.dispatch(migrationEvents.memoryIteration({ id: ++this.iteration, pages: lastPages.pages, bytes: lastPages.bytes }));
        this.phase = 'completing';
        await ch.expect(FrameType.Ready);
        mark('destination ready');
        if (this.cancelled) throw new MigrationError(this.cancelled);
        // From here the destination may run the VM: this side never resumes it on its own.
        this.committed = true;
        await ch.send(FrameType.Commit);
        try {
          await ch.expect(FrameType.Running);
        } catch (e) {
          return this.afterCommitFailure(e, machine, wasPaused);
        }
        this.downtimeMs = Date.now() - pausedAt;
        return true;
      });
      if (!ok) return false;
      this.phase = 'finished';
      ch.close();
      for (const x of this.extra) x.close();
      this.vm.log.info({ downtime_ms: this.downtimeMs, total_ms: Date.now() - this.startedAt, bytes: this.bytesWritten }, 'migration finished');
      this.vm.store.dispatch(
        migrationEvents.finished({ downtime_ms: this.downtimeMs!, total_ms: Date.now() - this.startedAt, bytes: this.bytesWritten, iterations: this.iteration }),
      );
      return true;
    } catch (e) {
      const reason = this.cancelled ?? errorText(e);
      this.abortAll(reason);
      if (locksReleased && !this.committed) await this.retakeDiskLocks(this.machineAtStart!);
      if (paused && !this.committed) {
        try {
          this.machineAtStart!.resume();
        } catch (again) {
          this.vm.log.error({ err: again }, 'the guest could not run again after the failed migration');
        }
      }
      this.machineAtStart?.throttle(0);
      this.stopDirtyLogging();
      return this.fail(reason);
    } finally {
      steps?.log(this.vm.log, 'source');
      clearTimeout(this.timeoutTimer);
      // (a failed migration's source runs on, and its progress stays readable: the frame
      // buffers, up to nine of 16 MiB over several connections, are not kept for it)
      this.builder = undefined;
      this.fanOut = undefined;
    }
  }

  /**
   * The migration failed: KVM stops logging the guest's writes (while it logs a slot it maps
   * it in 4 KiB pages only), as before the migration. A machine that is gone needs nothing.
   */
  private stopDirtyLogging(): void {
    const m = this.vm.machine();
    if (!m || m !== this.machineAtStart || this.opts.local) return;
    try {
      m.dirtyLogging(false);
    } catch (e) {
      this.vm.log.warn({ err: e }, 'could not stop the dirty log after the failed migration');
    }
  }

  /**
   * The migration failed after the images' locks were let go: take them back before the guest
   * writes again. A destination that took them lets them go as it discards the VM; it is given
   * a few seconds, and after that the guest runs on with the lock still missing (logged).
   */
  private async retakeDiskLocks(machine: SourceMachine): Promise<void> {
    const deadline = Date.now() + RETAKE_LOCKS_MS;
    for (;;) {
      try {
        machine.takeDiskLocks();
        return;
      } catch (e) {
        if (Date.now() >= deadline) {
          this.vm.log.error({ err: errorText(e) }, 'a disk image lock could not be taken back after the failed migration');
          return;
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /**
   * After Commit the destination may already run the VM. Only if its end of the connection
   * closed (the process is gone) may the guest run here again; a silent destination may be
   * running it, so the guest stays paused here and the operator decides.
   */
  private afterCommitFailure(e: unknown, machine: SourceMachine, wasPaused: boolean): boolean {
    const closed = e instanceof MigrationPeerError && e.peerGone;
    if (closed && !wasPaused) {
      machine.resume();
      this.fail(`the destination went away after taking the VM over (${errorText(e)}); the guest runs here again`);
    } else {
      this.fail(`the destination did not confirm that the VM runs there (${errorText(e)}); the guest stays paused here so it never runs twice`);
    }
    return false;
  }

  private fail(reason: string): false {
    if (this.phase === 'failed') return false;
    this.phase = 'failed';
    this.error = reason;
    this.vm.log.warn({ reason }, 'migration failed');
    this.vm.store.dispatch(migrationEvents.failed({ reason }));
    return false;
  }

  /**
   * Fill Memory frames through `fill` and send them; returns pages and bytes sent, and where the
   * time went (`ms` in all, `sending_ms` of it waiting for the link to take the frames).
   */
  private async sendPages(fill: (b: MemoryFrameBuilder, flush: () => Promise<void>) => Promise<void>, spread = true): Promise<{ pages: number; bytes: number; ms: number; sending_ms: number }> {
    // One builder for the whole migration: its 16 MiB buffer is not allocated again in the pause.
    const b = (this.builder ??= new MemoryFrameBuilder());
    const pagesBefore = b.pages;
    const before = this.bytesWritten;
    const started = performance.now();
    let sendingMs = 0;
    const fanOut = spread ? this.fanOut : undefined;
    const flush = async () => {
      const t = performance.now();
      if (!b.empty) {
        // (over several connections the builder fills another buffer while this one is sent)
        if (fanOut) await fanOut.send(b.handOver(), (p) => b.giveBack(p));
        else await this.channel!.sendFlushed(FrameType.Memory, b.take());
      }
      sendingMs += performance.now() - t;
      if (this.cancelled) throw new MigrationError(this.cancelled);
    };
    await fill(b, flush);
    await flush();
    if (fanOut) {
      const t = performance.now();
      await fanOut.drain();
      sendingMs += performance.now() - t;
    }
    return { pages: b.pages - pagesBefore, bytes: this.bytesWritten - before, ms: Math.round(performance.now() - started), sending_ms: Math.round(sendingMs) };
  }

  /**
   * Wait until the destination has nothing left to do of what came before the pause: it has
   * checked the state and readied its final checks (Prepared; during the memory rounds, it has
   * long since) and, when it says so, written every round into RAM. A destination still writing
   * the first round's last frames (up to 48 MiB it read ahead) did that inside the pause: on
   * a real CPU that was up to 20 ms of a 5 ms pause.
   */
  private async destinationCaughtUp(): Promise<void> {
    const started = performance.now();
    const ch = this.channel!;
    let prepared = false;
    const pending = () => this.destinationAppliesRounds && this.roundsApplied < this.roundFrames;
    while (!prepared || pending()) {
      const f = await ch.next();
      if (f.type === FrameType.Prepared && !prepared) prepared = true;
      else if (f.type === FrameType.RoundApplied && pending()) {
        // (the rounds are applied in order: one out of turn is a destination not following along)
        const { round } = (frameJson(f) ?? {}) as { round?: unknown };
        if (round !== this.roundsApplied) throw new MigrationProtocolError(`RoundApplied for round ${String(round)} where round ${this.roundsApplied} was next`);
        this.roundsApplied++;
      } else throw new MigrationProtocolError(`expected a Prepared or RoundApplied frame, got ${FrameType[f.type]}`);
    }
    this.vm.log.debug({ ms: Math.round(performance.now() - started), rounds: this.roundsApplied }, 'migration: destination caught up');
  }

  /**
   * Run the code of the coming pause once while the guest still runs, on stand-in data: the
   * save (SourceMachine.rehearseSave), the last round's page scan (over empty bitmaps: nothing
   * is found or sent) and the final state patch (encoded, not sent). Code that runs once per
   * migration is otherwise compiled inside the pause, and where the CPU is slow (an emulated
   * one most of all) that was a large part of it. Only a rehearsal: a failure is logged.
   */
  private async rehearsePause(): Promise<void> {
    const started = performance.now();
    try {
      // (the guest still runs and this thread serves its exits: each part lets them through after it)
      const between = () => new Promise<void>((r) => setImmediate(r));
      const machine = this.checkMachine();
      const after = machine.rehearseSave?.(this.vm.store.getState());
      await between();
      if (after) encodeJsonFrame(FrameType.Final, { patches: diffState(this.sentState!, after) }, this.channel!.checksum);
      await between();
      if (!this.opts.local) {
        const empty = machine.memory.regions.map((r) => new Uint8Array(Math.ceil(r.size / PAGE / 8)));
        await addDirtyPages((this.builder ??= new MemoryFrameBuilder()), machine.memory, [empty, empty], async () => undefined);
      }
    } catch (e) {
      if (e instanceof MigrationError) throw e;
      this.vm.log.debug({ err: e }, 'migration: the rehearsal of the pause failed');
    }
    // (it holds the thread that serves the running guest's exits: the guest may see it)
    this.vm.log.debug({ ms: Math.round(performance.now() - started) }, 'migration: pause rehearsed');
  }

  /**
   * What is left fits the downtime, but would one more round make the pause shorter still? It
   * would when the guest dirtied at most half of what the round just sent (the next round is
   * shorter, and dirties less again) and what is left is more than a small last round. An idle
   * guest leaves thousands of pages dirty behind the long first round, and sending them inside
   * the pause was most of that pause; a guest that dirties as fast as the link goes finishes
   * as soon as it fits, as before.
   */
  private worthAnotherRound(dirtyPages: number, sentPages: number): boolean {
    return dirtyPages > SMALL_LAST_ROUND_PAGES && dirtyPages * 2 <= sentPages && this.shrinkingRounds < MAX_SHRINKING_ROUNDS;
  }

  /** (where a round's time goes: scanning and copying here, or waiting for the link to take it) */
  private logRound(sent: { pages: number; ms: number; sending_ms: number }): void {
    this.vm.log.debug({ pages: sent.pages, ms: sent.ms, sending_ms: sent.sending_ms }, 'migration: pages sent');
  }

  /**
   * Rounds while the guest runs. Returns the dirty bitmaps read last and not sent yet: the
   * final round sends them with whatever the pause adds.
   */
  private async memoryRounds(): Promise<Uint8Array[]> {
    let machine = this.checkMachine();
    this.phase = 'memory';
    machine.dirtyLogging(true);
    machine.dirtyBitmaps(); // start the log afresh (the VMM's bitmap too): round 0 sends everything
    let roundStart = Date.now();
    let sent = await this.sendPages((b, flush) => addAllNonZeroPages(b, machine.memory, flush));
    this.logRound(sent);
    await endRound(this.extra, this.roundEnds++, false);
    await this.sendPatches(FrameType.Round, { iteration: 0 });
    this.roundFrames++;
    this.vm.store.dispatch(migrationEvents.memoryIteration({ id: 0, pages: sent.pages, bytes: sent.bytes }));
    for (;;) {
      machine = this.checkMachine();
      const bitmaps = machine.dirtyBitmaps();
      const now = Date.now();
      const seconds = Math.max(0.001, (now - roundStart) / 1000);
      const dirty = countDirtyPages(bitmaps) * PAGE;
      this.linkRate = sent.bytes / seconds;
      this.dirtyRate = dirty / seconds;
      this.bytesRemaining = dirty;
      const estimateMs = (dirty / Math.max(1, this.linkRate)) * 1000;
      this.vm.log.debug({ round: this.iteration, dirty_pages: dirty / PAGE, estimate_ms: Math.round(estimateMs) }, 'migration: dirty after the round');
      if (this.forceFinal || this.iteration + 1 >= MAX_ROUNDS) return bitmaps;
      if (estimateMs <= this.opts.downtime_ms) {
        if (!this.worthAnotherRound(dirty / PAGE, sent.pages)) return bitmaps;
        this.shrinkingRounds++;
      }
      // Auto-converge: in the round just sent the guest dirtied more than half of what the
      // link carried, so the rounds would shrink slowly or not at all; take vCPU time away
      // from it, a step more each round this persists (round 0, the full copy, says nothing).
      if (this.iteration >= 1 && dirty > 0.5 * sent.bytes && this.throttlePercent < THROTTLE_MAX) {
        this.throttlePercent = Math.min(THROTTLE_MAX, this.throttlePercent + THROTTLE_STEP);
        machine.throttle(this.throttlePercent);
        this.vm.log.info({ throttle_percent: this.throttlePercent, dirty_rate: Math.round(this.dirtyRate), link_rate: Math.round(this.linkRate) }, 'migration: throttling the vCPUs to converge');
      }
      this.iteration++;
      roundStart = now;
      sent = await this.sendPages((b, flush) => addDirtyPages(b, machine.memory, [bitmaps], flush));
      this.logRound(sent);
      await endRound(this.extra, this.roundEnds++, false);
      await this.sendPatches(FrameType.Round, { iteration: this.iteration });
      this.roundFrames++;
      this.vm.store.dispatch(migrationEvents.memoryIteration({ id: this.iteration, pages: sent.pages, bytes: sent.bytes }));
    }
  }
}

export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
