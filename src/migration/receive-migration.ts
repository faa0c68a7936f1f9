// The destination side of a live migration. Everything the source sends is untrusted: the
// handshake is checked before anything is set up, every frame is verified (frames.ts), pages
// must fall inside the announced RAM, and the state - the source's whole store, kept here as a
// shadow the Round/Final patches are applied to - passes the same upgraders and checks as a
// restored snapshot before a VM is built from it. Nothing is replayed: the VM is constructed
// from that state and the received RAM. Any failure discards it all; the VMM can receive again.
import type net from 'node:net';
import type { Logger } from 'pino';
import { sameCpuid } from '../boot/cpuid';
import { withDefaults, type VmConfig } from '../config/vm-config';
import type { GuestMemory } from '../memory/guest-memory';
import { native, type CpuidEntry } from '../native/kvm';
import {
  applyStatePatchesInPlace,
  migrationEvents,
  upgradeState,
  validateState,
  type RamRegionState,
  type RootState,
  type SavedKvmState,
  type SavedVcpuState,
  type StatePatch,
  type Store,
} from '../state';
import { FrameChannel } from './frame-channel';
import { loadTlsDir, tlsServer, type TlsMaterial } from './migration-tls';
import { PauseSteps } from './pause-steps';
import { CHECKSUM_NAMES, FrameType, MEMORY_PAYLOAD_MAX_BYTES, MigrationProtocolError, frameJson } from './frames';
import { PayloadBuffers } from './payload-buffers';
import { MIGRATION_PROTOCOL_VERSION, checkHello, type Hello } from './handshake';
import { MemoryFrameWriter } from './memory-frames';
import { CONNECTION_UNREAD_BYTES, MAX_GRANTED_CONNECTIONS, RoundBarrier, checkJoin, newJoinToken, readMemoryStream } from './memory-streams';
import type { MigrationPhase, MigrationProgress, ReceiveMigrationOptions } from './migration-options';
import { describeAddress, listenMigration, parseMigrationUrl, type MigrationAddress } from './migration-url';
import { receivePreamble } from './preamble';
import { checkSavedConfig, checkSavedState } from './saved-vm';
import { MigrationError, errorText } from './send-migration';

/** A machine being received into: RAM first, the rest once the state is complete. */
export interface IncomingMachine {
  readonly memory: GuestMemory;
  /** create the vCPUs and park their threads now, while the source still runs the guest (their state comes at the end) */
  prepareVcpus(count: number): Promise<void>;
  /** open the host ends of the VM's devices (disk images, an entropy source) from its config */
  openBackends(config: VmConfig): Promise<void>;
  /** what its new vCPUs and KVM objects would save (after prepareVcpus) */
  sampleSavedState(cpuid: readonly CpuidEntry[]): { vcpus: Record<string, SavedVcpuState>; kvm: SavedKvmState };
  /** set a sampled vCPU state back through the restore path, with the CPUID the source announced (Machine.rehearseRestore) */
  rehearseRestore(sample: SavedVcpuState, cpuid: readonly CpuidEntry[]): void;
  /** attach the devices' host side (routes, doorbells) as the state received so far has them (Machine.prepareDevices) */
  prepareDevices(state: RootState, config: VmConfig): void;
  completeIncoming(state: RootState, mark?: (step: string) => void): void;
  /** take the disk images' locks, which the source let go before it sent Complete */
  takeDiskLocks(): void;
  /** start the vCPU threads parked: after Commit, running the guest is only waking them */
  startParked(): Promise<void>;
  destroy(): Promise<void>;
}

export interface DestinationVm {
  store: Store<RootState>;
  log: Logger;
  /** RAM for the announced layout (local: mapping the source's memfds) */
  prepare(regions: readonly RamRegionState[], fds?: readonly number[]): IncomingMachine;
  /**
   * Problems that keep this host from running a guest given this CPUID and these saved MSRs
   * (empty when it can).
   */
  cpuProblems(cpuid: readonly CpuidEntry[], msrIndices: readonly number[]): string[];
  /** Make the built machine and its state the VMM's VM, running unless it was paused. */
  install(machine: IncomingMachine, state: RootState): Promise<void>;
}

/** the source must keep talking while it sends (it builds no VM on its side) */
const SOURCE_IDLE_MS = 60_000;
const PREAMBLE_TIMEOUT_MS = 10_000;
/** how long the source's extra connections (connections > 1) may take to join after the Accept */
const JOIN_TIMEOUT_MS = 30_000;
const MAX_PATH_DEPTH = 64;
const RESERVED_KEYS = new Set(['__proto__', 'constructor', 'prototype']);

function checkPatches(raw: unknown, where: string): StatePatch[] {
  const list = (raw as { patches?: unknown })?.patches;
  if (!Array.isArray(list)) throw new MigrationProtocolError(`${where}: no patch list`);
  for (const p of list) {
    const ok =
      typeof p === 'object' && p !== null &&
      (p.op === 'add' || p.op === 'replace' || p.op === 'remove') &&
      Array.isArray(p.path) && p.path.length <= MAX_PATH_DEPTH &&
      p.path.every((k: unknown) => (typeof k === 'string' && !RESERVED_KEYS.has(k)) || (Number.isSafeInteger(k) && (k as number) >= 0)) &&
      (p.op === 'remove' || 'value' in p);
    if (!ok) throw new MigrationProtocolError(`${where}: malformed state patch`);
  }
  return list as StatePatch[];
}

/**
 * Runs of the final checks on the State frame (rehearseFinalChecks), between the first round's
 * frames. Ten runs were kept while each first run generated the checks; with the checks the
 * build generated, two did as well in the pause and left the first round 0.6 s shorter in the
 * nested lab (idle 1 GiB, four migrations each, one boot: the check in the pause 23-35 against
 * 30-38 ms, total 2.49 against 3.07 s, medians). TERN_MIGRATION_REHEARSALS sets another count
 * (the migration bench compares them).
 */
const FINAL_CHECK_REHEARSALS = 2;

/** (read when a migration comes, not when the module loads: a startup snapshot would keep the build's) */
function finalCheckRehearsals(): number {
  const setting = process.env.TERN_MIGRATION_REHEARSALS;
  const n = Number(setting);
  return setting !== undefined && setting !== '' && Number.isInteger(n) && n >= 0 && n <= 100 ? n : FINAL_CHECK_REHEARSALS;
}

export class MigrationReceiver {
  private phase: MigrationPhase = 'listening';
  private readonly startedAt = Date.now();
  private server?: net.Server;
  private channel?: FrameChannel;
  private machine?: IncomingMachine;
  private fds: number[] = [];
  private iteration = 0;
  /** writes the Memory frames into RAM behind the reading of the next ones */
  private ramWriter?: MemoryFrameWriter;
  /** the state this machine's own vCPUs and KVM objects would save (rehearseFinalChecks) */
  private sample?: { vcpus: Record<string, SavedVcpuState>; kvm: SavedKvmState };
  private error?: string;
  private cancelled?: string;
  private rejectWait?: (e: Error) => void;
  private tls?: TlsMaterial;
  /** connections > 1: the extra connections awaited (by index), and the token that admits them */
  private joins?: { token: string; open: Set<number>; timer: NodeJS.Timeout; joining: number };
  /** the extra connections, and their readers (memory-streams.ts) */
  private extra: FrameChannel[] = [];
  private readers: Promise<void>[] = [];
  private barrier?: RoundBarrier;
  /** why an extra connection failed the migration */
  private streamError?: string;
  /** the half-received VM is being discarded: no frame is written into its RAM any more */
  private discarding = false;
  /**
   * Memory payloads of every connection, used again once in RAM: as many as can be under way
   * at once (two waiting to be written, one being read per connection) are kept.
   */
  private readonly payloads = new PayloadBuffers(MEMORY_PAYLOAD_MAX_BYTES, 4);

  constructor(
    private readonly vm: DestinationVm,
    private readonly opts: ReceiveMigrationOptions,
  ) {}

  get active(): boolean {
    return this.phase !== 'finished' && this.phase !== 'failed';
  }

  progress(): MigrationProgress {
    return {
      role: 'receive',
      phase: this.phase,
      url: this.opts.receiver_url,
      local: this.fds.length > 0,
      iteration: this.iteration,
      bytes_transferred: (this.channel?.bytesRead ?? 0) + this.extra.reduce((n, ch) => n + ch.bytesRead, 0),
      bytes_remaining: 0,
      dirty_rate_bytes_per_s: 0,
      link_rate_bytes_per_s: 0,
      estimated_downtime_ms: 0,
      throttle_percent: 0,
      elapsed_ms: Date.now() - this.startedAt,
      ...(this.error !== undefined && { error: this.error }),
    };
  }

  cancel(reason = 'cancelled by the client'): void {
    if (!this.active) throw new MigrationError('no migration is in progress');
    if (this.phase === 'finished') throw new MigrationError('too late to cancel: the VM runs here');
    this.cancelled = reason;
    this.abortAll(reason);
    this.rejectWait?.(new MigrationError(reason));
  }

  private abortAll(reason: string): void {
    this.channel?.abort(reason);
    for (const ch of this.extra) ch.abort(reason);
    this.barrier?.fail(new MigrationError(reason));
  }

  /** Listen, receive one VM, build it. Resolves when it runs here; rejects after discarding it all. */
  async receive(): Promise<void> {
    // What the request itself gets wrong (the URL, a TLS directory this side cannot use) fails
    // it before anything listens or is reported: no migration was received, nor begun.
    let address: MigrationAddress;
    let tlsMaterial: TlsMaterial | undefined;
    try {
      address = parseMigrationUrl(this.opts.receiver_url, 'receiver_url');
      if (this.opts.tls_dir !== undefined && address.kind !== 'tcp') throw new MigrationError('TLS (tls_dir) is for tcp: URLs only');
      tlsMaterial = this.opts.tls_dir !== undefined ? loadTlsDir(this.opts.tls_dir, 'server') : undefined;
    } catch (e) {
      this.phase = 'failed';
      this.error = errorText(e);
      throw e;
    }
    this.tls = tlsMaterial;
    try {
      this.server = await listenMigration(address);
      this.vm.store.dispatch(migrationEvents.receiveReady({ receiver_url: this.opts.receiver_url }));
      this.vm.log.info({ url: describeAddress(address) }, 'waiting for a migration');
      let socket = await this.accept();
      // One source per receive: nobody else gets in while this one is handled, but for the
      // extra connections it asks for (the listener closes once its Hello says how many).
      this.server.on('connection', (s: net.Socket) => this.laterConnection(s));
      // (a source that fails the TLS handshake fails the receive, as any broken source does)
      if (tlsMaterial) socket = await this.secure(socket, tlsMaterial);
      if (address.kind === 'unix') {
        const pre = await receivePreamble(socket, PREAMBLE_TIMEOUT_MS);
        this.fds = pre.fds;
        if (pre.protocol !== MIGRATION_PROTOCOL_VERSION) {
          throw new MigrationProtocolError(`protocol version ${pre.protocol} is not supported (this VMM speaks ${MIGRATION_PROTOCOL_VERSION})`);
        }
      }
      // (TLS reads through its own socket: the large reads are for the plain connection's handle)
      this.channel = new FrameChannel(socket, { idleTimeoutMs: SOURCE_IDLE_MS, peer: 'source', largeReads: !tlsMaterial, payloads: this.payloads, maxBufferedBytes: CONNECTION_UNREAD_BYTES });
      this.channel.socket.resume();
      await this.receiveVm();
    } catch (e) {
      const reason = this.cancelled ?? this.streamError ?? errorText(e);
      this.abortAll(reason);
      await this.discard();
      this.phase = 'failed';
      this.error = reason;
      this.vm.log.warn({ reason }, 'migration receive failed');
      this.vm.store.dispatch(migrationEvents.receiveFailed({ reason }));
      throw e instanceof MigrationError ? e : new MigrationError(reason);
    } finally {
      this.server?.close();
      if (this.joins) clearTimeout(this.joins.timer);
      this.closeFds();
      this.payloads.close();
    }
  }

  /**
   * A connection after the source's first: one of the extra connections it announced, joining
   * with the Accept's token, or else nobody's, closed. A connection that fails to join does
   * not fail the migration; the joins' timeout does. Connections still to say whom they join
   * are few (two more than the joins awaited) and must say it within PREAMBLE_TIMEOUT_MS: a
   * stranger holds neither sockets nor read buffers for long.
   */
  private laterConnection(socket: net.Socket): void {
    const joins = this.joins;
    if (!joins || this.discarding || joins.joining >= joins.open.size + 2) {
      socket.destroy();
      return;
    }
    joins.joining++;
    void (async () => {
      let ch: FrameChannel | undefined;
      let late: NodeJS.Timeout | undefined;
      try {
        const s = this.tls ? await tlsServer(socket, this.tls) : socket;
        ch = new FrameChannel(s, { idleTimeoutMs: SOURCE_IDLE_MS, peer: 'source', largeReads: !this.tls, maxBufferedBytes: CONNECTION_UNREAD_BYTES, payloads: this.payloads });
        ch.socket.resume();
        const joining = ch;
        late = setTimeout(() => joining.abort(`no Join within ${PREAMBLE_TIMEOUT_MS / 1000} s`), PREAMBLE_TIMEOUT_MS);
        const index = checkJoin(frameJson(await ch.expect(FrameType.Join)), joins.token, joins.open);
        if (this.discarding || this.joins !== joins) throw new MigrationError('the migration ended');
        joins.open.delete(index);
        this.extra.push(ch);
        const stream = ch;
        this.vm.log.debug({ connection: index }, 'migration: a memory connection joined');
        this.readers.push(
          readMemoryStream(stream, index, this.barrier!, (payload) => this.addPages(payload)).then(
            (frames) => {
              this.vm.log.debug({ connection: index, frames, bytes: stream.bytesRead }, 'migration: a memory connection ended');
              stream.close();
            },
            (e: unknown) => this.streamFailed(`memory connection ${index}: ${errorText(e)}`),
          ),
        );
        if (joins.open.size === 0) {
          clearTimeout(joins.timer);
          this.server?.close();
        }
      } catch (e) {
        this.vm.log.warn({ reason: errorText(e) }, 'migration: a connection that did not join the migration was closed');
        if (ch) ch.abort(errorText(e));
        else socket.destroy();
      } finally {
        clearTimeout(late);
        joins.joining--;
      }
    })();
  }

  /** An extra connection failed or never joined, or a write into RAM failed: so does the migration (unless it runs here already). */
  private streamFailed(reason: string): void {
    if (this.streamError !== undefined || this.phase === 'finished' || this.phase === 'failed') return;
    this.streamError = reason;
    this.abortAll(reason);
  }

  /** A Memory frame, from any connection, into RAM behind the reading of the next ones. */
  private addPages(payload: Buffer): Promise<number> {
    if (this.discarding || !this.machine) return Promise.reject(new MigrationError('the migration ended'));
    return (this.ramWriter ??= new MemoryFrameWriter(this.machine.memory)).add(payload, () => this.payloads.give(payload));
  }

  private accept(): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      this.rejectWait = reject;
      this.server!.once('connection', (s: net.Socket) => {
        this.rejectWait = undefined;
        resolve(s);
      });
      this.server!.once('error', (e) => reject(new MigrationError(`listening failed: ${e.message}`)));
    });
  }

  /** The TLS handshake with the source, which a cancel ends at once (not at its timeout). */
  private async secure(socket: net.Socket, material: TlsMaterial): Promise<net.Socket> {
    const secured = tlsServer(socket, material);
    try {
      return await Promise.race([secured, new Promise<never>((_, reject) => (this.rejectWait = reject))]);
    } catch (e) {
      socket.destroy();
      // (the handshake fails too once its socket is gone: that is this failure, not another)
      secured.catch(() => undefined);
      throw e;
    } finally {
      this.rejectWait = undefined;
    }
  }

  private closeFds(): void {
    for (const fd of this.fds.splice(0)) {
      try {
        native().closeFd(fd);
      } catch {
        /* already closed */
      }
    }
  }

  private async discard(): Promise<void> {
    // (RAM writes still running use the machine's memfds: they end before it is released, and
    // the extra connections' readers add none after them)
    this.discarding = true;
    for (const ch of this.extra) ch.close();
    await Promise.allSettled(this.readers);
    await this.ramWriter?.drain().catch(() => undefined);
    const m = this.machine;
    this.machine = undefined;
    await m?.destroy().catch((err) => this.vm.log.error({ err }, 'releasing the half-received VM failed'));
  }

  /**
   * Run the final checks on a state as complete as the final one will be (this machine's own
   * new vCPUs and KVM objects stand in for the saved ones), `times` times: the code they run is
   * compiled now, while the source still runs the guest, and not in the pause. One run leaves it
   * in V8's interpreter (in the nested lab, while the first run still generated the checks, the
   * second took 18-49 ms and the tenth 7-16 ms).
   * Only a rehearsal: what it finds is logged, never held against the source.
   */
  private async rehearseFinalChecks(state: unknown, config: VmConfig, hello: Hello, times: number): Promise<void> {
    try {
      if (!this.sample) {
        this.sample = this.machine!.sampleSavedState(hello.cpuid);
        this.machine!.rehearseRestore(this.sample.vcpus['0'], hello.cpuid);
      }
      const sample = this.sample;
      for (let i = 0; i < times; i++) {
        // (the memory frames queued meanwhile are not kept waiting for all the runs)
        if (i) await new Promise<void>((r) => setImmediate(r));
        // (a copy: the checks freeze what they pass, and the shadow still takes the rounds' patches)
        const copy = structuredClone(state) as RootState;
        this.finalChecks({ ...copy, vcpus: { ...copy.vcpus, saved: sample.vcpus }, kvm: { ...copy.kvm, saved: sample.kvm } }, config, hello);
      }
    } catch (e) {
      this.vm.log.debug({ err: e }, 'migration: the rehearsal of the final checks failed');
    }
  }

  /** The checks of the final state before the VM is built from it; returns it validated. */
  private finalChecks(shadow: unknown, config: VmConfig, hello: Hello): RootState {
    const error = (m: string) => new MigrationProtocolError(m);
    const { state } = checkSavedState(shadow, { config, statuses: ['Running', 'Paused'], where: 'the migrated state', configWhere: 'the migrated VM config' }, error);
    const layout = state.memory.regions;
    if (layout.length !== hello.regions.length || layout.some((r, i) => r.guestAddress !== hello.regions[i].guestAddress || r.size !== hello.regions[i].size)) {
      throw error('the migrated state\'s RAM regions differ from the ones the handshake announced');
    }
    // The handshake checked the CPU the source announced; the saved vCPU state is what will be set.
    // (its CPUID entries and MSR indices are plain numbers the schema has checked: the rest of
    // the vCPU state need not be decoded for this, inside the pause)
    const vcpu0 = state.vcpus.saved['0'];
    const announcedMsrs = new Set(hello.msrIndices);
    // (the usual case costs no second check: the very CPUID and MSRs the handshake accepted)
    const asAnnounced = sameCpuid(vcpu0.cpuid, hello.cpuid) && vcpu0.msrs.every((m) => announcedMsrs.has(m.index));
    const cpuProblems = asAnnounced ? [] : this.vm.cpuProblems(vcpu0.cpuid, vcpu0.msrs.map((m) => m.index));
    if (cpuProblems.length) throw new MigrationError(`this host cannot run the guest's CPU: ${cpuProblems.join('; ')}`);
    return state;
  }

  private async receiveVm(): Promise<void> {
    const ch = this.channel!;
    const error = (m: string) => new MigrationProtocolError(m);
    this.phase = 'receiving';

    const hello: Hello = checkHello(frameJson(await ch.expect(FrameType.Hello)), { fds: this.fds.length });
    // (where the time before the memory rounds goes: the source's first round waits for it)
    const setup = new PauseSteps();
    const connections = Math.min(hello.connections ?? 1, MAX_GRANTED_CONNECTIONS);
    if (connections > 1 && !this.opts.receiver_url.startsWith('tcp:')) throw error('more than one connection is for tcp: URLs only');
    if (connections === 1) this.server?.close();
    const problems = this.vm.cpuProblems(hello.cpuid, hello.msrIndices);
    if (problems.length) throw new MigrationError(`this host cannot run the guest's CPU: ${problems.join('; ')}`);
    this.machine = this.vm.prepare(hello.regions, hello.local ? this.fds : undefined);
    this.closeFds(); // the slots hold their own duplicates
    setup.mark('RAM mapped');
    // (the checksums beyond CRC-32 this side reads: the source may use them from here on)
    let join: { connections: number; join: string } | undefined;
    if (connections > 1) {
      join = { connections, join: newJoinToken() };
      this.barrier = new RoundBarrier(connections);
      const timer = setTimeout(() => this.streamFailed(`${this.joins?.open.size} of ${connections - 1} extra connections did not join within ${JOIN_TIMEOUT_MS / 1000} s`), JOIN_TIMEOUT_MS);
      timer.unref();
      this.joins = { token: join.join, open: new Set(Array.from({ length: connections - 1 }, (_, i) => i + 1)), timer, joining: 0 };
    }
    await ch.sendJson(FrameType.Accept, { protocol: MIGRATION_PROTOCOL_VERSION, checksums: Object.values(CHECKSUM_NAMES), ...join, ...(hello.roundsApplied && { rounds_applied: true }) });
    this.vm.store.dispatch(migrationEvents.receiveStarted({ receiver_url: this.opts.receiver_url }));
    this.vm.log.info({ source: hello.tern, local: hello.local, schema: hello.schemaVersion }, 'receiving a migration');

    const config: VmConfig = checkSavedConfig(frameJson(await ch.expect(FrameType.Config)), 'the migrated VM config', error);
    setup.mark('config received');
    // The final state must carry this same config (checked at Complete), so its vCPUs can exist
    // already: creating them is work the guest's pause does not wait for.
    await this.machine.prepareVcpus(withDefaults(config).cpus.boot_vcpus);
    // Disk images and consoles open now, not while the guest is paused: opening one takes I/O.
    await this.machine.openBackends(config);
    setup.mark('vCPUs and backends ready');
    let shadow: unknown = frameJson(await ch.expect(FrameType.State));
    if (typeof shadow !== 'object' || shadow === null || Array.isArray(shadow)) throw error('State frame: not an object');
    if ((shadow as { schemaVersion?: unknown }).schemaVersion !== hello.schemaVersion) throw error('State frame: its schema version is not the one the handshake announced');
    // Check the state as it arrives, so a bad one is refused before any memory moves; this
    // also readies the validators, so the final check, made while the guest is paused
    // at the source, takes a fraction of a millisecond instead of compiling them then.
    let upgraded: RootState;
    try {
      upgraded = upgradeState(shadow) as RootState;
      validateState(upgraded);
    } catch (e) {
      throw error(`State frame: ${errorText(e)}`);
    }
    setup.mark('state checked');
    // (the state was checked just now; the final state's build brings these up to date)
    this.machine.prepareDevices(upgraded, config);
    setup.mark('devices prepared');
    // The rehearsal runs between the first round's Memory frames, not before them: the source
    // sends them from the State frame on, and a destination busy rehearsing left its link
    // idle (in the nested lab the source's first round waited 0.6-0.9 s for it). The source
    // pauses the guest only once it has Prepared: the rehearsal is work its pause would
    // otherwise wait for (a local migration has no memory rounds to hide it behind).
    let prepared = false;
    const preparing = this.rehearseFinalChecks(upgraded, config, hello, finalCheckRehearsals()).then(() => {
      setup.mark('final checks rehearsed');
      setup.logAs(this.vm.log, 'migration: receive set up');
      prepared = true;
      return ch.sendJson(FrameType.Prepared, {});
    });
    // (a send that fails fails the channel: the loop below hears of it from its next read)
    preparing.catch(() => undefined);

    let steps: PauseSteps | undefined;
    let built: RootState | undefined;
    let roundStart = performance.now();
    let ramWaitMs = 0;
    /** round ends of the control connection (memory-streams.ts): its Round frames, then Complete */
    let roundsEnded = 0;
    for (;;) {
      const f = await ch.next();
      if (f.type === FrameType.Memory) {
        if (hello.local) throw error('Memory frame in a local migration');
        const t = performance.now();
        await this.addPages(f.payload);
        ramWaitMs += performance.now() - t;
      } else if (built && (f.type === FrameType.Round || f.type === FrameType.Final)) {
        throw error(`${FrameType[f.type]} frame after the Final frame`);
      } else if (f.type === FrameType.Round || f.type === FrameType.Final) {
        if (f.type === FrameType.Final && !prepared) throw error('Final frame before this side was prepared');
        // (the source's guest is paused from here on: the steps time what this side does of it)
        if (f.type === FrameType.Final) steps = new PauseSteps();
        const body = frameJson(f);
        try {
          shadow = applyStatePatchesInPlace(shadow, checkPatches(body, FrameType[f.type]));
        } catch (e) {
          throw error(`${FrameType[f.type]} frame: its state patches do not apply (${errorText(e)})`);
        }
        if (f.type === FrameType.Final) {
          steps?.mark('patched');
          steps?.note({ final_bytes: f.payload.length });
          // The last pages follow the final state: the VM is built from it while they arrive
          // (building touches no guest RAM), and the source scans and sends them meanwhile.
          built = await this.build(shadow, config, hello, steps);
        } else {
          // (the other connections' frames of this round are all in before the next round's)
          await this.barrier?.arrive(0, roundsEnded++);
          // (where a round's time goes: waiting to write pages into RAM here, or waiting for the source)
          this.vm.log.debug({ round: this.iteration, ms: Math.round(performance.now() - roundStart), ram_wait_ms: Math.round(ramWaitMs) }, 'migration: round received');
          // (each round may be the last before the pause: the checks stay compiled, on the state as it now is)
          await this.rehearseFinalChecks(shadow, config, hello, 1);
          if (hello.roundsApplied) this.roundApplied(ch, this.iteration);
          this.iteration++;
          roundStart = performance.now();
          ramWaitMs = 0;
        }
      } else if (f.type === FrameType.Complete) {
        if (built) await this.barrier?.arrive(0, roundsEnded++, true);
        break;
      } else {
        throw error(`unexpected ${FrameType[f.type]} frame while receiving`);
      }
    }

    try {
      if (!built) throw error('Complete frame before the Final frame');
      steps?.mark('complete received');
      await this.ramWriter?.drain();
      steps?.mark('pages written');
      await this.run(ch, built, steps);
    } finally {
      steps?.log(this.vm.log, 'destination');
    }
  }

  /**
   * Tell the source once the round's pages are in RAM (every frame queued so far), without
   * holding up the reading of the next round's: the source pauses its guest only then.
   */
  private roundApplied(ch: FrameChannel, round: number): void {
    void (this.ramWriter?.drain() ?? Promise.resolve()).then(
      // (a send that fails fails the channel: the loop hears of it from its next read)
      () => ch.sendJson(FrameType.RoundApplied, { round }).catch(() => undefined),
      (e: unknown) => this.streamFailed(`writing guest RAM failed: ${errorText(e)}`),
    );
  }

  /** The Final frame arrived: check the final state and build the VM from it (its vCPUs stay parked). */
  private async build(shadow: unknown, config: VmConfig, hello: Hello, steps: PauseSteps | undefined): Promise<RootState> {
    const machine = this.machine;
    if (!machine) throw new Error('no machine to build the migrated VM in');
    const state = this.finalChecks(shadow, config, hello);
    steps?.mark('state checked');
    // (the source let the images go before it sent the final state; a disk another process
    // still holds fails the migration here, and the source resumes)
    machine.takeDiskLocks();
    machine.completeIncoming(state, (step) => steps?.mark(step));
    await machine.startParked();
    steps?.mark('machine built');
    return state;
  }

  /** Complete arrived (every page is in RAM): tell the source, and run the VM once it commits. */
  private async run(ch: FrameChannel, state: RootState, steps: PauseSteps | undefined): Promise<void> {
    const machine = this.machine!;
    const mark = (step: string) => steps?.mark(step);
    await ch.sendJson(FrameType.Ready, {});
    await ch.expect(FrameType.Commit);
    mark('committed');
    // The source has given the VM up: from here it is ours to run, whatever happens to the link.
    this.phase = 'finished';
    this.machine = undefined;
    try {
      await this.vm.install(machine, state);
    } catch (e) {
      this.machine = machine;
      this.phase = 'receiving';
      throw e;
    }
    mark('installed');
    await ch.sendJson(FrameType.Running, { status: state.vm.status }).catch((e) => this.vm.log.warn({ err: e }, 'could not tell the source the VM runs here'));
    ch.close();
    this.vm.log.info({ status: state.vm.status, rounds: this.iteration, bytes: ch.bytesRead }, 'migration received');
    this.vm.store.dispatch(migrationEvents.receiveFinished(null));
  }
}
