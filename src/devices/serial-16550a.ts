// A 16550A UART as a plain state slice and pure transitions.
//
// Transmission is instantaneous: a THR write leaves the transmitter empty again at once, so
// LSR always reports THRE|TEMT and every THR write re-arms the THR-empty interrupt.
// The interrupt output is modelled as a level computed from the state; since the ISA pin is
// edge-triggered on the in-kernel IOAPIC, a transition reports {type:'irq.pulse'} exactly
// when that level rises.
import { Type } from '@sinclair/typebox';
import * as aml from '../boot/aml';
import { eventCreator } from '../state/slice';
import { Count, DeviceId, Exact, IntIn, U8 } from '../state/state-schema';
import { type Effect, type IoAccess, type TransitionResult, data32 } from './device';
import {
  type DeviceAcpi,
  type DeviceInstance,
  type DeviceModel,
  type DeviceStateBase,
  Gsi,
  deviceAccessEventTypes,
} from './model';

export const SERIAL_KIND = 'serial-16550a' as const;
// 2: txDropped
export const SERIAL_SCHEMA_VERSION = 2;
export const SERIAL_LABEL = 'Serial';
export const COM1_BASE = 0x3f8;
export const COM1_GSI = 4;
export const SERIAL_PORT_LENGTH = 8;
/** Depth of the chip's FIFOs; what the guest measures through loopback. */
export const SERIAL_HW_FIFO_DEPTH = 16;
/** the largest host-input buffer a UART may be given (a restored state is held to it) */
export const SERIAL_MAX_RX_CAPACITY = 1 << 16;
/** Default RX buffer for host input: larger than the chip's so pasted text is not lost. */
export const SERIAL_DEFAULT_RX_CAPACITY = 64;

export const SerialEvents = {
  RegisterRead: '[Serial] Register Read',
  RegisterWritten: '[Serial] Register Written',
  InputReceived: '[Serial] Input Received',
  /** host side: guest output the console's destination did not take (file cap, write error) */
  OutputDropped: '[Serial] Output Dropped',
} as const;

export interface SerialInputPayload {
  bytes: number[];
}

export interface SerialOutputDroppedPayload {
  bytes: number;
}

/** The event recording that `bytes` of device `id`'s output were dropped on the host side. */
const outputDropped = eventCreator<SerialOutputDroppedPayload>(SerialEvents.OutputDropped);
const inputReceived = eventCreator<SerialInputPayload>(SerialEvents.InputReceived);

export function serialOutputDroppedEvent(id: string, bytes: number) {
  return outputDropped({ bytes }, id);
}

/** The event for host bytes typed into serial device `id` (dispatch it on the store). */
export function serialInputEvent(id: string, bytes: number[] | Uint8Array) {
  return inputReceived({ bytes: Array.from(bytes) }, id);
}

// Register offsets
const RBR_THR_DLL = 0;
const IER_DLM = 1;
const IIR_FCR = 2;
const LCR = 3;
const MCR = 4;
const LSR = 5;
const MSR = 6;
const SCR = 7;

// IER
export const IER_RDA = 0x01;
export const IER_THRE = 0x02;
export const IER_RLS = 0x04;
export const IER_MS = 0x08;
const IER_MASK = 0x0f;

// IIR
export const IIR_NO_INT = 0x01;
export const IIR_MS = 0x00;
export const IIR_THRE = 0x02;
export const IIR_RDA = 0x04;
export const IIR_RLS = 0x06;
export const IIR_FIFO_ENABLED = 0xc0;

// FCR
const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
/** bits kept: enable, DMA mode, RX trigger level */
const FCR_STORED = 0xc9;

// LCR
export const LCR_DLAB = 0x80;

// MCR
export const MCR_DTR = 0x01;
export const MCR_RTS = 0x02;
export const MCR_OUT1 = 0x04;
export const MCR_OUT2 = 0x08;
export const MCR_LOOP = 0x10;
const MCR_MASK = 0x1f;

// LSR
export const LSR_DR = 0x01;
export const LSR_OE = 0x02;
export const LSR_PE = 0x04;
export const LSR_FE = 0x08;
export const LSR_BI = 0x10;
export const LSR_THRE = 0x20;
export const LSR_TEMT = 0x40;
const LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

// MSR
export const MSR_DCTS = 0x01;
export const MSR_DDSR = 0x02;
export const MSR_TERI = 0x04;
export const MSR_DDCD = 0x08;
export const MSR_CTS = 0x10;
export const MSR_DSR = 0x20;
export const MSR_RI = 0x40;
export const MSR_DCD = 0x80;
/** Lines seen by the UART outside loopback: a terminal is attached and ready. */
const MSR_LINES_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS;

export interface Serial16550aState extends DeviceStateBase {
  kind: typeof SERIAL_KIND;
  gsi: number;
  ier: number;
  /** last FCR value (enable, DMA mode, trigger bits) */
  fcr: number;
  lcr: number;
  mcr: number;
  scr: number;
  dll: number;
  dlm: number;
  /** sticky LSR error bits, cleared by reading LSR */
  lsrErrors: number;
  /** MSR delta bits, cleared by reading MSR */
  msrDelta: number;
  /** THR-empty interrupt armed; cleared by reading IIR while it is the reported cause */
  threPending: boolean;
  /** receive FIFO, oldest first */
  rx: number[];
  /** how many bytes of host input rx may hold */
  rxCapacity: number;
  /** host input bytes dropped because rx was full (or the UART was in loopback) */
  rxDropped: number;
  txBytes: number;
  /** bytes the guest sent that the host side dropped (serial file cap, write errors) */
  txDropped: number;
  rxBytes: number;
}

export interface SerialOptions {
  id?: string;
  base?: number;
  gsi?: number;
  rxCapacity?: number;
}

export function serialInitialState(opts: SerialOptions = {}): Serial16550aState {
  const rxCapacity = opts.rxCapacity ?? SERIAL_DEFAULT_RX_CAPACITY;
  if (rxCapacity < SERIAL_HW_FIFO_DEPTH) throw new RangeError(`rxCapacity must be >= ${SERIAL_HW_FIFO_DEPTH}`);
  return {
    kind: SERIAL_KIND,
    id: opts.id ?? 'serial0',
    schemaVersion: SERIAL_SCHEMA_VERSION,
    gsi: opts.gsi ?? COM1_GSI,
    ier: 0,
    fcr: 0,
    lcr: 0x03, // 8N1
    mcr: MCR_OUT2,
    scr: 0,
    dll: 0x0c, // 9600 baud with the PC's 1.8432 MHz clock
    dlm: 0,
    lsrErrors: 0,
    msrDelta: 0,
    threPending: false,
    rx: [],
    rxCapacity,
    rxDropped: 0,
    txBytes: 0,
    txDropped: 0,
    rxBytes: 0,
  };
}

export function serialDevice(opts: SerialOptions = {}): DeviceInstance<Serial16550aState> {
  return {
    state: serialInitialState(opts),
    ranges: [{ space: 'pio', base: opts.base ?? COM1_BASE, length: SERIAL_PORT_LENGTH }],
  };
}

/** Modem status lines as the UART sees them (loopback wires MCR outputs to MSR inputs). */
function modemLines(mcr: number): number {
  if (!(mcr & MCR_LOOP)) return MSR_LINES_CONNECTED;
  return (
    (mcr & MCR_DTR ? MSR_DSR : 0) |
    (mcr & MCR_RTS ? MSR_CTS : 0) |
    (mcr & MCR_OUT1 ? MSR_RI : 0) |
    (mcr & MCR_OUT2 ? MSR_DCD : 0)
  );
}

function modemDelta(before: number, after: number): number {
  const changed = before ^ after;
  return (
    (changed & MSR_CTS ? MSR_DCTS : 0) |
    (changed & MSR_DSR ? MSR_DDSR : 0) |
    (before & MSR_RI && !(after & MSR_RI) ? MSR_TERI : 0) |
    (changed & MSR_DCD ? MSR_DDCD : 0)
  );
}

/** Highest-priority pending interrupt cause (IIR bits 0..3). */
function interruptCause(s: Serial16550aState, threPending: boolean): number {
  const ier = s.ier;
  if (ier & IER_RLS && s.lsrErrors) return IIR_RLS;
  if (ier & IER_RDA && s.rx.length > 0) return IIR_RDA;
  if (ier & IER_THRE && threPending) return IIR_THRE;
  if (ier & IER_MS && s.msrDelta) return IIR_MS;
  return IIR_NO_INT;
}

function interruptLevel(s: Serial16550aState, threPending = s.threPending): boolean {
  return interruptCause(s, threPending) !== IIR_NO_INT;
}

/** The IIR value the guest would read now. */
export function serialIir(s: Serial16550aState): number {
  return interruptCause(s, s.threPending) | (s.fcr & FCR_ENABLE ? IIR_FIFO_ENABLED : 0);
}

/** The LSR value the guest would read now. */
export function serialLsr(s: Serial16550aState): number {
  return (s.rx.length > 0 ? LSR_DR : 0) | s.lsrErrors | LSR_THRE | LSR_TEMT;
}

const NO_EFFECTS = Object.freeze([]) as unknown as Effect[];

/**
 * A fresh copy to modify and return. A literal naming every field (TypeScript checks none is
 * missing) copies much faster than object spread on the per-access path.
 */
export function copySerialState(s: Serial16550aState): Serial16550aState {
  return {
    kind: s.kind,
    id: s.id,
    schemaVersion: s.schemaVersion,
    gsi: s.gsi,
    ier: s.ier,
    fcr: s.fcr,
    lcr: s.lcr,
    mcr: s.mcr,
    scr: s.scr,
    dll: s.dll,
    dlm: s.dlm,
    lsrErrors: s.lsrErrors,
    msrDelta: s.msrDelta,
    threPending: s.threPending,
    rx: s.rx,
    rxCapacity: s.rxCapacity,
    rxDropped: s.rxDropped,
    txBytes: s.txBytes,
    txDropped: s.txDropped,
    rxBytes: s.rxBytes,
  };
}

function finish(
  before: boolean,
  next: Serial16550aState,
  effects: Effect[],
  value?: number,
): TransitionResult<Serial16550aState> {
  if (!before && interruptLevel(next)) {
    effects = effects === NO_EFFECTS ? [] : effects;
    effects.push({ type: 'irq.pulse', gsi: next.gsi });
  }
  return value === undefined ? { state: next, effects } : { state: next, effects, value };
}

function read(s: Serial16550aState, offset: number): TransitionResult<Serial16550aState> {
  const dlab = (s.lcr & LCR_DLAB) !== 0;
  switch (offset) {
    case RBR_THR_DLL: {
      if (dlab) return { state: s, effects: NO_EFFECTS, value: s.dll };
      if (s.rx.length === 0) return { state: s, effects: NO_EFFECTS, value: 0 };
      // Popping can only lower the interrupt level, so no edge to report; the room it makes
      // is for the console's held input.
      const n = copySerialState(s);
      n.rx = s.rx.slice(1);
      return { state: n, effects: [{ type: 'console.input-room', device: s.id }], value: s.rx[0] };
    }
    case IER_DLM:
      return { state: s, effects: NO_EFFECTS, value: dlab ? s.dlm : s.ier };
    case IIR_FCR: {
      const iir = serialIir(s);
      if ((iir & 0x0f) !== IIR_THRE) return { state: s, effects: NO_EFFECTS, value: iir };
      // Reading IIR acknowledges a THR-empty interrupt it reports.
      const n = copySerialState(s);
      n.threPending = false;
      return { state: n, effects: NO_EFFECTS, value: iir };
    }
    case LCR:
      return { state: s, effects: NO_EFFECTS, value: s.lcr };
    case MCR:
      return { state: s, effects: NO_EFFECTS, value: s.mcr };
    case LSR: {
      const lsr = serialLsr(s);
      if (!s.lsrErrors) return { state: s, effects: NO_EFFECTS, value: lsr };
      const n = copySerialState(s);
      n.lsrErrors = 0;
      return { state: n, effects: NO_EFFECTS, value: lsr };
    }
    case MSR: {
      const msr = modemLines(s.mcr) | s.msrDelta;
      if (!s.msrDelta) return { state: s, effects: NO_EFFECTS, value: msr };
      const n = copySerialState(s);
      n.msrDelta = 0;
      return { state: n, effects: NO_EFFECTS, value: msr };
    }
    case SCR:
      return { state: s, effects: NO_EFFECTS, value: s.scr };
    default:
      return { state: s, effects: NO_EFFECTS, value: 0xff };
  }
}

function write(s: Serial16550aState, offset: number, data: number): TransitionResult<Serial16550aState> {
  const dlab = (s.lcr & LCR_DLAB) !== 0;
  const n = copySerialState(s);
  switch (offset) {
    case RBR_THR_DLL: {
      if (dlab) {
        n.dll = data;
        return { state: n, effects: NO_EFFECTS };
      }
      // The write clears THRE; the instant transmission sets it again: that is an edge.
      const before = interruptLevel(s, false);
      n.threPending = true;
      n.txBytes = s.txBytes + 1;
      if (s.mcr & MCR_LOOP) {
        const depth = s.fcr & FCR_ENABLE ? SERIAL_HW_FIFO_DEPTH : 1;
        if (s.rx.length < depth) n.rx = s.rx.concat(data);
        else n.lsrErrors = s.lsrErrors | LSR_OE;
        return finish(before, n, NO_EFFECTS);
      }
      return finish(before, n, [{ type: 'console.output', device: s.id, bytes: [data] }]);
    }
    case IER_DLM: {
      if (dlab) {
        n.dlm = data;
        return { state: n, effects: NO_EFFECTS };
      }
      n.ier = data & IER_MASK;
      // Enabling the THR-empty interrupt while the transmitter is empty raises it at once.
      if (!(s.ier & IER_THRE) && n.ier & IER_THRE) n.threPending = true;
      return finish(interruptLevel(s), n, NO_EFFECTS);
    }
    case IIR_FCR: {
      n.fcr = data & FCR_STORED;
      // Toggling the FIFO enable resets both FIFOs, as does the RX clear bit.
      const clearRx = (data & FCR_CLEAR_RX) !== 0 || ((s.fcr ^ n.fcr) & FCR_ENABLE) !== 0;
      if (clearRx && s.rx.length) n.rx = [];
      return finish(interruptLevel(s), n, NO_EFFECTS);
    }
    case LCR:
      n.lcr = data;
      return { state: n, effects: NO_EFFECTS };
    case MCR: {
      n.mcr = data & MCR_MASK;
      n.msrDelta = s.msrDelta | modemDelta(modemLines(s.mcr), modemLines(n.mcr));
      return finish(interruptLevel(s), n, NO_EFFECTS);
    }
    case SCR:
      n.scr = data;
      return { state: n, effects: NO_EFFECTS };
    default:
      // LSR and MSR are read-only (factory test writes are ignored).
      return { state: s, effects: NO_EFFECTS };
  }
}

export function serialTransition(state: Serial16550aState, access: IoAccess): TransitionResult<Serial16550aState> {
  return access.direction === 'read' ? read(state, access.offset) : write(state, access.offset, data32(access) & 0xff);
}

/** How many host input bytes the UART takes now (in loopback it takes, and drops, all of them). */
export function serialInputRoom(state: Serial16550aState): number {
  if (state.mcr & MCR_LOOP) return Number.POSITIVE_INFINITY;
  return Math.max(0, state.rxCapacity - state.rx.length);
}

/** Host input: fill the RX FIFO, dropping (and counting) what does not fit. */
export function serialInput(state: Serial16550aState, payload: SerialInputPayload): TransitionResult<Serial16550aState> {
  const bytes = payload.bytes;
  if (bytes.length === 0) return { state, effects: NO_EFFECTS };
  const n = copySerialState(state);
  // In loopback the receiver is disconnected from the line.
  if (state.mcr & MCR_LOOP) {
    n.rxDropped = state.rxDropped + bytes.length;
    return { state: n, effects: NO_EFFECTS };
  }
  const room = Math.max(0, state.rxCapacity - state.rx.length);
  const taken = bytes.length <= room ? bytes : bytes.slice(0, room);
  const dropped = bytes.length - taken.length;
  if (taken.length) n.rx = state.rx.concat(taken.map((b) => b & 0xff));
  n.rxBytes = state.rxBytes + taken.length;
  if (dropped) {
    n.rxDropped = state.rxDropped + dropped;
    n.lsrErrors = state.lsrErrors | LSR_OE;
  }
  return finish(interruptLevel(state), n, NO_EFFECTS);
}

/** The state's shape, checked when a state comes from outside (restore). */
export const Serial16550aStateSchema = Exact({ kind: Type.Literal(SERIAL_KIND), id: DeviceId(), schemaVersion: IntIn(SERIAL_SCHEMA_VERSION, SERIAL_SCHEMA_VERSION), gsi: Gsi(), ier: U8(), fcr: U8(), lcr: U8(), mcr: U8(), scr: U8(), dll: U8(), dlm: U8(), lsrErrors: U8(), msrDelta: U8(), threPending: Type.Boolean(), rx: Type.Array(U8(), { maxItems: SERIAL_MAX_RX_CAPACITY }), rxCapacity: IntIn(SERIAL_HW_FIFO_DEPTH, SERIAL_MAX_RX_CAPACITY), rxDropped: Count(), txBytes: Count(), txDropped: Count(), rxBytes: Count() });

/** Host side: count guest output the console's destination dropped. */
export function serialOutputDropped(state: Serial16550aState, payload: SerialOutputDroppedPayload): TransitionResult<Serial16550aState> {
  const n = payload?.bytes;
  if (!Number.isSafeInteger(n) || n <= 0) return { state, effects: NO_EFFECTS };
  const next = copySerialState(state);
  next.txDropped = state.txDropped + n;
  return { state: next, effects: NO_EFFECTS };
}

/** The PC's COM ports by I/O base: COM1 is 0x3f8 (ACPI name COM1, _UID 1), and so on. */
const COM_PORT_BASES = [0x3f8, 0x2f8, 0x3e8, 0x2e8];

/**
 * The UART in the DSDT (PNP0501) with its ports and interrupt. Hardware-reduced ACPI makes
 * Linux drop the legacy PIC's fixed ISA IRQ numbering, so this _CRS is how it learns the IRQ.
 */
export function serialAcpi(device: DeviceInstance<Serial16550aState>): DeviceAcpi {
  const base = device.ranges[0].base;
  const n = COM_PORT_BASES.indexOf(base) + 1;
  if (n === 0) throw new RangeError(`a UART at port 0x${base.toString(16)} has no COM name for ACPI`);
  return {
    sb: [
      aml.device(`COM${n}`, [
        aml.name('_HID', aml.eisaId('PNP0501')),
        aml.name('_UID', n),
        aml.name(
          '_CRS',
          aml.resourceTemplate([aml.Resource.io(base, base, 1, SERIAL_PORT_LENGTH), aml.Resource.interrupt({ edge: true }, [device.state.gsi])]),
        ),
      ]),
    ],
  };
}

/** A FIFO holding more than the UART may buffer would break its own invariants. */
export function checkSerialRx(s: Serial16550aState): string | null {
  return s.rx.length > s.rxCapacity ? `/rx: holds ${s.rx.length} bytes, more than rxCapacity ${s.rxCapacity}` : null;
}

export const serialModel: DeviceModel<Serial16550aState> = {
  kind: SERIAL_KIND,
  label: SERIAL_LABEL,
  schemaVersion: SERIAL_SCHEMA_VERSION,
  events: deviceAccessEventTypes(SERIAL_LABEL),
  transition: serialTransition,
  stateSchema: Serial16550aStateSchema,
  inputs: { [SerialEvents.InputReceived]: serialInput, [SerialEvents.OutputDropped]: serialOutputDropped },
  acpi: serialAcpi,
  checkState: checkSerialRx,
};
