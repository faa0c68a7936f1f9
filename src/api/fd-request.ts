// One API request that carries file descriptors (SCM_RIGHTS), as ch-remote sends taps with
// add-net: the whole request goes out in one sendmsg with the descriptors attached, so they
// arrive with its first bytes, where the server looks for them. Node's HTTP client cannot
// attach descriptors, so this writes the request itself and reads the reply to the end
// (Connection: close).
import type { IncomingHttpHeaders } from 'node:http';
import net from 'node:net';

export interface FdReply {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

/** The most reply bytes taken: an API reply is a status, a few headers and a small JSON body. */
const MAX_REPLY_BYTES = 1 << 20;

export function requestWithFds(socketPath: string, method: 'PUT' | 'GET', endpoint: string, body: unknown, fds: readonly number[], timeoutMs: number): Promise<FdReply> {
  const payload = body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
  const head =
    `${method} /api/v1/${endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n` +
    (body === undefined ? '' : `Content-Type: application/json\r\nContent-Length: ${payload.length}\r\n`) +
    'Connection: close\r\n\r\n';
  const request = Buffer.concat([Buffer.from(head, 'latin1'), payload]);
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    const chunks: Buffer[] = [];
    let size = 0;
    const timer = setTimeout(() => socket.destroy(new Error(`${endpoint}: no reply within ${timeoutMs} ms`)), timeoutMs);
    socket.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    socket.on('connect', () => {
      const fd = (socket as net.Socket & { _handle?: { fd?: number } })._handle?.fd;
      try {
        if (fd === undefined || fd < 0) throw new Error('the API socket has no descriptor to send on');
        // (loaded here: the client library works without the native addon until descriptors are sent)
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        const { native } = require('../native/kvm') as typeof import('../native/kvm');
        native().sendWithFds(fd, request, [...fds], timeoutMs);
      } catch (e) {
        socket.destroy(e as Error);
      }
    });
    socket.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_REPLY_BYTES) return socket.destroy(new Error(`${endpoint}: the reply is over ${MAX_REPLY_BYTES} bytes`));
      chunks.push(c);
    });
    socket.on('end', () => {
      clearTimeout(timer);
      try {
        resolve(parseReply(Buffer.concat(chunks), endpoint));
      } catch (e) {
        reject(e);
      }
      socket.destroy();
    });
  });
}

/** Status, headers and body of an HTTP/1.1 reply read to its end. */
function parseReply(raw: Buffer, endpoint: string): FdReply {
  const end = raw.indexOf('\r\n\r\n');
  if (end < 0) throw new Error(`${endpoint}: the reply has no complete head`);
  const [statusLine, ...lines] = raw.subarray(0, end).toString('latin1').split('\r\n');
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(statusLine);
  if (!m) throw new Error(`${endpoint}: the reply does not start with an HTTP status line`);
  const headers: IncomingHttpHeaders = {};
  for (const l of lines) {
    const colon = l.indexOf(':');
    if (colon > 0) headers[l.slice(0, colon).trim().toLowerCase()] = l.slice(colon + 1).trim();
  }
  let body = raw.subarray(end + 4);
  const length = Number(headers['content-length']);
  if (Number.isInteger(length) && length >= 0) body = body.subarray(0, length);
  return { status: Number(m[1]), headers, body };
}
