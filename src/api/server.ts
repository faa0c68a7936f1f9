// The HTTP API: HTTP/1.1 on a UNIX socket, Cloud Hypervisor's paths, methods, status codes and
// error bodies. It only translates: request -> VmmApi call -> reply. Node's http parser does the
// HTTP; everything it rejects (garbage, truncated requests, oversized headers) still gets a
// Cloud Hypervisor-style error reply when the socket can take one.
import fs from 'node:fs';
import http from 'node:http';
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { Subscription } from 'rxjs';
import { native } from '../native/kvm';
import type { StoreEvent } from '../state';
import { ApiError, badRequest, notFound, toApiError } from './errors';
import { toTernEvent } from './event-monitor';
import { parseJsonBody } from './request-body';
import type { VmmApi } from './vmm-api';

export const API_ROOT = '/api/v1';
export const MAX_BODY_BYTES = 4 << 20;
/** Node's default; a request with more header bytes gets a 400 */
export const MAX_HEADER_BYTES = 16 << 10;
/** an SSE subscriber this far behind is dropped rather than buffered without bound */
const MAX_STREAM_BACKLOG = 1 << 20;

type Method = 'GET' | 'PUT';

interface Endpoint {
  method: Method;
  /** whether the request carries a JSON body (vm.create) or must carry none */
  body: boolean;
  run(api: VmmApi, body: unknown): Promise<unknown> | unknown;
}

const put = (run: (api: VmmApi) => Promise<void>): Endpoint => ({ method: 'PUT', body: false, run });
const get = (run: (api: VmmApi) => unknown): Endpoint => ({ method: 'GET', body: false, run });

/** Paths implemented now; migration and hotplug answer as unknown paths. */
export const ENDPOINTS: Readonly<Record<string, Endpoint>> = {
  'vmm.ping': get((a) => a.ping()),
  'vmm.shutdown': put((a) => a.shutdownVmm()),
  'vm.create': { method: 'PUT', body: true, run: (a, body) => a.create(body) },
  'vm.snapshot': { method: 'PUT', body: true, run: (a, body) => a.snapshot(body) },
  'vm.restore': { method: 'PUT', body: true, run: (a, body) => a.restore(body) },
  'vm.boot': put((a) => a.boot()),
  'vm.delete': put((a) => a.delete()),
  'vm.shutdown': put((a) => a.shutdown()),
  'vm.reboot': put((a) => a.reboot()),
  'vm.pause': put((a) => a.pause()),
  'vm.resume': put((a) => a.resume()),
  'vm.power-button': put((a) => a.powerButton()),
  'vm.info': get((a) => a.info()),
  'vm.counters': get((a) => a.counters()),
};

/** Tern's addition: Server-Sent Events carrying what the event monitor writes. */
export const EVENTS_PATH = 'vmm.events';

export interface SocketTarget {
  path?: string;
  fd?: number;
}

export class ApiSocketInUseError extends Error {
  constructor(readonly path: string) {
    super(`API socket ${path} is in use by another VMM (its lock ${path}.lock is held)`);
    this.name = 'ApiSocketInUseError';
  }
}

export interface ApiServerOptions {
  api: VmmApi;
  log: Logger;
  /** called once vmm.shutdown has been answered: the owner ends the process */
  onVmmShutdown?: () => void;
}

const JSON_TYPE = 'application/json';
const ACCEPTED_BODY_TYPES = new Set([JSON_TYPE, 'text/plain']);

function errorBody(err: ApiError): string {
  return JSON.stringify(err.chain);
}

/** A complete reply written straight to a socket the HTTP parser gave up on. */
function rawErrorReply(err: ApiError): Buffer {
  const body = Buffer.from(errorBody(err));
  const reason = http.STATUS_CODES[err.status] ?? 'Error';
  return Buffer.concat([
    Buffer.from(
      `HTTP/1.1 ${err.status} ${reason}\r\nServer: Tern API\r\nContent-Type: ${JSON_TYPE}\r\n` +
        `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n`,
    ),
    body,
  ]);
}

/** The path part of a request target (origin-form or absolute-form), without the query. */
function requestPath(url: string): string {
  if (url.startsWith('/') && !/[?#]/.test(url)) return url;
  let p = url;
  const scheme = /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\/[^/]*/.exec(p);
  if (scheme) p = p.slice(scheme[0].length) || '/';
  const q = p.search(/[?#]/);
  return q >= 0 ? p.slice(0, q) : p;
}

export class ApiServer {
  private readonly server: http.Server;
  private readonly streams = new Set<{ res: http.ServerResponse; sub: Subscription }>();
  private lockFd?: number;
  private socketPath?: string;
  private closing?: Promise<void>;

  private constructor(private readonly opts: ApiServerOptions) {
    this.server = http.createServer(
      // Cloud Hypervisor's clients need not send Host (HTTP/1.1 says they should; a UNIX socket
      // has no virtual hosts to pick from).
      { maxHeaderSize: MAX_HEADER_BYTES, requestTimeout: 60_000, headersTimeout: 30_000, requireHostHeader: false },
      (req, res) => this.handle(req, res),
    );
    this.server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => this.onClientError(err, socket));
    // Node hands CONNECT to its own event (and drops the socket if nobody listens): answer it.
    this.server.on('connect', (req: http.IncomingMessage, socket: Socket) => {
      if (socket.writable) socket.end(rawErrorReply(badRequest(`${requestPath(req.url ?? '')} accepts no CONNECT`)));
      else socket.destroy();
    });
    // A peer that vanishes mid-reply is not the VMM's problem.
    this.server.on('connection', (socket: Socket) => socket.on('error', () => undefined));
  }

  /**
   * Serve on `target`: a path (with its `.lock` flock held for the VMM's lifetime, a stale
   * socket file replaced, the new one mode 0600) or an inherited listening fd.
   */
  static async listen(target: SocketTarget, opts: ApiServerOptions): Promise<ApiServer> {
    const s = new ApiServer(opts);
    if (target.fd !== undefined) {
      await s.listenOn(() => s.server.listen({ fd: target.fd }));
      return s;
    }
    if (!target.path) throw new Error('the API socket needs path= or fd=');
    s.acquireLock(target.path);
    try {
      removeStaleSocket(target.path);
      await s.listenOn(() => {
        // bind() creates the file with the umask applied: make it 0600 from the first instant.
        const mask = process.umask(0o177);
        try {
          s.server.listen(target.path);
        } finally {
          process.umask(mask);
        }
      });
      s.socketPath = target.path;
      fs.chmodSync(target.path, 0o600);
    } catch (e) {
      s.releaseLock();
      throw e;
    }
    return s;
  }

  private acquireLock(socketPath: string): void {
    const fd = fs.openSync(`${socketPath}.lock`, fs.constants.O_CREAT | fs.constants.O_WRONLY, 0o600);
    let locked = false;
    try {
      locked = native().flock(fd, { exclusive: true, nonblocking: true });
    } finally {
      if (!locked) fs.closeSync(fd);
    }
    if (!locked) throw new ApiSocketInUseError(socketPath);
    this.lockFd = fd;
  }

  private releaseLock(): void {
    // Closing the fd drops the flock; the lock file stays, as removing it would let two VMMs
    // lock two different files of the same name.
    if (this.lockFd !== undefined) fs.closeSync(this.lockFd);
    this.lockFd = undefined;
  }

  private listenOn(start: () => void): Promise<void> {
    return new Promise((resolve, reject) => {
      const onError = (e: Error) => reject(e);
      this.server.once('error', onError);
      this.server.once('listening', () => {
        this.server.off('error', onError);
        resolve();
      });
      start();
    });
  }

  get address(): string | undefined {
    return this.socketPath;
  }

  private onClientError(err: NodeJS.ErrnoException, socket: Socket): void {
    if (err.code === 'ECONNRESET' || !socket.writable || socket.destroyed) {
      socket.destroy();
      return;
    }
    const why =
      err.code === 'HPE_HEADER_OVERFLOW'
        ? `request headers exceed ${MAX_HEADER_BYTES} bytes`
        : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
          ? 'the request was not completed in time'
          : `malformed HTTP request (${err.code ?? err.message})`;
    socket.end(rawErrorReply(badRequest(why)));
  }

  // Synchronous where it can be: most calls (ping, info, counters) need no I/O, and every
  // promise hop shows in the round-trip time.
  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    try {
      const pending = this.route(req, res);
      if (pending) pending.catch((e) => this.fail(req, res, e));
    } catch (e) {
      this.fail(req, res, e);
    }
  }

  private fail(req: http.IncomingMessage, res: http.ServerResponse, e: unknown): void {
    const err = e instanceof ApiError ? e : toApiError(e, 'Internal error');
    if (!(e instanceof ApiError)) this.opts.log.error({ err: e, url: req.url }, 'API request failed unexpectedly');
    else this.opts.log.debug({ method: req.method, url: req.url, status: err.status, chain: err.chain }, 'API error reply');
    this.reply(req, res, err.status, errorBody(err));
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> | undefined {
    const path = requestPath(req.url ?? '');
    const name = path.startsWith(`${API_ROOT}/`) ? path.slice(API_ROOT.length + 1) : undefined;
    if (name === EVENTS_PATH) {
      if (req.method !== 'GET') throw badRequest(`${path} accepts GET only`);
      const raw = this.readBody(req, false);
      if (!raw) return void this.stream(req, res);
      return raw.then(() => this.stream(req, res));
    }
    const endpoint = name !== undefined && Object.hasOwn(ENDPOINTS, name) ? ENDPOINTS[name] : undefined;
    if (!endpoint) {
      // Unknown paths are 404 whatever the method; a body they came with is discarded.
      discardBody(req);
      throw notFound(`no endpoint ${path}`);
    }
    if (req.method !== endpoint.method) {
      discardBody(req);
      throw badRequest(`${path} accepts ${endpoint.method} only, not ${req.method}`);
    }
    const run = (raw: Buffer | null): Promise<void> | undefined => {
      const result = endpoint.run(this.opts.api, endpoint.body ? parseJsonBody(raw!) : undefined);
      if (result instanceof Promise) return result.then((r) => this.answer(name!, res, req, r));
      this.answer(name!, res, req, result);
      return undefined;
    };
    const raw = this.readBody(req, endpoint.body);
    return raw ? raw.then(run) : run(null);
  }

  private answer(name: string, res: http.ServerResponse, req: http.IncomingMessage, result: unknown): void {
    if (result === undefined) this.reply(req, res, 204);
    else this.reply(req, res, 200, JSON.stringify(result));
    if (name === 'vmm.shutdown') res.once('finish', () => this.opts.onVmmShutdown?.());
  }

  /**
   * Read the request body within the limit; null when there is none. A body over the limit is
   * refused at once but still read (and dropped) for a while, so the client can finish sending
   * and read the refusal instead of having its connection reset under it.
   */
  private readBody(req: http.IncomingMessage, wanted: boolean): Promise<Buffer | null> | null {
    // Most calls carry no body: answer them without waiting for the stream's end event.
    if (req.complete && req.headers['content-length'] === undefined && req.headers['transfer-encoding'] === undefined) {
      req.resume();
      if (wanted) throw badRequest('this request needs a JSON body');
      return null;
    }
    const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
    const declared = req.headers['content-length'] !== undefined ? Number(req.headers['content-length']) : 0;
    if (declared > MAX_BODY_BYTES) {
      discardBody(req);
      return Promise.reject(badRequest(`the request body exceeds ${MAX_BODY_BYTES} bytes`));
    }
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      const onData = (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_BODY_BYTES) {
          req.off('data', onData);
          chunks.length = 0;
          discardBody(req);
          reject(badRequest(`the request body exceeds ${MAX_BODY_BYTES} bytes`));
          return;
        }
        chunks.push(chunk);
      };
      req.on('data', onData);
      req.on('error', (e) => reject(badRequest(`the request body could not be read: ${e.message}`)));
      req.on('end', () => {
        if (size > MAX_BODY_BYTES) return;
        if (size === 0) {
          if (wanted) reject(badRequest('this request needs a JSON body'));
          else resolve(null);
          return;
        }
        if (!wanted) reject(badRequest('this request takes no body'));
        else if (type !== '' && !ACCEPTED_BODY_TYPES.has(type)) reject(badRequest(`Content-Type ${type} is not ${JSON_TYPE}`));
        else resolve(Buffer.concat(chunks, size));
      });
    });
  }

  /** `body` is JSON text: as a string, Node sends it in one write with the headers. */
  private reply(req: http.IncomingMessage, res: http.ServerResponse, status: number, body?: string): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    if (body !== undefined && status !== 204) {
      res.writeHead(status, { Server: 'Tern API', 'Content-Type': JSON_TYPE, 'Content-Length': Buffer.byteLength(body) });
      res.end(body);
    } else {
      res.writeHead(status, { Server: 'Tern API', 'Content-Type': JSON_TYPE });
      res.end();
    }
  }

  /** GET vmm.events: every monitor event from now on; Last-Event-ID replays from the journal. */
  private stream(req: http.IncomingMessage, res: http.ServerResponse): void {
    const store = this.opts.api.vmm.store;
    res.writeHead(200, {
      Server: 'Tern API',
      'Content-Type': 'text/event-stream',
      'Cache-Control': 'no-cache',
      Connection: 'keep-alive',
    });
    res.write(': tern event stream\n\n');
    const send = (ev: StoreEvent): void => {
      const e = toTernEvent(ev);
      if (!e) return;
      res.write(`id: ${ev.seq}\ndata: ${JSON.stringify(e)}\n\n`);
      if (res.writableLength > MAX_STREAM_BACKLOG) res.destroy();
    };
    const last = Number(req.headers['last-event-id']);
    if (Number.isSafeInteger(last) && last >= 0) for (const ev of store.journal()) if (ev.seq > last) send(ev);
    const entry = { res, sub: store.events$.subscribe(send) };
    this.streams.add(entry);
    res.on('close', () => {
      entry.sub.unsubscribe();
      this.streams.delete(entry);
    });
  }

  /** Stop listening, end event streams (after what they were sent is flushed), drop the lock. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const ended = [...this.streams].map(
        ({ res, sub }) =>
          new Promise<void>((resolve) => {
            sub.unsubscribe();
            res.once('close', () => resolve());
            res.end(() => resolve());
          }),
      );
      const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
      this.server.closeIdleConnections();
      await Promise.race([Promise.all(ended), delay(500)]);
      this.server.closeAllConnections();
      await stopped;
      if (this.socketPath) fs.rmSync(this.socketPath, { force: true });
      this.releaseLock();
    })();
    return this.closing;
  }
}

/** past this much unwanted body, or this long, the connection is dropped instead of drained */
const DISCARD_LIMIT_BYTES = 64 << 20;
const DISCARD_LIMIT_MS = 10_000;

/** Read and drop what is left of a request body, within limits. */
function discardBody(req: http.IncomingMessage): void {
  let dropped = 0;
  const timer = setTimeout(() => req.socket.destroy(), DISCARD_LIMIT_MS).unref();
  req.on('data', (chunk: Buffer) => {
    dropped += chunk.length;
    if (dropped > DISCARD_LIMIT_BYTES) req.socket.destroy();
  });
  req.on('end', () => clearTimeout(timer));
  req.on('close', () => clearTimeout(timer));
  req.on('error', () => undefined);
  req.resume();
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

/** Remove a socket file left by a VMM that died (we hold the lock, so it cannot be live). */
function removeStaleSocket(path: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!st.isSocket()) throw new Error(`API socket path ${path} exists and is not a socket`);
  fs.unlinkSync(path);
}
