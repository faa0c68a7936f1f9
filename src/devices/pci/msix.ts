// MSI-X (PCI Local Bus 3.0, 6.8.2): a capability in configuration space (enable and
// function-mask bits, where the table and the pending-bit array are) plus the table and PBA
// in one of the function's memory BARs. All of it is plain state with pure transitions. What
// the VMM needs is in the results: the messages to send now, and which vectors' routes
// (address, data, masked) changed, so it can program KVM's GSI routing from msixRoutes().
import { Type } from '@sinclair/typebox';
import type { TSchema } from '@sinclair/typebox';
import { Exact, U32 } from '../../state/state-schema';
import { allOnes } from '../bus';
import { type IoAccess, data32 } from '../device';
import { type PciCapabilitySpec, PciCapId, pciConfigRead } from './config-space';

export const MSIX_ENTRY_SIZE = 16;
/** Message Control bits. */
export const MsixControl = {
  TABLE_SIZE_MASK: 0x07ff,
  FUNCTION_MASK: 1 << 14,
  ENABLE: 1 << 15,
} as const;
/** Vector Control: the per-vector mask bit (the only defined bit). */
export const MSIX_VECTOR_MASKED = 1;
/** The table holds at most 2048 vectors. */
export const MSIX_MAX_VECTORS = 2048;

/** Where a function's MSI-X structures are. */
export interface MsixLayout {
  /** configuration-space offset of the capability */
  capOffset: number;
  vectors: number;
  /** BAR index holding table and PBA */
  bar: number;
  /** offsets in that BAR, 8-byte aligned */
  tableOffset: number;
  pbaOffset: number;
}

/** The table (4 dwords per vector: address low, address high, data, vector control) and the PBA. */
export interface MsixState {
  table: number[];
  /** one bit per vector, 32 per dword */
  pending: number[];
}

/** One message a function sends: a write of `data` to the 64-bit `address`. */
export interface MsiMessage {
  vector: number;
  addressLow: number;
  addressHigh: number;
  data: number;
}

/** A vector's route as KVM's GSI routing takes it, and whether it may fire. */
export interface MsixRoute extends MsiMessage {
  masked: boolean;
}

export interface MsixResult {
  msix: MsixState;
  /** value read (reads only) */
  value?: number | bigint;
  /** messages to deliver now (a pending vector unmasked, or a signal on an unmasked one) */
  messages: MsiMessage[];
  /** vectors whose route or mask changed: their GSI routes need reprogramming */
  routesChanged: number[];
}

const pbaDwords = (vectors: number) => Math.ceil(vectors / 32);
export const msixTableSize = (l: MsixLayout) => l.vectors * MSIX_ENTRY_SIZE;
/** The PBA is read in qwords, so it takes whole qwords. */
export const msixPbaSize = (l: MsixLayout) => Math.ceil(l.vectors / 64) * 8;

/** The capability (12 bytes) for `l`: the guest may write the enable and function-mask bits. */
export function msixCapability(l: MsixLayout): PciCapabilitySpec {
  if (!Number.isInteger(l.vectors) || l.vectors < 1 || l.vectors > MSIX_MAX_VECTORS) throw new RangeError(`MSI-X vector count ${l.vectors}`);
  if (l.tableOffset % 8 !== 0 || l.pbaOffset % 8 !== 0) throw new RangeError('MSI-X table and PBA offsets must be 8-byte aligned');
  if (l.tableOffset < l.pbaOffset + msixPbaSize(l) && l.pbaOffset < l.tableOffset + msixTableSize(l)) throw new RangeError('MSI-X table and PBA overlap');
  const control = l.vectors - 1;
  const table = (l.tableOffset | l.bar) >>> 0;
  const pba = (l.pbaOffset | l.bar) >>> 0;
  const le = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
  return {
    id: PciCapId.MSIX,
    offset: l.capOffset,
    body: [control & 0xff, control >> 8, ...le(table), ...le(pba)],
    writable: [{ offset: 2, size: 2, mask: MsixControl.ENABLE | MsixControl.FUNCTION_MASK }],
  };
}

/** Power-on: every vector masked, nothing pending. */
export function msixInitialState(l: MsixLayout): MsixState {
  const table = new Array<number>(4 * l.vectors).fill(0);
  for (let v = 0; v < l.vectors; v++) table[4 * v + 3] = MSIX_VECTOR_MASKED;
  return { table, pending: new Array<number>(pbaDwords(l.vectors)).fill(0) };
}

export function msixStateSchema(l: MsixLayout): TSchema {
  return Exact({
    table: Type.Array(U32(), { minItems: 4 * l.vectors, maxItems: 4 * l.vectors }),
    pending: Type.Array(U32(), { minItems: pbaDwords(l.vectors), maxItems: pbaDwords(l.vectors) }),
  });
}

/** What the state's shape cannot say: reserved bits are zero and no vector past the last is pending. */
export function msixStateProblem(s: MsixState, l: MsixLayout): string | null {
  for (let v = 0; v < l.vectors; v++) {
    if (s.table[4 * v] & 3) return `/msix/table/${4 * v}: address bits 1:0 are reserved`;
    if (s.table[4 * v + 3] & ~MSIX_VECTOR_MASKED) return `/msix/table/${4 * v + 3}: reserved vector control bits`;
  }
  const spare = l.vectors % 32;
  if (spare && s.pending[s.pending.length - 1] >>> spare) return '/msix/pending: bits past the last vector';
  return null;
}

/** MSI-X enable and function mask, from the configuration space. */
export function msixControl(config: readonly number[], l: MsixLayout): { enabled: boolean; functionMasked: boolean } {
  const control = pciConfigRead(config, l.capOffset + 2, 2);
  return { enabled: (control & MsixControl.ENABLE) !== 0, functionMasked: (control & MsixControl.FUNCTION_MASK) !== 0 };
}

function message(s: MsixState, vector: number): MsiMessage {
  return { vector, addressLow: s.table[4 * vector], addressHigh: s.table[4 * vector + 1], data: s.table[4 * vector + 2] };
}

const isPending = (s: MsixState, v: number) => ((s.pending[v >> 5] >>> (v & 31)) & 1) === 1;

function withPending(s: MsixState, v: number, on: boolean): MsixState {
  const pending = s.pending.slice();
  pending[v >> 5] = on ? (pending[v >> 5] | (1 << (v & 31))) >>> 0 : (pending[v >> 5] & ~(1 << (v & 31))) >>> 0;
  return { table: s.table, pending };
}

/** Whether vector `v` may fire: MSI-X enabled, function not masked, vector not masked. */
function vectorLive(s: MsixState, config: readonly number[], l: MsixLayout, v: number): boolean {
  const c = msixControl(config, l);
  return c.enabled && !c.functionMasked && (s.table[4 * v + 3] & MSIX_VECTOR_MASKED) === 0;
}

/** Every vector's route: what the VMM programs into KVM's GSI routing table. */
export function msixRoutes(s: MsixState, config: readonly number[], l: MsixLayout): MsixRoute[] {
  const out: MsixRoute[] = [];
  for (let v = 0; v < l.vectors; v++) out.push({ ...message(s, v), masked: !vectorLive(s, config, l, v) });
  return out;
}

/** Send pending messages of vectors that are live now, clearing their pending bits. */
function flushPending(s: MsixState, config: readonly number[], l: MsixLayout, vectors: Iterable<number>): { msix: MsixState; messages: MsiMessage[] } {
  let msix = s;
  const messages: MsiMessage[] = [];
  for (const v of vectors) {
    if (isPending(msix, v) && vectorLive(msix, config, l, v)) {
      msix = withPending(msix, v, false);
      messages.push(message(msix, v));
    }
  }
  return { msix, messages };
}

const all = (l: MsixLayout) => Array.from({ length: l.vectors }, (_, v) => v);

/**
 * The device raises vector `v`: a live vector sends its message; a masked one (vector or
 * function mask) sets its pending bit and sends once unmasked. With MSI-X disabled nothing
 * is sent or latched (the function would use INTx).
 */
export function msixSignal(s: MsixState, config: readonly number[], l: MsixLayout, v: number): MsixResult {
  if (!Number.isInteger(v) || v < 0 || v >= l.vectors) throw new RangeError(`MSI-X vector ${v} of ${l.vectors}`);
  if (!msixControl(config, l).enabled) return { msix: s, messages: [], routesChanged: [] };
  if (vectorLive(s, config, l, v)) return { msix: s, messages: [message(s, v)], routesChanged: [] };
  return { msix: isPending(s, v) ? s : withPending(s, v, true), messages: [], routesChanged: [] };
}

/**
 * The configuration space changed from `before` to `after`: when MSI-X is enabled or the
 * function unmasked, pending vectors fire; any change of those two bits changes every route.
 */
export function msixConfigChanged(s: MsixState, before: readonly number[], after: readonly number[], l: MsixLayout): MsixResult {
  const was = msixControl(before, l);
  const now = msixControl(after, l);
  if (was.enabled === now.enabled && was.functionMasked === now.functionMasked) return { msix: s, messages: [], routesChanged: [] };
  const { msix, messages } = flushPending(s, after, l, all(l));
  return { msix, messages, routesChanged: all(l) };
}

/** Write one table dword: the address keeps bits 1:0 zero, vector control has only its mask bit. */
function writeTableDword(s: MsixState, index: number, value: number): MsixState {
  const field = index & 3;
  const v = field === 0 ? value & ~3 : field === 3 ? value & MSIX_VECTOR_MASKED : value;
  if (s.table[index] === v >>> 0) return s;
  const table = s.table.slice();
  table[index] = v >>> 0;
  return { table, pending: s.pending };
}

/**
 * A guest access to the table or the PBA at `offset` in the BAR, or null when the offset is
 * neither. Software must use aligned dword or qword accesses (6.8.2); others read all ones
 * and are dropped. The PBA is read-only.
 */
export function msixBarAccess(s: MsixState, config: readonly number[], l: MsixLayout, offset: number, access: IoAccess): MsixResult | null {
  const inTable = offset >= l.tableOffset && offset < l.tableOffset + msixTableSize(l);
  const inPba = offset >= l.pbaOffset && offset < l.pbaOffset + msixPbaSize(l);
  if (!inTable && !inPba) return null;
  const none: MsixResult = { msix: s, messages: [], routesChanged: [] };
  const aligned = (access.size === 4 || access.size === 8) && offset % access.size === 0;
  if (!aligned) return access.direction === 'read' ? { ...none, value: allOnes(access.size) } : none;
  const base = inTable ? l.tableOffset : l.pbaOffset;
  const first = (offset - base) / 4;
  const words = inTable ? s.table : s.pending;
  if (access.direction === 'read') {
    const lo = words[first] ?? 0;
    if (access.size === 4) return { ...none, value: lo };
    return { ...none, value: (BigInt(words[first + 1] ?? 0) << 32n) | BigInt(lo) };
  }
  if (inPba) return none;
  let msix = s;
  const lo = data32(access);
  msix = writeTableDword(msix, first, lo);
  if (access.size === 8) msix = writeTableDword(msix, first + 1, Number(BigInt.asUintN(32, (access.data as bigint) >> 32n)));
  if (msix === s) return none;
  const vector = first >> 2;
  // Unmasking a vector with its pending bit set sends the message now.
  const flushed = flushPending(msix, config, l, [vector]);
  return { msix: flushed.msix, messages: flushed.messages, routesChanged: [vector] };
}
