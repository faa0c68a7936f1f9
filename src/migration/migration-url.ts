// Where a migration goes: Cloud Hypervisor's `tcp:HOST:PORT` and `unix:/path` URLs, and the
// sockets behind them.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { TernStateError } from '../state/errors';

export type MigrationAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export class MigrationUrlError extends TernStateError {
  constructor(message: string) {
    super('MigrationUrl', message);
  }
}

export function parseMigrationUrl(url: unknown, what: string): MigrationAddress {
  if (typeof url !== 'string' || !url) throw new MigrationUrlError(`${what} must be a tcp:HOST:PORT or unix:/path URL`);
  if (url.startsWith('unix:')) {
    const p = url.slice('unix:'.length);
    if (!path.isAbsolute(p) || p.includes('\0')) throw new MigrationUrlError(`${what} '${url}': the socket path must be absolute`);
    if (Buffer.byteLength(p) > 107) throw new MigrationUrlError(`${what} '${url}': the socket path is longer than a UNIX socket address allows`);
    return { kind: 'unix', path: path.normalize(p) };
  }
  if (url.startsWith('tcp:')) {
    const rest = url.slice('tcp:'.length);
    const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(rest);
    const port = m ? Number(m[3]) : NaN;
    if (!m || port < 1 || port > 65535) throw new MigrationUrlError(`${what} '${url}' is not tcp:HOST:PORT`);
    return { kind: 'tcp', host: m[1] ?? m[2], port };
  }
  throw new MigrationUrlError(`${what} '${url}': only tcp:HOST:PORT and unix:/path are supported`);
}

export function describeAddress(a: MigrationAddress): string {
  return a.kind === 'unix' ? `unix:${a.path}` : `tcp:${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

/** Connect to a receiving VMM; fails after timeoutMs. */
export function connectMigration(a: MigrationAddress, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = a.kind === 'unix' ? net.connect({ path: a.path }) : net.connect({ host: a.host, port: a.port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new MigrationUrlError(`cannot connect to ${describeAddress(a)}: no answer within ${timeoutMs / 1000} s`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      if (a.kind === 'tcp') socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new MigrationUrlError(`cannot connect to ${describeAddress(a)}: ${e.code ?? e.message}`));
    });
  });
}

/**
 * Listen for one source. Connections are accepted paused (nothing is read from them until the
 * receiver says so), because a local migration's first bytes carry file descriptors that only
 * a recvmsg() of our own can take. A UNIX socket path may replace a stale socket, never another
 * kind of file; the socket is made 0600.
 */
export async function listenMigration(a: MigrationAddress): Promise<net.Server> {
  const server = net.createServer({ pauseOnConnect: true });
  if (a.kind === 'unix') {
    let st: fs.Stats | undefined;
    try {
      st = fs.lstatSync(a.path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new MigrationUrlError(`unix:${a.path}: ${(e as NodeJS.ErrnoException).code}`);
    }
    if (st && !st.isSocket()) throw new MigrationUrlError(`unix:${a.path} exists and is not a socket`);
    if (st) fs.unlinkSync(a.path);
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => reject(new MigrationUrlError(`cannot listen on ${describeAddress(a)}: ${e.code ?? e.message}`)));
    if (a.kind === 'unix') server.listen(a.path, () => resolve());
    else server.listen(a.port, a.host, () => resolve());
  });
  server.removeAllListeners('error');
  if (a.kind === 'unix') fs.chmodSync(a.path, 0o600);
  return server;
}
