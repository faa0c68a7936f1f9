// Events about the VMM process itself and about the guest that change no state but belong in
// the one event log, so every subscriber (event monitor, SSE stream, tests) sees them in order
// with the VM lifecycle.
import { eventCreator } from './slice';

export const VmmEvents = {
  Starting: '[VMM] Starting',
  Shutdown: '[VMM] Shutdown',
  /** the VM stopped on an error the VMM could not handle (failed KVM entry, internal error) */
  VmFailed: '[VMM] VM Failed',
} as const;

export const GuestEvents = {
  /** the guest reported a panic (pvpanic-style event names: 'panic', 'crash_loaded') */
  Panic: '[Guest] Panic',
} as const;

export interface VmmStartingPayload {
  version: string;
  pid: number;
}

export interface GuestPanicPayload {
  event: string;
  /** how the panic was reported, e.g. 'kvm system event' */
  detail?: string;
}

export interface VmFailedPayload {
  message: string;
}

export const vmmEvents = {
  vmFailed: eventCreator<VmFailedPayload>(VmmEvents.VmFailed),
  starting: eventCreator<VmmStartingPayload>(VmmEvents.Starting),
  shutdown: eventCreator<null>(VmmEvents.Shutdown),
  guestPanic: eventCreator<GuestPanicPayload>(GuestEvents.Panic),
};
