// State diffs as immer patches (RFC 6902-like operations with array paths), so snapshot and
// migration code can stream what changed between two states and apply it on the other side.
// diffState walks only what differs: unchanged subtrees share references in an immutable
// store, so the cost follows the size of the change, not of the state.
import { applyPatch, type Operation, type Validator } from 'fast-json-patch';
import { applyPatches, enablePatches, produceWithPatches, type Draft, type Patch } from 'immer';

enablePatches();

export type StatePatch = Patch;

/** The patches one event produced, as emitted on Store.patches$. */
export interface StatePatchSet {
  seq: number;
  type: string;
  patches: StatePatch[];
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null;
}

const hasOwn = (o: object, k: string): boolean => Object.prototype.hasOwnProperty.call(o, k);

function diff(a: unknown, b: unknown, path: (string | number)[], out: Patch[]): void {
  if (a === b) return;
  if (!isObject(a) || !isObject(b) || Array.isArray(a) !== Array.isArray(b)) {
    out.push({ op: 'replace', path, value: b });
    return;
  }
  if (Array.isArray(a)) {
    const bb = b as unknown as unknown[];
    if (a.length !== bb.length) {
      // Shifts and appends on small arrays (FIFOs, range lists): one replace says it best.
      out.push({ op: 'replace', path, value: bb });
      return;
    }
    for (let i = 0; i < a.length; i++) if (a[i] !== bb[i]) diff(a[i], bb[i], [...path, i], out);
    return;
  }
  for (const k of Object.keys(a)) {
    if (!hasOwn(b, k)) out.push({ op: 'remove', path: [...path, k] });
    else if (a[k] !== b[k]) diff(a[k], b[k], [...path, k], out);
  }
  for (const k of Object.keys(b)) if (!hasOwn(a, k)) out.push({ op: 'add', path: [...path, k], value: b[k] });
}

/** Patches that turn `prev` into `next`. Values in the patches are shared, not copied. */
export function diffState<S>(prev: S, next: S): StatePatch[] {
  const out: Patch[] = [];
  diff(prev, next, [], out);
  return out;
}

/** Apply patches (from diffState, produceStateWithPatches or the store) to a frozen state. */
export function applyStatePatches<S>(state: S, patches: readonly StatePatch[]): S {
  return applyPatches(state as object, patches as Patch[]) as S;
}

/**
 * Apply patches to a plain JSON document that nobody else holds (a migration destination's
 * shadow of the source's state, parsed from the stream), changing it in place: no copy, no
 * freeze of what the patches bring, which for the final patch (every vCPU's saved state) is
 * most of the state. Each operation is checked against the document (a path that does not
 * resolve, an index out of range) and none may touch __proto__; on an error the document is
 * left part-patched, so a caller discards it. Returns the document, a new one only if a patch
 * replaced the root.
 */
export function applyStatePatchesInPlace<S>(doc: S, patches: readonly StatePatch[]): S {
  const ops = patches.map((p) => ({ op: p.op, path: jsonPointer(p.path), value: p.value }) as Operation);
  return applyPatch(doc, ops, pathResolves, true, true).newDocument;
}

/**
 * fast-json-patch's check of an operation against the document, given the longest prefix of
 * its path that exists: replace and remove need the whole path, add its parent. (Its default
 * check also walks every value looking for `undefined`, which JSON cannot hold: with the vCPU
 * states in the final patch, that walk was most of the cost.) Array indices out of range are
 * refused by the library itself.
 */
const pathResolves: Validator<unknown> = (op, _index, _doc, existing) => {
  if (existing === op.path) return;
  if (op.op === 'add' && op.path.split('/').length === existing.split('/').length + 1) return;
  throw new Error(`${op.op} ${op.path}: the path does not resolve`);
};

/** An immer path as an RFC 6901 JSON pointer. */
function jsonPointer(path: readonly (string | number)[]): string {
  return path.map((k) => `/${String(k).replace(/~/g, '~0').replace(/\//g, '~1')}`).join('');
}

/** immer's produceWithPatches, for code that edits state outside the store. */
export function produceStateWithPatches<S>(
  state: S,
  recipe: (draft: Draft<S>) => void | S,
): [S, StatePatch[], StatePatch[]] {
  return produceWithPatches(state as object, recipe as (d: object) => void) as unknown as [S, Patch[], Patch[]];
}
