// A minimal i8042 keyboard controller: enough for a guest to probe it, read and write the
// command byte, run the self tests, and reset the machine through it. No keyboard or mouse
// is attached: bytes sent to either port are answered with a timeout error at once, so a
// probing guest gives up quickly instead of waiting for its command timeouts.
import { Type } from '@sinclair/typebox';
import * as aml from '../boot/aml';
import { DeviceId, Exact, IntIn, U8 } from '../state/state-schema';
import { type Effect, type IoAccess, type TransitionResult, data32 } from './device';
import {
  type DeviceAcpi,
  type DeviceInstance,
  type DeviceModel,
  type DeviceStateBase,
  Gsi,
  deviceAccessEventTypes,
} from './model';

export const I8042_KIND = 'i8042' as const;
export const I8042_SCHEMA_VERSION = 1;
export const I8042_LABEL = 'i8042';
export const I8042_DATA_PORT = 0x60;
export const I8042_COMMAND_PORT = 0x64;
export const I8042_KBD_GSI = 1;
export const I8042_AUX_GSI = 12;

export const I8042Events = {
  RegisterRead: '[i8042] Register Read',
  RegisterWritten: '[i8042] Register Written',
} as const;

/** Device-relative offsets: the data port is the base, the command/status port is base+4. */
const DATA = 0;
const COMMAND = I8042_COMMAND_PORT - I8042_DATA_PORT;

// Status register
export const STATUS_OBF = 0x01;
export const STATUS_IBF = 0x02;
export const STATUS_SYS = 0x04;
export const STATUS_CMD = 0x08;
export const STATUS_UNLOCKED = 0x10;
export const STATUS_AUX = 0x20;
export const STATUS_TIMEOUT = 0x40;

// Command byte (controller configuration)
export const CTR_KBDINT = 0x01;
export const CTR_AUXINT = 0x02;
export const CTR_SYS = 0x04;
export const CTR_KBDDIS = 0x10;
export const CTR_AUXDIS = 0x20;
export const CTR_XLATE = 0x40;

export const I8042Command = {
  ReadCtr: 0x20,
  WriteCtr: 0x60,
  AuxDisable: 0xa7,
  AuxEnable: 0xa8,
  AuxTest: 0xa9,
  SelfTest: 0xaa,
  KbdTest: 0xab,
  KbdDisable: 0xad,
  KbdEnable: 0xae,
  ReadOutputPort: 0xd0,
  WriteOutputPort: 0xd1,
  KbdLoop: 0xd2,
  AuxLoop: 0xd3,
  AuxSend: 0xd4,
  PulseReset: 0xfe,
} as const;

export const SELF_TEST_OK = 0x55;
export const INTERFACE_TEST_OK = 0x00;
/** answer of a port with no device behind it */
const NO_DEVICE = 0xfe;
/** output port bit 0 low holds the CPU in reset */
const OUTPUT_PORT_RESET_RELEASED = 0x01;

export type I8042Channel = 'ctrl' | 'kbd' | 'aux';

export interface I8042State extends DeviceStateBase {
  kind: typeof I8042_KIND;
  /** command byte */
  ctr: number;
  outputPort: number;
  /** byte in the output buffer; kept after it is read, as stale reads return it */
  outData: number;
  outFull: boolean;
  /** which side produced the buffered byte (selects STATUS_AUX and the interrupt line) */
  outChannel: I8042Channel;
  /** the buffered byte reports a device timeout */
  outTimeout: boolean;
  /** the last write went to the command port (STATUS_CMD) */
  lastWasCommand: boolean;
  /** command waiting for its data byte on port 0x60, or null */
  pendingCommand: number | null;
  kbdGsi: number;
  auxGsi: number;
}

export function i8042InitialState(opts: { id?: string } = {}): I8042State {
  return {
    kind: I8042_KIND,
    id: opts.id ?? 'i8042',
    schemaVersion: I8042_SCHEMA_VERSION,
    ctr: CTR_SYS | CTR_XLATE | CTR_KBDINT,
    outputPort: OUTPUT_PORT_RESET_RELEASED,
    outData: 0,
    outFull: false,
    outChannel: 'ctrl',
    outTimeout: false,
    lastWasCommand: false,
    pendingCommand: null,
    kbdGsi: I8042_KBD_GSI,
    auxGsi: I8042_AUX_GSI,
  };
}

export function i8042Device(opts: { id?: string } = {}): DeviceInstance<I8042State> {
  return {
    state: i8042InitialState(opts),
    ranges: [
      { space: 'pio', base: I8042_DATA_PORT, length: 1, deviceOffset: DATA },
      { space: 'pio', base: I8042_COMMAND_PORT, length: 1, deviceOffset: COMMAND },
    ],
  };
}

export function i8042Status(s: I8042State): number {
  return (
    (s.outFull ? STATUS_OBF : 0) |
    (s.ctr & CTR_SYS ? STATUS_SYS : 0) |
    (s.lastWasCommand ? STATUS_CMD : 0) |
    STATUS_UNLOCKED |
    (s.outFull && s.outChannel === 'aux' ? STATUS_AUX : 0) |
    (s.outFull && s.outTimeout ? STATUS_TIMEOUT : 0)
  );
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

/** A fresh copy to modify and return (a field-by-field literal is faster than spread). */
export function copyI8042State(s: I8042State): I8042State {
  return {
    kind: s.kind,
    id: s.id,
    schemaVersion: s.schemaVersion,
    ctr: s.ctr,
    outputPort: s.outputPort,
    outData: s.outData,
    outFull: s.outFull,
    outChannel: s.outChannel,
    outTimeout: s.outTimeout,
    lastWasCommand: s.lastWasCommand,
    pendingCommand: s.pendingCommand,
    kbdGsi: s.kbdGsi,
    auxGsi: s.auxGsi,
  };
}

/** Put a byte in the output buffer (of `n`, a fresh copy) and raise the matching interrupt if enabled. */
function output(n: I8042State, data: number, channel: I8042Channel, timeout = false): TransitionResult<I8042State> {
  n.outData = data & 0xff;
  n.outFull = true;
  n.outChannel = channel;
  n.outTimeout = timeout;
  if (channel === 'aux') {
    if (n.ctr & CTR_AUXINT) return { state: n, effects: [{ type: 'irq.pulse', gsi: n.auxGsi }] };
  } else if (n.ctr & CTR_KBDINT) {
    return { state: n, effects: [{ type: 'irq.pulse', gsi: n.kbdGsi }] };
  }
  return { state: n, effects: NO_EFFECTS };
}

const RESET: Effect[] = [{ type: 'vm.reset', source: 'i8042' }];

function command(s: I8042State, cmd: number): TransitionResult<I8042State> {
  const n = copyI8042State(s);
  n.lastWasCommand = true;
  n.pendingCommand = null;
  switch (cmd) {
    case I8042Command.ReadCtr:
      return output(n, n.ctr, 'ctrl');
    case I8042Command.WriteCtr:
    case I8042Command.WriteOutputPort:
    case I8042Command.KbdLoop:
    case I8042Command.AuxLoop:
    case I8042Command.AuxSend:
      n.pendingCommand = cmd;
      break;
    case I8042Command.AuxDisable:
      n.ctr |= CTR_AUXDIS;
      break;
    case I8042Command.AuxEnable:
      n.ctr &= ~CTR_AUXDIS;
      break;
    case I8042Command.AuxTest:
    case I8042Command.KbdTest:
      return output(n, INTERFACE_TEST_OK, 'ctrl');
    case I8042Command.SelfTest:
      n.ctr |= CTR_SYS;
      return output(n, SELF_TEST_OK, 'ctrl');
    case I8042Command.KbdDisable:
      n.ctr |= CTR_KBDDIS;
      break;
    case I8042Command.KbdEnable:
      n.ctr &= ~CTR_KBDDIS;
      break;
    case I8042Command.ReadOutputPort:
      return output(n, n.outputPort, 'ctrl');
    default:
      // 0xF0..0xFF pulse output port lines for ~6us; bit 0 of the command low = reset line.
      if (cmd >= 0xf0 && (cmd & 0x01) === 0) return { state: n, effects: [...RESET] };
  }
  return { state: n, effects: NO_EFFECTS };
}

function data(s: I8042State, value: number): TransitionResult<I8042State> {
  const n = copyI8042State(s);
  n.lastWasCommand = false;
  n.pendingCommand = null;
  switch (s.pendingCommand) {
    case I8042Command.WriteCtr:
      n.ctr = value;
      return { state: n, effects: NO_EFFECTS };
    case I8042Command.WriteOutputPort:
      n.outputPort = value;
      return { state: n, effects: value & OUTPUT_PORT_RESET_RELEASED ? NO_EFFECTS : [...RESET] };
    case I8042Command.KbdLoop:
      return output(n, value, 'kbd');
    case I8042Command.AuxLoop:
      return output(n, value, 'aux');
    case I8042Command.AuxSend:
      return output(n, NO_DEVICE, 'aux', true);
    default:
      // A byte for the keyboard, which is not there.
      return output(n, NO_DEVICE, 'kbd', true);
  }
}

export function i8042Transition(state: I8042State, access: IoAccess): TransitionResult<I8042State> {
  const port = access.offset;
  if (access.direction === 'read') {
    if (port === COMMAND) return { state, effects: NO_EFFECTS, value: i8042Status(state) };
    if (port === DATA) {
      if (!state.outFull) return { state, effects: NO_EFFECTS, value: state.outData };
      const n = copyI8042State(state);
      n.outFull = false;
      n.outTimeout = false;
      return { state: n, effects: NO_EFFECTS, value: state.outData };
    }
    return { state, effects: NO_EFFECTS, value: 0xff };
  }
  const value = data32(access) & 0xff;
  if (port === COMMAND) return command(state, value);
  if (port === DATA) return data(state, value);
  return { state, effects: NO_EFFECTS };
}

/** The state's shape, checked when a state comes from outside (restore). */
export const I8042StateSchema = Exact({ kind: Type.Literal(I8042_KIND), id: DeviceId(), schemaVersion: IntIn(I8042_SCHEMA_VERSION, I8042_SCHEMA_VERSION), ctr: U8(), outputPort: U8(), outData: U8(), outFull: Type.Boolean(), outChannel: Type.Union([Type.Literal('ctrl'), Type.Literal('kbd'), Type.Literal('aux')]), outTimeout: Type.Boolean(), lastWasCommand: Type.Boolean(), pendingCommand: Type.Union([Type.Null(), U8()]), kbdGsi: Gsi(), auxGsi: Gsi() });

/** The keyboard controller in the DSDT (PNP0303): its two ports and the keyboard interrupt. */
export function i8042Acpi(device: DeviceInstance<I8042State>): DeviceAcpi {
  const ports = device.ranges.map((r) => aml.Resource.io(r.base, r.base, 1, r.length));
  return {
    legacy: 'i8042',
    sb: [
      aml.device('PS2K', [
        aml.name('_HID', aml.eisaId('PNP0303')),
        aml.name('_CRS', aml.resourceTemplate([...ports, aml.Resource.interrupt({ edge: true }, [device.state.kbdGsi])])),
      ]),
    ],
  };
}

export const i8042Model: DeviceModel<I8042State> = {
  kind: I8042_KIND,
  label: I8042_LABEL,
  schemaVersion: I8042_SCHEMA_VERSION,
  events: deviceAccessEventTypes(I8042_LABEL),
  transition: i8042Transition,
  stateSchema: I8042StateSchema,
  inputs: {},
  acpi: i8042Acpi,
};
