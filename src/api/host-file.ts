// Files the API creates on the host (the socket's lock, the event monitor's output) sit at
// paths a client chose, often in a directory others can write to. They are opened without
// following a symlink, created 0600, and refused unless they are what they claim to be: a
// planted link must not make the VMM (often root) create, truncate or lock some other file.
import fs from 'node:fs';

export class HostFileError extends Error {
  constructor(
    readonly path: string,
    why: string,
  ) {
    super(`${path}: ${why}`);
    this.name = 'HostFileError';
  }
}

export interface OpenOwnFileOptions {
  /** what the file is for, for the error message */
  role: string;
  /** empty a regular file once it is known to be one (never through a link) */
  truncate?: boolean;
  /** a named pipe is acceptable too (a reader on the other end, as with Cloud Hypervisor) */
  allowFifo?: boolean;
}

/**
 * Open (creating it 0600 if absent) a file for writing without following a symlink at `path`,
 * then check what was opened: a regular file with one link, or a FIFO when allowed. Returns the
 * fd; anything else is closed again and refused with a HostFileError naming the path.
 */
export function openOwnFile(path: string, opts: OpenOwnFileOptions): number {
  // (Node adds O_CLOEXEC itself)
  const { O_WRONLY, O_CREAT, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
  // Without a FIFO wanted, O_NONBLOCK makes a planted FIFO fail at once instead of blocking the
  // open until someone reads it; it changes nothing for a regular file.
  const flags = O_WRONLY | O_CREAT | O_NOFOLLOW | (opts.allowFifo ? 0 : O_NONBLOCK);
  let fd: number;
  try {
    fd = fs.openSync(path, flags, 0o600);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw new HostFileError(path, `${opts.role} is a symbolic link; refusing to follow it`);
    throw new HostFileError(path, `${opts.role} cannot be opened (${code ?? (e as Error).message})`);
  }
  try {
    const st = fs.fstatSync(fd);
    if (st.isFIFO() && opts.allowFifo) return fd;
    if (!st.isFile()) throw new HostFileError(path, `${opts.role} exists and is not a regular file`);
    // A second name for the same inode is how a file elsewhere would be reached without a link.
    if (st.nlink !== 1) throw new HostFileError(path, `${opts.role} has ${st.nlink} hard links; refusing to use it`);
    if (opts.truncate) fs.ftruncateSync(fd, 0);
    return fd;
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
}
