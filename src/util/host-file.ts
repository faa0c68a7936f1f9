// Host files named by input the VMM does not control (a snapshot's files, the paths a restored
// config names). Each is opened without following a final symlink and without blocking (a FIFO
// would hang the VMM), must be a regular file (/dev/zero never ends), is size-capped before it
// is read, and every error names the file and the fault, never the file's contents.
import fs from 'node:fs';

const { O_RDONLY, O_WRONLY, O_APPEND, O_CREAT, O_NOFOLLOW, O_NONBLOCK } = fs.constants;

export class HostFileError extends Error {
  constructor(
    readonly file: string,
    readonly fault: string,
  ) {
    super(`${file}: ${fault}`);
    this.name = 'HostFileError';
  }
}

function openFault(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'missing';
  if (code === 'ELOOP') return 'is a symbolic link';
  if (code === 'ENXIO') return 'is not a regular file';
  return `cannot be opened (${code ?? 'unknown error'})`;
}

/** Check an open fd is a regular file of at most maxBytes; closes it and throws if not. */
function checkRegular(fd: number, file: string, maxBytes: number): number {
  let fault: string | undefined;
  let size = 0;
  try {
    const st = fs.fstatSync(fd);
    size = st.size;
    if (!st.isFile()) fault = 'is not a regular file';
    else if (st.size > maxBytes) fault = `is ${st.size} bytes, more than the ${maxBytes} allowed`;
  } catch (e) {
    fault = `cannot be examined (${(e as NodeJS.ErrnoException).code ?? 'unknown error'})`;
  }
  if (fault !== undefined) {
    fs.closeSync(fd);
    throw new HostFileError(file, fault);
  }
  return size;
}

/** Open a regular file for reading (O_NOFOLLOW|O_NONBLOCK); returns its fd and size. */
export function openRegularFile(file: string, maxBytes = Number.MAX_SAFE_INTEGER): { fd: number; size: number } {
  let fd: number;
  try {
    fd = fs.openSync(file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch (e) {
    throw new HostFileError(file, openFault(e));
  }
  return { fd, size: checkRegular(fd, file, maxBytes) };
}

/** The whole of a regular file of at most maxBytes. */
export function readRegularFile(file: string, maxBytes: number): Buffer {
  const { fd, size } = openRegularFile(file, maxBytes);
  try {
    const buf = Buffer.alloc(size);
    for (let done = 0; done < size;) {
      const n = fs.readSync(fd, buf, done, size - done, done);
      if (n === 0) throw new HostFileError(file, `shrank while being read (${done} of ${size} bytes)`);
      done += n;
    }
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Open (creating it 0600 if missing) a regular file to append to: never through a symlink,
 * never a FIFO, device or directory. Returns its fd and current size (what a cap counts from).
 */
export function openAppendFile(file: string): { fd: number; size: number } {
  let fd: number;
  try {
    fd = fs.openSync(file, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK, 0o600);
  } catch (e) {
    throw new HostFileError(file, openFault(e));
  }
  return { fd, size: checkRegular(fd, file, Number.MAX_SAFE_INTEGER) };
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Parse JSON read from `file`. V8's parse errors quote the text around the fault, which for a
 * file that is not JSON at all may be a secret: the error here gives the position only.
 */
export function parseJsonFile(bytes: Uint8Array, file: string, maxDepth: number): unknown {
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw new HostFileError(file, 'not valid JSON (not UTF-8 text)');
  }
  if (jsonNestingDepth(text, maxDepth) > maxDepth) throw new HostFileError(file, `not valid JSON (nested deeper than ${maxDepth} levels)`);
  try {
    return JSON.parse(text);
  } catch (e) {
    const msg = (e as Error).message;
    const at = /at position (\d+)/.exec(msg);
    const where = at ? ` at position ${at[1]}` : /end of JSON input/.test(msg) ? ' (it ends early)' : '';
    throw new HostFileError(file, `not valid JSON${where}`);
  }
}

/** Nesting depth of a JSON text (strings skipped), scanning without recursion; stops past max. */
export function jsonNestingDepth(text: string, max = Infinity): number {
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      if (++depth > deepest) deepest = depth;
      if (deepest > max) return deepest;
    } else if (c === 0x5d || c === 0x7d) depth--;
  }
  return deepest;
}

/**
 * A source of entropy named by the config (`--rng src=`): opened for reading without following
 * a final symlink and without blocking, and only a character device (/dev/urandom) or a regular
 * file; reads from it never wait.
 */
export function openEntropySource(file: string): number {
  let fd: number;
  try {
    fd = fs.openSync(file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch (e) {
    throw new HostFileError(file, openFault(e));
  }
  let fault: string | undefined;
  try {
    const st = fs.fstatSync(fd);
    if (!st.isCharacterDevice() && !st.isFile()) fault = 'is neither a character device nor a regular file';
  } catch (e) {
    fault = `cannot be examined (${(e as NodeJS.ErrnoException).code ?? 'unknown error'})`;
  }
  if (fault !== undefined) {
    fs.closeSync(fd);
    throw new HostFileError(file, fault);
  }
  return fd;
}
