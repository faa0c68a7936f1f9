// TLS for migrations over TCP, as Cloud Hypervisor's `tls_dir` has it: mutual authentication
// with certificates from one directory per side. The source (the TLS client) trusts the CAs in
// `ca-cert.pem`, checks that the destination's certificate names the host of its
// destination_url (a DNS name or an IP address), and presents `client-cert.pem` with
// `client-key.pem`; the destination (the server) presents `server-cert.pem` with
// `server-key.pem` and accepts only a source whose certificate chains to its `ca-cert.pem`.
// Node's TLS (OpenSSL) does the protocol; this module reads the files as untrusted host files
// and turns every failure into an error that names the file or the check, never its contents.
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import fs from 'node:fs';
import { HostFileError, readRegularFile } from '../util/host-file';
import { TernStateError } from '../state/errors';

export class MigrationTlsError extends TernStateError {
  constructor(message: string) {
    super('MigrationTls', message);
  }
}

export type TlsSide = 'client' | 'server';

const FILES: Record<TlsSide, { ca: string; cert: string; key: string }> = {
  client: { ca: 'ca-cert.pem', cert: 'client-cert.pem', key: 'client-key.pem' },
  server: { ca: 'ca-cert.pem', cert: 'server-cert.pem', key: 'server-key.pem' },
};

/** a PEM file of certificates or a key is a few KiB; a CA bundle may hold a few hundred */
const MAX_PEM_BYTES = 1 << 20;
/** how long either side waits for the other to finish the handshake */
export const TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

/** One side's certificates and key, read and parsed: a context both ends can be built from. */
export interface TlsMaterial {
  side: TlsSide;
  /** the files as read (a tls.Server takes these, not a context) */
  pem: { ca: Buffer; cert: Buffer; key: Buffer };
  context: tls.SecureContext;
}

/**
 * Read `dir`'s three files for `side` (each a regular file, not through a symlink, at most
 * 1 MiB) and check that OpenSSL takes them: a key that does not match its certificate, or a
 * file that is not PEM, fails here, when the client asks, not in the middle of a migration.
 */
export function loadTlsDir(dir: string, side: TlsSide): TlsMaterial {
  if (typeof dir !== 'string' || dir === '' || dir.includes('\0')) throw new MigrationTlsError('tls_dir must be a directory path');
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch (e) {
    throw new MigrationTlsError(`tls_dir ${dir}: ${(e as NodeJS.ErrnoException).code ?? 'cannot be read'}`);
  }
  if (!st.isDirectory()) throw new MigrationTlsError(`tls_dir ${dir} is not a directory`);
  const names = FILES[side];
  const read = (name: string): Buffer => {
    const file = path.join(dir, name);
    try {
      return readRegularFile(file, MAX_PEM_BYTES);
    } catch (e) {
      const why = e instanceof HostFileError ? e.message : (e as NodeJS.ErrnoException).code ?? 'cannot be read';
      throw new MigrationTlsError(`tls_dir: the migration ${side} needs ${name}: ${why}`);
    }
  };
  const ca = read(names.ca);
  const cert = read(names.cert);
  const key = read(names.key);
  let context: tls.SecureContext;
  try {
    context = tls.createSecureContext({ ca, cert, key, minVersion: 'TLSv1.2' });
  } catch (e) {
    // (OpenSSL's reason names what is wrong, e.g. "key values mismatch", not the bytes)
    throw new MigrationTlsError(`tls_dir ${dir}: ${names.ca}, ${names.cert} and ${names.key} are not a usable set: ${opensslReason(e)}`);
  }
  return { side, pem: { ca, cert, key }, context };
}

function opensslReason(e: unknown): string {
  const err = e as { code?: string; reason?: string; message?: string };
  return (err.reason ?? err.code ?? err.message ?? 'unknown error').slice(0, 200);
}

/** Wait for the client's handshake's end: an error, a close or the timeout fail it. */
function clientHandshake(socket: tls.TLSSocket, timeoutMs: number): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const fail = (why: string) => {
      clearTimeout(timer);
      socket.destroy();
      reject(new MigrationTlsError(`TLS with the destination failed: ${why}`));
    };
    const timer = setTimeout(() => fail(`no handshake within ${timeoutMs / 1000} s`), timeoutMs);
    // (tls.connect checks the certificate's chain and name before this, with rejectUnauthorized)
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      socket.removeAllListeners('close');
      resolve(socket);
    });
    socket.once('error', (e: NodeJS.ErrnoException) => fail(opensslReason(e)));
    socket.once('close', () => fail('the connection closed during the handshake'));
  });
}

/**
 * The source's end: TLS over the connected `socket` to `host` (the destination_url's host,
 * which the destination's certificate must name). Resolves once both sides are authenticated.
 */
export function tlsClient(socket: net.Socket, host: string, material: TlsMaterial, timeoutMs = TLS_HANDSHAKE_TIMEOUT_MS): Promise<tls.TLSSocket> {
  if (material.side !== 'client') throw new Error('tlsClient needs the client material');
  const secure = tls.connect({
    socket,
    secureContext: material.context,
    // (SNI takes names only; the certificate check below takes the host either way)
    ...(net.isIP(host) ? {} : { servername: host }),
    checkServerIdentity: (_name, cert) => tls.checkServerIdentity(host, cert),
    rejectUnauthorized: true,
    minVersion: 'TLSv1.2',
  });
  return clientHandshake(secure, timeoutMs);
}

/**
 * The destination's end: TLS over the accepted `socket`; only a source whose certificate chains
 * to the CAs of `ca-cert.pem` gets through. Resolves once both sides are authenticated.
 *
 * The socket is handed to a tls.Server that listens on nothing: only a server's connections
 * have their peer's certificate judged (a bare server-side TLSSocket completes its handshake
 * whatever the client presented, and never says whether it chains to the CA).
 */
export function tlsServer(socket: net.Socket, material: TlsMaterial, timeoutMs = TLS_HANDSHAKE_TIMEOUT_MS): Promise<tls.TLSSocket> {
  if (material.side !== 'server') throw new Error('tlsServer needs the server material');
  // (not rejectUnauthorized: the check is made below, so that the refusal can say why)
  const server = tls.createServer({ ...material.pem, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2', handshakeTimeout: timeoutMs });
  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (why: string, secure?: tls.TLSSocket) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      secure?.destroy();
      socket.destroy();
      server.close();
      reject(new MigrationTlsError(`TLS with the source failed: ${why}`));
    };
    const timer = setTimeout(() => fail(`no handshake within ${timeoutMs / 1000} s`), timeoutMs + 1000);
    server.on('tlsClientError', (e: NodeJS.ErrnoException, secure: tls.TLSSocket) => fail(opensslReason(e), secure));
    server.on('secureConnection', (secure: tls.TLSSocket) => {
      if (!secure.authorized) return fail(`its certificate is not accepted (${String(secure.authorizationError ?? 'none was presented')})`, secure);
      if (settled) return void secure.destroy();
      settled = true;
      clearTimeout(timer);
      server.close();
      resolve(secure);
    });
    socket.once('close', () => fail('the connection closed during the handshake'));
    // (accepted paused, as every migration connection is: TLS must read the handshake now)
    server.emit('connection', socket);
    socket.resume();
  });
}
