// The state's schema checks as the build generated them (scripts/compile-state-checks.js), keyed
// by schemaFingerprint(). They are read from state-checks.json beside this module (or beside the
// bundle) when the first state is checked, not at start-up: a VMM that never restores nor
// receives a VM does not hold them. Without the file each check is compiled on first use.
import path from 'node:path';
import { readRegularFile } from '../util/host-file';

export const COMPILED_CHECKS_FILE = 'state-checks.json';
/** the file is about 0.2 MiB: a larger one is not the build's */
const MAX_FILE_BYTES = 8 << 20;

let table: Readonly<Record<string, unknown>> | undefined;

/** The generated code of the check for the schema with this fingerprint, if the build made it. */
export function compiledCheckCode(fingerprint: string): string | undefined {
  table ??= readTable();
  const code = Object.hasOwn(table, fingerprint) ? table[fingerprint] : undefined;
  return typeof code === 'string' ? code : undefined;
}

function readTable(): Readonly<Record<string, unknown>> {
  try {
    const parsed: unknown = JSON.parse(readRegularFile(path.join(__dirname, COMPILED_CHECKS_FILE), MAX_FILE_BYTES).toString('utf8'));
    return typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed) ? (parsed as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}
