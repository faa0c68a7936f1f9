// Building blocks for the TypeBox schemas each slice (and each device state) declares beside
// itself. A state loaded from outside (restore, migration) is checked against them before it
// may enter a store, so a crafted field (`rx: null`) is refused at restore with the slice and
// field named, instead of failing at the guest's first access.
import { FormatRegistry, Type, type TSchema } from '@sinclair/typebox';
import { TypeCheck, TypeCompiler } from '@sinclair/typebox/compiler';
import { compiledCheckCode } from './compiled-checks';
import { TernStateError } from './errors';

/** Integer in [min, max]. */
export const IntIn = (min: number, max: number): TSchema => Type.Integer({ minimum: min, maximum: max });
export const U8 = (): TSchema => IntIn(0, 0xff);
export const U16 = (): TSchema => IntIn(0, 0xffff);
export const U32 = (): TSchema => IntIn(0, 0xffff_ffff);
/** a counter or size: a non-negative integer a JS number holds exactly */
export const Count = (): TSchema => IntIn(0, Number.MAX_SAFE_INTEGER);
/** a 64-bit value in the store's hex form (codec.ts) */
export const HexU64 = (): TSchema => Type.String({ pattern: '^-?0x[0-9a-f]{1,16}$' });
// Canonical base64 (what Buffer writes), checked natively: a regular expression over the few
// KiB of an xsave area is compiled the first time it meets one, which is inside a migration's
// pause on the destination.
FormatRegistry.Set('base64', (s) => Buffer.from(s, 'base64').toString('base64') === s);

/** base64 of a raw kernel structure; capped, as the largest (xsave) is a few KiB */
export const Base64 = (maxLength = 1 << 20): TSchema => Type.String({ format: 'base64', maxLength });
/** a device id, the key of a device in the devices slice */
export const DeviceId = (): TSchema => Type.String({ minLength: 1, maxLength: 256 });
/** an object with exactly these fields */
export const Exact = <T extends Record<string, TSchema>>(fields: T) => Type.Object(fields, { additionalProperties: false });

export class InvalidStateError extends TernStateError {
  constructor(message: string) {
    super('InvalidSliceState', message);
  }
}

const compiled = new WeakMap<TSchema, TypeCheck<TSchema>>();
let compiledAtRuntime = 0;

/**
 * A schema's identity in compiled-checks.ts: its JSON with TypeBox's symbol-keyed fields (its
 * Kind, whether a property is optional) written in, which is all the generated check depends on.
 */
export function schemaFingerprint(schema: TSchema): string {
  return JSON.stringify(schema, (_key, v: unknown) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return v;
    const symbols = Object.getOwnPropertySymbols(v);
    if (symbols.length === 0) return v;
    const out: Record<string, unknown> = {};
    for (const s of symbols) out[`~${s.description}`] = (v as Record<symbol, unknown>)[s];
    return Object.assign(out, v);
  });
}

/**
 * The check generated for a schema when the build ran (scripts/compile-state-checks.js), else
 * generated now. Generating one is the larger part of a state's first check: a restore or a
 * migration's destination paid it on every start (a third of a second in the nested lab).
 */
function compileCheck(schema: TSchema): TypeCheck<TSchema> {
  const code = compiledCheckCode(schemaFingerprint(schema));
  if (code === undefined) {
    compiledAtRuntime++;
    return TypeCompiler.Compile(schema);
  }
  // (the build keeps only checks that call no custom kind and no hash: formats are all they use)
  const format = (name: string, value: unknown) => FormatRegistry.Has(name) && FormatRegistry.Get(name)!(value as string);
  const unused = () => false;
  const check = new Function('kind', 'format', 'hash', code)(unused, format, unused) as (value: unknown) => boolean;
  return new TypeCheck(schema, [], check, code);
}

/** How many schemas were compiled here rather than by the build (tests: none of the state's). */
export function checksCompiledAtRuntime(): number {
  return compiledAtRuntime;
}

/** Throw InvalidStateError naming `where` and the first offending field unless `value` fits. */
export function checkSchema(schema: TSchema, value: unknown, where: string): void {
  let check = compiled.get(schema);
  if (!check) {
    check = compileCheck(schema);
    compiled.set(schema, check);
  }
  if (check.Check(value)) return;
  const err = check.Errors(value).First();
  throw new InvalidStateError(`${where} field ${err?.path || '/'}: ${err?.message ?? 'does not match its schema'}`);
}
