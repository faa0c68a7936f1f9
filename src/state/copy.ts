// Shallow copies and freezing for the per-event hot path.
//
// On the V8 in Node 20, `{...obj, key: v}` copies an object of more than a handful of
// properties through a slow runtime path (about 1 us for 20 fields), while an object literal
// naming each field is an order of magnitude faster. Device states are copied with
// hand-written literals (type-checked for completeness); records whose keys are only known at
// run time (the root, the devices map) use a literal compiled once per key set.

type Copier = (o: Record<string, unknown>) => Record<string, unknown>;

const copiers = new Map<string, Copier>();

function compile(keys: readonly string[]): Copier {
  // In a literal, a "__proto__" key would set the prototype instead of copying a field.
  if (keys.includes('__proto__')) {
    return (o) => {
      const out: Record<string, unknown> = {};
      for (const k of keys) Object.defineProperty(out, k, { value: o[k], enumerable: true, writable: true, configurable: true });
      return out;
    };
  }
  // JSON.stringify yields a valid JS string literal for any key, so the source is safe.
  const body = keys.map((k) => `${JSON.stringify(k)}: o[${JSON.stringify(k)}]`).join(', ');
  return new Function('o', `return { ${body} };`) as Copier;
}

/** A fast shallow copier for records with exactly these keys (in this order). */
export function recordCopier<T extends object>(keys: readonly string[]): (o: T) => T {
  const sig = keys.join('\u0000');
  let c = copiers.get(sig);
  if (!c) copiers.set(sig, (c = compile(keys)));
  return c as unknown as (o: T) => T;
}

// Records are usually copied from the copy made for the previous event: remember it.
let lastOut: object | undefined;
let lastCopier: Copier | undefined;

/** Shallow copy of a plain record, fast when the same shape is copied repeatedly. */
export function copyRecord<T extends object>(o: T): T {
  const c = o === lastOut ? lastCopier! : recordCopier<Record<string, unknown>>(Object.keys(o));
  const out = c(o as Record<string, unknown>);
  lastOut = out;
  lastCopier = c;
  return out as T;
}

/** Copy `o` with `key` set to `value`. */
export function withKey<T extends object, K extends keyof T>(o: T, key: K, value: T[K]): T {
  const out = copyRecord(o);
  if (!(key in out)) {
    // a new key changes the shape: the remembered copier no longer fits
    lastOut = undefined;
  }
  out[key] = value;
  return out;
}

/**
 * Freeze an object and every object inside it that is not frozen yet. Stops at frozen
 * subtrees, so freezing a new state that shares most of its tree with the old one costs only
 * the new objects.
 */
export function freezeNew<T>(value: T): T {
  if (typeof value !== 'object' || value === null || Object.isFrozen(value)) return value;
  Object.freeze(value);
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const v = value[i];
      if (typeof v === 'object' && v !== null) freezeNew(v);
    }
  } else {
    for (const k in value) {
      const v = (value as Record<string, unknown>)[k];
      if (typeof v === 'object' && v !== null) freezeNew(v);
    }
  }
  return value;
}
