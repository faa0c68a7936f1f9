// The API's operations, independent of HTTP: each one is a Vmm call (or a read of the store)
// with its errors turned into ApiErrors. The HTTP server and the `tern` CLI both go through
// here, so a VM started with --kernel is created and booted exactly as vm.create + vm.boot do.
// Nothing here keeps VM state: every answer is read from the store when it is asked for.
import { TypeCompiler } from '@sinclair/typebox/compiler';
import { doubleTtyProblem, withDefaults, type ConsoleConfig as StoredConsoleConfig, type VmConfig as StoredVmConfig } from '../config/vm-config';
import { DEBUG_PORT_KIND, PCI_SEGMENT_KIND, SERIAL_KIND, type PciSegmentState } from '../devices';
import { VmEvents, assertVmTransition, type RootState } from '../state';
import { TERN_VERSION } from '../version';
import type { Vmm } from '../vmm/vmm';
import type { MigrationProgress } from '../migration/migration-options';
import { ApiError, toApiError } from './errors';
import { parseMigrationUrl } from './migration-url';
import { checkBody, checkVmConfig, deviceIds as deviceIdsOf } from './request-body';
import { diskIdOf, netIdOf } from '../devices/virtio/vm-devices';
import { netConfigProblem, withoutHeldFds } from '../config/net-config';
import { native } from '../native/kvm';
import { restoredCardsOnTaps, tapNameOf } from '../vmm/net-backend';
import {
  ConsoleConfigSchema,
  DiskConfigSchema,
  NetConfigSchema,
  ReceiveMigrationDataSchema,
  SendMigrationDataSchema,
  SerialConfigSchema,
  type DiskConfig,
  type NetConfig,
  type ReceiveMigrationData,
  type SendMigrationData,
  type VmConfig,
  type VmCounters,
  type VmInfo,
  type VmmPingResponse,
} from './schema';

const serialChecker = TypeCompiler.Compile(SerialConfigSchema);
const diskConfigChecker = TypeCompiler.Compile(DiskConfigSchema);
const netConfigChecker = TypeCompiler.Compile(NetConfigSchema);
const consoleChecker = TypeCompiler.Compile(ConsoleConfigSchema);
const sendMigrationChecker = TypeCompiler.Compile(SendMigrationDataSchema);
const receiveMigrationChecker = TypeCompiler.Compile(ReceiveMigrationDataSchema);

/** phases after which a migration is over: nothing is left to cancel */
const ENDED_PHASES: ReadonlySet<MigrationProgress['phase']> = new Set(['finished', 'failed']);

/** Device-state fields reported by vm.counters, per device kind: counter name -> state field. */
const DEVICE_COUNTERS: Readonly<Record<string, Readonly<Record<string, string>>>> = {
  [SERIAL_KIND]: { tx_bytes: 'txBytes', tx_dropped: 'txDropped', rx_bytes: 'rxBytes', rx_dropped: 'rxDropped' },
  [DEBUG_PORT_KIND]: { writes: 'writes' },
};

export const TERN_FEATURES = ['kvm', 'event_stream'];

/**
 * RestoreConfig.memory_restore_mode: the contract's MemoryRestoreMode spelling (what ch-remote
 * sends), and the lowercase one of the command line, which Tern's API has always taken.
 */
const MEMORY_RESTORE_MODES: Readonly<Record<string, 'copy' | 'ondemand'>> = {
  Copy: 'copy',
  OnDemand: 'ondemand',
  copy: 'copy',
  ondemand: 'ondemand',
};

function invalidBody(outer: string, why: string): ApiError {
  return new ApiError(400, [outer, 'The request body is not valid', why]);
}

function objectBody(body: unknown, outer: string): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw invalidBody(outer, 'expected a JSON object');
  return body as Record<string, unknown>;
}

function noVm(outer: string): ApiError {
  return new ApiError(404, [outer, 'no VM has been created']);
}

/** A migration body's URL checked, or a 400 saying what is wrong with it. */
function checkMigrationUrl(outer: string, field: string, url: string): void {
  try {
    parseMigrationUrl(url);
  } catch (e) {
    throw invalidBody(outer, `${field} ${(e as Error).message}`);
  }
}

/** What the contract lets a client ask and Tern cannot do: 400, before anything starts. */
function unsupported(outer: string, why: string): ApiError {
  return new ApiError(400, [outer, 'The request asks for what Tern does not support', why]);
}

function checkMemoryMode(outer: string, mode: string | undefined): void {
  if (mode !== undefined && mode !== 'Precopy') {
    throw unsupported(outer, `memory_mode "${mode}": Tern migrates memory before the VM moves ("Precopy") only`);
  }
}

/** vm.restore's `net` (Tern's addition): which card opens which tap; null when malformed. */
function restoredTaps(v: unknown): { id: string; tap: string }[] | null {
  if (!Array.isArray(v) || v.length > 16) return null;
  const ok = v.every(
    (e) =>
      typeof e === 'object' && e !== null && Object.keys(e).sort().join(',') === 'id,tap' &&
      typeof e.id === 'string' && e.id.length >= 1 && e.id.length <= 256 &&
      typeof e.tap === 'string' && Buffer.byteLength(e.tap) >= 1 && Buffer.byteLength(e.tap) <= 15 && !e.tap.includes('/'),
  );
  return ok ? (v as { id: string; tap: string }[]).map(({ id, tap }) => ({ id, tap })) : null;
}

/**
 * vm.restore's `net_fds` (Cloud Hypervisor's list of RestoredNetConfig): for each card, how many
 * of the taps sent with the request (SCM_RIGHTS, in the list's order) are its queues. fd numbers
 * in the body are the client's, and are ignored, as Cloud Hypervisor ignores them. Null when
 * malformed.
 */
function restoredNetFds(v: unknown): { id: string; num_fds: number }[] | null {
  if (!Array.isArray(v) || v.length > 16) return null;
  const ok = v.every(
    (e) =>
      typeof e === 'object' && e !== null && !Array.isArray(e) && Object.keys(e).every((k) => k === 'id' || k === 'num_fds' || k === 'fds') &&
      typeof e.id === 'string' && e.id.length >= 1 && e.id.length <= 256 &&
      (e.num_fds === undefined || (Number.isInteger(e.num_fds) && e.num_fds >= 0 && e.num_fds <= 16)),
  );
  if (!ok) return null;
  const out = (v as { id: string; num_fds?: number }[]).map(({ id, num_fds }) => ({ id, num_fds: num_fds ?? 0 }));
  return new Set(out.map((e) => e.id)).size === out.length ? out : null;
}

export class VmmApi {
  /**
   * A vm.receive-migration request holds its connection until the migration ends; one at a
   * time, so a client cannot pin connections with receives the VMM would refuse anyway.
   */
  private receiving = false;

  constructor(readonly vmm: Vmm) {}

  private get state(): RootState {
    return this.vmm.state;
  }

  ping(): VmmPingResponse {
    return { build_version: `v${TERN_VERSION}`, version: TERN_VERSION, pid: process.pid, features: [...TERN_FEATURES] };
  }

  /**
   * vm.create: `body` is parsed JSON, checked here against the contract before the store sees
   * it. Tap fds in it count only from the command line (`heldFds`): this process holds those,
   * and each card is named after the tap they are queues of. An API client's are dropped.
   */
  async create(body: unknown, opts: { heldFds?: boolean } = {}): Promise<void> {
    const outer = 'The VM could not be created';
    let config: VmConfig;
    try {
      config = this.netFdsTaken(checkVmConfig(body), opts.heldFds ?? false);
      // A new VM only: a snapshot from before the console existed may name the tty twice.
      const tty = doubleTtyProblem(config);
      if (tty) throw new ApiError(400, ['The VM configuration is not valid', tty]);
      const net = (config.net ?? []).map((n, i) => netConfigProblem(n, netIdOf(n, i))).find((p) => p !== null);
      if (net) throw new ApiError(400, ['The VM configuration is not valid', net]);
    } catch (e) {
      throw toApiError(e, outer);
    }
    await this.run(outer, () => this.vmm.create(config as StoredVmConfig));
  }

  /** A new config's cards with fds: named after their taps when this process holds them, without the fds otherwise. */
  private netFdsTaken(config: VmConfig, held: boolean): VmConfig {
    if (!held) {
      const without = withoutHeldFds(config);
      if (without !== config) this.vmm.log.warn('tap fds in an API request are ignored: only the command line can hand taps over');
      return without;
    }
    const net = (config.net ?? []).map((n, i) => {
      if (!n.fds) return n;
      const id = netIdOf(n, i);
      const problem = netConfigProblem(n, id);
      if (problem) throw new ApiError(400, ['The VM configuration is not valid', problem]);
      return this.namedAfterTap(n, id, 'The VM configuration is not valid');
    });
    return config.net ? { ...config, net } : config;
  }

  boot(): Promise<void> {
    return this.run('The VM could not be booted', () => this.vmm.boot());
  }

  /**
   * vm.add-disk. Tern adds disks cold only (204): to a VM that is created or shut down, for its
   * next boot. A running VM's disks are fixed (500, as any action its state does not allow).
   */
  async addDisk(body: unknown): Promise<void> {
    const outer = 'The disk could not be added to the VM';
    let disk: DiskConfig;
    try {
      disk = checkBody(diskConfigChecker, DiskConfigSchema, 'DiskConfig', body) as DiskConfig;
    } catch (e) {
      throw toApiError(e, outer);
    }
    const config = this.coldAddTarget(outer, 'disks');
    const disks = [...(config.disks ?? []), disk];
    // Ids as the VM will have them: a disk without one is _diskN by its place in the list.
    const taken = new Set([...deviceIdsOf(config), ...(config.disks ?? []).map((d, i) => diskIdOf(d, i))]);
    const id = diskIdOf(disk, disks.length - 1);
    if (taken.has(id)) throw new ApiError(409, [outer, `a device with id '${id}' already exists`]);
    await this.run(outer, () => this.vmm.addDisk(disk));
  }

  /** The config a cold add joins: 404 without a VM, 500 for a running or paused one (no hot-plug). */
  private coldAddTarget(outer: string, what: string): VmConfig {
    const { vm } = this.state;
    if (vm.status === 'NotCreated') throw new ApiError(404, [outer, 'no VM has been created']);
    if (vm.status === 'Running' || vm.status === 'Paused') throw new ApiError(500, [outer, `the VM is ${vm.status}: Tern adds ${what} to a VM that is not running only (no hot-plug)`]);
    return vm.config as VmConfig;
  }

  /**
   * vm.add-net: cold add only, as vm.add-disk (a card's tap opens when the VM boots). `fds`:
   * taps the client sent with the request (SCM_RIGHTS, as ch-remote sends `fd=`), one per
   * queue pair; this takes them, and closes them unless the card is added. fd numbers in the
   * body are the client's, not this process's, and are dropped.
   */
  async addNet(body: unknown, fds: number[] = []): Promise<void> {
    const outer = 'The net device could not be added to the VM';
    let added = false;
    try {
      await this.addNetWith(outer, body, fds);
      added = true;
    } finally {
      if (!added) fds.forEach((fd) => native().closeFd(fd));
    }
  }

  private async addNetWith(outer: string, body: unknown, fds: number[]): Promise<void> {
    let net: NetConfig;
    try {
      net = checkBody(netConfigChecker, NetConfigSchema, 'NetConfig', body) as NetConfig;
      if (net.fds !== undefined) {
        this.vmm.log.warn('tap fd numbers in an API body are ignored: taps come with the request (SCM_RIGHTS)');
        net = withoutHeldFds({ net: [net] }).net![0];
      }
      if (fds.length) net = { ...net, fds: [...fds] };
    } catch (e) {
      throw toApiError(e, outer);
    }
    const config = this.coldAddTarget(outer, 'net devices');
    const nets = [...(config.net ?? []), net];
    const taken = new Set([...deviceIdsOf(config), ...(config.net ?? []).map((n, i) => netIdOf(n, i))]);
    const id = netIdOf(net, nets.length - 1);
    if (taken.has(id)) throw new ApiError(409, [outer, `a device with id '${id}' already exists`]);
    const problem = netConfigProblem(net, id);
    if (problem) throw new ApiError(400, [outer, problem]);
    if (net.fds) net = this.namedAfterTap(net, id, outer);
    await this.run(outer, () => this.vmm.addNet(net));
  }

  /** A card on taps this process holds, named after the tap they are queues of (400 when they are no such taps). */
  private namedAfterTap(net: NetConfig, id: string, outer: string): NetConfig {
    try {
      return { ...net, tap: tapNameOf(net.fds!, id) };
    } catch (e) {
      throw new ApiError(400, [outer, (e as Error).message]);
    }
  }

  shutdown(): Promise<void> {
    return this.run('The VM could not be shut down', () => this.vmm.shutdown());
  }

  reboot(): Promise<void> {
    return this.run('The VM could not be rebooted', () => this.vmm.reboot());
  }

  pause(): Promise<void> {
    return this.run('The VM could not be paused', () => this.vmm.pause());
  }

  resume(): Promise<void> {
    return this.run('The VM could not be resumed', () => this.vmm.resume());
  }

  /** Deleting when there is no VM succeeds, as in Cloud Hypervisor. */
  delete(): Promise<void> {
    return this.run('The VM could not be deleted', () => this.vmm.delete({ missingOk: true }));
  }

  /**
   * The store's lifecycle rules decide first (404 without a VM, 500 unless Running); the press
   * itself is Vmm.powerButton, which records "[VM] Power Button Pressed" for the monitor.
   */
  powerButton(): Promise<void> {
    const outer = 'The power button could not be pressed';
    return this.run(outer, async () => {
      assertVmTransition(this.state.vm, VmEvents.PowerButtonPressed);
      await this.vmm.powerButton();
    });
  }

  /** vm.snapshot: body is a VmSnapshotConfig ({destination_url}); the VM must be Paused. */
  async snapshot(body: unknown): Promise<void> {
    const outer = 'The VM could not be snapshotted';
    const b = objectBody(body, outer);
    if (typeof b.destination_url !== 'string') throw invalidBody(outer, 'destination_url must be a string');
    await this.run(outer, () => this.vmm.snapshot(b.destination_url as string));
  }

  /**
   * vm.restore: body is a RestoreConfig; only when no VM exists. `fds`: taps sent with the
   * request for `net_fds`; the restored VM holds them, and they are closed if it is not restored.
   */
  async restore(body: unknown, fds: number[] = []): Promise<void> {
    let restored = false;
    try {
      await this.restoreWith(body, fds);
      restored = true;
    } finally {
      if (!restored) fds.forEach((fd) => native().closeFd(fd));
    }
  }

  private async restoreWith(body: unknown, fds: number[]): Promise<void> {
    const outer = 'The VM could not be restored';
    const b = objectBody(body, outer);
    if (typeof b.source_url !== 'string') throw invalidBody(outer, 'source_url must be a string');
    for (const k of ['prefault', 'resume'] as const) {
      if (b[k] != null && typeof b[k] !== 'boolean') throw invalidBody(outer, `${k} must be a boolean`);
    }
    const mode = b.memory_restore_mode;
    const restoreMode = mode == null ? undefined : typeof mode === 'string' && Object.hasOwn(MEMORY_RESTORE_MODES, mode) ? MEMORY_RESTORE_MODES[mode] : undefined;
    if (mode != null && !restoreMode) {
      throw invalidBody(outer, `memory_restore_mode must be one of ${Object.keys(MEMORY_RESTORE_MODES).map((m) => `"${m}"`).join(', ')}`);
    }
    // Tern's additions: the host ends of the consoles, chosen by the restoring client instead
    // of taken from the snapshot.
    const hostEnds: { serial?: StoredConsoleConfig; console?: StoredConsoleConfig } = {};
    for (const [k, checker] of [['serial', serialChecker], ['console', consoleChecker]] as const) {
      if (b[k] == null) continue;
      if (!checker.Check(b[k])) throw invalidBody(outer, `${k} must be a ${k === 'serial' ? 'SerialConfig' : 'ConsoleConfig'}`);
      hostEnds[k] = b[k] as StoredConsoleConfig;
    }
    // ... and the tap each card opens: [{id, tap}].
    const named = b.net == null ? undefined : restoredTaps(b.net);
    if (named === null) throw invalidBody(outer, 'net must be a list of {"id": ..., "tap": ...} (at most 16; a tap name is 1 to 15 bytes without "/")');
    // ... and, as Cloud Hypervisor's net_fds, taps sent with the request.
    const handed = b.net_fds == null ? [] : restoredNetFds(b.net_fds);
    if (handed === null) throw invalidBody(outer, 'net_fds must be a list of {"id": ..., "num_fds": N} with distinct ids (at most 16, N at most 16)');
    const expected = handed.reduce((n, e) => n + e.num_fds, 0);
    if (expected !== fds.length) throw invalidBody(outer, `net_fds names ${expected} descriptors, the request came with ${fds.length}`);
    let at = 0;
    const withFds = handed.map((e) => ({ id: e.id, fds: fds.slice(at, (at += e.num_fds)) }));
    let net: { id: string; tap: string; fds?: number[] }[];
    try {
      net = [...(named ?? []), ...restoredCardsOnTaps(withFds, named)];
    } catch (err) {
      throw new ApiError(400, [outer, (err as Error).message]);
    }
    await this.run(outer, () =>
      this.vmm.restore({
        source_url: b.source_url as string,
        prefault: (b.prefault as boolean | null) ?? undefined,
        resume: (b.resume as boolean | null) ?? undefined,
        memory_restore_mode: restoreMode,
        ...hostEnds,
        ...(net.length ? { net } : {}),
      }),
    );
  }

  /**
   * vm.send-migration: body is a SendMigrationData. Answers once the migration has started
   * (connected, handshake accepted); how it ends is told by the migration events and
   * vm.migration-progress.
   */
  async sendMigration(body: unknown): Promise<void> {
    const outer = 'The migration could not be started';
    let data: SendMigrationData;
    try {
      data = checkBody(sendMigrationChecker, SendMigrationDataSchema, 'SendMigrationData', body) as SendMigrationData;
    } catch (e) {
      throw toApiError(e, outer);
    }
    checkMigrationUrl(outer, 'destination_url', data.destination_url);
    if (data.connections !== undefined && data.connections > 1 && !data.destination_url.startsWith('tcp:')) {
      throw unsupported(outer, `connections ${data.connections}: more than one connection is for tcp: URLs only`);
    }
    if (data.tls_dir !== undefined && !data.destination_url.startsWith('tcp:')) throw unsupported(outer, 'tls_dir: TLS is for tcp: URLs only');
    checkMemoryMode(outer, data.memory_mode);
    if (data.local && !data.destination_url.startsWith('unix:')) {
      throw unsupported(outer, 'local: memory can only be handed over as file descriptors on a unix: socket');
    }
    if (data.preserve_source) throw unsupported(outer, 'preserve_source: the source VM is stopped once the destination runs it');
    await this.run(outer, () =>
      this.vmm.sendMigration({
        destination_url: data.destination_url,
        local: data.local,
        downtime_ms: data.downtime_ms,
        timeout_s: data.timeout_s,
        timeout_strategy: data.timeout_strategy,
        ...(data.connections !== undefined && { connections: data.connections }),
        ...(data.tls_dir !== undefined && { tls_dir: data.tls_dir }),
      }),
    );
  }

  /**
   * vm.receive-migration: body is a ReceiveMigrationData. Answers when the migration has
   * ended, which can take as long as the sender's timeout_s: the server does not time the
   * reply out. A client that goes away does not cancel it (vm.migration-cancel does).
   */
  async receiveMigration(body: unknown): Promise<void> {
    const outer = 'The migration could not be received';
    let data: ReceiveMigrationData;
    try {
      data = checkBody(receiveMigrationChecker, ReceiveMigrationDataSchema, 'ReceiveMigrationData', body) as ReceiveMigrationData;
    } catch (e) {
      throw toApiError(e, outer);
    }
    checkMigrationUrl(outer, 'receiver_url', data.receiver_url);
    if (data.tls_dir !== undefined && !data.receiver_url.startsWith('tcp:')) throw unsupported(outer, 'tls_dir: TLS is for tcp: URLs only');
    checkMemoryMode(outer, data.memory_mode);
    if (data.zone_updates?.length) throw unsupported(outer, 'zone_updates: Tern has no memory zones to move to other NUMA nodes');
    if (this.receiving) throw new ApiError(500, [outer, 'a migration is already being received']);
    this.receiving = true;
    try {
      await this.run(outer, () => this.vmm.receiveMigration({ receiver_url: data.receiver_url, ...(data.tls_dir !== undefined && { tls_dir: data.tls_dir }) }));
    } finally {
      this.receiving = false;
    }
  }

  /** vm.migration-progress (Tern's): the migration in progress, or the last one. */
  migrationProgress(): MigrationProgress {
    const progress = this.vmm.migrationProgress();
    if (!progress) throw new ApiError(404, ['The migration progress is not available', 'no migration has been started']);
    return progress;
  }

  /** vm.migration-cancel (Tern's): either side; 404 when no migration is in progress. */
  cancelMigration(): void {
    const outer = 'The migration could not be cancelled';
    const progress = this.vmm.migrationProgress();
    if (!progress || ENDED_PHASES.has(progress.phase)) throw new ApiError(404, [outer, 'no migration is in progress']);
    try {
      this.vmm.cancelMigration();
    } catch (e) {
      throw toApiError(e, outer);
    }
  }

  shutdownVmm(): Promise<void> {
    return this.run('The VMM could not be shut down', () => this.vmm.shutdownVmm());
  }

  info(): VmInfo {
    const vm = this.state.vm;
    if (vm.status === 'NotCreated' || vm.config === null) throw noVm('The VM information is not available');
    const config = withDefaults(vm.config);
    // A console in pty mode reports its pseudo-terminal as its file, as Cloud Hypervisor's does.
    const pty = this.vmm.ptyPaths();
    if (pty.serial && config.serial.mode === 'Pty') config.serial = { ...config.serial, file: pty.serial };
    if (pty.console && config.console.mode === 'Pty') config.console = { ...config.console, file: pty.console };
    return {
      config: config as unknown as VmConfig,
      state: vm.status,
      // boot RAM: Tern has no memory hotplug or balloon yet
      memory_actual_size: config.memory.size,
    };
  }

  counters(): VmCounters {
    const outer = 'The VM counters are not available';
    this.vmm.collectDeviceCounters();
    const { vm, bus, devices } = this.state;
    // 500 with no VM too: Cloud Hypervisor answers "not running" whether or not one was created,
    // and the contract lists no 404 here.
    if (vm.status !== 'Running' && vm.status !== 'Paused') {
      throw new ApiError(500, [outer, vm.status === 'NotCreated' ? 'no VM has been created' : `the VM is ${vm.status}, not running`]);
    }
    const counters: VmCounters = {
      bus: {
        pio_unhandled_reads: bus.unhandled.pio.reads,
        pio_unhandled_writes: bus.unhandled.pio.writes,
        mmio_unhandled_reads: bus.unhandled.mmio.reads,
        mmio_unhandled_writes: bus.unhandled.mmio.writes,
      },
    };
    // PCI functions with counters of their own (virtio devices) answer by their device ids.
    for (const inst of Object.values(devices.instances)) {
      if (inst.kind !== PCI_SEGMENT_KIND) continue;
      for (const fn of Object.values((inst as PciSegmentState).functions) as { id?: unknown; counters?: Record<string, number> }[]) {
        if (typeof fn.id === 'string' && fn.counters) counters[fn.id] = { ...fn.counters };
      }
    }
    for (const [id, inst] of Object.entries(devices.instances)) {
      const fields = DEVICE_COUNTERS[inst.kind];
      if (!fields) continue;
      const c: Record<string, number> = {};
      for (const [name, field] of Object.entries(fields)) {
        const v = (inst as unknown as Record<string, unknown>)[field];
        if (typeof v === 'number') c[name] = v;
      }
      counters[id] = c;
    }
    return counters;
  }

  private async run(outer: string, action: () => Promise<void>): Promise<void> {
    try {
      await action();
    } catch (e) {
      throw toApiError(e, outer);
    }
  }
}
