// The VMM: one store, at most one VM. Every lifecycle action is an event checked by the
// store's state machine first, so the CLI, the API and the guest itself (poweroff, reset)
// all go through the same path and the same rules.
import { netIdOf } from '../devices/virtio/vm-devices';
import type { Logger } from 'pino';
import { withDefaults, type ConsoleConfig, type VmConfig } from '../config/vm-config';
import type { GuestMemory } from '../memory/guest-memory';
import type { MigrationProgress, ReceiveMigrationOptions, SendMigrationOptions } from '../migration/migration-options';
import { MigrationReceiver } from '../migration/receive-migration';
import { MigrationError, MigrationSender } from '../migration/send-migration';
import { SnapshotError, readSnapshot, snapshotDirFromUrl, writeSnapshot } from '../migration/snapshot';
import { cpuCompatProblems } from '../migration/cpu-compat';
import { PauseSteps } from '../migration/pause-steps';
import { native, type CpuidEntry, type SeccompMode } from '../native/kvm';
import { createStore, vmConfigProblems, vmEvents, vmmEvents, type GuestStop, type RootState, type Store, type VmStatus } from '../state';
import { guestLog, type GuestLog } from '../util/guest-log';
import { TERN_VERSION } from '../version';
import { Machine, type MachineHealth, type MachineOptions, type MachineStop } from './machine';
import type { VcpuSample } from './vcpu-sample';
import { openDeviceBackends } from './device-backends';

/** Reading guest RAM without the means to change it. */
export type GuestMemoryReader = Pick<GuestMemory, 'size' | 'read' | 'readU8' | 'readU16' | 'readU32' | 'readU64'>;

/** Cloud Hypervisor's RestoreConfig, plus Tern's host-side overrides. */
export interface RestoreOptions {
  source_url: string;
  prefault?: boolean;
  resume?: boolean;
  memory_restore_mode?: 'copy' | 'ondemand';
  /** where the serial console goes now (a host setting, not part of the guest's state) */
  serial?: ConsoleConfig;
  /** the same for the virtio console */
  console?: ConsoleConfig;
  /**
   * the tap each named card opens instead of the one its snapshot names (Tern's addition), or,
   * with `fds` (net_fds), the queues of that tap handed to this process, which the VM then holds
   */
  net?: { id: string; tap: string; fds?: number[] }[];
}

/**
 * The restored state with the consoles' host ends the restoring client chose. The snapshot's
 * own choices stay otherwise; they passed vm.create's checks in readSnapshot, and a serial
 * file is opened only as a regular file, never through a symlink, created 0600.
 */
function withHostEnds(state: RootState, opts: Pick<RestoreOptions, 'serial' | 'console' | 'net'>): RootState {
  const config = state.vm.config!;
  if (opts.serial) {
    const was = config.serial?.mode ?? 'Null';
    // The UART exists or not according to the saved device state: it cannot appear or vanish.
    if ((was === 'Off') !== (opts.serial.mode === 'Off')) {
      throw new SnapshotError(`the serial port cannot be switched ${was === 'Off' ? 'on' : 'off'} on restore`);
    }
  }
  let net = config.net;
  for (const o of opts.net ?? []) {
    const at = (net ?? []).findIndex((n, i) => netIdOf(n, i) === o.id);
    if (at < 0) throw new SnapshotError(`restore: the snapshot has no net device '${o.id}'`);
    net = net!.map((n, i) => (i === at ? { ...n, tap: o.tap, ...(o.fds && { fds: o.fds }) } : n));
  }
  const next = { ...config, ...(opts.serial && { serial: opts.serial }), ...(opts.console && { console: opts.console }), ...(net && { net }) };
  const problems = vmConfigProblems(next);
  if (problems.length) throw new SnapshotError(`restore: ${problems.join('; ')}`);
  return { ...state, vm: { ...state.vm, config: next } } as RootState;
}

export interface VmmOptions {
  log: Logger;
  store?: Store<RootState>;
  /** the vCPU threads' seccomp filter action (default 'trap') */
  seccomp?: SeccompMode;
  /** cap of a serial output file, in bytes (default SERIAL_FILE_DEFAULT_MAX_BYTES) */
  serialFileMaxBytes?: number;
}

export class Vmm {
  readonly store: Store<RootState>;
  readonly log: Logger;
  /** lines the guest can trigger (resets, poweroffs, sleep requests), rate-limited */
  private readonly guestLog: GuestLog;
  private machine?: Machine;
  /** the migration in progress, or the last one (for vm.migration-progress) */
  private migration?: MigrationSender | MigrationReceiver;
  /** serializes lifecycle actions: a reboot requested by the guest must not race an API call */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: VmmOptions) {
    this.log = opts.log;
    this.guestLog = guestLog(opts.log);
    this.store = opts.store ?? createStore();
  }

  get state(): RootState {
    return this.store.getState();
  }

  /** The running machine's guest RAM (tests, snapshots); undefined while no machine exists. */
  guestMemory(): GuestMemoryReader | undefined {
    return this.machine?.memory;
  }

  /** The pseudo-terminals of consoles in pty mode, while a machine runs. */
  ptyPaths(): { serial?: string; console?: string } {
    return this.machine?.ptyPaths() ?? {};
  }

  /** The VM's status and, while a machine exists, Machine.health(): for a guest that seems stuck. */
  health(): { status: string } & Partial<MachineHealth> {
    return { status: this.store.getState().vm.status, ...this.machine?.health() };
  }

  /** Machine.sampleVcpus() while a machine runs: where each vCPU is in its guest (a health report's second part). */
  sampleVcpus(): Promise<{ samples: VcpuSample[][] } | { notSampled: string }> {
    if (!this.machine || this.store.getState().vm.status !== 'Running') return Promise.resolve({ notSampled: 'no VM is running' });
    return this.machine.sampleVcpus();
  }

  /** Bring what the devices counted on native threads into the store (before reading vm.counters). */
  collectDeviceCounters(): void {
    this.machine?.collectDeviceCounters();
  }

  private serialize<T>(action: () => Promise<T> | T): Promise<T> {
    const run = this.queue.then(action, action);
    this.queue = run.catch(() => undefined);
    return run;
  }

  create(config: VmConfig): Promise<void> {
    return this.serialize(() => {
      this.refuseWhileReceiving();
      this.store.dispatch(vmEvents.created(config));
    });
  }

  /** Cold add (vm.add-disk on a VM that is not running): the disk joins the config; the next boot opens it. */
  addDisk(disk: NonNullable<VmConfig['disks']>[number]): Promise<void> {
    return this.serialize(() => {
      this.refuseWhileReceiving();
      this.store.dispatch(vmEvents.diskAdded(disk));
    });
  }

  /** Cold add (vm.add-net on a VM that is not running): the card joins the config; the next boot opens its tap. */
  addNet(net: NonNullable<VmConfig['net']>[number]): Promise<void> {
    return this.serialize(() => {
      this.refuseWhileReceiving();
      this.store.dispatch(vmEvents.netAdded(net));
    });
  }

  boot(): Promise<void> {
    return this.serialize(async () => {
      this.store.dispatch(vmEvents.booting());
      try {
        await this.startMachine();
      } catch (e) {
        await this.destroyMachine();
        this.store.dispatch(vmEvents.operationFailed(errorMessage(e)));
        throw e;
      }
      this.store.dispatch(vmEvents.booted());
    });
  }

  /** Stop the guest (Cloud Hypervisor's vm.shutdown): the VM stays created and can boot again. */
  shutdown(source = 'vmm'): Promise<void> {
    return this.serialize(() => this.shutdownNow(source));
  }

  private async shutdownNow(source: string): Promise<void> {
    this.store.dispatch(vmEvents.shutdown(source));
    await this.destroyMachine();
  }

  reboot(source = 'vmm'): Promise<void> {
    return this.serialize(() => this.rebootNow(source));
  }

  private async rebootNow(source: string): Promise<void> {
    this.store.dispatch(vmEvents.rebooting(source));
    try {
      await this.destroyMachine();
      await this.startMachine();
    } catch (e) {
      // The old machine is gone and no new one runs: the VM is shut down, and says so.
      await this.destroyMachine();
      this.store.dispatch(vmEvents.operationFailed(errorMessage(e), 'Shutdown'));
      throw e;
    }
    this.store.dispatch(vmEvents.rebooted(source));
  }

  pause(): Promise<void> {
    return this.serialize(async () => {
      this.store.dispatch(vmEvents.pausing());
      const machine = this.liveMachine();
      try {
        this.log.debug(await machine.pause(), 'vCPUs paused and their state saved');
      } catch (e) {
        // Let the vCPUs run on, without the clock of some earlier pause; if even that fails,
        // the VM cannot go on.
        let status: VmStatus = 'Running';
        try {
          machine.resume({ restoreClock: false });
        } catch (again) {
          this.log.error({ err: again }, 'the vCPUs could not run again after a failed pause');
          await this.destroyMachine();
          status = 'Shutdown';
        }
        this.store.dispatch(vmEvents.operationFailed(errorMessage(e), status));
        throw e;
      }
      this.store.dispatch(vmEvents.paused());
    });
  }

  resume(): Promise<void> {
    return this.serialize(() => this.resumeNow());
  }

  private async resumeNow(): Promise<void> {
    this.store.dispatch(vmEvents.resuming());
    const machine = this.liveMachine();
    const stop = this.state.vm.guestStop;
    if (stop) {
      // The guest asked to stop while the VM was being paused: its vCPUs must not run on past
      // that request, so resuming carries the stop out instead.
      this.store.dispatch(vmEvents.resumed());
      this.log.info({ ...stop }, 'carrying out the guest stop that arrived during the pause');
      await this.carryOutGuestStop(stop);
      return;
    }
    try {
      machine.resume();
    } catch (e) {
      // Park whatever did start again, so Paused is true; if even that fails, the VM cannot go on.
      let status: VmStatus = 'Paused';
      try {
        await machine.pause();
      } catch (again) {
        this.log.error({ err: again }, 'the vCPUs could not be parked again after a failed resume');
        await this.destroyMachine();
        status = 'Shutdown';
      }
      this.store.dispatch(vmEvents.operationFailed(errorMessage(e), status));
      throw e;
    }
    this.store.dispatch(vmEvents.resumed());
  }

  /**
   * Write the paused VM to a new snapshot directory (config.json, state.json, memory-ranges).
   * On any failure nothing is left at the destination and the VM stays Paused.
   */
  snapshot(destinationUrl: string): Promise<void> {
    return this.serialize(async () => {
      this.store.dispatch(vmEvents.snapshotting());
      try {
        const dir = snapshotDirFromUrl(destinationUrl, 'destination_url');
        const state = this.store.getState();
        // The saved VM is simply Paused: the snapshot in progress is not part of it.
        const saved = { ...state, vm: { ...state.vm, pending: null } } as RootState;
        const t0 = performance.now();
        const { memoryBytes, memoryExtents, memoryMs } = await writeSnapshot({ dir, config: state.vm.config as VmConfig, state: saved, memory: this.liveMachine().memory });
        // Where a snapshot's time goes: guest RAM (written and checksummed) against the whole.
        this.log.info({ dir, memory_bytes: memoryBytes, memory_extents: memoryExtents, memory_ms: Math.round(memoryMs), total_ms: Math.round(performance.now() - t0) }, 'snapshot written');
      } catch (e) {
        this.store.dispatch(vmEvents.operationFailed(errorMessage(e)));
        throw e;
      }
      this.store.dispatch(vmEvents.snapshotted());
    });
  }

  /**
   * Build the VM from a snapshot directory alone (no kernel is loaded, nothing boots): KVM
   * objects, RAM, vCPUs and devices come from state.json and memory-ranges, then the saved
   * state replaces the store's. Only when there is no VM. Resumes only with resume=true.
   */
  restore(opts: RestoreOptions): Promise<void> {
    return this.serialize(async () => {
      this.refuseWhileReceiving();
      this.store.dispatch(vmEvents.restoring());
      // Where a restore's time goes, logged with -vv once it is over.
      const steps = new PauseSteps();
      let machine: Machine | undefined;
      try {
        const mode = opts.memory_restore_mode ?? 'copy';
        if (mode !== 'copy' && mode !== 'ondemand') throw new SnapshotError(`memory_restore_mode '${String(mode)}' is not copy or ondemand`);
        const snap = readSnapshot(snapshotDirFromUrl(opts.source_url, 'source_url'));
        steps.mark('snapshot read and checked');
        let state = snap.state;
        state = withHostEnds(state, opts);
        const backends = await openDeviceBackends(state.vm.config as VmConfig, this.log);
        steps.mark('device backends opened');
        machine = this.newMachine({
          restore: {
            state,
            memoryPath: snap.memoryPath,
            ranges: snap.ranges,
            rangeChecksums: snap.rangeChecksums,
            mode,
            prefault: opts.prefault,
            hugePages: withDefaults(state.vm.config as VmConfig).memory.thp,
            mark: (step) => steps.mark(step),
          },
          backends,
        });
        this.log.info({ dir: snap.dir, mode, fromSchema: snap.storedSchemaVersion }, 'VM restored from snapshot');
        this.store.replaceState({ ...state, vm: { ...state.vm, pending: 'Restoring' } } as RootState);
        steps.mark('store holds the saved state');
      } catch (e) {
        await machine?.destroy().catch((err) => this.log.error({ err }, 'releasing a half-restored machine failed'));
        this.store.dispatch(vmEvents.operationFailed(errorMessage(e)));
        throw e;
      }
      this.machine = machine;
      this.store.dispatch(vmEvents.restored());
      steps.mark('restored');
      if (opts.resume) {
        await this.resumeNow();
        steps.mark('resumed');
      }
      steps.logAs(this.log, 'restore steps');
    });
  }

  /**
   * Start sending the VM to a receiving VMM (vm.send-migration). Resolves once the migration
   * has started in the background (connected, handshake accepted); its end is reported by the
   * migration events. Rejects when it cannot start; the VM is then untouched. When it has
   * finished, the VM here is shut down: it runs at the destination now.
   */
  async sendMigration(opts: SendMigrationOptions): Promise<void> {
    if (this.migration?.active) throw new MigrationError('a migration is already in progress');
    const sender = new MigrationSender(
      { store: this.store, log: this.log, machine: () => this.machine, exclusive: (fn) => this.serialize(fn) },
      opts,
    );
    this.migration = sender;
    await sender.start();
    void sender.done!.then(async (moved) => {
      if (!moved) return;
      await this.serialize(async () => {
        if (this.state.vm.status === 'Running' || this.state.vm.status === 'Paused') this.store.dispatch(vmEvents.shutdown('migration'));
        await this.destroyMachine();
      });
    });
  }

  /**
   * Receive a VM from a sending VMM (vm.receive-migration). Only when no VM exists; resolves
   * when the VM runs here (or is paused, if it was paused at the source), rejects when the
   * migration failed, after everything received was discarded.
   */
  async receiveMigration(opts: ReceiveMigrationOptions): Promise<void> {
    if (this.migration?.active) throw new MigrationError('a migration is already in progress');
    if (this.state.vm.status !== 'NotCreated') throw new MigrationError(`a VM already exists here (${this.state.vm.status})`);
    let host: { cpuid: CpuidEntry[]; msrIndices: number[] } | undefined;
    const receiver = new MigrationReceiver(
      {
        store: this.store,
        log: this.log,
        prepare: (regions, fds) => this.newMachine({ incoming: { regions, fds } }),
        // Asked at the handshake and again while the guest is paused at the source: this
        // host's answer is read from KVM once.
        cpuProblems: (cpuid, msrIndices) => {
          host ??= hostCpu();
          return cpuCompatProblems({ guestCpuid: cpuid, guestMsrIndices: msrIndices, hostCpuid: host.cpuid, hostMsrIndices: host.msrIndices }).map((p) => p.message);
        },
        install: (m, state) => this.serialize(() => this.installMigratedVm(m as Machine, state)),
      },
      opts,
    );
    this.migration = receiver;
    await receiver.receive();
  }

  /** The received VM becomes this VMM's, running unless it was paused at the source. */
  private async installMigratedVm(machine: Machine, state: RootState): Promise<void> {
    if (this.state.vm.status !== 'NotCreated') throw new MigrationError(`a VM was created here during the migration (${this.state.vm.status})`);
    // (the state passed the final checks: unless a new vm slice must be made, none is checked again)
    this.store.replaceState(state.vm.pending === null ? state : ({ ...state, vm: { ...state.vm, pending: null } } as RootState), 'migration');
    this.machine = machine;
    if (state.vm.status !== 'Running') return;
    try {
      machine.resume();
    } catch (e) {
      this.machine = undefined;
      this.store.replaceState(createStore().getState(), 'migration');
      throw e;
    }
  }

  /** The migration in progress or the last one that ended; null if there was none. */
  migrationProgress(): MigrationProgress | null {
    return this.migration?.progress() ?? null;
  }

  /** Cancel the migration in progress (either side); throws if there is none. */
  cancelMigration(): void {
    if (!this.migration?.active) throw new MigrationError('no migration is in progress');
    this.migration.cancel();
  }

  private refuseWhileReceiving(): void {
    if (this.migration instanceof MigrationReceiver && this.migration.active) throw new MigrationError('a migration is being received');
  }

  /**
   * Press the ACPI power button. The store checks the VM is Running and records the press for
   * the event monitor; the guest decides what a press means (the test guest powers off).
   */
  powerButton(): Promise<void> {
    return this.serialize(() => {
      this.store.dispatch(vmEvents.powerButtonPressed());
      this.liveMachine().pressPowerButton();
    });
  }

  /**
   * Delete the VM, shutting it down first if it runs (so subscribers see Shutdown, then Deleted).
   * With missingOk, deleting when there is no VM is a no-op, as Cloud Hypervisor's vm.delete is.
   */
  delete(opts: { missingOk?: boolean } = {}): Promise<void> {
    return this.serialize(() => this.deleteNow(opts.missingOk ?? false));
  }

  private async deleteNow(missingOk: boolean): Promise<void> {
    const status = this.state.vm.status;
    if (status === 'NotCreated' && missingOk) return;
    if (status === 'Running' || status === 'Paused') {
      this.store.dispatch(vmEvents.shutdown());
      await this.destroyMachine();
    }
    const held = new Set((this.state.vm.config?.net ?? []).flatMap((n) => n.fds ?? []));
    this.store.dispatch(vmEvents.deleted());
    await this.destroyMachine();
    // Taps handed over for the VM's cards (fd=, SCM_RIGHTS) were the VM's: a client that creates
    // and deletes VMs must not pile up descriptors.
    for (const fd of held) {
      try {
        native().closeFd(fd);
      } catch (e) {
        this.log.warn({ fd, err: (e as Error).message }, 'a tap handed over for a deleted VM could not be closed');
      }
    }
  }

  /** Record that the VMM is up; call once its subscribers (event monitor, API) are attached. */
  announceStart(): void {
    this.store.dispatch(vmmEvents.starting({ version: TERN_VERSION, pid: process.pid }));
  }

  private vmmShutdown?: Promise<void>;

  /** Delete any VM and record the VMM's shutdown; the caller then ends the process. Idempotent. */
  shutdownVmm(): Promise<void> {
    if (this.migration?.active) {
      try {
        this.migration.cancel('the VMM is shutting down');
      } catch {
        /* handed over already: the shutdown below ends it */
      }
    }
    this.vmmShutdown ??= this.serialize(async () => {
      try {
        await this.deleteNow(true);
      } finally {
        await this.destroyMachine();
        this.store.dispatch(vmmEvents.shutdown(null));
      }
    });
    return this.vmmShutdown;
  }

  /** Release everything before the process ends. */
  async close(): Promise<void> {
    await this.serialize(() => this.destroyMachine());
  }

  /** A machine of this VMM: a boot (no extra options), a restore or a migration destination. */
  private newMachine(extra: Pick<MachineOptions, 'restore' | 'incoming' | 'backends'>): Machine {
    const m: Machine = new Machine({
      store: this.store,
      log: this.log,
      seccomp: this.opts.seccomp,
      guestLog: this.guestLog,
      serialFileMaxBytes: this.opts.serialFileMaxBytes,
      onStop: (s) => this.onMachineStop(m, s),
      ...extra,
    });
    return m;
  }

  /** Boot: the devices' host ends open first (disk images take I/O), then the machine is built from the config. */
  private async startMachine(): Promise<void> {
    const backends = await openDeviceBackends(this.state.vm.config as VmConfig, this.log);
    const machine = this.newMachine({ backends });
    this.machine = machine;
    machine.start();
  }

  /** The machine of a Running or Paused VM; every path that loses it leaves the VM Shutdown. */
  private liveMachine(): Machine {
    if (!this.machine) throw new Error(`the VM is ${this.state.vm.status} but has no machine`);
    return this.machine;
  }

  /**
   * Stop the vCPUs and release the machine's host resources. The machine is gone afterwards
   * even if releasing fails: that failure is logged, it does not change the VM's state.
   */
  private async destroyMachine(): Promise<void> {
    const m = this.machine;
    this.machine = undefined;
    try {
      await m?.destroy();
    } catch (e) {
      this.log.error({ err: e }, 'releasing the machine failed');
    }
  }

  /**
   * A guest poweroff, reset, panic or fatal error. It is recorded in the store at once, so
   * neither a pause in progress nor a snapshot loses it; it is carried out now if the VM is
   * Running, or by the next resume if the VM is (being) paused.
   */
  private onMachineStop(machine: Machine, stop: MachineStop): void {
    if (this.machine !== machine) return; // a machine already replaced or torn down
    const status = this.state.vm.status;
    if (status !== 'Running' && status !== 'Paused') return;
    const guestStop = guestStopFor(stop);
    if (stop.reason === 'reset') {
      this.guestLog.info('guest-reset', { source: stop.source }, 'guest reset: rebooting the VM from its configuration');
    } else if (stop.reason === 'poweroff') {
      this.guestLog.info('guest-poweroff', { source: stop.source }, 'guest powered off');
    } else if (stop.reason === 'panic') {
      this.guestLog.error('guest-panic', { source: stop.source }, 'guest panicked');
      this.store.dispatch(vmmEvents.guestPanic({ event: 'panic', detail: stop.source }, 'vm'));
    } else {
      this.guestLog.error('vm-fatal', { message: stop.message }, 'VM stopped on a fatal error');
      this.store.dispatch(vmmEvents.vmFailed({ message: stop.message }, 'vmm'));
    }
    this.store.dispatch(vmEvents.guestStopRequested(guestStop));
    this.serialize(async () => {
      if (this.machine !== machine) return; // an API reboot or shutdown came first
      const vm = this.state.vm;
      if (vm.status !== 'Running' || !vm.guestStop) return; // Paused: the resume carries it out
      await this.carryOutGuestStop(vm.guestStop);
    }).catch((e) => this.guestLog.error('guest-stop-failed', { err: e }, 'carrying out the guest stop failed'));
  }

  private carryOutGuestStop(stop: GuestStop): Promise<void> {
    return stop.action === 'reboot' ? this.rebootNow('vm') : this.shutdownNow('vm');
  }
}

/** The CPUID this host's KVM can give a guest and the MSRs it keeps. */
function hostCpu(): { cpuid: CpuidEntry[]; msrIndices: number[] } {
  const kvm = native().openKvm();
  try {
    return { cpuid: kvm.supportedCpuid(), msrIndices: kvm.msrIndexList() };
  } finally {
    kvm.close();
  }
}

function guestStopFor(stop: MachineStop): GuestStop {
  switch (stop.reason) {
    case 'reset':
      return { action: 'reboot', reason: 'reset', detail: stop.source };
    case 'poweroff':
    case 'panic':
      return { action: 'shutdown', reason: stop.reason, detail: stop.source };
    default:
      return { action: 'shutdown', reason: 'fatal', detail: stop.message };
  }
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

