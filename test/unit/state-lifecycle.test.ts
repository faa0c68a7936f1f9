import test from 'ava';
import { serialDevice } from '../../src/devices/serial-16550a';
import { InvalidTransitionError, InvalidVmConfigError, TernStateError } from '../../src/state/errors';
import { deviceEvents } from '../../src/state/slices/devices';
import { VmEvents, type VmEventType, canTransition, vmEvents } from '../../src/state/slices/vm';
import type { EventInput } from '../../src/state/slice';
import { createStore } from '../../src/state/store';
import { config } from './state-fixtures';

function running() {
  const store = createStore();
  store.dispatch(vmEvents.created(config));
  store.dispatch(vmEvents.booting());
  store.dispatch(vmEvents.booted());
  return store;
}

test('the whole lifecycle, step by step', (t) => {
  const store = createStore();
  const status = () => {
    const vm = store.getState().vm;
    return vm.pending ? `${vm.status}/${vm.pending}` : vm.status;
  };
  const steps: [EventInput, string][] = [
    [vmEvents.created(config), 'Created'],
    [vmEvents.booting(), 'Created/Booting'],
    [vmEvents.booted(), 'Running'],
    [vmEvents.pausing(), 'Running/Pausing'],
    [vmEvents.paused(), 'Paused'],
    [vmEvents.resuming(), 'Paused/Resuming'],
    [vmEvents.resumed(), 'Running'],
    [vmEvents.rebooting(), 'Running/Rebooting'],
    [vmEvents.rebooted(), 'Running'],
    [vmEvents.shutdown(), 'Shutdown'],
    [vmEvents.booting(), 'Shutdown/Booting'],
    [vmEvents.booted(), 'Running'],
    [vmEvents.deleted(), 'NotCreated'],
  ];
  t.is(status(), 'NotCreated');
  for (const [event, expected] of steps) {
    store.dispatch(event);
    t.is(status(), expected, event.type);
  }
  t.is(store.getState().vm.config, null);
});

test('resume while Running is refused with a typed error and changes nothing', (t) => {
  const store = running();
  const before = store.getState();
  const seq = store.seq;
  const journalLength = store.journal().length;
  const e = t.throws(() => store.dispatch(vmEvents.resuming()), { instanceOf: InvalidTransitionError });
  t.true(e instanceof TernStateError);
  t.is(e?.code, 'InvalidStateTransition');
  t.is(e?.httpStatus, 500);
  t.is(e?.from, 'Running');
  t.is(e?.eventType, VmEvents.Resuming);
  t.is(store.getState(), before);
  t.is(store.seq, seq);
  t.is(store.journal().length, journalLength);
});

test('illegal transitions across the state machine', (t) => {
  const refused: [string, () => ReturnType<typeof createStore>, VmEventType][] = [
    ['boot without a VM', () => createStore(), VmEvents.Booting],
    ['delete without a VM', () => createStore(), VmEvents.Deleted],
    ['shutdown without a VM', () => createStore(), VmEvents.Shutdown],
    ['create twice', running, VmEvents.Created],
    ['pause a created VM', () => {
      const s = createStore();
      s.dispatch(vmEvents.created(config));
      return s;
    }, VmEvents.Pausing],
    ['shutdown of a VM that never booted', () => {
      const s = createStore();
      s.dispatch(vmEvents.created(config));
      return s;
    }, VmEvents.Shutdown],
    ['Booted without Booting', () => {
      const s = createStore();
      s.dispatch(vmEvents.created(config));
      return s;
    }, VmEvents.Booted],
    ['boot while running', running, VmEvents.Booting],
    ['resume while running', running, VmEvents.Resuming],
    ['Paused without Pausing', running, VmEvents.Paused],
    ['pause while pausing', () => {
      const s = running();
      s.dispatch(vmEvents.pausing());
      return s;
    }, VmEvents.Pausing],
    ['reboot while paused', () => {
      const s = running();
      s.dispatch(vmEvents.pausing());
      s.dispatch(vmEvents.paused());
      return s;
    }, VmEvents.Rebooting],
    ['shutdown twice', () => {
      const s = running();
      s.dispatch(vmEvents.shutdown());
      return s;
    }, VmEvents.Shutdown],
    ['operation failed with nothing pending', running, VmEvents.OperationFailed],
  ];
  for (const [what, make, type] of refused) {
    const store = make();
    t.false(canTransition(store.getState().vm, type), what);
    t.throws(() => store.dispatch({ type, payload: type === VmEvents.Created ? { config } : null }), { instanceOf: InvalidTransitionError }, what);
  }
});

test('shutdown aborts an operation in progress; a failed operation clears pending', (t) => {
  const a = running();
  a.dispatch(vmEvents.pausing());
  a.dispatch(vmEvents.shutdown());
  t.is(a.getState().vm.status, 'Shutdown');
  t.is(a.getState().vm.pending, null);

  const b = running();
  b.dispatch(vmEvents.pausing());
  b.dispatch(vmEvents.operationFailed('vCPU 1 did not stop'));
  t.is(b.getState().vm.status, 'Running');
  t.is(b.getState().vm.pending, null);
  t.deepEqual(b.getState().vm.lastFailure, { operation: 'Pausing', message: 'vCPU 1 did not stop' });
});

test('every failed operation ends in a defined status: a failed reboot is Shutdown, not Running', (t) => {
  const status = (s: ReturnType<typeof createStore>) => `${s.getState().vm.status}${s.getState().vm.pending ? '/' + s.getState().vm.pending : ''}`;
  const reboot = running();
  reboot.dispatch(vmEvents.rebooting());
  reboot.dispatch(vmEvents.operationFailed('cannot read kernel'));
  t.is(status(reboot), 'Shutdown', 'the old machine is gone: the VM is not Running');
  t.deepEqual(reboot.getState().vm.lastFailure, { operation: 'Rebooting', message: 'cannot read kernel' });
  t.throws(() => reboot.dispatch(vmEvents.pausing()), { instanceOf: InvalidTransitionError }, 'a Shutdown VM cannot be paused');
  reboot.dispatch(vmEvents.booting());
  reboot.dispatch(vmEvents.booted());
  t.is(status(reboot), 'Running', 'it can boot again');

  const resume = running();
  resume.dispatch(vmEvents.pausing());
  resume.dispatch(vmEvents.paused());
  resume.dispatch(vmEvents.resuming());
  resume.dispatch(vmEvents.operationFailed('KVM_SET_CLOCK failed'));
  t.is(status(resume), 'Paused', 'a failed resume is Paused again, not Resuming forever');
  resume.dispatch(vmEvents.resuming());
  resume.dispatch(vmEvents.operationFailed('parking failed too', 'Shutdown'));
  t.is(status(resume), 'Shutdown');

  const pause = running();
  pause.dispatch(vmEvents.pausing());
  t.throws(() => pause.dispatch(vmEvents.operationFailed('x', 'Paused')), { instanceOf: InvalidTransitionError }, 'a failed pause is not Paused');
  t.is(status(pause), 'Running/Pausing', 'the refused outcome changed nothing');
  pause.dispatch(vmEvents.operationFailed('x', 'Shutdown'));
  t.is(status(pause), 'Shutdown');
});

test('a guest stop is recorded while pausing or paused, kept until the VM stops or boots', (t) => {
  const s = running();
  const reset = { action: 'reboot', reason: 'reset', detail: 'i8042' } as const;
  const poweroff = { action: 'shutdown', reason: 'poweroff', detail: 'acpi' } as const;
  s.dispatch(vmEvents.pausing());
  s.dispatch(vmEvents.guestStopRequested(reset));
  s.dispatch(vmEvents.paused());
  t.deepEqual(s.getState().vm.guestStop, reset, 'a stop during the pause is kept');
  s.dispatch(vmEvents.snapshotting());
  s.dispatch(vmEvents.snapshotted());
  t.deepEqual(s.getState().vm.guestStop, reset, 'and is part of a snapshot of the paused VM');
  s.dispatch(vmEvents.guestStopRequested(poweroff));
  s.dispatch(vmEvents.guestStopRequested(reset));
  t.deepEqual(s.getState().vm.guestStop, poweroff, 'a poweroff outranks a reset');
  s.dispatch(vmEvents.resuming());
  s.dispatch(vmEvents.resumed());
  t.deepEqual(s.getState().vm.guestStop, poweroff, 'still there for the VMM to carry out after the resume');
  s.dispatch(vmEvents.shutdown('vm'));
  t.is(s.getState().vm.guestStop, null);
  t.throws(() => s.dispatch(vmEvents.guestStopRequested(reset)), { instanceOf: InvalidTransitionError }, 'no guest runs');

  const r = running();
  r.dispatch(vmEvents.guestStopRequested(reset));
  r.dispatch(vmEvents.rebooting('vm'));
  r.dispatch(vmEvents.rebooted('vm'));
  t.is(r.getState().vm.guestStop, null, 'the reboot carried it out');
  t.throws(() => r.dispatch(vmEvents.guestStopRequested({ action: 'explode', reason: 'x', detail: 'y' } as never)), { instanceOf: TernStateError });
});

test('boot and reboot counts', (t) => {
  const store = running();
  store.dispatch(vmEvents.rebooting());
  store.dispatch(vmEvents.rebooted());
  t.is(store.getState().vm.bootCount, 1);
  t.is(store.getState().vm.rebootCount, 1);
});

test('an unusable config is refused', (t) => {
  const store = createStore();
  const e = t.throws(() => store.dispatch(vmEvents.created({ payload: {} } as never)), { instanceOf: InvalidVmConfigError });
  t.is(e?.httpStatus, 400);
  t.throws(() => store.dispatch(vmEvents.created({ ...config, cpus: { boot_vcpus: 4, max_vcpus: 2 } })), {
    instanceOf: InvalidVmConfigError,
  });
  t.is(store.getState().vm.status, 'NotCreated');
});

test('the stored config is a private frozen copy', (t) => {
  const mine = structuredClone(config);
  const store = createStore();
  store.dispatch(vmEvents.created(mine));
  t.false(Object.isFrozen(mine));
  t.not(store.getState().vm.config, mine);
  t.true(Object.isFrozen(store.getState().vm.config));
  t.deepEqual(store.getState().vm.config, config);
});

test('deleting the VM clears devices, bus and saved vCPUs', (t) => {
  const store = running();
  store.dispatch(deviceEvents.added(serialDevice()));
  store.dispatch(vmEvents.deleted());
  const s = store.getState();
  t.deepEqual(s.devices.instances, {});
  t.deepEqual(s.bus.pio, []);
  t.deepEqual(s.vcpus.saved, {});
});
