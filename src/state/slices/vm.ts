// The VM lifecycle: Cloud Hypervisor's VmState names (Created, Running, Shutdown, Paused) plus
// an explicit 'NotCreated' for "no VM". Operations that take time are bracketed by an
// "-ing" event (Booting) and a completion event (Booted); in between, `pending` names the
// operation and other lifecycle events are refused. The VM config lives here too.
//
// Every operation ends in a defined status: its completion event, or "[VM] Operation Failed",
// whose outcome the table FAILURE_OUTCOMES bounds (a failed reboot has lost its machine and
// ends Shutdown; a failed pause or resume ends where the VMM could put the vCPUs back).
// A stop the guest asks for (poweroff, reset) is recorded as `guestStop` the moment it
// arrives; while the VM is paused it waits there, and the resume carries it out.
import type { VmConfig } from '../../config/vm-config';
import { InvalidTransitionError, InvalidVmConfigError, TernStateError } from '../errors';
import { assertJsonSafe } from '../json';
import { Type } from '@sinclair/typebox';
import { VmConfigSchema } from '../../api/schema';
import { createSlice, eventCreator } from '../slice';
import { Count, Exact, IntIn } from '../state-schema';

// 2: guestStop
export const VM_SCHEMA_VERSION = 2;

export type VmState = 'Created' | 'Running' | 'Shutdown' | 'Paused';
export type VmStatus = 'NotCreated' | VmState;
export type VmPending = 'Booting' | 'Pausing' | 'Resuming' | 'Rebooting' | 'Snapshotting' | 'Restoring';

export interface VmFailure {
  operation: VmPending;
  message: string;
}

/** A stop the guest asked for: what the VMM does about it, and why. */
export interface GuestStop {
  action: 'reboot' | 'shutdown';
  /** 'reset', 'poweroff', 'panic' or 'fatal' */
  reason: string;
  /** where it came from ('acpi', 'i8042', 'vcpu0 triple fault', an error message) */
  detail: string;
}

export interface VmSliceState {
  schemaVersion: number;
  status: VmStatus;
  /** operation in progress, if any */
  pending: VmPending | null;
  config: VmConfig | null;
  bootCount: number;
  rebootCount: number;
  /** the last operation that failed between its "-ing" and completion events */
  lastFailure: VmFailure | null;
  /** a guest stop not carried out yet (it arrived while the VM was being paused or was paused) */
  guestStop: GuestStop | null;
}

export const VmEvents = {
  Created: '[VM] Created',
  Booting: '[VM] Booting',
  Booted: '[VM] Booted',
  Pausing: '[VM] Pausing',
  Paused: '[VM] Paused',
  Resuming: '[VM] Resuming',
  Resumed: '[VM] Resumed',
  Rebooting: '[VM] Rebooting',
  Rebooted: '[VM] Rebooted',
  Shutdown: '[VM] Shutdown',
  Deleted: '[VM] Deleted',
  OperationFailed: '[VM] Operation Failed',
  /** the guest asked to power off or reset (or failed); carried out at once unless Paused */
  GuestStopRequested: '[VM] Guest Stop Requested',
  /** the ACPI power button was pressed; the guest decides what to do about it */
  PowerButtonPressed: '[VM] Power Button Pressed',
  Snapshotting: '[VM] Snapshotting',
  Snapshotted: '[VM] Snapshotted',
  /** restore starts with no VM; the saved state then replaces the store's, still Restoring */
  Restoring: '[VM] Restoring',
  Restored: '[VM] Restored',
  /** a disk joined the config of a VM that is not running (vm.add-disk's cold add) */
  DiskAdded: '[VM] Disk Added',
  /** a net card joined the config of a VM that is not running (vm.add-net's cold add) */
  NetAdded: '[VM] Net Added',
} as const;

export type VmEventType = (typeof VmEvents)[keyof typeof VmEvents];

export interface VmCreatedPayload {
  config: VmConfig;
}

export interface VmDiskAddedPayload {
  disk: NonNullable<VmConfig['disks']>[number];
}

export interface VmNetAddedPayload {
  net: NonNullable<VmConfig['net']>[number];
}

export interface VmOperationFailedPayload {
  message: string;
  /** where the failed operation left the VM; FAILURE_OUTCOMES lists what each operation allows */
  status?: VmStatus;
}

/**
 * What a failed operation may leave behind, the first being the default: a failed boot never
 * started a guest, a failed reboot has destroyed the old machine, a failed pause or resume
 * ends with the vCPUs running or parked again or, if even that failed, with no machine.
 */
export const FAILURE_OUTCOMES: Readonly<Record<VmPending, readonly ('unchanged' | VmStatus)[]>> = {
  Booting: ['unchanged'],
  Rebooting: ['Shutdown'],
  Pausing: ['Running', 'Shutdown'],
  Resuming: ['Paused', 'Shutdown'],
  Snapshotting: ['Paused', 'Shutdown'],
  Restoring: ['unchanged'],
};

interface Rule {
  /** statuses the event is accepted in */
  from: readonly VmStatus[];
  /** the operation that must be pending; null = none may be; 'any' = either */
  pending: VmPending | null | 'any';
}

const CREATED: readonly VmStatus[] = ['Created', 'Running', 'Paused', 'Shutdown'];

/** The lifecycle state machine: which events each (status, pending) accepts. */
export const VM_LIFECYCLE: Readonly<Record<VmEventType, Rule>> = {
  [VmEvents.Created]: { from: ['NotCreated'], pending: null },
  // A running VM would need the disk hot-plugged: only a VM that is not running takes one.
  [VmEvents.DiskAdded]: { from: ['Created', 'Shutdown'], pending: null },
  [VmEvents.NetAdded]: { from: ['Created', 'Shutdown'], pending: null },
  [VmEvents.Booting]: { from: ['Created', 'Shutdown'], pending: null },
  [VmEvents.Booted]: { from: ['Created', 'Shutdown'], pending: 'Booting' },
  [VmEvents.Pausing]: { from: ['Running'], pending: null },
  [VmEvents.Paused]: { from: ['Running'], pending: 'Pausing' },
  [VmEvents.Resuming]: { from: ['Paused'], pending: null },
  [VmEvents.Resumed]: { from: ['Paused'], pending: 'Resuming' },
  [VmEvents.Rebooting]: { from: ['Running'], pending: null },
  [VmEvents.Rebooted]: { from: ['Running'], pending: 'Rebooting' },
  // Shutting down or deleting aborts whatever was in progress. A VM that never booted has
  // nothing to shut down (Cloud Hypervisor refuses it too).
  [VmEvents.Shutdown]: { from: ['Running', 'Paused'], pending: 'any' },
  [VmEvents.Deleted]: { from: CREATED, pending: 'any' },
  // A failed restore leaves no VM: its failure is recorded while NotCreated.
  [VmEvents.OperationFailed]: { from: ['NotCreated', ...CREATED], pending: 'any' },
  [VmEvents.PowerButtonPressed]: { from: ['Running'], pending: null },
  // Whatever the VMM is doing: the guest's request must not be lost.
  [VmEvents.GuestStopRequested]: { from: ['Running', 'Paused'], pending: 'any' },
  [VmEvents.Snapshotting]: { from: ['Paused'], pending: null },
  [VmEvents.Snapshotted]: { from: ['Paused'], pending: 'Snapshotting' },
  [VmEvents.Restoring]: { from: ['NotCreated'], pending: null },
  [VmEvents.Restored]: { from: ['Paused'], pending: 'Restoring' },
};

function describe(vm: Pick<VmSliceState, 'status' | 'pending'>): string {
  return vm.pending ? `${vm.status} (${vm.pending})` : vm.status;
}

/** Why `type` is refused in `vm`, or null if it is allowed. */
export function vmTransitionRefusal(vm: Pick<VmSliceState, 'status' | 'pending'>, type: VmEventType): string | null {
  const rule = VM_LIFECYCLE[type];
  if (!rule) return 'unknown lifecycle event';
  if (!rule.from.includes(vm.status)) return vm.status === 'NotCreated' ? 'no VM has been created' : 'wrong state';
  if (type === VmEvents.OperationFailed) return vm.pending ? null : 'no operation in progress';
  if (rule.pending === 'any') return null;
  if (rule.pending === null) return vm.pending ? `${vm.pending} is in progress` : null;
  return vm.pending === rule.pending ? null : `expected ${rule.pending} to be in progress`;
}

export function canTransition(vm: Pick<VmSliceState, 'status' | 'pending'>, type: VmEventType): boolean {
  return vmTransitionRefusal(vm, type) === null;
}

/** Throw InvalidTransitionError unless `type` is allowed in `vm`. */
export function assertVmTransition(vm: Pick<VmSliceState, 'status' | 'pending'>, type: VmEventType): void {
  const why = vmTransitionRefusal(vm, type);
  if (why !== null) throw new InvalidTransitionError(describe(vm), type, why);
}

/** Structural checks the store insists on; full validation belongs to the API layer. */
export function vmConfigProblems(config: unknown): string[] {
  const problems: string[] = [];
  if (typeof config !== 'object' || config === null || Array.isArray(config)) return ['config must be an object'];
  const c = config as VmConfig;
  if (typeof c.payload !== 'object' || c.payload === null) problems.push('payload is required');
  else if (typeof c.payload.kernel !== 'string' && typeof c.payload.firmware !== 'string') {
    problems.push('payload needs a kernel or a firmware');
  }
  if (c.cpus !== undefined) {
    const { boot_vcpus: boot, max_vcpus: max } = c.cpus;
    if (!Number.isInteger(boot) || boot < 1) problems.push('cpus.boot_vcpus must be a positive integer');
    if (!Number.isInteger(max) || max < boot) problems.push('cpus.max_vcpus must be an integer >= boot_vcpus');
  }
  if (c.memory !== undefined && !(Number.isSafeInteger(c.memory.size) && c.memory.size > 0)) {
    problems.push('memory.size must be a positive integer');
  }
  try {
    assertJsonSafe(config, '/config');
  } catch (e) {
    problems.push((e as Error).message);
  }
  return problems;
}

export const vmInitialState = (): VmSliceState => ({
  schemaVersion: VM_SCHEMA_VERSION,
  status: 'NotCreated',
  pending: null,
  config: null,
  bootCount: 0,
  rebootCount: 0,
  lastFailure: null,
  guestStop: null,
});

type Draft = VmSliceState; // handlers below mutate an immer draft of this

/** A cold add: `entry` (a copy) at the end of the config's `list`, the whole config checked again. */
function addToConfigList(vm: Draft, list: 'disks' | 'net', entry: unknown): void {
  const config = { ...vm.config, [list]: [...(vm.config?.[list] ?? []), JSON.parse(JSON.stringify(entry ?? null))] } as VmConfig;
  const problems = vmConfigProblems(config);
  if (problems.length) throw new InvalidVmConfigError(problems);
  vm.config = config;
}

function begin(type: VmEventType, op: VmPending) {
  return (vm: Draft) => {
    assertVmTransition(vm, type);
    vm.pending = op;
  };
}

function complete(type: VmEventType, status: VmState, count?: 'bootCount' | 'rebootCount') {
  return (vm: Draft) => {
    assertVmTransition(vm, type);
    vm.status = status;
    vm.pending = null;
    vm.lastFailure = null;
    // Rebooted, Booted and Shutdown start or end the guest: any stop it asked for is done.
    if (status !== 'Paused' && type !== VmEvents.Resumed) vm.guestStop = null;
    if (count) vm[count] += 1;
  };
}

const Literals = (...values: string[]) => Type.Union(values.map((v) => Type.Literal(v)));
const PendingSchema = Literals('Booting', 'Pausing', 'Resuming', 'Rebooting', 'Snapshotting', 'Restoring');

export const VmSliceSchema = Exact({
  schemaVersion: IntIn(VM_SCHEMA_VERSION, VM_SCHEMA_VERSION),
  status: Literals('NotCreated', 'Created', 'Running', 'Paused', 'Shutdown'),
  pending: Type.Union([Type.Null(), PendingSchema]),
  config: Type.Union([Type.Null(), VmConfigSchema]),
  bootCount: Count(),
  rebootCount: Count(),
  lastFailure: Type.Union([Type.Null(), Exact({ operation: PendingSchema, message: Type.String({ maxLength: 65536 }) })]),
  guestStop: Type.Union([Type.Null(), Exact({ action: Literals('reboot', 'shutdown'), reason: Type.String({ maxLength: 256 }), detail: Type.String({ maxLength: 65536 }) })]),
});

export const vmSlice = createSlice({
  name: 'vm',
  schemaVersion: VM_SCHEMA_VERSION,
  initialState: vmInitialState,
  schema: VmSliceSchema,
  handlers: {
    [VmEvents.Created]: (vm, payload: VmCreatedPayload) => {
      assertVmTransition(vm, VmEvents.Created);
      const problems = vmConfigProblems(payload?.config);
      if (problems.length) throw new InvalidVmConfigError(problems);
      vm.status = 'Created';
      // A private copy: the caller's object is not frozen into the store.
      vm.config = JSON.parse(JSON.stringify(payload.config)) as VmConfig;
    },
    [VmEvents.DiskAdded]: (vm, payload: VmDiskAddedPayload) => {
      assertVmTransition(vm, VmEvents.DiskAdded);
      addToConfigList(vm, 'disks', payload?.disk);
    },
    [VmEvents.NetAdded]: (vm, payload: VmNetAddedPayload) => {
      assertVmTransition(vm, VmEvents.NetAdded);
      addToConfigList(vm, 'net', payload?.net);
    },
    [VmEvents.Booting]: begin(VmEvents.Booting, 'Booting'),
    [VmEvents.Booted]: complete(VmEvents.Booted, 'Running', 'bootCount'),
    [VmEvents.Pausing]: begin(VmEvents.Pausing, 'Pausing'),
    [VmEvents.Paused]: complete(VmEvents.Paused, 'Paused'),
    [VmEvents.Resuming]: begin(VmEvents.Resuming, 'Resuming'),
    [VmEvents.Resumed]: complete(VmEvents.Resumed, 'Running'),
    [VmEvents.Rebooting]: begin(VmEvents.Rebooting, 'Rebooting'),
    [VmEvents.Rebooted]: complete(VmEvents.Rebooted, 'Running', 'rebootCount'),
    [VmEvents.Shutdown]: complete(VmEvents.Shutdown, 'Shutdown'),
    [VmEvents.Deleted]: (vm) => {
      assertVmTransition(vm, VmEvents.Deleted);
      return vmInitialState();
    },
    // No state change: recorded so the check runs in one place and subscribers see the press.
    [VmEvents.PowerButtonPressed]: (vm) => {
      assertVmTransition(vm, VmEvents.PowerButtonPressed);
    },
    [VmEvents.Snapshotting]: begin(VmEvents.Snapshotting, 'Snapshotting'),
    [VmEvents.Snapshotted]: complete(VmEvents.Snapshotted, 'Paused'),
    [VmEvents.Restoring]: begin(VmEvents.Restoring, 'Restoring'),
    [VmEvents.Restored]: complete(VmEvents.Restored, 'Paused'),
    [VmEvents.OperationFailed]: (vm, payload: VmOperationFailedPayload) => {
      assertVmTransition(vm, VmEvents.OperationFailed);
      const operation = vm.pending as VmPending;
      const allowed = FAILURE_OUTCOMES[operation];
      const outcome = payload?.status ?? allowed[0];
      if (!allowed.includes(outcome)) {
        throw new InvalidTransitionError(describe(vm), VmEvents.OperationFailed, `a failed ${operation} cannot end ${String(outcome)}`);
      }
      vm.lastFailure = { operation, message: String(payload?.message ?? '') };
      vm.pending = null;
      if (outcome !== 'unchanged') vm.status = outcome;
      if (outcome === 'Shutdown') vm.guestStop = null;
    },
    [VmEvents.GuestStopRequested]: (vm, payload: GuestStop) => {
      assertVmTransition(vm, VmEvents.GuestStopRequested);
      if (payload?.action !== 'reboot' && payload?.action !== 'shutdown') {
        throw new TernStateError('InvalidGuestStop', `a guest stop must reboot or shut down, not '${String(payload?.action)}'`);
      }
      // A poweroff outranks a reset that came first: the guest's last word is to stop.
      if (vm.guestStop?.action === 'shutdown') return;
      vm.guestStop = { action: payload.action, reason: String(payload.reason), detail: String(payload.detail) };
    },
  },
  validate(state) {
    if (!['NotCreated', 'Created', 'Running', 'Paused', 'Shutdown'].includes(state.status)) {
      throw new TernStateError('InvalidState', `unknown VM status '${String(state.status)}'`);
    }
  },
});

/** A lifecycle event with no payload, from `source` (default the VMM). */
function lifecycle(type: VmEventType) {
  const create = eventCreator<null>(type);
  return (source = 'vmm') => create(null, source);
}
const vmCreated = eventCreator<VmCreatedPayload>(VmEvents.Created);
const vmOperationFailed = eventCreator<VmOperationFailedPayload>(VmEvents.OperationFailed);
const vmGuestStopRequested = eventCreator<GuestStop>(VmEvents.GuestStopRequested);
const vmDiskAdded = eventCreator<VmDiskAddedPayload>(VmEvents.DiskAdded);
const vmNetAdded = eventCreator<VmNetAddedPayload>(VmEvents.NetAdded);

/** Event creators for the VM lifecycle. */
export const vmEvents = {
  created: (config: VmConfig, source = 'vmm') => vmCreated({ config }, source),
  booting: lifecycle(VmEvents.Booting),
  booted: lifecycle(VmEvents.Booted),
  pausing: lifecycle(VmEvents.Pausing),
  paused: lifecycle(VmEvents.Paused),
  resuming: lifecycle(VmEvents.Resuming),
  resumed: lifecycle(VmEvents.Resumed),
  rebooting: lifecycle(VmEvents.Rebooting),
  rebooted: lifecycle(VmEvents.Rebooted),
  shutdown: lifecycle(VmEvents.Shutdown),
  deleted: lifecycle(VmEvents.Deleted),
  operationFailed: (message: string, status?: VmStatus, source = 'vmm') => vmOperationFailed(status ? { message, status } : { message }, source),
  guestStopRequested: (stop: GuestStop, source = 'vm') => vmGuestStopRequested(stop, source),
  powerButtonPressed: lifecycle(VmEvents.PowerButtonPressed),
  snapshotting: lifecycle(VmEvents.Snapshotting),
  snapshotted: lifecycle(VmEvents.Snapshotted),
  restoring: lifecycle(VmEvents.Restoring),
  restored: lifecycle(VmEvents.Restored),
  diskAdded: (disk: VmDiskAddedPayload['disk'], source = 'vmm') => vmDiskAdded({ disk }, source),
  netAdded: (net: VmNetAddedPayload['net'], source = 'vmm') => vmNetAdded({ net }, source),
};
