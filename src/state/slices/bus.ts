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
import { createSlice, pure } from '../slice';
import { DeviceEvents, type DeviceAddedPayload, type DeviceRemovedPayload } from './devices';
import { VmEvents } from './vm';

export const BusEvents = {
  UnhandledAccess: '[Bus] Unhandled Access',
} as const;

export type BusSliceState = BusState;

export const busSlice = createSlice({
  name: 'bus',
  schemaVersion: BUS_SCHEMA_VERSION,
  initialState: busInitialState,
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
