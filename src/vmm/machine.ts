// A running KVM machine built from the VM config in the store: the KVM VM, its guest RAM, the
// vCPU threads, and the wiring from vCPU exits to device events. The machine itself holds
// only host resources (file descriptors, threads, mappings); every piece of VM and device
// state is in the store.
import type { Logger } from 'pino';
import {
  KVM_IDENTITY_MAP_ADDRESS,
  KVM_TSS_ADDRESS,
  loadKernel,
  patchLapicLint,
  ramRegions,
  type BootPlan,
} from '../boot';
import { sameCpuid } from '../boot/cpuid';
import { longModeSregs, protectedMode32Sregs } from '../boot/x86/long-mode';
import { doubleTtyProblem, withDefaults, type ConsoleConfig, type SerialConfig, type VmConfig } from '../config/vm-config';
import type { Effect } from '../devices/device';
import {
  devicesAcpi,
  platformDevices,
  powerButtonPressedEvent,
  PLATFORM_GED_ID,
  PLATFORM_SERIAL_ID,
  serialInputEvent,
  serialInputRoom,
  serialOutputDroppedEvent,
  serialIir,
  type DeviceInstance,
  type Serial16550aState,
  type AnyDeviceState,
} from '../devices';
import type { GuestMemory } from '../memory/guest-memory';
import { PCI_SEGMENT_ID, pciFunctionModels, pciSlotOfDevice, type PciSegmentState } from '../devices/pci';
import { VIRTIO_CONSOLE_ID } from '../devices/virtio/console';
import { placeVirtioFunctions, virtioFunctionsOf } from '../devices/virtio/vm-devices';
import { virtioEvents } from '../devices/virtio/transport';
import { checkVcpuFitsHost } from '../migration/cpu-compat';
import {
  KvmCap,
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
  createStore,
  decodeVcpuState,
  deviceEvents,
  memoryEvents,
  encodeCpuid,
  encodeVcpuState,
  kvmEvents,
  standInVcpuState,
  vcpuEvents,
  type RootState,
  type SavedKvmState,
  type SavedVcpuState,
  type Store,
} from '../state';
import { HostFileError, readRegularFile } from '../util/host-file';
import { silentLogger } from '../util/log';
import type { GuestLog } from '../util/guest-log';
import { openConsoleSink, type ConsoleSink } from './console-sink';
import { dispatchIoExit } from './io-exit';
import { stopForEffect, stopForExit, type MachineStop } from './exit-stop';
import { createRam, incomingRam, snapshotRam, type GuestRam, type IncomingRam, type SnapshotRam } from './guest-ram';
import { shmemThpRefusalOnce } from './shmem-thp';
import { readVcpuSample, type VcpuSample } from './vcpu-sample';
import { readVcpuState, writeVcpuState } from './vcpu-state';
import { VcpuRunner } from './vcpu-runner';
import { MsiRouting } from './msi-routing';
import { VirtioQueues, type QueueHealth } from './virtio-queues';
import { consoleWorker } from './console-worker';
import { ConsoleConfigError, terminalSize } from './console-sink';
import { checkBackendsFit, openDeviceBackends, type DeviceBackends } from './device-backends';
import { threadCpuMsByName } from '../util/thread-cpu';

export type { MachineStop };


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
  /**
   * The host ends of the VM's virtio devices, opened from its config (a migration destination
   * opens them with openBackends() once the config has arrived). The machine closes them.
   */
  backends?: DeviceBackends;
}

export type MachineIncoming = IncomingRam;

export interface MachineRestore extends SnapshotRam {
  /** the saved store state (vm, vcpus, kvm, devices); the store itself is not read */
  state: RootState;
  /** told as each part of the build is done (where a restore's time goes) */
  mark?: (step: string) => void;
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

/** The name native/kvm_vcpu.cc gives a vCPU's thread (what top -H and /proc show). */
const vcpuThreadName = (id: number): string => `tern vcpu ${id}`;

/** What Machine.health() reports. */
export interface MachineHealth {
  /** each vCPU: its thread, its exits to this side, and the CPU its thread has used (a guest spinning or halted) */
  vcpus: { id: number; thread: string; exits: number; lastExitMsAgo: number | null; threadCpuMs: number | null }[];
  serial?: { ier: number; iir: number; threPending: boolean; rxQueued: number; txBytes: number };
  queues: QueueHealth[];
}

/** Where a pause's time went, in ms: parking the vCPUs, then saving their state (of which reading it from KVM, encoding it for the store, and recording it). */
export interface PauseTiming {
  parked_ms: number;
  saved_ms: number;
  read_ms: number;
  encode_ms: number;
  dispatch_ms: number;
}

export class Machine {
  private readonly kvm: NativeKvm;
  private readonly vm: NativeVm;
  readonly memory: GuestMemory;
  private readonly runners: VcpuRunner[] = [];
  /** the MSRs a pause saves: KVM's list less those this VM's vCPUs cannot read */
  private readableMsrs?: number[];
  /** the CPUID readableMsrs was found with ahead of the state (rehearseRestore) */
  private readableMsrsCpuid?: readonly CpuidEntry[];
  /**
   * A migration destination's vCPUs, created and their threads started parked before their
   * state arrived (restoreVcpus takes them over).
   */
  private readonly earlyRunners: VcpuRunner[] = [];
  private console?: ConsoleSink;
  /** the virtio console's host end (hvc0), when the VM has one */
  private hvc?: ConsoleSink;
  /** hvc0's host input goes to its receive queue (from the first run of the vCPUs on) */
  private hvcInput = false;
  /** each RAM slot's memfd (valid until release) */
  private readonly slotFds: number[] = [];
  /** RAM is memfds mapped shared (not a private mapping of a snapshot file) */
  private sharedRam = true;
  private throttleTimer?: NodeJS.Timeout;
  /** the throttle asked the vCPUs to park for this period, and has not resumed them yet */
  private throttleParked = false;
  private stopReported = false;
  private started = false;
  /** the console's host input goes to the UART (from the first run of the vCPUs on) */
  private consoleInput = false;
  /** undefined for a restored machine: nothing was loaded */
  readonly plan?: BootPlan;
  /** the CPUID each vCPU was given, saved with its state */
  private readonly cpuids: CpuidEntry[][] = [];
  /**
   * The same in the store's form, made once: a vCPU's CPUID never changes while it lives, so a
   * pause (a migration's, inside the guest's downtime) neither copies nor diffs it again.
   */
  private readonly cpuidsJson: CpuidEntry[][] = [];
  /** a migration destination's machine has been built from the final state */
  private incomingBuilt = false;
  /** MSI-X routes and irqfds of the PCI functions */
  private msi?: MsiRouting;
  /** the virtio devices' doorbells and queue serving */
  private virtio?: VirtioQueues;
  /** per vCPU id: the exits handed to this thread, and when the last one came (health()) */
  private readonly exitCounts: number[] = [];
  private readonly lastExitAt: number[] = [];
  private backends?: DeviceBackends;
  /** a health report's vCPU sampling in progress (a pause waits for it: it resumes what it parked) */
  private sampling?: Promise<{ samples: VcpuSample[][] }>;
  /** a pause has begun and no resume has followed: nothing else may resume the vCPUs */
  private pausing = false;

  constructor(private readonly opts: MachineOptions) {
    const { store } = opts;
    this.backends = opts.backends;
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
        const { mark } = opts.restore;
        mark?.('KVM VM created');
        const vcpu0 = opts.restore.state.vcpus.saved['0'];
        if (vcpu0) checkVcpuFitsHost(this.kvm, decodeVcpuState(vcpu0));
        mark?.('CPU checked against the host');
        this.memory = this.useRam(snapshotRam(this.vm, opts.restore));
        mark?.('guest RAM mapped');
        this.buildFromState(opts.restore.state, mark);
        mark?.('devices attached');
        return;
      }
      if (opts.incoming) {
        this.memory = this.useRam(incomingRam(this.vm, opts.incoming));
        return;
      }
      const config = withDefaults(store.getState().vm.config as VmConfig);

      const layout = ramRegions(config.memory.size);
      this.memory = this.useRam(createRam(this.vm, layout, config.memory.thp));
      const noHugePages = config.memory.thp ? shmemThpRefusalOnce() : undefined;
      if (noHugePages) opts.log.warn(noHugePages);
      store.dispatch(memoryEvents.regionsCreated(layout));

      const payload = config.payload;
      if (!payload.kernel) throw new Error('the VM config has no payload.kernel');
      const devices = platformDevices({
        memorySize: config.memory.size,
        serial: config.serial.mode !== 'Off',
        pciFunctions: placeVirtioFunctions(
          virtioFunctionsOf(config, {
            diskSizes: new Map([...(this.backends?.disks ?? [])].map(([id, d]) => [id, d.size])),
            netMacs: new Map([...(this.backends?.nets ?? [])].map(([id, n]) => [id, n.mac])),
            consoleSize: terminalSize(config.console),
          }),
        ),
      });
      this.plan = loadKernel(this.memory, {
        kernel: readPayloadFile(payload.kernel, 'kernel', config.memory.size),
        initramfs: payload.initramfs ? readPayloadFile(payload.initramfs, 'initramfs', config.memory.size) : undefined,
        cmdline: payload.cmdline ?? '',
        vcpuCount: config.cpus.boot_vcpus,
        memorySize: config.memory.size,
        kernelName: payload.kernel,
        initramfsName: payload.initramfs,
        supportedCpuid: this.kvm.supportedCpuid(),
        // KVM's LAPIC emulates the TSC-deadline timer but leaves it out of the supported CPUID:
        // the guest is told here, as QEMU and Cloud Hypervisor tell theirs (without it, Linux
        // falls back to the LAPIC's one-shot timer).
        cpuidOptions: { profile: config.cpus.tern_profile, tscDeadline: this.kvm.checkExtension(KvmCap.TSC_DEADLINE_TIMER) > 0 },
        // The DSDT describes the devices this VM has, each in its own words.
        acpi: { devices: devicesAcpi(devices) },
      });
      // Every guest reset loads the kernel again: these lines are the guest's to trigger.
      opts.guestLog.debug('kernel-loaded', { format: this.plan.format, entry: this.plan.entry }, 'kernel loaded');

      this.attachDevices(devices);
      this.console = this.openConsole(config.serial);
      this.attachPciHost(config);
      this.createVcpus();
    } catch (e) {
      this.release();
      // The backends were handed over with the options: they are the machine's to close.
      this.backends?.close().catch((err) => opts.log.error({ err }, 'closing the device backends failed'));
      throw e;
    }
  }

  /** The serial console's host end; what it drops is counted on the serial device. */
  private openConsole(serial: SerialConfig): ConsoleSink {
    const sink = openConsoleSink(serial, {
      maxFileBytes: this.opts.serialFileMaxBytes,
      log: this.opts.guestLog,
      onDropped: (bytes) => {
        if (this.opts.store.getState().devices.instances[SERIAL_ID]) this.opts.store.dispatch(serialOutputDroppedEvent(SERIAL_ID, bytes));
      },
    });
    if (sink.path) this.opts.log.info({ device: 'serial', pty: sink.path }, 'serial console on a pseudo-terminal');
    return sink;
  }

  /** The pseudo-terminals the consoles in pty mode opened (vm.info shows them as their files). */
  ptyPaths(): { serial?: string; console?: string } {
    return { ...(this.console?.path ? { serial: this.console.path } : {}), ...(this.hvc?.path ? { console: this.hvc.path } : {}) };
  }

  /**
   * The virtio console's host end. A guest that has the device always gets one: a restore
   * that turns the console Off keeps the guest's hvc0 and discards what it writes.
   */
  private openHvc(config: VmConfig & { console: ConsoleConfig }): ConsoleSink {
    const tty = doubleTtyProblem(config);
    if (tty) throw new ConsoleConfigError(tty);
    const sink = openConsoleSink(config.console.mode === 'Off' ? { mode: 'Null' } : config.console, {
      device: 'console',
      maxFileBytes: this.opts.serialFileMaxBytes,
      log: this.opts.guestLog,
    });
    if (sink.path) this.opts.log.info({ device: 'console', pty: sink.path }, 'virtio console on a pseudo-terminal');
    return sink;
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
      this.noteReadableMsrs(vcpu);
      this.runners.push(new VcpuRunner(vcpu, (id, exit) => this.onExit(id, exit), this.opts.seccomp));
    }
  }

  /**
   * Which of the MSRs KVM lists this VM's vCPUs can read, found once before they run: a pause
   * (a migration's downtime) then reads them in one KVM_GET_MSRS instead of one more call per
   * MSR the host lists but the vCPU lacks.
   */
  private noteReadableMsrs(vcpu: NativeVcpu): void {
    this.readableMsrs ??= readMsrs(vcpu, this.kvm.msrIndexList()).entries.map((e) => e.index);
  }

  private useRam(ram: GuestRam): GuestMemory {
    this.slotFds.push(...ram.slotFds);
    this.sharedRam = ram.shared;
    return ram.memory;
  }

  private kvmState(clock: { clock: bigint; flags: number }): SavedKvmState {
    return {
      irqchips: [0, 1, 2].map((chip) => this.vm.getIrqchip(chip)),
      pit: this.vm.getPit2(),
      clock: `0x${clock.clock.toString(16)}`,
      clockFlags: clock.flags,
    };
  }

  /**
   * A migration destination, after prepareVcpus(): the state its own new vCPUs and KVM objects
   * would save, in the store's form, recording `cpuid` (the source's, so the checks of it take
   * the path the real state's will). Checking and decoding it while the source still runs the
   * guest compiles the code (validators, codecs) that the pause then runs on the real state.
   */
  sampleSavedState(cpuid: readonly CpuidEntry[]): { vcpus: Record<string, SavedVcpuState>; kvm: SavedKvmState } {
    const vcpu = this.earlyRunners[0]?.vcpu;
    if (!this.opts.incoming || !vcpu) throw new Error('sampleSavedState() is for a migration destination with its vCPUs created');
    // (not noteReadableMsrs: this vCPU has no CPUID yet, and would read fewer than the real ones)
    const state = encodeVcpuState(readVcpuState(vcpu, this.kvm.msrIndexList(), [...cpuid]));
    return { vcpus: Object.fromEntries(this.earlyRunners.map((_, id) => [String(id), state])), kvm: this.kvmState(this.vm.getClock()) };
  }

  /**
   * A migration destination, after prepareVcpus(): set vCPU 0's sampled state back into it
   * through the restore path (decoding, every KVM setter) with the CPUID the source announced,
   * and find which MSRs a vCPU with that CPUID can read. Both would otherwise run for the first
   * time inside the pause. The vCPU has not run, and the final state overwrites all of it.
   */
  rehearseRestore(sample: SavedVcpuState, cpuid: readonly CpuidEntry[]): void {
    const vcpu = this.earlyRunners[0]?.vcpu;
    if (!this.opts.incoming || this.incomingBuilt || !vcpu) throw new Error('rehearseRestore() is for a migration destination with its vCPUs created');
    // (the sample was read before this vCPU had a CPUID: what the announced one refuses is no news)
    writeVcpuState(vcpu, { ...decodeVcpuState(sample), cpuid: [...cpuid] }, silentLogger());
    this.readableMsrs = readMsrs(vcpu, this.kvm.msrIndexList()).entries.map((e) => e.index);
    this.readableMsrsCpuid = cpuid;
  }

  /**
   * A migration destination: create the vCPUs before their state arrives, and start their
   * threads parked before their first KVM_RUN (a parked vCPU takes its state like an idle
   * one). Thread creation and seccomp set-up are then not part of the guest's pause.
   */
  async prepareVcpus(count: number): Promise<void> {
    if (!this.opts.incoming || this.incomingBuilt) throw new Error('prepareVcpus() is for a migration destination, before completeIncoming()');
    for (let id = this.earlyRunners.length; id < count; id++) {
      this.earlyRunners.push(new VcpuRunner(this.vm.createVcpu(id), (vid, exit) => this.onExit(vid, exit), this.opts.seccomp));
    }
    await Promise.all(this.earlyRunners.filter((r) => !r.hasStarted).map((r) => r.startParked()));
  }

  /**
   * A migration destination: open the host ends of the devices (disk images, the consoles)
   * once the VM's config arrived, not while the guest is paused: opening them takes I/O.
   */
  async openBackends(config: VmConfig): Promise<void> {
    if (!this.opts.incoming || this.incomingBuilt || this.backends) throw new Error('openBackends() is for a migration destination, once, before completeIncoming()');
    // A source on this host holds its images' locks until it hands them over (takeDiskLocks).
    this.backends = await openDeviceBackends(config, this.opts.log, { deferLocks: true });
    this.console = this.openConsole(withDefaults(config).serial);
  }

  /**
   * A migration: the source, paused, lets its disk images' locks go before it sends the last
   * state, and the destination takes them before it says it is ready; a source whose migration
   * failed takes them back before its guest runs again. So two VMMs on one host never both
   * write an image, and a VM with a writable disk can still move to a new VMM on its host.
   */
  releaseDiskLocks(): void {
    this.backends?.releaseLocks();
  }

  takeDiskLocks(): void {
    this.backends?.takeLocks();
  }

  /** A migration destination: build the vCPUs, devices' host ends and KVM state from the received state. */
  completeIncoming(state: RootState, mark?: (step: string) => void): void {
    if (!this.opts.incoming || this.incomingBuilt) throw new Error('completeIncoming() is for a migration destination, once');
    this.incomingBuilt = true;
    this.buildFromState(state, mark);
  }

  /** `mark`: told as each part is done (a migration's pause steps). */
  private buildFromState(state: RootState, mark?: (step: string) => void): void {
    const config = withDefaults(state.vm.config as VmConfig);
    // (a migration destination opened it with the config, ahead of the state)
    this.console ??= this.openConsole(config.serial);
    this.restoreVcpus(state, mark);
    mark?.('vCPUs set');
    this.restoreVmState(state);
    mark?.('irqchips set');
    // (the store takes this state only once the machine is built: the functions come from it)
    this.attachPciHost(config, state.devices.instances[PCI_SEGMENT_ID] as PciSegmentState | undefined);
  }

  /**
   * A migration destination, after openBackends(): attach the PCI functions' host side as the
   * state received so far has them (checked, not yet final). Each doorbell's ioeventfd costs
   * KVM a wait for its readers (an SRCU grace period), which the emulated lab stretched to
   * tens of milliseconds in all; the final state's build then only changes what moved since.
   * Nothing runs on them before the VM is started: no vCPU rings a doorbell, no queue serves.
   */
  prepareDevices(state: RootState, config: VmConfig): void {
    if (!this.opts.incoming || this.incomingBuilt) throw new Error('prepareDevices() is for a migration destination, before completeIncoming()');
    this.attachPciHost(withDefaults(config), state.devices.instances[PCI_SEGMENT_ID] as PciSegmentState | undefined);
  }

  /**
   * The host side of the PCI functions in the store: MSI-X routes and irqfds as the guest
   * programmed them, queue doorbells where their BARs decode, and the devices' workers. Once
   * attached (prepareDevices), a second call brings routes and doorbells up to `segment`.
   */
  private attachPciHost(config: VmConfig & { console: ConsoleConfig }, segment = this.pciSegment()): void {
    if (segment) checkBackendsFit(segment, this.backends);
    this.msi ??= new MsiRouting(this.vm, pciFunctionModels);
    this.msi.sync(segment);
    if (!this.virtio) {
      const workers = new Map(this.backends?.workers ?? []);
      if (segment && pciSlotOfDevice(segment, VIRTIO_CONSOLE_ID) !== undefined) {
        this.hvc = this.openHvc(config);
        workers.set(VIRTIO_CONSOLE_ID, consoleWorker(this.hvc));
      }
      this.virtio = new VirtioQueues({
        store: this.opts.store,
        vm: this.vm,
        memory: this.memory,
        guestLog: this.opts.guestLog,
        workers,
        runEffects: (effects) => this.runEffects(effects),
        irqfdOf: (device, vector) => this.msi?.irqfd(device, vector),
        msiHealth: (device, vector) => this.msi?.vectorHealth(device, vector),
      });
    }
    this.virtio.syncDoorbells(segment);
  }

  private pciSegment(): PciSegmentState | undefined {
    return this.opts.store.getState().devices.instances[PCI_SEGMENT_ID] as PciSegmentState | undefined;
  }

  /** Each RAM slot's memfd, for a local migration; undefined when RAM is not shareable. */
  memoryFds(): number[] | undefined {
    return this.sharedRam ? [...this.slotFds] : undefined;
  }

  /** Start or stop KVM's dirty log on every RAM slot (off from the start: a migration turns it on for its rounds). */
  dirtyLogging(on: boolean): void {
    this.memory.regions.forEach((_, slot) => this.vm.setDirtyLogging(slot, on));
  }

  /** Pages written since the last call (KVM's dirty log OR the VMM's own), one bitmap per region; logging must be on. */
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
    // A throttle that ends (or changes) inside a period's parked part lets the vCPUs run now:
    // that period's resume no longer comes, and a failed migration's source would keep its
    // guest with every vCPU parked.
    this.stopThrottle(true);
    if (percent <= 0) return;
    const off = Math.min(0.99, percent / 100) * periodMs;
    const timer = setInterval(() => {
      for (const r of this.runners) r.vcpu.requestPause();
      this.throttleParked = true;
      setTimeout(() => {
        if (this.throttleTimer === timer && this.throttleParked) this.endThrottlePark();
      }, off).unref();
    }, periodMs);
    this.throttleTimer = timer;
    timer.unref();
  }

  private endThrottlePark(): void {
    this.throttleParked = false;
    for (const r of this.runners) if (r.isRunning) r.resume();
  }

  /**
   * End the throttle. `resumeParked` false is for callers that park the vCPUs next (pause,
   * stop, a guest stop): what the current period parked stays parked, and no guest instruction
   * runs in between.
   */
  private stopThrottle(resumeParked: boolean): void {
    clearInterval(this.throttleTimer);
    this.throttleTimer = undefined;
    if (!this.throttleParked) return;
    if (resumeParked) this.endThrottlePark();
    else this.throttleParked = false;
  }

  private restoreVcpus(state: RootState, mark?: (step: string) => void): void {
    const count = withDefaults(state.vm.config as VmConfig).cpus.boot_vcpus;
    for (let id = 0; id < count; id++) {
      const saved = state.vcpus.saved[String(id)];
      if (!saved) throw new Error(`the saved state has no vCPU ${id}`);
      const s = decodeVcpuState(saved);
      mark?.(`vCPU ${id} decoded`);
      // (a migration destination's vCPUs exist already, their threads started and parked)
      const runner = this.earlyRunners[id] ?? new VcpuRunner(this.vm.createVcpu(id), (vid, exit) => this.onExit(vid, exit), this.opts.seccomp);
      // (MSRs found readable ahead of the state, with the CPUID the source announced, hold for this one)
      if (id === 0 && this.readableMsrsCpuid && !sameCpuid(s.cpuid, this.readableMsrsCpuid)) this.readableMsrs = undefined;
      writeVcpuState(runner.vcpu, s, this.opts.log);
      mark?.(`vCPU ${id} written`);
      this.cpuids[id] = s.cpuid;
      this.cpuidsJson[id] = saved.cpuid;
      this.noteReadableMsrs(runner.vcpu);
      this.runners.push(runner);
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
    this.takeConsoleInput();
    for (const r of this.runners) r.start();
    this.virtio?.start();
    this.takeHvcInput();
  }

  /**
   * A migration destination, once its VM is built: the vCPU threads start and wait parked
   * before their first KVM_RUN (thread creation and seccomp setup are then done before the
   * source gives the VM up); resume() wakes them. Console input waits for resume() too.
   */
  async startParked(): Promise<void> {
    if (this.started) throw new Error('startParked() is for a machine whose vCPUs have not started');
    this.started = true;
    await Promise.all(this.runners.filter((r) => !r.hasStarted).map((r) => r.startParked()));
  }

  private takeConsoleInput(): void {
    if (this.consoleInput) return;
    this.consoleInput = true;
    this.console!.onInput((bytes) => this.acceptConsoleInput(bytes));
  }

  /** hvc0's input goes into its receive queue while the queues are served. */
  private takeHvcInput(): void {
    if (this.hvcInput || !this.hvc) return;
    this.hvcInput = true;
    this.hvc.onInput((bytes) => this.virtio?.offerInput(VIRTIO_CONSOLE_ID, bytes) ?? 0);
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
    const now = Date.now();
    this.exitCounts[vcpu] = (this.exitCounts[vcpu] ?? 0) + 1;
    this.lastExitAt[vcpu] = now;
    switch (exit.kind) {
      case 'io':
      case 'mmio': {
        const r = dispatchIoExit(this.opts.store, exit, now * 1e6);
        if (r.effects.length) this.runEffects(r.effects);
        return r.value;
      }
      case 'hlt':
        return; // with the in-kernel LAPIC, HLT is handled by KVM; nothing to do
      default: {
        const stop = stopForExit(vcpu, exit);
        if (!stop) return;
        this.reportStop(stop);
        return 'stop';
      }
    }
  }

  private runEffects(effects: readonly Effect[]): void {
    for (const e of effects) {
      switch (e.type) {
        case 'console.output':
          this.console!.write(e.bytes);
          break;
        case 'console.input-room':
          this.console!.offerHeldInput();
          break;
        case 'irq.pulse':
          this.vm.irqLine(e.gsi, 1);
          this.vm.irqLine(e.gsi, 0);
          break;
        case 'irq.level':
          this.vm.irqLine(e.gsi, e.level);
          break;
        case 'vm.reset':
        case 'vm.poweroff':
          this.reportStop(stopForEffect(e)!);
          break;
        case 'vm.sleep':
          this.opts.guestLog.warn('sleep-state', { state: e.state, source: e.source }, 'guest asked for a sleep state Tern does not implement');
          break;
        case 'boot.progress':
          break; // recorded in the store by the debug port's event
        case 'msi.routes-changed':
          // Native queue threads write irqfds: they stop before a route goes away, and start
          // again where the new routes allow.
          {
            const stopped = this.virtio?.routesChanging() ?? false;
            this.msi!.sync(this.pciSegment());
            if (stopped) this.virtio!.serveAll();
          }
          break;
        case 'msi.send':
          this.msi!.send(e.device, e.vector);
          break;
        case 'pci.bars-changed':
          this.virtio!.syncDoorbells();
          break;
        case 'virtio.notify':
          this.virtio!.notify(e.device, e.queue);
          break;
        case 'virtio.activated':
          this.opts.store.dispatch(virtioEvents.activated(PCI_SEGMENT_ID, e.device));
          // Buffers the driver posted before DRIVER_OK are served now.
          this.virtio!.serveAll();
          break;
        case 'virtio.reset':
          // The transport state is back to power-on: nothing is served until DRIVER_OK, and
          // requests still in flight finish without touching the new queues.
          this.virtio!.deviceReset(e.device);
          this.opts.store.dispatch(virtioEvents.reset(PCI_SEGMENT_ID, e.device));
          break;
      }
    }
  }

  private reportStop(stop: MachineStop): void {
    if (this.stopReported) return;
    this.stopReported = true;
    this.stopThrottle(false);
    // Stop every vCPU now: no guest instruction may run after a poweroff or reset request.
    for (const r of this.runners) r.vcpu.requestPause();
    setImmediate(() => this.opts.onStop(stop));
  }

  /**
   * Kick every vCPU out of KVM_RUN, wait until all are parked, then record each one's complete
   * state in the store. Console input stays in the host's buffer until resume, so no device
   * raises an interrupt while the VM is paused.
   */
  async pause(): Promise<PauseTiming> {
    this.pausing = true;
    await this.sampling?.catch(() => undefined);
    this.stopThrottle(false);
    this.console!.pauseInput();
    this.hvc?.pauseInput();
    // Queues are served on this thread in whole batches: from here on none is, so the device
    // state saved below is final.
    this.virtio?.pause();
    const t0 = performance.now();
    await Promise.all(this.runners.map((r) => r.pause()));
    // Requests in flight finish (their used elements and cursors go in) before anything is saved.
    await this.virtio?.drain();
    const parked = performance.now();
    // kvmclock first, as close as possible to the moment the vCPUs stopped: the guest's TSC is
    // saved with its vCPU, and every millisecond between the two reads would be guest time
    // that passes again after the resume.
    const clock = this.vm.getClock();
    const msrIndices = this.readableMsrs ?? this.kvm.msrIndexList();
    let readMs = 0;
    let encodeMs = 0;
    let dispatchMs = 0;
    for (const r of this.runners) {
      const t1 = performance.now();
      const id = r.vcpu.id;
      const raw = readVcpuState(r.vcpu, msrIndices, this.cpuids[id] ?? []);
      const t2 = performance.now();
      const encoded = encodeVcpuState(raw, (this.cpuidsJson[id] ??= encodeCpuid(raw.cpuid)));
      const t3 = performance.now();
      this.opts.store.dispatch(vcpuEvents.stateSaved(r.vcpu.id, encoded));
      readMs += t2 - t1;
      encodeMs += t3 - t2;
      dispatchMs += performance.now() - t3;
    }
    this.opts.store.dispatch(kvmEvents.stateSaved(this.kvmState(clock)));
    // (a migration's downtime starts here: where the pause's time goes; the caller logs it
    // once the guest runs again, so that writing the line is not part of the pause)
    return { parked_ms: Math.round(parked - t0), saved_ms: Math.round(performance.now() - parked), read_ms: Math.round(readMs), encode_ms: Math.round(encodeMs), dispatch_ms: Math.round(dispatchMs) };
  }

  /**
   * A migration source, before its pause: run what the pause runs after reading the vCPUs
   * (encoding each one's state, the store's reducers taking it and KVM's) on stand-in vCPU
   * state in a scratch store, so that this code is compiled while the guest still runs and not
   * inside its pause. Returns the state such a pause would leave, for the caller to rehearse
   * its own part with. Only KVM's VM-wide state is read; the VM and the store are untouched.
   */
  rehearseSave(state: RootState): RootState {
    const scratch = createStore({ preloadedState: state, preloadedFromStore: true, journalSize: 0 });
    const standIn = standInVcpuState(this.readableMsrs ?? this.kvm.msrIndexList());
    for (const r of this.runners) {
      const id = r.vcpu.id;
      scratch.dispatch(vcpuEvents.stateSaved(id, encodeVcpuState(standIn, (this.cpuidsJson[id] ??= encodeCpuid(this.cpuids[id] ?? [])))));
    }
    scratch.dispatch(kvmEvents.stateSaved(this.kvmState(this.vm.getClock())));
    return scratch.getState();
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
    this.pausing = false;
    // A restored machine's vCPU threads have not run yet.
    if (!this.started) {
      this.start();
      return;
    }
    this.takeConsoleInput();
    for (const r of this.runners) r.resume();
    this.console!.resumeInput();
    this.virtio?.start();
    // After the queues: held input goes into the receive buffers the guest left.
    this.takeHvcInput();
    this.hvc?.resumeInput();
  }

  /**
   * A picture of the running machine for when its guest seems stuck: each vCPU thread's state
   * and exits (a vCPU that has made none for long is spinning or halted in the guest), the
   * console UART's interrupt state, and every virtio queue from both sides.
   */
  health(): MachineHealth {
    const now = Date.now();
    const serial = this.opts.store.getState().devices.instances[SERIAL_ID] as Serial16550aState | undefined;
    // (a vCPU that made no exit for long and whose thread keeps using CPU runs the guest, which
    // spins; one whose thread uses none is halted there, waiting for an interrupt)
    const cpu = threadCpuMsByName();
    return {
      vcpus: this.runners.map((r) => {
        const id = r.vcpu.id;
        return {
          id,
          thread: r.threadState,
          exits: this.exitCounts[id] ?? 0,
          lastExitMsAgo: this.lastExitAt[id] === undefined ? null : now - this.lastExitAt[id],
          threadCpuMs: cpu.get(vcpuThreadName(id)) ?? null,
        };
      }),
      ...(serial && { serial: { ier: serial.ier, iir: serialIir(serial), threPending: serial.threPending, rxQueued: serial.rx.length, txBytes: serial.txBytes } }),
      queues: this.virtio?.health() ?? [],
    };
  }

  /**
   * Where each vCPU is in its guest, `count` times `intervalMs` apart: each time every vCPU is
   * parked for as long as reading its registers takes, then runs on (a few milliseconds in all,
   * no event, nothing in the store). Only a machine whose vCPUs all run is sampled: a pause,
   * a stop or a migration's throttle has them parked for a reason of its own.
   */
  async sampleVcpus(count = 5, intervalMs = 10): Promise<{ samples: VcpuSample[][] } | { notSampled: string }> {
    // (two reports asked for at once share one sampling)
    if (this.sampling) return this.sampling;
    const why = this.sampleRefusal();
    if (why) return { notSampled: why };
    const run = async (): Promise<VcpuSample[][]> => {
      const samples: VcpuSample[][] = this.runners.map(() => []);
      for (let i = 0; i < count && !this.sampleRefusal(); i++) {
        if (i > 0) await new Promise((r) => setTimeout(r, intervalMs));
        await Promise.all(this.runners.map((r) => r.pause()));
        try {
          this.runners.forEach((r, n) => {
            if (r.threadState === 'parked') samples[n].push(readVcpuSample(r.vcpu, this.memory));
          });
        } finally {
          // (a guest stop meanwhile keeps them parked for good)
          if (!this.stopReported) for (const r of this.runners) if (r.isRunning) r.resume();
        }
      }
      return samples;
    };
    const sampling = run().then((samples) => ({ samples }));
    this.sampling = sampling;
    try {
      return await sampling;
    } finally {
      this.sampling = undefined;
    }
  }

  private sampleRefusal(): string | undefined {
    if (this.pausing) return 'the VM is paused or pausing';
    if (this.stopReported) return 'the guest stopped';
    if (this.throttleTimer) return 'a migration throttles the vCPUs';
    const notRunning = this.runners.find((r) => r.threadState !== 'running');
    if (notRunning) return `vCPU ${notRunning.vcpu.id} is ${notRunning.threadState}`;
    return undefined;
  }

  /** Bring what the devices' native threads counted into the store, for vm.counters. */
  collectDeviceCounters(): void {
    this.virtio?.collectCounters();
  }

  /** Stop every vCPU thread and wait for them. */
  async stop(): Promise<void> {
    this.stopThrottle(false);
    await Promise.all([...new Set([...this.runners, ...this.earlyRunners])].map((r) => r.stop()));
  }

  /** Stop the vCPUs and release every host resource. */
  async destroy(): Promise<void> {
    await this.stop();
    // Disk requests in flight finish before their images close.
    await this.virtio?.close().catch((err) => this.opts.log.error({ err }, 'stopping the virtio queues failed'));
    try {
      this.release();
    } finally {
      await this.backends?.close();
    }
  }

  private release(): void {
    this.console?.close();
    this.hvc?.close();
    this.msi?.close();
    for (const vcpu of new Set([...this.runners, ...this.earlyRunners].map((r) => r.vcpu))) {
      try {
        vcpu.close();
      } catch {
        /* already closed */
      }
    }
    this.runners.length = 0;
    this.earlyRunners.length = 0;
    try {
      this.vm?.close();
    } finally {
      this.kvm.close();
    }
  }
}
