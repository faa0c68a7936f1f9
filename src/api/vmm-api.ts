// The API's operations, independent of HTTP: each one is a Vmm call (or a read of the store)
// with its errors turned into ApiErrors. The HTTP server and the `tern` CLI both go through
// here, so a VM started with --kernel is created and booted exactly as vm.create + vm.boot do.
// Nothing here keeps VM state: every answer is read from the store when it is asked for.
import { TypeCompiler } from '@sinclair/typebox/compiler';
import { withDefaults, type ConsoleConfig as StoredConsoleConfig, type VmConfig as StoredVmConfig } from '../config/vm-config';
import { DEBUG_PORT_KIND, SERIAL_KIND } from '../devices';
import { VmEvents, assertVmTransition, type RootState } from '../state';
import { TERN_VERSION } from '../version';
import type { Vmm } from '../vmm/vmm';
import { ApiError, toApiError } from './errors';
import { checkVmConfig } from './request-body';
import { ConsoleConfigSchema, SerialConfigSchema, type VmConfig, type VmCounters, type VmInfo, type VmmPingResponse } from './schema';

const serialChecker = TypeCompiler.Compile(SerialConfigSchema);
const consoleChecker = TypeCompiler.Compile(ConsoleConfigSchema);

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

export class VmmApi {
  constructor(readonly vmm: Vmm) {}

  private get state(): RootState {
    return this.vmm.state;
  }

  ping(): VmmPingResponse {
    return { build_version: `v${TERN_VERSION}`, version: TERN_VERSION, pid: process.pid, features: [...TERN_FEATURES] };
  }

  /** vm.create: `body` is parsed JSON, checked here against the contract before the store sees it. */
  async create(body: unknown): Promise<void> {
    const outer = 'The VM could not be created';
    let config: VmConfig;
    try {
      config = checkVmConfig(body);
    } catch (e) {
      throw toApiError(e, outer);
    }
    await this.run(outer, () => this.vmm.create(config as StoredVmConfig));
  }

  boot(): Promise<void> {
    return this.run('The VM could not be booted', () => this.vmm.boot());
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

  /** vm.restore: body is a RestoreConfig; only when no VM exists. */
  async restore(body: unknown): Promise<void> {
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
    await this.run(outer, () =>
      this.vmm.restore({
        source_url: b.source_url as string,
        prefault: (b.prefault as boolean | null) ?? undefined,
        resume: (b.resume as boolean | null) ?? undefined,
        memory_restore_mode: restoreMode,
        ...hostEnds,
      }),
    );
  }

  shutdownVmm(): Promise<void> {
    return this.run('The VMM could not be shut down', () => this.vmm.shutdownVmm());
  }

  info(): VmInfo {
    const vm = this.state.vm;
    if (vm.status === 'NotCreated' || vm.config === null) throw noVm('The VM information is not available');
    const config = withDefaults(vm.config);
    return {
      config: config as unknown as VmConfig,
      state: vm.status,
      // boot RAM: Tern has no memory hotplug or balloon yet
      memory_actual_size: config.memory.size,
    };
  }

  counters(): VmCounters {
    const outer = 'The VM counters are not available';
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
