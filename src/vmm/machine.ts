// A running KVM machine built from the VM config in the store: the KVM VM, its guest RAM, the
// vCPU threads, and the wiring from vCPU exits to device events. The machine itself holds
// only host resources (file descriptors, threads, mappings); every piece of VM and device
// state is in the store.
import fs from 'node:fs';
import type { Logger } from 'pino';
import {
  KVM_IDENTITY_MAP_ADDRESS,
  KVM_TSS_ADDRESS,
  loadKernel,
  patchLapicLint,
  ramRegions,
  type BootPlan,
} from '../boot';
import { longModeSregs, protectedMode32Sregs } from '../boot/x86/long-mode';
import { withDefaults, type SerialConfig, type VmConfig } from '../config/vm-config';
import type { Effect } from '../devices/device';
import {
  devicesAcpi,
  platformDevices,
  powerButtonPressedEvent,
  COM1_BASE,
  PLATFORM_GED_ID,
  PLATFORM_SERIAL_ID,
  serialInputEvent,
  serialInputRoom,
  serialOutputDroppedEvent,
  type DeviceInstance,
  type Serial16550aState,
  type AnyDeviceState,
} from '../devices';
import { GuestMemory, GuestRegion } from '../memory/guest-memory';
import { checkVcpuFitsHost } from '../migration/cpu-compat';
import { SnapshotError, copyMemoryRange, openMemoryFile, verifyRangeInRam, type MemoryRange } from '../migration/snapshot';
import {
  native,
  readMsrs,
  writeMsrs,
  type CpuidEntry,
  type NativeKvm,
  type NativeVcpu,
  type NativeVm,
  type SeccompMode,
  type VcpuExit,
} from '../native/kvm';
import {
  decodeVcpuState,
  deviceEvents,
  memoryEvents,
  encodeVcpuState,
  kvmEvents,
  vcpuEvents,
  type RamRegionState,
  type RootState,
  type Store,
} from '../state';
import { HostFileError, readRegularFile } from '../util/host-file';
import type { GuestLog } from '../util/guest-log';
import { openConsoleSink, type ConsoleSink } from './console-sink';
import { dispatchIoExit } from './io-exit';
import { VcpuRunner } from './vcpu-runner';

/** Why a machine stopped running on its own. */
export type MachineStop =
  | { reason: 'poweroff'; source: string }
  | { reason: 'reset'; source: string }
  | { reason: 'panic'; source: string }
  | { reason: 'fatal'; message: string };

export interface MachineOptions {
  store: Store<RootState>;
  log: Logger;
  /** where lines the guest can trigger go (rate-limited); shared across reboots */
  guestLog: GuestLog;
  /** cap of a serial output file (default SERIAL_FILE_DEFAULT_MAX_BYTES) */
  serialFileMaxBytes?: number;
  /** called once, from the JavaScript thread, when the guest powers off, resets or fails */
  onStop: (stop: MachineStop) => void;
  /** build from saved state and a memory-ranges file instead of loading a kernel */
  restore?: MachineRestore;
  /** the vCPU threads' seccomp filter action (default 'trap') */
  seccomp?: SeccompMode;
  /** a migration destination: RAM only, filled by the stream; completeIncoming() builds the rest */
  incoming?: MachineIncoming;
}

export interface MachineIncoming {
  /** the RAM layout the source announced */
  regions: readonly RamRegionState[];
  /** a local migration's memfds, one per region, mapped shared: the source's RAM itself */
  fds?: readonly number[];
}

export interface MachineRestore {
  /** the saved store state (vm, vcpus, kvm, devices); the store itself is not read */
  state: RootState;
  memoryPath: string;
  ranges: readonly MemoryRange[];
  /** per-range checksums a copy restore verifies (absent for a format-1 snapshot) */
  rangeChecksums?: readonly string[];
  /** copy: read RAM in now; ondemand: map the file copy-on-write, pages load on first touch */
  mode: 'copy' | 'ondemand';
  /** ondemand: touch every page now */
  prefault?: boolean;
}

const SERIAL_ID = PLATFORM_SERIAL_ID;
const GED_ID = PLATFORM_GED_ID;

/**
 * A kernel or initramfs named by the config (which a restored VM took from its snapshot and
 * reloads at a guest reset): a regular file, not through a symlink, no larger than guest RAM.
 */
function readPayloadFile(path: string, what: string, maxBytes: number): Buffer {
  try {
    return readRegularFile(path, maxBytes);
  } catch (e) {
    throw new Error(`cannot read ${what} ${e instanceof HostFileError ? e.message : `${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`}`);
  }
}

/** Read one byte of every page so the file-backed mapping is populated now. */
function prefault(region: GuestRegion): void {
  let sink = 0;
  for (let off = 0; off < region.size; off += 4096) sink ^= region.view(off, 1)![0];
  void sink;
}

export class Machine {
  private readonly kvm: NativeKvm;
  private readonly vm: NativeVm;
  readonly memory: GuestMemory;
  private readonly runners: VcpuRunner[] = [];
  private console?: ConsoleSink;
  /** each RAM slot's memfd (valid until release) */
  private readonly slotFds: number[] = [];
  /** RAM is memfds mapped shared (not a private mapping of a snapshot file) */
  private sharedRam = true;
  private throttleTimer?: NodeJS.Timeout;
  private stopReported = false;
  private started = false;
  /** undefined for a restored machine: nothing was loaded */
  readonly plan?: BootPlan;
  /** the CPUID each vCPU was given, saved with its state */
  private readonly cpuids: CpuidEntry[][] = [];

  constructor(private readonly opts: MachineOptions) {
    const { store } = opts;
    this.kvm = native().openKvm();
    try {
      this.vm = this.kvm.createVm();
      // Intel needs both addresses set before the first vCPU; AMD ignores them.
      this.vm.setTssAddr(KVM_TSS_ADDRESS);
      this.vm.setIdentityMapAddr(BigInt(KVM_IDENTITY_MAP_ADDRESS));
      this.vm.createIrqchip();
      this.vm.createPit2();

      if (opts.restore) {
        // Before any RAM is read: a guest given CPU features this host lacks would fault on
        // their first use, long after a restore that seemed to work.
        const vcpu0 = opts.restore.state.vcpus.saved['0'];
        if (vcpu0) checkVcpuFitsHost(this.kvm, decodeVcpuState(vcpu0));
        this.memory = this.restoreMemory(opts.restore);
        this.buildFromState(opts.restore.state);
        return;
      }
      if (opts.incoming) {
        this.memory = this.incomingMemory(opts.incoming);
        return;
      }
      const config = withDefaults(store.getState().vm.config as VmConfig);

      const layout = ramRegions(config.memory.size);
      const regions = layout.map((r, slot) => {
        const info = this.vm.addMemorySlot({ slot, guestAddress: BigInt(r.guestAddress), size: r.size, name: 'tern-ram' });
        this.slotFds[slot] = info.fd;
        return new GuestRegion({
          guestAddress: r.guestAddress,
          size: r.size,
          chunks: info.chunks!,
          chunkSize: info.chunkSize,
          dirtyBitmap: this.vm.vmmDirtyBitmap(slot),
        });
      });
      this.memory = new GuestMemory(regions);
      store.dispatch(memoryEvents.regionsCreated(layout));

      const payload = config.payload;
      if (!payload.kernel) throw new Error('the VM config has no payload.kernel');
      const devices = platformDevices({ memorySize: config.memory.size, serial: config.serial.mode !== 'Off' });
      this.plan = loadKernel(this.memory, {
        kernel: readPayloadFile(payload.kernel, 'kernel', config.memory.size),
        initramfs: payload.initramfs ? readPayloadFile(payload.initramfs, 'initramfs', config.memory.size) : undefined,
        cmdline: payload.cmdline ?? '',
        vcpuCount: config.cpus.boot_vcpus,
        memorySize: config.memory.size,
        kernelName: payload.kernel,
        initramfsName: payload.initramfs,
        supportedCpuid: this.kvm.supportedCpuid(),
        // The DSDT describes the devices this VM has, each in its own words.
        acpi: { devices: devicesAcpi(devices) },
      });
      // Every guest reset loads the kernel again: these lines are the guest's to trigger.
      opts.guestLog.debug('kernel-loaded', { format: this.plan.format, entry: this.plan.entry }, 'kernel loaded');

      this.attachDevices(devices);
      this.console = this.openConsole(config.serial);
      this.createVcpus();
    } catch (e) {
      this.release();
      throw e;
    }
  }

  /** The serial console's host end; what it drops is counted on the serial device. */
  private openConsole(serial: SerialConfig): ConsoleSink {
    return openConsoleSink(serial, {
      maxFileBytes: this.opts.serialFileMaxBytes,
      log: this.opts.guestLog,
      onDropped: (bytes) => {
        if (this.opts.store.getState().devices.instances[SERIAL_ID]) this.opts.store.dispatch(serialOutputDroppedEvent(SERIAL_ID, bytes));
      },
    });
  }

  /** (Re)attach the platform devices: a boot starts from power-on device state. */
  private attachDevices(devices: DeviceInstance<AnyDeviceState>[]): void {
    const { store } = this.opts;
    for (const id of Object.keys(store.getState().devices.instances)) store.dispatch(deviceEvents.removed(id));
    for (const d of devices) store.dispatch(deviceEvents.added(d));
  }

  private createVcpus(): void {
    const plan = this.plan!;
    for (const inputs of plan.vcpus) {
      const vcpu = this.vm.createVcpu(inputs.id);
      if (inputs.cpuid) vcpu.setCpuid(inputs.cpuid);
      this.cpuids[inputs.id] = inputs.cpuid ?? [];
      const { set, rejected } = writeMsrs(vcpu, inputs.msrs);
      if (rejected.length > 0) {
        this.opts.guestLog.debug('boot-msrs', { vcpu: inputs.id, set, wanted: inputs.msrs.length, rejected }, 'KVM accepted only some boot MSRs');
      }
      vcpu.setFpu(inputs.fpu);
      vcpu.setLapic(patchLapicLint(vcpu.getLapic(), inputs.lapic));
      if (inputs.id === 0) {
        vcpu.setRegs(plan.boot.regs);
        const current = vcpu.getSregs();
        const s = plan.boot.sregs;
        vcpu.setSregs(s.mode === 'pvh32' ? protectedMode32Sregs(current) : longModeSregs(current, { cr3: s.cr3, ring: 0 }));
      }
      this.runners.push(new VcpuRunner(vcpu, (id, exit) => this.onExit(id, exit), this.opts.seccomp));
    }
  }

  /**
   * Guest RAM of a restored machine: the slots recorded in the saved state, so the guest sees
   * the physical map it was saved with; memory-ranges must hold exactly those.
   */
  private restoreMemory(r: MachineRestore): GuestMemory {
    // readSnapshot checked the table against the state; the file is opened anew, so check
    // again that it is a regular file long enough for every range (a mapping past its end
    // would fault the VMM at the guest's first touch).
    const { fd, size } = openMemoryFile(r.memoryPath);
    try {
      const end = Math.max(...r.ranges.map((x) => x.fileOffset + x.length));
      if (size < end) throw new SnapshotError(`${r.memoryPath}: file is ${size} bytes, shorter than its range table needs (${end})`);
      const regions = r.ranges.map((range, slot) => {
        const ondemand = r.mode === 'ondemand';
        const info = this.vm.addMemorySlot({
          slot,
          guestAddress: BigInt(range.guestAddress),
          size: range.length,
          name: 'tern-ram',
          // An ondemand restore does not touch RAM from JS: no ArrayBuffers (and no GC) yet.
          deferChunks: true,
          ...(ondemand ? { fromFd: fd, fileOffset: range.fileOffset, privateMap: true } : {}),
        });
        this.slotFds[slot] = info.fd;
        if (ondemand) this.sharedRam = false;
        const region = new GuestRegion({
          guestAddress: range.guestAddress,
          size: range.length,
          chunks: () => this.vm.memoryChunks(slot),
          chunkSize: info.chunkSize,
          dirtyBitmap: this.vm.vmmDirtyBitmap(slot),
        });
        if (!ondemand) copyMemoryRange(r.memoryPath, fd, range, slot, region, r.rangeChecksums?.[slot]);
        else if (r.prefault) {
          // Every page is touched now anyway: hashing them as they come costs CPU only.
          const sum = r.rangeChecksums?.[slot];
          if (sum === undefined) prefault(region);
          else verifyRangeInRam(r.memoryPath, range, slot, region, sum);
        }
        return region;
      });
      return new GuestMemory(regions);
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * RAM of a migration destination: new zeroed memfds the stream fills, or (local migration)
   * the source's own memfds mapped shared, so no byte of RAM is copied.
   */
  private incomingMemory(inc: MachineIncoming): GuestMemory {
    if (inc.fds && inc.fds.length !== inc.regions.length) throw new Error(`${inc.fds.length} memory fds for ${inc.regions.length} RAM regions`);
    const regions = inc.regions.map((r, slot) => {
      const info = this.vm.addMemorySlot({
        slot,
        guestAddress: BigInt(r.guestAddress),
        size: r.size,
        name: 'tern-ram',
        deferChunks: true,
        ...(inc.fds ? { fromFd: inc.fds[slot], fileOffset: 0 } : {}),
      });
      this.slotFds[slot] = info.fd;
      return new GuestRegion({
        guestAddress: r.guestAddress,
        size: r.size,
        chunks: () => this.vm.memoryChunks(slot),
        chunkSize: info.chunkSize,
        dirtyBitmap: this.vm.vmmDirtyBitmap(slot),
      });
    });
    return new GuestMemory(regions);
  }

  /** A migration destination: build the vCPUs, devices' host ends and KVM state from the received state. */
  completeIncoming(state: RootState): void {
    if (!this.opts.incoming || this.console) throw new Error('completeIncoming() is for a migration destination, once');
    this.buildFromState(state);
  }

  private buildFromState(state: RootState): void {
    this.console = this.openConsole(withDefaults(state.vm.config as VmConfig).serial);
    this.restoreVcpus(state);
    this.restoreVmState(state);
  }

  /** Each RAM slot's memfd, for a local migration; undefined when RAM is not shareable. */
  memoryFds(): number[] | undefined {
    return this.sharedRam ? [...this.slotFds] : undefined;
  }

  /** Pages written since the last call (KVM's dirty log OR the VMM's own), one bitmap per region. */
  dirtyBitmaps(): Uint8Array[] {
    return this.memory.regions.map((_, slot) => this.vm.getDirtyBitmap(slot));
  }

  /** The CPUID vCPU 0 was given, and the MSRs this host's KVM saves: what a destination must offer. */
  cpuFacts(): { cpuid: CpuidEntry[]; msrIndices: number[] } {
    return { cpuid: this.cpuids[0] ?? [], msrIndices: this.kvm.msrIndexList() };
  }

  /**
   * Take `percent` of every period from the vCPUs (auto-converge: a guest that dirties memory
   * faster than the link carries it is slowed until the rounds shrink). 0 ends the throttle.
   */
  throttle(percent: number, periodMs = 100): void {
    clearInterval(this.throttleTimer);
    this.throttleTimer = undefined;
    if (percent <= 0) return;
    const off = Math.min(0.99, percent / 100) * periodMs;
    this.throttleTimer = setInterval(() => {
      for (const r of this.runners) r.vcpu.requestPause();
      setTimeout(() => {
        if (this.throttleTimer) for (const r of this.runners) if (r.isRunning) r.resume();
      }, off).unref();
    }, periodMs);
    this.throttleTimer.unref();
  }

  private restoreVcpus(state: RootState): void {
    const count = withDefaults(state.vm.config as VmConfig).cpus.boot_vcpus;
    for (let id = 0; id < count; id++) {
      const saved = state.vcpus.saved[String(id)];
      if (!saved) throw new Error(`the saved state has no vCPU ${id}`);
      const s = decodeVcpuState(saved);
      const vcpu = this.vm.createVcpu(id);
      // CPUID first: it decides which MSRs and xsave features KVM accepts.
      vcpu.setCpuid(s.cpuid);
      this.cpuids[id] = s.cpuid;
      vcpu.setSregs(s.sregs);
      vcpu.setRegs(s.regs);
      vcpu.setFpu(s.fpu);
      vcpu.setXsave(s.xsave);
      vcpu.setXcrs(s.xcrs);
      vcpu.setLapic(s.lapic);
      // Every MSR this KVM takes is set, the ones it rejects are skipped (a destination whose
      // KVM lacks one of the source's): one line per vCPU names them all.
      const { set, rejected } = writeMsrs(vcpu, s.msrs);
      if (rejected.length > 0) {
        this.opts.log.warn({ vcpu: id, set, wanted: s.msrs.length, rejected: rejected.map((i) => `0x${i.toString(16)}`) }, 'KVM rejected saved MSRs');
      }
      vcpu.setVcpuEvents(s.vcpuEvents);
      vcpu.setDebugRegs(s.debugRegs);
      vcpu.setMpState(s.mpState);
      this.runners.push(new VcpuRunner(vcpu, (vid, exit) => this.onExit(vid, exit), this.opts.seccomp));
    }
  }

  private restoreVmState(state: RootState): void {
    const saved = state.kvm.saved;
    if (!saved) throw new Error('the saved state has no KVM irqchip/PIT/clock state');
    saved.irqchips.forEach((chip, i) => this.vm.setIrqchip(i, chip));
    this.vm.setPit2(saved.pit);
  }

  start(): void {
    this.started = true;
    this.console!.onInput((bytes) => this.acceptConsoleInput(bytes));
    for (const r of this.runners) r.start();
  }

  /** Press the ACPI power button: the GED latches the event and raises its interrupt. */
  pressPowerButton(): void {
    this.runEffects(this.opts.store.dispatch(powerButtonPressedEvent(GED_ID)).effects);
  }

  /** Put host console input in the UART, as much as it has room for; returns the bytes taken. */
  private acceptConsoleInput(bytes: Uint8Array): number {
    const inst = this.opts.store.getState().devices.instances[SERIAL_ID];
    if (!inst) return bytes.length;
    const taken = Math.min(bytes.length, serialInputRoom(inst as Serial16550aState));
    if (taken > 0) {
      const r = this.opts.store.dispatch(serialInputEvent(SERIAL_ID, bytes.subarray(0, taken)));
      this.runEffects(r.effects);
    }
    return taken;
  }

  private onExit(vcpu: number, exit: VcpuExit): number | bigint | 'stop' | void {
    switch (exit.kind) {
      case 'io':
      case 'mmio': {
        const r = dispatchIoExit(this.opts.store, exit, Date.now() * 1e6);
        if (r.effects.length) this.runEffects(r.effects);
        // The guest reading its receive buffer makes room for held console input.
        if (exit.kind === 'io' && exit.direction === 'in' && exit.port === COM1_BASE) this.console!.offerHeldInput();
        return r.value;
      }
      case 'hlt':
        return; // with the in-kernel LAPIC, HLT is handled by KVM; nothing to do
      case 'shutdown':
        // A triple fault: what a PC does then is reset, and Linux relies on it as a last resort.
        this.reportStop({ reason: 'reset', source: `vcpu${vcpu} triple fault` });
        return 'stop';
      case 'system_event':
        // KVM_SYSTEM_EVENT_SHUTDOWN = 1, RESET = 2, CRASH = 3
        if (exit.type === 2) this.reportStop({ reason: 'reset', source: 'system event' });
        else if (exit.type === 1) this.reportStop({ reason: 'poweroff', source: 'system event' });
        else if (exit.type === 3) this.reportStop({ reason: 'panic', source: 'kvm crash system event' });
        else this.reportStop({ reason: 'fatal', message: `guest crash (system event ${exit.type})` });
        return 'stop';
      case 'fail_entry':
        this.reportStop({ reason: 'fatal', message: `vCPU ${vcpu}: KVM entry failed, hardware reason 0x${exit.reason.toString(16)}` });
        return 'stop';
      case 'internal_error':
        this.reportStop({ reason: 'fatal', message: `vCPU ${vcpu}: KVM internal error, suberror ${exit.suberror}` });
        return 'stop';
      case 'error':
        this.reportStop({ reason: 'fatal', message: `vCPU ${vcpu}: ${exit.message}` });
        return 'stop';
      case 'unknown':
        this.reportStop({ reason: 'fatal', message: `vCPU ${vcpu}: unhandled KVM exit reason ${exit.reason}` });
        return 'stop';
      default:
        return;
    }
  }

  private runEffects(effects: readonly Effect[]): void {
    for (const e of effects) {
      switch (e.type) {
        case 'console.output':
          this.console!.write(e.bytes);
          break;
        case 'irq.pulse':
          this.vm.irqLine(e.gsi, 1);
          this.vm.irqLine(e.gsi, 0);
          break;
        case 'irq.level':
          this.vm.irqLine(e.gsi, e.level);
          break;
        case 'vm.reset':
          this.reportStop({ reason: 'reset', source: e.source });
          break;
        case 'vm.poweroff':
          this.reportStop({ reason: 'poweroff', source: e.source });
          break;
        case 'vm.sleep':
          this.opts.guestLog.warn('sleep-state', { state: e.state, source: e.source }, 'guest asked for a sleep state Tern does not implement');
          break;
        case 'boot.progress':
          break; // recorded in the store by the debug port's event
      }
    }
  }

  private reportStop(stop: MachineStop): void {
    if (this.stopReported) return;
    this.stopReported = true;
    this.throttle(0);
    // Stop every vCPU now: no guest instruction may run after a poweroff or reset request.
    for (const r of this.runners) r.vcpu.requestPause();
    setImmediate(() => this.opts.onStop(stop));
  }

  /**
   * Kick every vCPU out of KVM_RUN, wait until all are parked, then record each one's complete
   * state in the store. Console input stays in the host's buffer until resume, so no device
   * raises an interrupt while the VM is paused.
   */
  async pause(): Promise<void> {
    this.throttle(0);
    this.console!.pauseInput();
    await Promise.all(this.runners.map((r) => r.pause()));
    // kvmclock first, as close as possible to the moment the vCPUs stopped: the guest's TSC is
    // saved with its vCPU, and every millisecond between the two reads would be guest time
    // that passes again after the resume.
    const clock = this.vm.getClock();
    const msrIndices = this.kvm.msrIndexList();
    for (const r of this.runners) {
      this.opts.store.dispatch(vcpuEvents.stateSaved(r.vcpu.id, encodeVcpuState(this.readVcpuState(r.vcpu, msrIndices))));
    }
    this.opts.store.dispatch(
      kvmEvents.stateSaved({
        irqchips: [0, 1, 2].map((chip) => this.vm.getIrqchip(chip)),
        pit: this.vm.getPit2(),
        clock: `0x${clock.clock.toString(16)}`,
        clockFlags: clock.flags,
      }),
    );
  }

  /**
   * Let the vCPUs run again. restoreClock false is for a pause that failed part way: the
   * saved clock may then be an earlier pause's, and the guest's own clock simply ran on.
   */
  resume(opts: { restoreClock?: boolean } = {}): void {
    // kvmclock continues from the value saved at the pause, set just before the vCPUs run:
    // the guest's time neither runs backwards nor counts the time it spent paused (or in a
    // snapshot, or being restored).
    const saved = this.opts.store.getState().kvm.saved;
    if (saved && (opts.restoreClock ?? true)) this.vm.setClock(BigInt(saved.clock));
    // A restored machine's vCPU threads have not run yet.
    if (!this.started) {
      this.start();
      return;
    }
    for (const r of this.runners) r.resume();
    this.console!.resumeInput();
  }

  private readVcpuState(vcpu: NativeVcpu, msrIndices: number[]) {
    // KVM_KVMCLOCK_CTRL tells the guest the pause was the host's doing (no soft-lockup report).
    vcpu.kvmclockCtrl();
    return {
      regs: vcpu.getRegs(),
      sregs: vcpu.getSregs(),
      fpu: vcpu.getFpu(),
      msrs: readMsrs(vcpu, msrIndices).entries,
      xsave: vcpu.getXsave(),
      xcrs: vcpu.getXcrs(),
      lapic: vcpu.getLapic(),
      vcpuEvents: vcpu.getVcpuEvents(),
      debugRegs: vcpu.getDebugRegs(),
      mpState: vcpu.getMpState(),
      cpuid: this.cpuids[vcpu.id] ?? [],
    };
  }

  /** Stop every vCPU thread and wait for them. */
  async stop(): Promise<void> {
    this.throttle(0);
    await Promise.all(this.runners.map((r) => r.stop()));
  }

  /** Stop the vCPUs and release every host resource. */
  async destroy(): Promise<void> {
    await this.stop();
    this.release();
  }

  private release(): void {
    this.console?.close();
    for (const r of this.runners) {
      try {
        r.vcpu.close();
      } catch {
        /* already closed */
      }
    }
    this.runners.length = 0;
    try {
      this.vm?.close();
    } finally {
      this.kvm.close();
    }
  }
}
