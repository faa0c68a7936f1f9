// Frames over a connected socket, both ways: send() respects the socket's back-pressure (a slow
// link slows the sender instead of filling the VMM's memory), next() yields the peer's frames
// in order. A peer's Abort frame, a frame that fails verification, the peer going away and a
// silence longer than the idle limit all end the channel with an error saying which.
import net from 'node:net';
import { FrameChecksum, FrameDecoder, FrameType, MigrationProtocolError, encodeJsonFrame, frameHeader, frameJson, type Frame } from './frames';
import { TernStateError } from '../state/errors';
import type { PayloadBuffers } from './payload-buffers';

export class MigrationPeerError extends TernStateError {
  /** the peer's end of the connection is closed: its process ended or gave the migration up */
  constructor(message: string, readonly peerGone = false) {
    super('MigrationPeer', message);
  }
}

/** caps what a peer can make us hold before we consume it */
const MAX_BUFFERED_BYTES = 128 << 20;
/** a receiving side's read size: all of RAM comes this way, and Node's own reads are 64 KiB */
const LARGE_READ_BYTES = 4 << 20;

/**
 * The same connection as a socket that reads up to LARGE_READ_BYTES at a time into one buffer
 * (net.Socket's onread), handing each read to `onChunk`, which must copy what it keeps before it
 * returns (the buffer is read into again). A connection accepted by a
 * net.Server cannot be given onread, so its handle moves to a new Socket; the accepted one,
 * which must be paused and untouched, is left without a handle. Undefined when the socket has
 * no handle to move (a Node that keeps it elsewhere): the caller reads it as it is.
 */
function withLargeReads(accepted: net.Socket, onChunk: (chunk: Uint8Array) => boolean): net.Socket | undefined {
  const handle = (accepted as unknown as { _handle?: unknown })._handle;
  if (!handle || !accepted.isPaused()) return undefined;
  (accepted as unknown as { _handle?: unknown })._handle = null;
  const buffer = Buffer.allocUnsafe(LARGE_READ_BYTES);
  return new net.Socket({
    handle,
    readable: true,
    writable: true,
    allowHalfOpen: accepted.allowHalfOpen,
    pauseOnCreate: true,
    onread: { buffer, callback: (n: number, buf: Uint8Array) => onChunk(buf.subarray(0, n)) },
  } as net.SocketConstructorOpts);
}

export class FrameChannel {
  private readonly decoder: FrameDecoder;
  private readonly frames: Frame[] = [];
  private waiter?: { resolve: (f: Frame) => void; reject: (e: Error) => void };
  private error?: Error;
  private idleTimer?: NodeJS.Timeout;
  bytesRead = 0;
  bytesWritten = 0;
  /** how the frames this side sends are checksummed (the peer reads any kind the decoder knows) */
  checksum = FrameChecksum.Crc32;

  readonly socket: net.Socket;

  /**
   * `largeReads`: the connection was just accepted and is paused; read it in large pieces (the
   * receiving side of a migration). The channel's `socket` is then a new one: resume that.
   * `payloads`: the pool large Memory payloads are read into (the receiver gives them back).
   */
  constructor(
    socket: net.Socket,
    private readonly opts: { idleTimeoutMs: number; peer: string; largeReads?: boolean; maxBufferedBytes?: number; payloads?: PayloadBuffers },
  ) {
    this.decoder = new FrameDecoder(opts.payloads);
    const large = opts.largeReads
      ? withLargeReads(socket, (chunk) => {
          this.onData(chunk);
          return !this.overfull();
        })
      : undefined;
    if (large) socket = large;
    else socket.on('data', (chunk: Buffer) => this.onData(chunk));
    this.socket = socket;
    socket.on('end', () => this.fail(new MigrationPeerError(`the ${opts.peer} closed the connection`, true)));
    socket.on('error', (e: NodeJS.ErrnoException) =>
      this.fail(new MigrationPeerError(`connection to the ${opts.peer} failed: ${e.code ?? e.message}`, e.code === 'ECONNRESET' || e.code === 'EPIPE')),
    );
    socket.on('close', () => this.fail(new MigrationPeerError(`the connection to the ${opts.peer} closed`, true)));
    this.armIdle();
  }

  private armIdle(): void {
    clearTimeout(this.idleTimer);
    if (this.error) return;
    this.idleTimer = setTimeout(
      () => this.fail(new MigrationPeerError(`the ${this.opts.peer} sent nothing for ${this.opts.idleTimeoutMs / 1000} s`)),
      this.opts.idleTimeoutMs,
    );
    this.idleTimer.unref();
  }

  /** (the decoder copies what it keeps: `chunk` may be a read buffer used again) */
  private onData(chunk: Uint8Array): void {
    if (this.error) return;
    this.bytesRead += chunk.length;
    this.armIdle();
    try {
      for (const f of this.decoder.push(chunk)) {
        if (f.type === FrameType.Abort) {
          const why = (frameJson(f) as { reason?: unknown })?.reason;
          throw new MigrationPeerError(`the ${this.opts.peer} gave up: ${typeof why === 'string' ? why.slice(0, 500) : 'no reason given'}`, true);
        }
        this.frames.push(f);
      }
    } catch (e) {
      this.fail(e as Error);
      return;
    }
    if (this.overfull()) this.socket.pause();
    this.deliver();
  }

  /**
   * Frames wait unread beyond the cap: stop reading. A frame still coming with none waiting is
   * read on whatever the cap (its type's cap bounds it; the socket would never be read again).
   */
  private overfull(): boolean {
    if (this.frames.length === 0) return false;
    return this.decoder.pendingBytes + this.frames.reduce((n, f) => n + f.payload.length, 0) > (this.opts.maxBufferedBytes ?? MAX_BUFFERED_BYTES);
  }

  private deliver(): void {
    if (!this.waiter) return;
    const f = this.frames.shift();
    if (f) {
      const w = this.waiter;
      this.waiter = undefined;
      if (this.frames.length === 0 && this.socket.isPaused()) this.socket.resume();
      w.resolve(f);
    } else if (this.error) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(this.error);
    }
  }

  private fail(e: Error): void {
    if (this.error) return;
    this.error = e;
    clearTimeout(this.idleTimer);
    this.deliver();
  }

  /** The next frame; frames that arrived before an error are still delivered first. */
  next(): Promise<Frame> {
    if (this.waiter) return Promise.reject(new Error('FrameChannel.next() is already waiting'));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.deliver();
    });
  }

  /** The next frame, which must be of `type`. */
  async expect(type: FrameType): Promise<Frame> {
    const f = await this.next();
    if (f.type !== type) throw new MigrationProtocolError(`expected a ${FrameType[type]} frame, got ${FrameType[f.type]}`);
    return f;
  }

  /** `flushed`: resolve only once the kernel has taken all of `buf`, so the caller may reuse it. */
  private write(buf: Uint8Array, flushed = false): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    this.bytesWritten += buf.length;
    return new Promise((resolve, reject) => {
      const ok = this.socket.write(buf, (e) => (e ? reject(new MigrationPeerError(`sending to the ${this.opts.peer} failed: ${(e as NodeJS.ErrnoException).code ?? e.message}`)) : flushed && resolve()));
      if (flushed) return;
      if (ok) resolve();
      else {
        // Wait until the kernel took the backlog, or the connection ended.
        const done = () => {
          this.socket.off('drain', done);
          this.socket.off('close', done);
          if (this.error && this.socket.destroyed) reject(this.error);
          else resolve();
        };
        this.socket.on('drain', done);
        this.socket.on('close', done);
      }
    });
  }

  async send(type: FrameType, payload: Uint8Array = Buffer.alloc(0)): Promise<void> {
    await this.write(frameHeader(type, payload, this.checksum));
    if (payload.length) await this.write(payload);
  }

  /** send(), resolving once the kernel has the whole payload: the caller may then overwrite it. */
  async sendFlushed(type: FrameType, payload: Uint8Array): Promise<void> {
    await this.write(frameHeader(type, payload, this.checksum));
    await this.write(payload, true);
  }

  sendJson(type: FrameType, value: unknown): Promise<void> {
    return this.write(encodeJsonFrame(type, value, this.checksum));
  }

  /** Tell the peer why we give up (best effort), then close. */
  abort(reason: string): void {
    if (!this.socket.destroyed && !this.error) {
      try {
        this.socket.end(encodeJsonFrame(FrameType.Abort, { reason: reason.slice(0, 1000) }));
      } catch {
        /* the peer is gone anyway */
      }
    }
    this.close();
  }

  /** Close at once; pending next() calls fail. */
  close(): void {
    this.fail(new MigrationPeerError('the migration connection was closed'));
    clearTimeout(this.idleTimer);
    setTimeout(() => this.socket.destroy(), 1000).unref();
    this.socket.end();
  }
}
