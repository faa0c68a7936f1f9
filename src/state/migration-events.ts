// Live migration's events. They change no state: the migrated VM's state is the store's own,
// sent as it is. They belong in the one event log so the event monitor, `vmm.events` and the
// journal report a migration in order with the VM lifecycle, under Cloud Hypervisor's names.
import { eventCreator } from './slice';

export const MigrationEvents = {
  /** source: connected to the destination, handshake accepted, memory rounds begin */
  Started: '[Migration] Started',
  /** source: one round of memory sent (round 0 = all non-zero RAM) */
  MemoryIteration: '[Migration] Memory Iteration',
  /** source: the destination runs the VM; this VMM stops its own */
  Finished: '[Migration] Finished',
  /** source: the migration ended without moving the VM; it runs (or stays paused) here */
  Failed: '[Migration] Failed',
  /** destination: listening for a source */
  ReceiveReady: '[Migration] Receive Ready',
  /** destination: a source connected and its handshake was accepted */
  ReceiveStarted: '[Migration] Receive Started',
  /** destination: the VM was built from the received state and runs (or is paused) here */
  ReceiveFinished: '[Migration] Receive Finished',
  /** destination: everything received was discarded; it can receive again */
  ReceiveFailed: '[Migration] Receive Failed',
} as const;

export interface MigrationStartedPayload {
  destination_url: string;
  local: boolean;
}

export interface MigrationIterationPayload {
  /** round number: 0 is the full copy, the last is sent with the VM paused */
  id: number;
  pages: number;
  bytes: number;
}

export interface MigrationFinishedPayload {
  /** from the source's pause to the destination's word that the VM runs there */
  downtime_ms: number;
  total_ms: number;
  bytes: number;
  iterations: number;
}

export interface MigrationFailedPayload {
  reason: string;
}

export interface MigrationReceivePayload {
  receiver_url: string;
}

export const migrationEvents = {
  started: eventCreator<MigrationStartedPayload>(MigrationEvents.Started),
  memoryIteration: eventCreator<MigrationIterationPayload>(MigrationEvents.MemoryIteration),
  finished: eventCreator<MigrationFinishedPayload>(MigrationEvents.Finished),
  failed: eventCreator<MigrationFailedPayload>(MigrationEvents.Failed),
  receiveReady: eventCreator<MigrationReceivePayload>(MigrationEvents.ReceiveReady),
  receiveStarted: eventCreator<MigrationReceivePayload>(MigrationEvents.ReceiveStarted),
  receiveFinished: eventCreator<null>(MigrationEvents.ReceiveFinished),
  receiveFailed: eventCreator<MigrationFailedPayload>(MigrationEvents.ReceiveFailed),
};
