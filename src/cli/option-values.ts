// Cloud Hypervisor's option-value syntax: `k=v,k=v`, where a value may be double-quoted
// (to hold commas) or a [bracketed,list]; and its size syntax (512M, 2G, 4096K, plain bytes).

export class OptionError extends Error {
  constructor(readonly option: string, message: string) {
    super(`${option}: ${message}`);
    this.name = 'OptionError';
  }
}

/** Split on commas that are not inside quotes or brackets. */
export function splitTopLevel(input: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let quoted = false;
  let current = '';
  for (const ch of input) {
    if (ch === '"') quoted = !quoted;
    else if (!quoted && ch === '[') depth++;
    else if (!quoted && ch === ']') depth--;
    if (ch === ',' && !quoted && depth === 0) {
      parts.push(current);
      current = '';
    } else {
      current += ch;
    }
  }
  if (quoted) throw new Error('unterminated quote');
  if (depth !== 0) throw new Error('unbalanced brackets');
  parts.push(current);
  return parts;
}

function unquote(v: string): string {
  return v.length >= 2 && v.startsWith('"') && v.endsWith('"') ? v.slice(1, -1) : v;
}

/**
 * Parse `k=v,k=v` against the keys an option accepts. A bare word (no `=`) is allowed only
 * when `bareKey` names the key it stands for (e.g. `--serial tty` means mode=tty).
 */
export function parseKeyValues(
  option: string,
  input: string,
  allowed: readonly string[],
  bareKey?: string,
): Record<string, string> {
  const out: Record<string, string> = {};
  let parts: string[];
  try {
    parts = splitTopLevel(input);
  } catch (e) {
    throw new OptionError(option, `${(e as Error).message} in "${input}"`);
  }
  for (const part of parts) {
    if (part === '') throw new OptionError(option, `empty item in "${input}"`);
    const eq = part.indexOf('=');
    let key: string;
    let value: string;
    if (eq < 0) {
      if (!bareKey || Object.keys(out).length > 0) {
        throw new OptionError(option, `expected key=value, got "${part}"`);
      }
      key = bareKey;
      value = part;
    } else {
      key = part.slice(0, eq);
      value = unquote(part.slice(eq + 1));
    }
    if (!allowed.includes(key)) {
      throw new OptionError(option, `unknown parameter "${key}" (accepted: ${allowed.join(', ')})`);
    }
    if (key in out) throw new OptionError(option, `parameter "${key}" given twice`);
    out[key] = value;
  }
  return out;
}

const SIZE_UNITS: Record<string, number> = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 };

export function parseSize(option: string, key: string, value: string): number {
  const m = /^(\d+)([KMGT]?)$/.exec(value);
  if (!m) throw new OptionError(option, `${key}="${value}" is not a size (e.g. 512M, 2G)`);
  const bytes = Number(m[1]) * SIZE_UNITS[m[2]];
  if (!Number.isSafeInteger(bytes)) throw new OptionError(option, `${key}="${value}" is too large`);
  return bytes;
}

export function parseInteger(option: string, key: string, value: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^\d+$/.test(value)) throw new OptionError(option, `${key}="${value}" is not a whole number`);
  const n = Number(value);
  if (n < min || n > max) throw new OptionError(option, `${key}=${value} is out of range ${min}..${max}`);
  return n;
}

/** An integer list as Cloud Hypervisor writes one: `3`, `[3,7]`, `[3-5,9]` (ranges inclusive). */
export function parseIntegerList(option: string, key: string, value: string, min = 0, max = Number.MAX_SAFE_INTEGER, maxItems = 256): number[] {
  const out: number[] = [];
  for (const item of value.trim().replace(/^\[/, '').replace(/\]$/, '').split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(item.trim());
    if (!m) throw new OptionError(option, `${key}=${value}: "${item}" is not an integer or a range a-b`);
    const from = parseInteger(option, key, m[1], min, max);
    const to = m[2] === undefined ? from : parseInteger(option, key, m[2], min, max);
    if (to < from) throw new OptionError(option, `${key}=${value}: the range ${item} runs backwards`);
    if (out.length + (to - from + 1) > maxItems) throw new OptionError(option, `${key}=${value}: more than ${maxItems} items`);
    for (let v = from; v <= to; v++) out.push(v);
  }
  return out;
}

/**
 * Cloud Hypervisor's list of ids with integer lists, `[net0@[3,4],net1@[5]]` (net_fds).
 */
export function parseIdIntegerLists(option: string, key: string, value: string, maxItems = 16): { id: string; values: number[] }[] {
  const v = value.trim();
  if (!v.startsWith('[') || !v.endsWith(']')) throw new OptionError(option, `${key}=${value} must be a list [ID@[N,...],...]`);
  let items: string[];
  try {
    items = splitTopLevel(v.slice(1, -1));
  } catch (e) {
    throw new OptionError(option, `${key}=${value}: ${(e as Error).message}`);
  }
  if (items.length > maxItems) throw new OptionError(option, `${key}=${value}: more than ${maxItems} items`);
  return items.map((item) => {
    const at = item.lastIndexOf('@[');
    if (at < 1 || !item.endsWith(']')) throw new OptionError(option, `${key}=${value}: "${item}" is not ID@[N,...]`);
    return { id: item.slice(0, at), values: parseIntegerList(option, key, item.slice(at + 1), 0, 0x7fff_ffff, maxItems) };
  });
}

export function parseOnOff(option: string, key: string, value: string): boolean {
  if (value === 'on' || value === 'true') return true;
  if (value === 'off' || value === 'false') return false;
  throw new OptionError(option, `${key}="${value}" must be on or off`);
}
