// VM-level KVM state that is not per vCPU: the in-kernel interrupt controllers (PIC master,
// PIC slave, IOAPIC), the PIT and kvmclock. Read out of KVM on pause, so that together with
// the vcpus slice a paused VM is fully described by the store; set back into KVM on restore.
import { Type } from '@sinclair/typebox';
import { TernStateError } from '../errors';
import { Base64, Exact, HexU64, IntIn, U32 } from '../state-schema';
import { assertJsonSafe } from '../json';
import { createSlice, eventCreator, pure } from '../slice';
import { VmEvents } from './vm';

export const KVM_SCHEMA_VERSION = 1;

export interface SavedKvmState {
  /** base64 of struct kvm_irqchip for chip 0 (PIC master), 1 (PIC slave), 2 (IOAPIC) */
  irqchips: string[];
  /** base64 of struct kvm_pit_state2 */
  pit: string;
  /** kvmclock in ns, as a hex string (the store holds no bigint) */
  clock: string;
  clockFlags: number;
}

export interface KvmSliceState {
  schemaVersion: number;
  /** null until the VM is first paused */
  saved: SavedKvmState | null;
}

export const KvmEvents = {
  StateSaved: '[KVM] State Saved',
} as const;

export const kvmInitialState = (): KvmSliceState => ({ schemaVersion: KVM_SCHEMA_VERSION, saved: null });

function checkSaved(s: unknown, where: string): asserts s is SavedKvmState {
  const o = s as SavedKvmState;
  if (typeof o !== 'object' || o === null) throw new TernStateError('InvalidKvmState', `${where}: expected an object`);
  if (!Array.isArray(o.irqchips) || o.irqchips.length !== 3 || !o.irqchips.every((c) => typeof c === 'string')) {
    throw new TernStateError('InvalidKvmState', `${where}.irqchips: expected 3 base64 strings`);
  }
  if (typeof o.pit !== 'string') throw new TernStateError('InvalidKvmState', `${where}.pit: expected a base64 string`);
  if (typeof o.clock !== 'string' || !/^0x[0-9a-f]+$/.test(o.clock)) {
    throw new TernStateError('InvalidKvmState', `${where}.clock: expected a hex string`);
  }
  if (!Number.isInteger(o.clockFlags)) throw new TernStateError('InvalidKvmState', `${where}.clockFlags: expected an integer`);
}

export const KvmSliceSchema = Exact({
  schemaVersion: IntIn(KVM_SCHEMA_VERSION, KVM_SCHEMA_VERSION),
  saved: Type.Union([
    Type.Null(),
    Exact({ irqchips: Type.Array(Base64(4096), { minItems: 3, maxItems: 3 }), pit: Base64(4096), clock: HexU64(), clockFlags: U32() }),
  ]),
});

export const kvmSlice = createSlice({
  name: 'kvm',
  schemaVersion: KVM_SCHEMA_VERSION,
  initialState: kvmInitialState,
  schema: KvmSliceSchema,
  handlers: {
    [KvmEvents.StateSaved]: pure((s: KvmSliceState, p: SavedKvmState) => {
      checkSaved(p, 'kvm state');
      assertJsonSafe(p, '/kvm/saved');
      return { schemaVersion: s.schemaVersion, saved: p };
    }),
    [VmEvents.Deleted]: pure(() => kvmInitialState()),
  },
  validate(state) {
    if (state.saved !== null) checkSaved(state.saved, 'kvm.saved');
  },
});

const kvmStateSaved = eventCreator<SavedKvmState>(KvmEvents.StateSaved);

export const kvmEvents = {
  stateSaved: (state: SavedKvmState, source = 'vmm') => kvmStateSaved(state, source),
};
