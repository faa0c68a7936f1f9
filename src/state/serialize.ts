// A snapshot of the store is its state as JSON. Loading one checks the root and every slice's
// schemaVersion (and each device's) before the state may enter a store.
import { SchemaVersionError } from './errors';
import { assertJsonSafe, deepFreeze } from './json';
import { ROOT_SCHEMA_VERSION, type RootState, type SliceMap, type StateOf, rootSlices } from './root';

/** Check that `state` is plain JSON with the expected versions; throws a TernStateError. */
export function validateState<M extends SliceMap>(
  state: unknown,
  slices: M = rootSlices as unknown as M,
  rootSchemaVersion = ROOT_SCHEMA_VERSION,
): asserts state is StateOf<M> {
  if (typeof state !== 'object' || state === null || Array.isArray(state)) {
    throw new TypeError('state must be an object');
  }
  const root = state as Record<string, unknown>;
  if (root.schemaVersion !== rootSchemaVersion) throw new SchemaVersionError('root', root.schemaVersion, rootSchemaVersion);
  for (const [key, slice] of Object.entries(slices)) {
    const value = root[key];
    if (typeof value === 'object' && value !== null && checkedSlices.get(value) === slice) continue;
    slice.validate(value);
    assertJsonSafe(value, `/${key}`);
  }
  const extra = Object.keys(root).filter((k) => k !== 'schemaVersion' && !Object.hasOwn(slices, k));
  if (extra.length) throw new TypeError(`state has unknown slices: ${extra.join(', ')}`);
}

// Slice values that passed validateAndFreezeState, with the slice that checked them: frozen, so
// unchanged since, and a state that shares them (the migrated state the store takes once the
// final checks passed) is not checked twice.
const checkedSlices = new WeakMap<object, unknown>();

/** validateState, then deep-freeze the state; its slices count as checked from then on. */
export function validateAndFreezeState<M extends SliceMap>(
  state: unknown,
  slices: M = rootSlices as unknown as M,
  rootSchemaVersion = ROOT_SCHEMA_VERSION,
): StateOf<M> {
  validateState(state, slices, rootSchemaVersion);
  const frozen = deepFreeze(state) as Record<string, unknown>;
  for (const [key, slice] of Object.entries(slices)) {
    const value = frozen[key];
    if (typeof value === 'object' && value !== null) checkedSlices.set(value, slice);
  }
  return frozen as StateOf<M>;
}

export function serializeState(state: unknown, space?: number): string {
  assertJsonSafe(state);
  return JSON.stringify(state, null, space);
}

/** Parse and check a serialized state; the result is deep-frozen, ready for a store. */
export function deserializeState(json: string): RootState;
export function deserializeState<M extends SliceMap>(json: string, slices: M, rootSchemaVersion?: number): StateOf<M>;
export function deserializeState(json: string, slices: SliceMap = rootSlices, rootSchemaVersion = ROOT_SCHEMA_VERSION): unknown {
  return validateAndFreezeState(JSON.parse(json), slices, rootSchemaVersion);
}

export type { RootState };
