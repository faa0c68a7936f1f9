// From a vCPU's I/O exit to an event: find the owning device on the bus and name the event
// after its model ("[Serial] Register Read", source = device id, payload = device-relative
// IoAccess), or record an unhandled access. Dispatching it returns the effects and, for reads,
// the value the guest gets.
import type { IoAccess } from '../devices/device';
import { type BusAccess, findDevice } from '../devices/bus';
import { deviceModels } from '../devices/index';
import type { RootState } from './root';
import { eventCreator, type EventCreator, type EventInput } from './slice';
import { BusEvents } from './slices/bus';
import type { DispatchResult, Store } from './store';

export type { BusAccess };

/** One creator per event type, made once: this runs on every guest I/O exit. */
const creators = new Map<string, EventCreator<string, IoAccess>>();
const unhandled = eventCreator<BusAccess>(BusEvents.UnhandledAccess);

function creatorFor(type: string): EventCreator<string, IoAccess> {
  let c = creators.get(type);
  if (!c) creators.set(type, (c = eventCreator<IoAccess>(type)));
  return c;
}

export function ioEvent(state: Pick<RootState, 'bus' | 'devices'>, access: BusAccess): EventInput<string, IoAccess | BusAccess> {
  const target = findDevice(state.bus, access.space, access.address);
  const inst = target && state.devices.instances[target.device];
  if (!target || !inst) return unhandled(access, 'bus');
  const model = deviceModels[inst.kind];
  // Both branches copy the same fields: a bigint 8-byte value reaches the device whole.
  const payload: IoAccess =
    access.size === 8
      ? { space: access.space, direction: access.direction, offset: target.offset, size: 8, data: access.data, nowNs: access.nowNs }
      : { space: access.space, direction: access.direction, offset: target.offset, size: access.size, data: access.data, nowNs: access.nowNs };
  return creatorFor(access.direction === 'read' ? model.events.read : model.events.write)(payload, target.device);
}

/** Route and dispatch one guest access. */
export function dispatchIo(store: Store<RootState>, access: BusAccess): DispatchResult {
  return store.dispatch(ioEvent(store.getState(), access));
}
