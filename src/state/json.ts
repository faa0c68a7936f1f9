// The store holds plain JSON only, so that a snapshot is JSON.stringify(state) and a restore is
// JSON.parse: no bigint, Map, Set, class instances, undefined values, holes or non-finite numbers.
import { freezeNew } from './copy';
import { NotJsonSafeError } from './errors';

export type JsonPrimitive = string | number | boolean | null;
export type JsonValue = JsonPrimitive | JsonValue[] | { [key: string]: JsonValue };

function describe(v: unknown): string {
  if (v === undefined) return 'undefined';
  if (typeof v === 'bigint') return `bigint ${v}n`;
  if (typeof v === 'number') return `non-finite number ${v}`;
  if (typeof v === 'function' || typeof v === 'symbol') return typeof v;
  const proto = Object.getPrototypeOf(v);
  return `instance of ${proto?.constructor?.name ?? 'unknown class'}`;
}

// The path to the value being checked, built only when a check fails: a state is checked whole
// before every snapshot and migration, and a string per value made that the bulk of the cost.
function check(v: unknown, keys: (string | number)[]): void {
  switch (typeof v) {
    case 'string':
    case 'boolean':
      return;
    case 'number':
      if (!Number.isFinite(v)) throw new NotJsonSafeError(pathOf(keys), describe(v));
      return;
    case 'object': {
      if (v === null) return;
      if (Array.isArray(v)) {
        for (let i = 0; i < v.length; i++) {
          keys.push(i);
          if (!(i in v)) throw new NotJsonSafeError(pathOf(keys), 'array hole');
          check(v[i], keys);
          keys.pop();
        }
        return;
      }
      const proto = Object.getPrototypeOf(v);
      if (proto !== Object.prototype && proto !== null) throw new NotJsonSafeError(pathOf(keys), describe(v));
      for (const key of Object.keys(v as object)) {
        keys.push(key);
        check((v as Record<string, unknown>)[key], keys);
        keys.pop();
      }
      return;
    }
    default:
      throw new NotJsonSafeError(pathOf(keys), describe(v));
  }
}

function pathOf(keys: (string | number)[]): string {
  return keys.map((k) => `/${k}`).join('');
}

/** Throw NotJsonSafeError (with a JSON-pointer-like path) unless `value` is plain JSON data. */
export function assertJsonSafe(value: unknown, path = ''): void {
  check(value, path ? [path.replace(/^\//, '')] : []);
}

export function isJsonSafe(value: unknown): boolean {
  try {
    check(value, []);
    return true;
  } catch {
    return false;
  }
}

/** Deep-freeze; subtrees that are already frozen are skipped, so re-freezing a new root is cheap. */
export function deepFreeze<T>(value: T): T {
  return freezeNew(value);
}
