// One sub-slice per device instance, keyed by id. Guest accesses arrive as
// "[<Label>] Register Read/Written" events whose source is the device id; the handler runs the
// device model's pure transition and hands its effects and read value back to the dispatcher.
import type { IoAccess } from '../../devices/device';
import { Type } from '@sinclair/typebox';
import { type AnyDeviceState, deviceModels } from '../../devices/index';
import type { BusRangeSpec, DeviceInstance, DeviceModel, DeviceStateBase } from '../../devices/model';
import { withKey } from '../copy';
import { DeviceConflictError, SchemaVersionError, UnknownDeviceError } from '../errors';
import { assertJsonSafe } from '../json';
import { type Handler, type PureHandler, type StoreEvent, createSlice, eventCreator, pure } from '../slice';
import { DeviceId, Exact, IntIn, InvalidStateError, checkSchema } from '../state-schema';
import { VmEvents } from './vm';

export const DEVICES_SCHEMA_VERSION = 1;

export interface DevicesSliceState {
  schemaVersion: number;
  instances: Record<string, AnyDeviceState>;
}

export const DeviceEvents = {
  Added: '[Devices] Device Added',
  Removed: '[Devices] Device Removed',
} as const;

export interface DeviceAddedPayload {
  state: AnyDeviceState;
  /** where it sits on the buses (the bus slice registers these) */
  ranges: BusRangeSpec[];
}

export interface DeviceRemovedPayload {
  id: string;
}

export const devicesInitialState = (): DevicesSliceState => ({ schemaVersion: DEVICES_SCHEMA_VERSION, instances: {} });

function instanceFor(s: DevicesSliceState, model: DeviceModel<any>, id: string): DeviceStateBase {
  const inst = s.instances[id];
  if (inst === undefined) throw new UnknownDeviceError(id);
  if (inst.kind !== model.kind) throw new UnknownDeviceError(id, `is a ${inst.kind}, not a ${model.kind}`);
  return inst;
}

function withInstance(s: DevicesSliceState, id: string, next: DeviceStateBase): DevicesSliceState {
  return { schemaVersion: s.schemaVersion, instances: withKey(s.instances, id, next as AnyDeviceState) };
}

function accessHandler(model: DeviceModel<any>): PureHandler<DevicesSliceState, IoAccess> {
  return pure((s: DevicesSliceState, access: IoAccess, event: StoreEvent<string, IoAccess>) => {
    const inst = instanceFor(s, model, event.source);
    const r = model.transition(inst, access);
    const state = r.state === inst ? s : withInstance(s, event.source, r.state);
    return r.value === undefined ? { state, effects: r.effects } : { state, effects: r.effects, value: r.value };
  });
}

function inputHandler(model: DeviceModel<any>, type: string): PureHandler<DevicesSliceState, unknown> {
  const input = model.inputs[type];
  return pure((s: DevicesSliceState, payload: unknown, event: StoreEvent<string, unknown>) => {
    const inst = instanceFor(s, model, event.source);
    const r = input(inst, payload);
    return { state: r.state === inst ? s : withInstance(s, event.source, r.state), effects: r.effects };
  });
}

function checkInstance(id: string, inst: DeviceStateBase): void {
  const model = Object.hasOwn(deviceModels, inst?.kind) ? deviceModels[inst.kind] : undefined;
  if (!model) throw new UnknownDeviceError(id, `unknown device kind '${String(inst?.kind)}'`);
  if (inst.id !== id) throw new DeviceConflictError(`device keyed '${id}' has id '${inst.id}'`);
  if (inst.schemaVersion !== model.schemaVersion) {
    throw new SchemaVersionError(`device '${id}' (${inst.kind})`, inst.schemaVersion, model.schemaVersion);
  }
}

/**
 * A device state's fields against its model's schema and cross-field check, so a state no
 * guest could have produced (from a snapshot, a migration stream) never reaches a transition.
 */
function checkFields(id: string, inst: DeviceStateBase): void {
  const model = deviceModels[inst.kind];
  const where = `slice 'devices' device '${id}' (${inst.kind})`;
  checkSchema(model.stateSchema, inst, where);
  const problem = model.checkState?.(inst);
  if (problem) throw new InvalidStateError(`${where} field ${problem}`);
}

const handlers: Record<string, Handler<DevicesSliceState, any>> = {
  [DeviceEvents.Added]: pure((s: DevicesSliceState, p: DeviceAddedPayload) => {
    const id = p?.state?.id;
    if (typeof id !== 'string' || id === '') throw new DeviceConflictError('a device needs a non-empty id');
    if (s.instances[id] !== undefined) throw new DeviceConflictError(`device '${id}' already exists`);
    checkInstance(id, p.state);
    checkFields(id, p.state);
    assertJsonSafe(p.state, `/devices/instances/${id}`);
    return withInstance(s, id, p.state);
  }),
  [DeviceEvents.Removed]: pure((s: DevicesSliceState, p: DeviceRemovedPayload) => {
    if (s.instances[p?.id] === undefined) throw new UnknownDeviceError(String(p?.id));
    const { [p.id]: _removed, ...instances } = s.instances;
    return { schemaVersion: s.schemaVersion, instances };
  }),
  [VmEvents.Deleted]: pure(() => devicesInitialState()),
};

for (const model of Object.values(deviceModels)) {
  handlers[model.events.read] = accessHandler(model);
  handlers[model.events.write] = accessHandler(model);
  for (const type of Object.keys(model.inputs)) handlers[type] = inputHandler(model, type);
}

/** The devices map; each instance is then checked against its own model's state schema. */
export const DevicesSliceSchema = Exact({
  schemaVersion: IntIn(DEVICES_SCHEMA_VERSION, DEVICES_SCHEMA_VERSION),
  instances: Type.Record(DeviceId(), Type.Object({ kind: Type.String(), id: DeviceId(), schemaVersion: Type.Integer() }), { maxProperties: 256 }),
});

export const devicesSlice = createSlice({
  name: 'devices',
  schemaVersion: DEVICES_SCHEMA_VERSION,
  initialState: devicesInitialState,
  handlers,
  schema: DevicesSliceSchema,
  validate(state) {
    for (const [id, inst] of Object.entries(state.instances)) {
      checkInstance(id, inst);
      checkFields(id, inst);
    }
  },
});

const deviceAdded = eventCreator<DeviceAddedPayload>(DeviceEvents.Added);
const deviceRemoved = eventCreator<DeviceRemovedPayload>(DeviceEvents.Removed);

export const deviceEvents = {
  /** Add a device built by one of the device constructors (serialDevice(), cmosDevice(), ...). */
  added: (device: DeviceInstance<AnyDeviceState>, source = 'vmm') => deviceAdded({ state: device.state, ranges: device.ranges }, source),
  removed: (id: string, source = 'vmm') => deviceRemoved({ id }, source),
};
