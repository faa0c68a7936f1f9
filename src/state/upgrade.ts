// Lifting a stored root state from an older schema to this build's. Each step is a pure
// function from version N to N+1 (no I/O, input not modified); upgradeState chains them.
// A state newer than this build cannot be lowered and is refused.
import { TernStateError } from './errors';
import { ROOT_SCHEMA_VERSION } from './root';
import { kvmInitialState } from './slices/kvm';
import { MEMORY_SCHEMA_VERSION, type RamRegionState } from './slices/memory';

type Json = Record<string, unknown>;
export type StateUpgrade = (state: Readonly<Json>) => Json;

/** from-version -> upgrade to from-version + 1 */
export const STATE_UPGRADES: Readonly<Record<number, StateUpgrade>> = Object.freeze({
  // 1 -> 2: the kvm slice. A version-1 state never saved VM-level KVM state.
  1: (s: Readonly<Json>) => ({ ...s, schemaVersion: 2, kvm: kvmInitialState() }),
  // 2 -> 3: the memory slice. Builds up to schema 2 did not record the RAM layout; they all
  // derived it from memory.size, which is what this step does.
  2: (s: Readonly<Json>) => ({ ...s, schemaVersion: 3, memory: { schemaVersion: MEMORY_SCHEMA_VERSION, regions: schema2RamLayout(s) } }),
  // 3 -> 4: vm slice 2 records a guest stop that waits for a resume. Schema-3 builds lost
  // such a stop, so none is waiting.
  3: (s: Readonly<Json>) => ({ ...s, schemaVersion: 4, vm: { ...(s.vm as Json), schemaVersion: 2, guestStop: null } }),
  // 4 -> 5: serial device 2 counts output the host dropped; nothing was counted before.
  4: (s: Readonly<Json>) => ({ ...s, schemaVersion: 5, devices: withSerialTxDropped(s.devices as Json) }),
  // 5 -> 6: VMs get a PCI segment (device kind 'pci-segment'), which schema-5 builds do not
  // know, hence the new version. A schema-5 VM keeps the devices it had: its guest booted
  // with ACPI tables that describe no PCI bridge and has never probed one, so restore adds
  // none; its next boot (a guest reset) gets the segment like any new VM.
  5: (s: Readonly<Json>) => ({ ...s, schemaVersion: 6 }),
});

function withSerialTxDropped(devices: Json): Json {
  const instances = (devices?.instances ?? {}) as Record<string, Json>;
  const lifted = Object.fromEntries(
    Object.entries(instances).map(([id, d]) =>
      d?.kind === 'serial-16550a' && d.schemaVersion === 1 ? [id, { ...d, schemaVersion: 2, txDropped: 0 }] : [id, d],
    ),
  );
  return { ...devices, instances: lifted };
}

/**
 * The RAM layout every schema-2 build gave a VM: one region from 0 up to the 32-bit MMIO hole
 * at 3 GiB, the rest from 4 GiB. Frozen here on purpose: it must not follow later layout
 * changes. A VM with no config had no RAM yet.
 */
function schema2RamLayout(s: Readonly<Json>): RamRegionState[] {
  const vm = s.vm as { status?: string; config?: { memory?: { size?: unknown } } | null } | undefined;
  // RAM exists only while the VM runs or is paused; a config without a size had the default.
  if (vm?.status !== 'Running' && vm?.status !== 'Paused') return [];
  const given = vm.config?.memory?.size;
  const size = typeof given === 'number' ? given : 512 * 1024 * 1024;
  const hole = 0xc000_0000;
  const low = Math.min(size, hole);
  return size > low ? [{ guestAddress: 0, size: low }, { guestAddress: 0x1_0000_0000, size: size - low }] : [{ guestAddress: 0, size: low }];
}

export class StateSchemaError extends TernStateError {
  constructor(message: string) {
    super('StateSchemaUnsupported', message);
  }
}

/** The root schema version `state` claims, checked to be usable. */
export function rootSchemaVersionOf(state: unknown, target = ROOT_SCHEMA_VERSION): number {
  if (typeof state !== 'object' || state === null || Array.isArray(state)) throw new StateSchemaError('state is not an object');
  const v = (state as Json).schemaVersion;
  if (!Number.isInteger(v) || (v as number) < 1) throw new StateSchemaError(`state schemaVersion ${String(v)} is not a positive integer`);
  if ((v as number) > target) {
    throw new StateSchemaError(`state schemaVersion ${String(v)} is newer than this build's ${target}`);
  }
  return v as number;
}

/** Apply every upgrade from the state's version up to `target`; returns the input when already current. */
export function upgradeState(state: unknown, target = ROOT_SCHEMA_VERSION, upgrades = STATE_UPGRADES): Json {
  let v = rootSchemaVersionOf(state, target);
  let s = state as Json;
  while (v < target) {
    const step = upgrades[v];
    if (!step) throw new StateSchemaError(`no upgrade from state schemaVersion ${v}`);
    s = step(s);
    if (s.schemaVersion !== v + 1) throw new StateSchemaError(`the upgrade from ${v} did not produce schemaVersion ${v + 1}`);
    v += 1;
  }
  return s;
}
