// Guest RAM layout: the memory slots the VM's RAM was created with, in guest-physical address
// order. Recorded when the machine creates its RAM, so a restore rebuilds exactly the physical
// map the guest was saved with, whatever layout a later build would choose for a new VM.
import { Type } from '@sinclair/typebox';
import { TernStateError } from '../errors';
import { Count, Exact, IntIn } from '../state-schema';
import { createSlice, eventCreator, pure } from '../slice';
import { VmEvents } from './vm';

export const MEMORY_SCHEMA_VERSION = 1;
const PAGE = 4096;

export interface RamRegionState {
  guestAddress: number;
  size: number;
}

export interface MemorySliceState {
  schemaVersion: number;
  /** empty until the VM's RAM exists */
  regions: RamRegionState[];
}

export const MemoryEvents = {
  RegionsCreated: '[Memory] Regions Created',
} as const;

export const memoryInitialState = (): MemorySliceState => ({ schemaVersion: MEMORY_SCHEMA_VERSION, regions: [] });

function checkRegions(regions: unknown, where: string): asserts regions is RamRegionState[] {
  if (!Array.isArray(regions)) throw new TernStateError('InvalidMemoryState', `${where}: expected an array`);
  let end = 0;
  regions.forEach((r: RamRegionState, i) => {
    const ok = typeof r === 'object' && r !== null && Number.isSafeInteger(r.guestAddress) && Number.isSafeInteger(r.size) &&
      r.size > 0 && r.guestAddress % PAGE === 0 && r.size % PAGE === 0 && r.guestAddress >= end;
    if (!ok) throw new TernStateError('InvalidMemoryState', `${where}[${i}]: expected a page-aligned region above the one before it`);
    end = r.guestAddress + r.size;
  });
}

export const MemorySliceSchema = Exact({
  schemaVersion: IntIn(MEMORY_SCHEMA_VERSION, MEMORY_SCHEMA_VERSION),
  regions: Type.Array(Exact({ guestAddress: Count(), size: Count() }), { maxItems: 1024 }),
});

export const memorySlice = createSlice({
  name: 'memory',
  schemaVersion: MEMORY_SCHEMA_VERSION,
  initialState: memoryInitialState,
  schema: MemorySliceSchema,
  handlers: {
    [MemoryEvents.RegionsCreated]: pure((s: MemorySliceState, p: { regions: RamRegionState[] }) => {
      checkRegions(p?.regions, 'memory regions');
      return { schemaVersion: s.schemaVersion, regions: p.regions.map((r) => ({ guestAddress: r.guestAddress, size: r.size })) };
    }),
    // With the VM shut down or deleted its RAM is gone.
    [VmEvents.Shutdown]: pure(() => memoryInitialState()),
    [VmEvents.Deleted]: pure(() => memoryInitialState()),
  },
  validate(state) {
    checkRegions(state.regions, 'memory.regions');
  },
});

const regionsCreated = eventCreator<{ regions: RamRegionState[] }>(MemoryEvents.RegionsCreated);

export const memoryEvents = {
  regionsCreated: (regions: readonly RamRegionState[], source = 'vmm') =>
    regionsCreated({ regions: regions.map((r) => ({ guestAddress: r.guestAddress, size: r.size })) }, source),
};
