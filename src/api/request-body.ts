// Request bodies: strict UTF-8 JSON with bounded nesting, then the contract's schema. Cloud
// Hypervisor deserializes with serde, which rejects wrong types, treats null as "not given",
// ignores fields it does not know and stops at 128 levels of nesting; Tern does the same, so
// what the store keeps is exactly the contract's VmConfig.
import type { TSchema } from '@sinclair/typebox';
import { TypeCompiler, type TypeCheck } from '@sinclair/typebox/compiler';
import type { ValueError } from '@sinclair/typebox/value';
import { Value } from '@sinclair/typebox/value';
import { jsonNestingDepth } from '../util/host-file';
import { ApiError } from './errors';
import { VmConfigSchema, type VmConfig } from './schema';

export const MAX_JSON_DEPTH = 128;
/** how many schema problems one reply lists */
const MAX_REPORTED = 5;

const utf8 = new TextDecoder('utf-8', { fatal: true });
const vmConfigChecker = TypeCompiler.Compile(VmConfigSchema);

const invalid = (...chain: string[]) => new ApiError(400, ['The request body is not valid', ...chain]);

function dropNullMembers(this: unknown, key: string, value: unknown): unknown {
  // No contract field is called __proto__; an own property of that name would survive
  // cleaning and confuse anything that later copies the object with spread or assign.
  if (key === '__proto__' && !Array.isArray(this)) return undefined;
  // null inside an array is a value; as an object member it means "not given"
  return value === null && key !== '' && !Array.isArray(this) ? undefined : value;
}

/** Decode and parse a JSON request body; 400 on anything that is not plain JSON. */
export function parseJsonBody(raw: Buffer): unknown {
  let text: string;
  try {
    text = utf8.decode(raw);
  } catch {
    throw invalid('it is not UTF-8 text');
  }
  if (jsonNestingDepth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) throw invalid(`JSON nested deeper than ${MAX_JSON_DEPTH} levels`);
  try {
    return JSON.parse(text, dropNullMembers);
  } catch (e) {
    throw invalid(`malformed JSON: ${(e as Error).message}`);
  }
}

/** Every device id in a config, with where it was found. */
/** The ids a config gives its devices explicitly. */
export function deviceIds(c: VmConfig): string[] {
  const ids: (string | undefined)[] = [];
  const lists = [c.disks, c.net, c.fs, c.pmem, c.devices, c.user_devices, c.vdpa, c.generic_vhost_user] as
    | ({ id?: string }[] | undefined)[];
  for (const list of lists) for (const d of list ?? []) ids.push(d.id);
  for (const single of [c.rng, c.balloon, c.vsock, c.console, c.rtc] as ({ id?: string } | undefined)[]) ids.push(single?.id);
  return ids.filter((id): id is string => id !== undefined);
}

function firstDuplicate(values: string[]): string | undefined {
  const seen = new Set<string>();
  for (const v of values) {
    if (seen.has(v)) return v;
    seen.add(v);
  }
  return undefined;
}

/** One schema problem; for a contract enum, the values it takes, spelled as the contract spells them. */
function describeProblem(err: ValueError): string {
  const options = (err.schema as { anyOf?: { const?: unknown }[] }).anyOf;
  const literals = options?.every((o) => typeof o.const === 'string') ? options.map((o) => JSON.stringify(o.const)) : undefined;
  return `${err.path || '/'}: ${literals ? `must be one of ${literals.join(', ')}` : err.message}`;
}

/**
 * Check a parsed body against a contract schema: 400 naming the first few problems, else the
 * body with the fields the schema does not know removed (serde ignores them too).
 */
export function checkBody<T extends TSchema>(checker: TypeCheck<T>, schema: T, name: string, body: unknown): unknown {
  if (!checker.Check(body)) {
    const problems: string[] = [];
    for (const err of checker.Errors(body)) {
      problems.push(describeProblem(err));
      if (problems.length >= MAX_REPORTED) break;
    }
    throw invalid(`it is not a ${name}`, ...problems);
  }
  return Value.Clean(schema, body);
}

/**
 * Check a parsed vm.create body against the contract: 400 for a wrong shape or type, 409 for
 * two devices with one id (or one VFIO path). Returns the config with unknown fields removed.
 */
export function checkVmConfig(body: unknown): VmConfig {
  const config = checkBody(vmConfigChecker, VmConfigSchema, 'VmConfig', body) as VmConfig;
  const dupId = firstDuplicate(deviceIds(config));
  if (dupId !== undefined) throw new ApiError(409, ['The VM configuration is not valid', `device id '${dupId}' is used more than once`]);
  const dupPath = firstDuplicate((config.devices ?? []).flatMap((d) => (d.path === undefined ? [] : [d.path])));
  if (dupPath !== undefined) throw new ApiError(409, ['The VM configuration is not valid', `device path '${dupPath}' is given more than once`]);
  return config;
}
