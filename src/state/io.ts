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
import { SERIAL_KIND, UART_IIR, UART_LSR, UART_THR } from '../devices/serial-16550a';
import { createStore, type DispatchResult, type Store } from './store';

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

/**
 * Serve `rounds` of a console UART's usual accesses (a byte written, the line and interrupt
 * status read) on a throwaway store holding a copy of `state`, whose effects are dropped. A
 * migration destination runs this while memory arrives: it has never served a guest exit, and
 * V8 would otherwise compile the path every console byte takes while the guest waits on it.
 */
export function rehearseConsoleIo(state: RootState, rounds: number): void {
  const uart = state.bus.pio.find((r) => state.devices.instances[r.device]?.kind === SERIAL_KIND && r.deviceOffset === 0);
  if (!uart) return;
  const store = createStore({ preloadedState: structuredClone(state), preloadedFromStore: true });
  const access = (direction: 'read' | 'write', offset: number, data: number) =>
    dispatchIo(store, { space: 'pio', direction, address: uart.base + offset, size: 1, data, nowNs: Date.now() * 1e6 });
  for (let i = 0; i < rounds; i++) {
    access('write', UART_THR, 0x2e);
    access('read', UART_LSR, 0);
    access('read', UART_IIR, 0);
  }
}
