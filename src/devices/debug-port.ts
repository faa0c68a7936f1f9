// The POST/debug port 0x80: firmware and early kernel code write progress codes here.
// Note that Linux also writes to it as an I/O delay (io_delay=0x80, the x86 default), so after
// early boot the codes are noise unless the guest runs with io_delay=none.
import { Type } from '@sinclair/typebox';
import { Count, DeviceId, Exact, IntIn, U32, U8 } from '../state/state-schema';
import { type Effect, type IoAccess, type TransitionResult, data32 } from './device';
import {
  type DeviceInstance,
  type DeviceModel,
  type DeviceStateBase,
  deviceAccessEventTypes,
} from './model';

export const DEBUG_PORT_KIND = 'debug-port' as const;
export const DEBUG_PORT_SCHEMA_VERSION = 1;
export const DEBUG_PORT_LABEL = 'Debug Port';
export const DEBUG_PORT = 0x80;

export const DebugPortEvents = {
  RegisterRead: '[Debug Port] Register Read',
  RegisterWritten: '[Debug Port] Register Written',
} as const;

export interface DebugPortState extends DeviceStateBase {
  kind: typeof DEBUG_PORT_KIND;
  /** last code written, or null before the first */
  lastCode: number | null;
  writes: number;
}

export function debugPortInitialState(opts: { id?: string } = {}): DebugPortState {
  return { kind: DEBUG_PORT_KIND, id: opts.id ?? 'debug-port', schemaVersion: DEBUG_PORT_SCHEMA_VERSION, lastCode: null, writes: 0 };
}

export function debugPortDevice(opts: { id?: string } = {}): DeviceInstance<DebugPortState> {
  return { state: debugPortInitialState(opts), ranges: [{ space: 'pio', base: DEBUG_PORT, length: 1 }] };
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

export function debugPortTransition(state: DebugPortState, access: IoAccess): TransitionResult<DebugPortState> {
  if (access.direction === 'read') {
    // A POST card latches the last code; nothing written yet reads as a floating bus.
    return { state, effects: NO_EFFECTS, value: state.lastCode ?? 0xff };
  }
  const code = data32(access) & 0xff;
  return {
    state: { kind: state.kind, id: state.id, schemaVersion: state.schemaVersion, lastCode: code, writes: state.writes + 1 },
    effects: [{ type: 'boot.progress', code }],
  };
}

/** The state's shape, checked when a state comes from outside (restore). */
export const DebugPortStateSchema = Exact({ kind: Type.Literal(DEBUG_PORT_KIND), id: DeviceId(), schemaVersion: IntIn(DEBUG_PORT_SCHEMA_VERSION, DEBUG_PORT_SCHEMA_VERSION), lastCode: Type.Union([Type.Null(), U8()]), writes: Count() });

export const debugPortModel: DeviceModel<DebugPortState> = {
  kind: DEBUG_PORT_KIND,
  label: DEBUG_PORT_LABEL,
  schemaVersion: DEBUG_PORT_SCHEMA_VERSION,
  events: deviceAccessEventTypes(DEBUG_PORT_LABEL),
  transition: debugPortTransition,
  stateSchema: DebugPortStateSchema,
  inputs: {},
};
