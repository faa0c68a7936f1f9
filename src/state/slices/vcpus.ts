// Saved vCPU state, one entry per vCPU id, in the JSON form of src/state/codec.ts. Filled when
// the VMM reads the vCPUs out of KVM (pause for snapshot, migration) and read back on restore.
import type { SavedVcpuState } from '../codec';
import { Type } from '@sinclair/typebox';
import { REGS_KEYS } from '../codec';
import { TernStateError } from '../errors';
import { Base64, Exact, HexU64, IntIn, U16, U32, U8 } from '../state-schema';
import { assertJsonSafe } from '../json';
import { createSlice, eventCreator, pure } from '../slice';
import { VmEvents } from './vm';

export const VCPUS_SCHEMA_VERSION = 1;

export interface VcpusSliceState {
  schemaVersion: number;
  /** keyed by vCPU id as a decimal string */
  saved: Record<string, SavedVcpuState>;
}

export const VcpuEvents = {
  StateSaved: '[vCPU] State Saved',
} as const;

export interface VcpuStateSavedPayload {
  id: number;
  state: SavedVcpuState;
}

export const vcpusInitialState = (): VcpusSliceState => ({ schemaVersion: VCPUS_SCHEMA_VERSION, saved: {} });

const SegmentSchema = Exact({
  base: HexU64(), limit: U32(), selector: U16(), type: U8(), present: U8(), dpl: U8(), db: U8(), s: U8(), l: U8(), g: U8(), avl: U8(), unusable: U8(),
});
const DTableSchema = Exact({ base: HexU64(), limit: U16() });

/** One vCPU's saved state: the JSON form of codec.ts's NativeVcpuState. */
export const SavedVcpuStateSchema = Exact({
  regs: Exact(Object.fromEntries(REGS_KEYS.map((k) => [k, HexU64()]))),
  sregs: Exact({
    cs: SegmentSchema, ds: SegmentSchema, es: SegmentSchema, fs: SegmentSchema, gs: SegmentSchema, ss: SegmentSchema, tr: SegmentSchema, ldt: SegmentSchema,
    gdt: DTableSchema, idt: DTableSchema,
    cr0: HexU64(), cr2: HexU64(), cr3: HexU64(), cr4: HexU64(), cr8: HexU64(), efer: HexU64(), apic_base: HexU64(),
    interrupt_bitmap: Type.Array(HexU64(), { minItems: 4, maxItems: 4 }),
  }),
  fpu: Exact({ fcw: U16(), fsw: U16(), ftwx: U8(), last_opcode: U16(), last_ip: HexU64(), last_dp: HexU64(), mxcsr: U32(), registers: Base64(4096) }),
  msrs: Type.Array(Exact({ index: U32(), data: HexU64() }), { maxItems: 4096 }),
  xsave: Base64(65536),
  xcrs: Base64(4096),
  lapic: Base64(4096),
  vcpuEvents: Base64(4096),
  debugRegs: Base64(4096),
  mpState: U32(),
  cpuid: Type.Array(Exact({ function: U32(), index: U32(), flags: U32(), eax: U32(), ebx: U32(), ecx: U32(), edx: U32() }), { maxItems: 256 }),
});

export const VcpusSliceSchema = Exact({
  schemaVersion: IntIn(VCPUS_SCHEMA_VERSION, VCPUS_SCHEMA_VERSION),
  saved: Type.Record(Type.String({ pattern: '^(0|[1-9][0-9]{0,2})$' }), SavedVcpuStateSchema, { additionalProperties: false }),
});

export const vcpusSlice = createSlice({
  name: 'vcpus',
  schemaVersion: VCPUS_SCHEMA_VERSION,
  initialState: vcpusInitialState,
  schema: VcpusSliceSchema,
  handlers: {
    [VcpuEvents.StateSaved]: pure((s: VcpusSliceState, p: VcpuStateSavedPayload) => {
      if (!Number.isInteger(p?.id) || p.id < 0) throw new TernStateError('InvalidVcpuState', `invalid vCPU id ${String(p?.id)}`);
      assertJsonSafe(p.state, `/vcpus/saved/${p.id}`);
      return { ...s, saved: { ...s.saved, [String(p.id)]: p.state } };
    }),
    [VmEvents.Deleted]: pure(() => vcpusInitialState()),
  },
});

const vcpuStateSaved = eventCreator<VcpuStateSavedPayload>(VcpuEvents.StateSaved);

export const vcpuEvents = {
  stateSaved: (id: number, state: SavedVcpuState, source = 'cpu') => vcpuStateSaved({ id, state }, source),
};
