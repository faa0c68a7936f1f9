// Saved vCPU state, one entry per vCPU id, in the JSON form of src/state/codec.ts. Filled when
// the VMM reads the vCPUs out of KVM (pause for snapshot, migration) and read back on restore.
import type { SavedVcpuState } from '../codec';
import { TernStateError } from '../errors';
import { assertJsonSafe } from '../json';
import { createSlice, pure } from '../slice';
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

export const vcpusSlice = createSlice({
  name: 'vcpus',
  schemaVersion: VCPUS_SCHEMA_VERSION,
  initialState: vcpusInitialState,
  handlers: {
    [VcpuEvents.StateSaved]: pure((s: VcpusSliceState, p: VcpuStateSavedPayload) => {
      if (!Number.isInteger(p?.id) || p.id < 0) throw new TernStateError('InvalidVcpuState', `invalid vCPU id ${String(p?.id)}`);
      assertJsonSafe(p.state, `/vcpus/saved/${p.id}`);
      return { ...s, saved: { ...s.saved, [String(p.id)]: p.state } };
    }),
    [VmEvents.Deleted]: pure(() => vcpusInitialState()),
  },
});

export const vcpuEvents = {
  stateSaved: (id: number, state: SavedVcpuState, source = 'cpu') => ({
    type: VcpuEvents.StateSaved,
    payload: { id, state } as VcpuStateSavedPayload,
    source,
  }),
};
