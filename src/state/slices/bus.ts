// The bus map in the store: ranges arrive with "[Devices] Device Added", accesses nobody owns
// arrive as "[Bus] Unhandled Access" and are counted here (for vm.counters).
import {
  type BusAccess,
  type BusState,
  busInitialState,
  registerRange,
  unhandledAccess,
  unregisterDevice,
  BUS_SCHEMA_VERSION,
} from '../../devices/bus';
import { Type } from '@sinclair/typebox';
import { createSlice, pure } from '../slice';
import { Count, Exact, IntIn } from '../state-schema';
import { DeviceEvents, type DeviceAddedPayload, type DeviceRemovedPayload } from './devices';
import { VmEvents } from './vm';

export const BusEvents = {
  UnhandledAccess: '[Bus] Unhandled Access',
} as const;

export type BusSliceState = BusState;

const Space = Type.Union([Type.Literal('pio'), Type.Literal('mmio')]);
const RangeSchema = Exact({ base: Count(), length: IntIn(1, Number.MAX_SAFE_INTEGER), device: Type.String({ minLength: 1, maxLength: 256 }), deviceOffset: Count() });
const CountersSchema = Exact({ reads: Count(), writes: Count() });

export const BusSliceSchema = Exact({
  schemaVersion: IntIn(BUS_SCHEMA_VERSION, BUS_SCHEMA_VERSION),
  pio: Type.Array(RangeSchema, { maxItems: 4096 }),
  mmio: Type.Array(RangeSchema, { maxItems: 4096 }),
  unhandled: Exact({ pio: CountersSchema, mmio: CountersSchema }),
  lastUnhandled: Type.Union([
    Type.Null(),
    Exact({ space: Space, direction: Type.Union([Type.Literal('read'), Type.Literal('write')]), address: Count(), size: IntIn(1, 8) }),
  ]),
});

export const busSlice = createSlice({
  name: 'bus',
  schemaVersion: BUS_SCHEMA_VERSION,
  initialState: busInitialState,
  schema: BusSliceSchema,
  handlers: {
    [DeviceEvents.Added]: pure((s: BusState, p: DeviceAddedPayload) => {
      let next = s;
      for (const r of p.ranges ?? []) next = registerRange(next, r, p.state.id);
      return next;
    }),
    [DeviceEvents.Removed]: pure((s: BusState, p: DeviceRemovedPayload) => unregisterDevice(s, p.id)),
    [BusEvents.UnhandledAccess]: pure((s: BusState, access: BusAccess) => {
      const r = unhandledAccess(s, access);
      return r.value === undefined ? { state: r.state, effects: [] } : { state: r.state, effects: [], value: r.value };
    }),
    [VmEvents.Deleted]: pure(() => busInitialState()),
  },
});
