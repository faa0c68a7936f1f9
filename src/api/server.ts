// The HTTP API: HTTP/1.1 on a UNIX socket, Cloud Hypervisor's paths, methods, status codes and
// error bodies. It only translates: request -> VmmApi call -> reply. Node's http parser does the
// HTTP; everything it rejects (garbage, truncated requests, oversized headers) still gets a
// Cloud Hypervisor-style error reply when the socket can take one.
//
// Replies are framed the way Cloud Hypervisor's server (micro_http) frames them, because its
// client, ch-remote, reads everything after "HTTP/1.1 " up to CR as the status number: a status
// line with no reason phrase, then Server and Connection: keep-alive, then Content-Type and
// Content-Length only when there is a body (never on 204), never chunked.
//
// Every client-held resource is capped: connections (the idlest one makes room, or 503),
// silence on a connection (closed after the idle timeout), request bodies held at once across
// all connections (429 past the budget), unanswered pipelined requests on one connection (429)
// and live event streams (429).
import fs from 'node:fs';
import http from 'node:http';
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { Subscription } from 'rxjs';
import { native } from '../native/kvm';
import type { StoreEvent } from '../state';
import { ApiError, badRequest, notFound, toApiError } from './errors';
import { toTernEvent } from './event-monitor';
import { openOwnFile } from './host-file';
import { parseJsonBody } from './request-body';
import type { VmmApi } from './vmm-api';

export const API_ROOT = '/api/v1';
/** Cloud Hypervisor's limit for one request body */
export const MAX_BODY_BYTES = 4 << 20;
/** Node's default; a request with more header bytes gets a 400 */
export const MAX_HEADER_BYTES = 16 << 10;
/** How long a connection whose request was malformed may stay open after its error reply. */
const ERROR_LINGER_MS = 5_000;
/** an SSE subscriber this far behind is dropped rather than buffered without bound */
const MAX_STREAM_BACKLOG = 1 << 20;
/** bodies this small are never refused for the budget, so vm.create works during a flood */
const SMALL_BODY_BYTES = 64 << 10;
/** the Server header's value; the only bytes of the framing that differ from Cloud Hypervisor's */
export const SERVER_NAME = 'Tern API';

/** What one client, or many, may hold of the VMM at once. */
export interface ApiLimits {
  /** open connections; at the cap the idlest connection is closed, or a new one gets 503 */
  maxConnections: number;
  /** live vmm.events streams (they count as connections too, and never go idle) */
  maxEventStreams: number;
  /** a connection with no request being worked on that stays silent this long is closed */
  idleTimeoutMs: number;
  /** a request's head and body must have arrived this long after it started */
  requestTimeoutMs: number;
  /** request body bytes held across all connections at once; past it, 429 */
  bodyBudgetBytes: number;
  /** requests pipelined on one connection and not yet answered; past it, 429 */
  maxPipelined: number;
}

export const DEFAULT_API_LIMITS: Readonly<ApiLimits> = {
  maxConnections: 64,
  maxEventStreams: 16,
  idleTimeoutMs: 30_000,
  requestTimeoutMs: 60_000,
  bodyBudgetBytes: 4 * MAX_BODY_BYTES,
  maxPipelined: 16,
};

type Method = 'GET' | 'PUT';

interface Endpoint {
  method: Method;
  /** whether the request carries a JSON body (vm.create) or must carry none */
  body: boolean;
  /** whether it takes the descriptors sent with the request (SCM_RIGHTS); others' are closed */
  takesFds?: true;
  /** `fds`: the descriptors sent with the request, when takesFds: the endpoint's to keep or close */
  run(api: VmmApi, body: unknown, fds: number[]): Promise<unknown> | unknown;
}

/** The most descriptors a request may bring (taps for one card: one per queue pair). */
const MAX_REQUEST_FDS = 16;

const put = (run: (api: VmmApi) => Promise<void>): Endpoint => ({ method: 'PUT', body: false, run });
const get = (run: (api: VmmApi) => unknown): Endpoint => ({ method: 'GET', body: false, run });

/**
 * Paths implemented now; hotplug answers as an unknown path. vm.migration-progress and
 * vm.migration-cancel are Tern's additions. vm.receive-migration is answered when the
 * migration ends, which may be long after requestTimeoutMs: that limit covers receiving a
 * request, and a connection waiting for its reply is never idle (see busy()), so the reply
 * is capped by the migration itself (its timeouts, vm.migration-cancel) and by VmmApi
 * holding one receive at a time.
 */
export const ENDPOINTS: Readonly<Record<string, Endpoint>> = {
  'vmm.ping': get((a) => a.ping()),
  'vmm.shutdown': put((a) => a.shutdownVmm()),
  'vm.create': { method: 'PUT', body: true, run: (a, body) => a.create(body) },
  'vm.snapshot': { method: 'PUT', body: true, run: (a, body) => a.snapshot(body) },
  'vm.restore': { method: 'PUT', body: true, takesFds: true, run: (a, body, fds) => a.restore(body, fds) },
  'vm.boot': put((a) => a.boot()),
  'vm.delete': put((a) => a.delete()),
  'vm.shutdown': put((a) => a.shutdown()),
  'vm.reboot': put((a) => a.reboot()),
  'vm.pause': put((a) => a.pause()),
  'vm.resume': put((a) => a.resume()),
  'vm.power-button': put((a) => a.powerButton()),
  'vm.info': get((a) => a.info()),
  'vm.counters': get((a) => a.counters()),
  'vm.add-disk': { method: 'PUT', body: true, run: (a, body) => a.addDisk(body) },
  'vm.add-net': { method: 'PUT', body: true, takesFds: true, run: (a, body, fds) => a.addNet(body, fds) },
  'vm.send-migration': { method: 'PUT', body: true, run: (a, body) => a.sendMigration(body) },
  'vm.receive-migration': { method: 'PUT', body: true, run: (a, body) => a.receiveMigration(body) },
  'vm.migration-progress': get((a) => a.migrationProgress()),
  'vm.migration-cancel': { method: 'PUT', body: false, run: (a) => a.cancelMigration() },
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
  /** defaults: DEFAULT_API_LIMITS */
  limits?: Partial<ApiLimits>;
}

const JSON_TYPE = 'application/json';
const ACCEPTED_BODY_TYPES = new Set([JSON_TYPE, 'text/plain']);

const tooMany = (...chain: string[]) => new ApiError(429, ['Too many requests', ...chain]);

function errorBody(err: ApiError): string {
  return JSON.stringify(err.chain);
}

/**
 * The head of a reply, as micro_http writes it: "HTTP/1.1 NNN " and CRLF (no reason phrase),
 * Server, Connection, then Content-Type and Content-Length only for a reply with a body.
 * As a flat list, so Node writes the headers in this order and adds none of its own.
 */
function replyHeaders(keepAlive: boolean, bodyLength: number | null, contentType = JSON_TYPE): string[] {
  const h = ['Server', SERVER_NAME, 'Connection', keepAlive ? 'keep-alive' : 'close'];
  if (bodyLength !== null) h.push('Content-Type', contentType, 'Content-Length', String(bodyLength));
  return h;
}

/** A complete error reply for a socket no ServerResponse exists for; the connection then ends. */
function rawErrorReply(err: ApiError): Buffer {
  const body = Buffer.from(errorBody(err));
  const h = replyHeaders(false, body.length);
  let head = `HTTP/1.1 ${err.status} \r\n`;
  for (let i = 0; i < h.length; i += 2) head += `${h[i]}: ${h[i + 1]}\r\n`;
  return Buffer.concat([Buffer.from(`${head}\r\n`), body]);
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

/** What the server knows of one admitted connection. */
interface Connection {
  /** the request being answered, from its head until its reply is finished */
  current?: { req: http.IncomingMessage; res: http.ServerResponse };
  /** a vmm.events stream: never idle, never evicted */
  streaming: boolean;
  /** requests received and not yet answered (pipelined ones are handled before earlier replies are out) */
  pending: number;
  /**
   * Descriptors sent with the connection's first bytes (SCM_RIGHTS, as ch-remote sends taps
   * with add-net), until its first request takes them; closed with the connection otherwise.
   */
  fds: number[];
}

export class ApiServer {
  private readonly server: http.Server;
  private readonly limits: ApiLimits;
  private readonly connections = new Map<Socket, Connection>();
  /** sockets whose malformed request got its error reply */
  private readonly answeredWithError = new WeakSet<Socket>();
  private readonly streams = new Set<{ res: http.ServerResponse; sub: Subscription }>();
  /** request body bytes held (or promised by Content-Length) across all connections */
  private bodyBytes = 0;
  private lockFd?: number;
  private socketPath?: string;
  private closing?: Promise<void>;

  private constructor(private readonly opts: ApiServerOptions) {
    const limits = (this.limits = { ...DEFAULT_API_LIMITS, ...opts.limits });
    this.server = http.createServer(
      {
        maxHeaderSize: MAX_HEADER_BYTES,
        requestTimeout: limits.requestTimeoutMs,
        headersTimeout: limits.requestTimeoutMs,
        keepAliveTimeout: limits.idleTimeoutMs,
        // how often Node looks for requests past requestTimeout (Node takes whole ms only)
        connectionsCheckingInterval: Math.max(10, Math.min(1000, Math.floor(limits.requestTimeoutMs / 4))),
        // Cloud Hypervisor's clients need not send Host (HTTP/1.1 says they should; a UNIX
        // socket has no virtual hosts to pick from).
        requireHostHeader: false,
      },
      (req, res) => this.handle(req, res),
    );
    // A client that half-closes its end after sending its request (as `nc -N` or a script
    // with shutdown(SHUT_WR) does) still gets the reply, however long the call takes (a
    // migration, a snapshot): Node otherwise drops the request when the client's FIN arrives.
    (this.server as http.Server & { httpAllowHalfOpen: boolean }).httpAllowHalfOpen = true;
    // Silence on a socket: Node asks here before closing it.
    this.server.timeout = limits.idleTimeoutMs;
    this.server.on('timeout', (socket: Socket) => this.onIdle(socket));
    this.server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => this.onClientError(err, socket));
    // Node hands CONNECT to its own event (and drops the socket if nobody listens): answer it.
    this.server.on('connect', (req: http.IncomingMessage, socket: Socket) => {
      if (socket.writable) socket.end(rawErrorReply(badRequest(`${requestPath(req.url ?? '')} accepts no CONNECT`)));
      else socket.destroy();
    });
    // http.Server attaches its parser in its own 'connection' listeners: admission runs in
    // their place and passes on only the sockets it admits, so a refused one is never parsed.
    const attachParser = this.server.listeners('connection') as ((socket: Socket) => void)[];
    this.server.removeAllListeners('connection');
    // Node reads a socket without room for control data, and the kernel then drops descriptors
    // sent with the bytes: a new connection waits unread until its first bytes are there, and
    // the descriptors that came with them are taken first (MSG_PEEK leaves the bytes to Node).
    (this.server as http.Server & { pauseOnConnect: boolean }).pauseOnConnect = true;
    this.server.on('connection', (socket: Socket) => {
      if (!this.admit(socket)) return;
      this.takeFdsThen(socket, () => {
        for (const l of attachParser) l.call(this.server, socket);
        socket.resume();
      });
    });
  }

  /**
   * Wait (without reading) until the connection's first bytes arrive, keep the descriptors sent
   * with them, then `go`. A peer silent for the idle timeout is closed, as an idle one is.
   */
  private takeFdsThen(socket: Socket, go: () => void): void {
    const fd = (socket as Socket & { _handle?: { fd?: number } })._handle?.fd;
    const started = Date.now();
    let spins = 0;
    const look = (): void => {
      if (socket.destroyed) return;
      let got: { bytes: number; fds: number[] } | null = null;
      try {
        got = fd === undefined || fd < 0 ? { bytes: 0, fds: [] } : native().peekFds(fd, MAX_REQUEST_FDS);
      } catch (e) {
        this.opts.log.warn({ err: (e as Error).message }, 'API connection sent descriptors that were refused');
        got = { bytes: 0, fds: [] };
      }
      if (got === null) {
        if (Date.now() - started >= this.limits.idleTimeoutMs) return this.drop(socket);
        // (the first looks come at once: clients send their request right after connecting)
        if (spins++ < 8) setImmediate(look);
        else setTimeout(look, Math.min(50, spins));
        return;
      }
      const c = this.connections.get(socket);
      if (c && got?.fds.length) {
        c.fds = got.fds;
        socket.once('close', () => this.closeFds(c));
      } else {
        got?.fds.forEach((f) => native().closeFd(f));
      }
      go();
    };
    look();
  }

  private closeFds(c: Connection): void {
    for (const f of c.fds.splice(0)) native().closeFd(f);
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
    const socketPath = target.path;
    s.acquireLock(socketPath);
    try {
      removeStaleSocket(socketPath);
      await s.listenOn(() => {
        // bind() creates the file with the umask applied: it is 0600 from its first instant,
        // and nothing changes its mode by path afterwards (a chmod would follow a link put in
        // its place).
        const mask = process.umask(0o177);
        try {
          s.server.listen(socketPath);
        } finally {
          process.umask(mask);
        }
      });
      s.socketPath = socketPath;
      checkSocketFile(socketPath);
    } catch (e) {
      await s.close();
      throw e;
    }
    return s;
  }

  private acquireLock(socketPath: string): void {
    const fd = openOwnFile(`${socketPath}.lock`, { role: 'the API socket lock' });
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

  /**
   * A new connection: admitted while under the cap; at the cap the longest-open connection
   * the VMM is not working for (no request in progress, no event stream) is closed to make
   * room, so silent connections cannot lock clients out; when every one is busy, 503.
   */
  private admit(socket: Socket): boolean {
    // A peer that vanishes mid-reply is not the VMM's problem.
    socket.on('error', () => undefined);
    if (this.closing) {
      socket.destroy();
      return false;
    }
    if (this.connections.size >= this.limits.maxConnections) {
      const idlest = [...this.connections].find(([, c]) => !this.busy(c));
      if (idlest) {
        this.opts.log.debug('API connection cap reached: closing the longest idle connection');
        this.drop(idlest[0]);
      } else {
        const err = new ApiError(503, ['Service unavailable', `the API already serves ${this.connections.size} connections`]);
        // On a UNIX socket the reply is in the peer's queue once written; closing the fd
        // right after does not take it back.
        socket.end(rawErrorReply(err), () => socket.destroy());
        return false;
      }
    }
    this.connections.set(socket, { streaming: false, pending: 0, fds: [] });
    socket.once('close', () => this.connections.delete(socket));
    return true;
  }

  /** Whether the VMM owes this connection something: a reply it is working on, or events. */
  private busy(c: Connection): boolean {
    return c.streaming || (c.current !== undefined && c.current.req.complete && !c.current.res.writableEnded);
  }

  private drop(socket: Socket): void {
    this.connections.delete(socket);
    socket.destroy();
  }

  /** The idle timeout: silence while the VMM owes nothing closes the connection. */
  private onIdle(socket: Socket): void {
    const c = this.connections.get(socket);
    if (c && this.busy(c)) return; // a slow vm.snapshot is not the client's silence
    const res = c?.current?.res;
    if (res && !res.headersSent) {
      // stopped half-way through its body: say so, then close
      res.shouldKeepAlive = false;
      this.reply(c!.current!.req, res, 408, errorBody(new ApiError(408, ['Request timeout', 'the request body stopped arriving'])));
      res.once('finish', () => socket.destroy());
      return;
    }
    this.drop(socket);
  }

  private onClientError(err: NodeJS.ErrnoException, socket: Socket): void {
    // Node's parser raises the error again for every chunk and for the end that follow a
    // malformed request; the reply is already on its way (end() flushes it, then closes), and
    // destroying the socket now would drop it whenever it could not be written at once.
    if (this.answeredWithError.has(socket)) return;
    if (err.code === 'ECONNRESET' || !socket.writable || socket.destroyed) {
      socket.destroy();
      return;
    }
    const timedOut = err.code === 'ERR_HTTP_REQUEST_TIMEOUT';
    const why =
      err.code === 'HPE_HEADER_OVERFLOW'
        ? `request headers exceed ${MAX_HEADER_BYTES} bytes`
        : timedOut
          ? 'the request was not completed in time'
          : `malformed HTTP request (${err.code ?? err.message})`;
    this.answeredWithError.add(socket);
    socket.end(rawErrorReply(timedOut ? new ApiError(408, ['Request timeout', why]) : badRequest(why)));
    // A client that goes on sending instead of ending holds the connection this long at most.
    setTimeout(() => socket.destroy(), ERROR_LINGER_MS).unref();
  }

  // Synchronous where it can be: most calls (ping, info, counters) need no I/O, and every
  // promise hop shows in the round-trip time.
  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    res.sendDate = false;
    const c = this.connections.get(req.socket);
    if (c) {
      const current = { req, res };
      c.current = current;
      c.pending++;
      res.once('close', () => {
        c.pending--;
        if (c.current === current) c.current = undefined;
      });
      // Each waiting request holds a place in the VMM's queue: a client may not stack them.
      if (c.pending > this.limits.maxPipelined) {
        discardBody(req);
        this.fail(req, res, tooMany(`${c.pending - 1} requests on this connection are not answered yet (at most ${this.limits.maxPipelined})`));
        return;
      }
    }
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
      // (descriptors go to the request they came with: the connection's first)
      const c = this.connections.get(req.socket);
      const fds = c ? c.fds.splice(0) : [];
      let body: unknown;
      try {
        if (!endpoint.takesFds) fds.splice(0).forEach((f) => native().closeFd(f));
        body = endpoint.body ? parseJsonBody(raw!) : undefined;
      } catch (e) {
        fds.forEach((f) => native().closeFd(f));
        throw e;
      }
      const result = endpoint.run(this.opts.api, body, fds);
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
   * Take `bytes` from the body budget, or refuse. A body small enough is always let through,
   * so a few ordinary calls work while large uploads hold the budget.
   */
  private reserveBody(bytes: number, total: number): void {
    if (total > SMALL_BODY_BYTES && this.bodyBytes + bytes > this.limits.bodyBudgetBytes) {
      throw tooMany(`the VMM is already holding ${this.bodyBytes} bytes of request bodies (at most ${this.limits.bodyBudgetBytes}); retry later`);
    }
    this.bodyBytes += bytes;
  }

  /**
   * Read the request body within the limit; null when there is none. A body over the limit is
   * refused at once but still read (and dropped) for a while, so the client can finish sending
   * and read the refusal instead of having its connection reset under it. What the body holds
   * counts against the budget from its Content-Length (or as it arrives, when chunked) until
   * it has been parsed or dropped.
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
    try {
      this.reserveBody(declared, declared);
    } catch (e) {
      discardBody(req);
      return Promise.reject(e);
    }
    let held = declared;
    const release = () => {
      this.bodyBytes -= held;
      held = 0;
    };
    return new Promise<Buffer | null>((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let refused = false;
      const refuse = (err: ApiError) => {
        refused = true;
        req.off('data', onData);
        chunks.length = 0;
        release();
        discardBody(req);
        reject(err);
      };
      const onData = (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_BODY_BYTES) return refuse(badRequest(`the request body exceeds ${MAX_BODY_BYTES} bytes`));
        if (size > held) {
          // chunked, or more than declared (the parser stops at the declared length anyway)
          try {
            this.reserveBody(size - held, size);
          } catch (e) {
            return refuse(e as ApiError);
          }
          held = size;
        }
        chunks.push(chunk);
      };
      req.on('data', onData);
      req.on('error', (e) => {
        release();
        reject(badRequest(`the request body could not be read: ${e.message}`));
      });
      req.once('close', release);
      req.on('end', () => {
        if (refused) return;
        const body = Buffer.concat(chunks, size);
        chunks.length = 0;
        if (size === 0) {
          release();
          if (wanted) reject(badRequest('this request needs a JSON body'));
          else resolve(null);
          return;
        }
        if (!wanted) {
          release();
          reject(badRequest('this request takes no body'));
        } else if (type !== '' && !ACCEPTED_BODY_TYPES.has(type)) {
          release();
          reject(badRequest(`Content-Type ${type} is not ${JSON_TYPE}`));
        } else {
          // held until the handler has parsed it: the parse is where the memory goes
          resolve(body);
          queueMicrotask(release);
        }
      });
    });
  }

  /** `body` is JSON text: as a string, Node sends it in one write with the headers. */
  private reply(req: http.IncomingMessage, res: http.ServerResponse, status: number, body?: string): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const withBody = body !== undefined && status !== 204;
    res.writeHead(status, '', replyHeaders(res.shouldKeepAlive, withBody ? Buffer.byteLength(body) : null));
    res.end(withBody ? body : undefined);
  }

  /** GET vmm.events: every monitor event from now on; Last-Event-ID replays from the journal. */
  private stream(req: http.IncomingMessage, res: http.ServerResponse): void {
    if (this.streams.size >= this.limits.maxEventStreams) {
      throw tooMany(`${this.streams.size} event streams are open already (at most ${this.limits.maxEventStreams})`);
    }
    const store = this.opts.api.vmm.store;
    const c = this.connections.get(req.socket);
    if (c) c.streaming = true;
    // Events may be minutes apart: a stream is not idle. It is dropped instead when it falls
    // behind (MAX_STREAM_BACKLOG).
    req.socket.setTimeout(0);
    // A stream has nothing more to read from its client: the client's FIN means it has gone
    // (the server lets other calls' clients half-close and still get their reply).
    req.socket.once('end', () => res.destroy());
    // Not chunked either: the stream is the rest of the connection, readable as plain text.
    res.useChunkedEncodingByDefault = false;
    res.writeHead(200, '', [...replyHeaders(false, null), 'Content-Type', 'text/event-stream', 'Cache-Control', 'no-cache']);
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
      const stopped = this.server.listening ? new Promise<void>((resolve) => this.server.close(() => resolve())) : undefined;
      this.server.closeIdleConnections();
      await Promise.race([Promise.all(ended), delay(500)]);
      this.server.closeAllConnections();
      for (const socket of this.connections.keys()) socket.destroy();
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

/** What bind() made at `path` must be our socket, 0600; lstat, so a link there is not followed. */
function checkSocketFile(path: string): void {
  const st = fs.lstatSync(path);
  if (!st.isSocket()) throw new Error(`API socket path ${path} was replaced by something that is not a socket`);
  if ((st.mode & 0o777) !== 0o600) throw new Error(`API socket ${path} has mode ${(st.mode & 0o777).toString(8)}, not 600`);
}
