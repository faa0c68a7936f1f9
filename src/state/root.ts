// The whole tree: one key per slice plus the root schema version.
import { busSlice } from './slices/bus';
import { devicesSlice } from './slices/devices';
import { kvmSlice } from './slices/kvm';
import { memorySlice } from './slices/memory';
import { vcpusSlice } from './slices/vcpus';
import { vmSlice } from './slices/vm';
import type { Slice, SliceStateOf } from './slice';

// 2: added the kvm slice; 3: added the memory slice; 4: vm.guestStop; 5: serial txDropped;
// 6: the pci-segment device kind
// (upgrade.ts lifts older states)
export const ROOT_SCHEMA_VERSION = 6;

export type SliceMap = Readonly<Record<string, Slice<string, any, any>>>;

export type StateOf<M extends SliceMap> = { readonly schemaVersion: number } & {
  readonly [K in keyof M]: SliceStateOf<M[K]>;
};

export const rootSlices = Object.freeze({
  vm: vmSlice,
  vcpus: vcpusSlice,
  devices: devicesSlice,
  bus: busSlice,
  kvm: kvmSlice,
  memory: memorySlice,
});

export type RootSlices = typeof rootSlices;
export type RootState = StateOf<RootSlices>;

export function initialStateOf<M extends SliceMap>(slices: M, schemaVersion = ROOT_SCHEMA_VERSION): StateOf<M> {
  const root: Record<string, unknown> = { schemaVersion };
  for (const [key, slice] of Object.entries(slices)) root[key] = slice.initialState();
  return Object.freeze(root) as StateOf<M>;
}

export function initialRootState(): RootState {
  return initialStateOf(rootSlices);
}
