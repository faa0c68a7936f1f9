// The two kinds of migration URL Cloud Hypervisor takes: `tcp:HOST:PORT` and `unix:/path`.
// Checked where the request arrives (the API, and tern-remote before it sends anything), so a
// mistyped URL is a 400 naming it rather than a failure deep inside a connection attempt.

/** sun_path holds 108 bytes, the terminating NUL included */
const MAX_UNIX_PATH_BYTES = 107;

export type MigrationAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

const HOST_NAME = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
const IPV6 = /^[0-9A-Fa-f:.]+$/;

/** The address a migration URL names; throws an Error saying what is wrong with it. */
export function parseMigrationUrl(url: string): MigrationAddress {
  const shown = JSON.stringify(url.length > 200 ? `${url.slice(0, 200)}...` : url);
  if (url.startsWith('unix:')) {
    const path = url.slice('unix:'.length);
    if (!path.startsWith('/')) throw new Error(`${shown}: a unix: URL needs an absolute path (unix:/path/to/socket)`);
    if (path.includes('\0')) throw new Error(`${shown}: the socket path holds a NUL byte`);
    if (Buffer.byteLength(path) > MAX_UNIX_PATH_BYTES) throw new Error(`${shown}: a socket path is at most ${MAX_UNIX_PATH_BYTES} bytes`);
    return { kind: 'unix', path };
  }
  if (url.startsWith('tcp:')) {
    const rest = url.slice('tcp:'.length);
    const colon = rest.lastIndexOf(':');
    const rawHost = colon < 0 ? '' : rest.slice(0, colon);
    const port = colon < 0 ? '' : rest.slice(colon + 1);
    if (!/^\d{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
      throw new Error(`${shown}: a tcp: URL ends with a port from 1 to 65535 (tcp:HOST:PORT)`);
    }
    const bracketed = /^\[(.*)\]$/.exec(rawHost);
    const host = bracketed ? bracketed[1] : rawHost;
    const valid = bracketed ? host.includes(':') && IPV6.test(host) : HOST_NAME.test(host) && host.length <= 253;
    if (!valid) throw new Error(`${shown}: the host is not a host name, an IPv4 address or a [bracketed] IPv6 address`);
    return { kind: 'tcp', host, port: Number(port) };
  }
  throw new Error(`${shown}: a migration URL is tcp:HOST:PORT or unix:/path`);
}
