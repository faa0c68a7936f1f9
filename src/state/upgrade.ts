// Lifting a stored root state from an older schema to this build's. Each step is a pure
// function from version N to N+1 (no I/O, input not modified); upgradeState chains them.
// A state newer than this build cannot be lowered and is refused.
import { TernStateError } from './errors';
import { ROOT_SCHEMA_VERSION } from './root';
import { kvmInitialState } from './slices/kvm';

type Json = Record<string, unknown>;
export type StateUpgrade = (state: Readonly<Json>) => Json;

/** from-version -> upgrade to from-version + 1 */
export const STATE_UPGRADES: Readonly<Record<number, StateUpgrade>> = Object.freeze({
  // 1 -> 2: the kvm slice. A version-1 state never saved VM-level KVM state.
  1: (s: Readonly<Json>) => ({ ...s, schemaVersion: 2, kvm: kvmInitialState() }),
});

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
