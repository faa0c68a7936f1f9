// Where a console device's bytes go (and, for a tty, where its input comes from).
// Output is batched per event-loop turn: the guest writes one byte per I/O exit, and a write(2)
// per byte would cost more than the exit itself.
//
// The guest decides how much it writes, so output is bounded on the host side: a serial file
// never grows beyond its cap (default SERIAL_FILE_DEFAULT_MAX_BYTES; bytes beyond it are
// dropped, not rotated), at most OUTPUT_MAX_PENDING_BYTES wait for a slow reader, and a write
// error (ENOSPC, EIO, ...) drops that batch. Every dropped byte is reported to onDropped (the
// VMM counts them in vm.counters) and every condition is logged through the guest log's rate
// limit; none of them stops the VM. A reader that is not ready (EAGAIN) is waited for with a
// timer that backs off, never by retrying in a loop.
import fs from 'node:fs';
import tty from 'node:tty';
import { type ConsoleConfig, SerialConfig } from '../config/vm-config';
import { native } from '../native/kvm';
import type { GuestLog } from '../util/guest-log';
import { HostFileError, openAppendFile } from '../util/host-file';

export interface ConsoleSink {
  /** the pseudo-terminal's slave, for a console in pty mode */
  readonly path?: string;
  write(bytes: Iterable<number>): void;
  /**
   * Host-side input (tty and pty modes). The callback gets raw bytes and returns how many the device
   * took; the rest is held here, and reading stops, until offerHeldInput() finds room. A paste
   * longer than the UART's buffer therefore waits for the guest instead of being dropped.
   */
  onInput(cb: (bytes: Uint8Array) => number): void;
  /** Offer held input to the device again (call when the guest may have drained its buffer). */
  offerHeldInput(): void;
  /** Leave host input in the host's buffer (VM paused) until resumeInput(). */
  pauseInput(): void;
  resumeInput(): void;
  close(): void;
}

export class ConsoleConfigError extends Error {}

/** Default cap of a serial output file. */
export const SERIAL_FILE_DEFAULT_MAX_BYTES = 64 * 1024 * 1024;
/** Output waiting for a reader that is not ready (a full pipe, a stopped terminal). */
export const OUTPUT_MAX_PENDING_BYTES = 1024 * 1024;
const RETRY_FIRST_MS = 1;
const RETRY_MAX_MS = 100;

export interface ConsoleSinkOptions {
  /** cap of a serial file, in bytes */
  maxFileBytes?: number;
  /** bytes the sink had to drop, reported at most once per event-loop turn */
  onDropped?: (bytes: number) => void;
  /** where conditions the guest's output causes are logged */
  log?: GuestLog;
  /** the device, in messages (default 'serial') */
  device?: string;
}

export interface ConsoleOutputOptions extends ConsoleSinkOptions {
  /** what the fd is, for log lines */
  name: string;
  /** bytes the destination may still take in all (a file's cap minus its size); default unbounded */
  room?: number;
}

/** Guest output to one file descriptor, batched, bounded and never fatal. */
export class ConsoleOutput {
  private batch: number[] = [];
  private scheduled = false;
  /** batches not yet written, oldest first; `offset` bytes of the first are written */
  private readonly pending: Buffer[] = [];
  private offset = 0;
  private pendingBytes = 0;
  private room: number;
  private dropped = 0;
  private retryMs = 0;
  private retryTimer?: NodeJS.Timeout;
  /** the reader went away (EPIPE): the guest keeps running, its output goes nowhere */
  private closed = false;

  constructor(
    private readonly fd: number,
    private readonly opts: ConsoleOutputOptions,
  ) {
    this.room = opts.room ?? Number.POSITIVE_INFINITY;
  }

  write(bytes: Iterable<number>): void {
    for (const b of bytes) this.batch.push(b);
    this.schedule();
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.flush();
    });
  }

  /** Queue the batch (what fits), write what the fd takes now, report what was dropped. */
  flush(): void {
    this.enqueueBatch();
    if (!this.retryTimer) this.writeOut(false);
    this.reportDropped();
  }

  private enqueueBatch(): void {
    if (this.batch.length === 0) return;
    const batch = this.batch;
    this.batch = [];
    if (this.closed) return this.drop(batch.length);
    const fits = Math.max(0, Math.min(batch.length, this.room, OUTPUT_MAX_PENDING_BYTES - this.pendingBytes));
    if (fits < batch.length) {
      const why = fits >= this.room ? `the ${this.opts.name} is at its size cap` : 'the console reader is not keeping up';
      this.opts.log?.warn(`console-drop:${this.opts.name}`, { output: this.opts.name, cap: this.opts.maxFileBytes }, `${why}: guest output dropped`);
      this.drop(batch.length - fits);
    }
    if (fits === 0) return;
    this.room -= fits;
    this.pending.push(Buffer.from(fits === batch.length ? batch : batch.slice(0, fits)));
    this.pendingBytes += fits;
  }

  /**
   * Write pending batches until done or the fd would block. `final`: the sink is closing, so
   * a reader that is not ready gets no second chance.
   */
  private writeOut(final: boolean): void {
    while (this.pending.length) {
      const buf = this.pending[0];
      let n: number;
      try {
        n = fs.writeSync(this.fd, buf, this.offset, buf.length - this.offset);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code ?? 'error';
        if (code === 'EAGAIN' && !final) {
          // Wait for the reader with a timer that backs off: no busy loop, the event loop runs.
          this.retryMs = Math.min(RETRY_MAX_MS, this.retryMs ? this.retryMs * 2 : RETRY_FIRST_MS);
          this.retryTimer = setTimeout(() => {
            this.retryTimer = undefined;
            this.flush();
          }, this.retryMs);
          return;
        }
        if (code === 'EPIPE') {
          // A closed terminal or pipe reader is not a VM failure; a serial line would just drop bytes.
          this.closed = true;
          this.drop(this.pendingBytes - this.offset);
          this.pending.length = 0;
          this.pendingBytes = 0;
          this.offset = 0;
          return;
        }
        // ENOSPC, EIO, EFBIG...: this batch is lost, the next one may fare better.
        this.opts.log?.warn(`console-error:${this.opts.name}:${code}`, { output: this.opts.name, code }, 'guest output could not be written');
        this.drop(buf.length - this.offset);
        n = buf.length - this.offset;
      }
      this.retryMs = 0;
      this.offset += n;
      if (this.offset === buf.length) {
        this.pending.shift();
        this.pendingBytes -= buf.length;
        this.offset = 0;
      }
    }
  }

  private drop(n: number): void {
    this.dropped += n;
  }

  private reportDropped(): void {
    if (this.dropped === 0) return;
    const n = this.dropped;
    this.dropped = 0;
    this.opts.onDropped?.(n);
  }

  /** Write what can be written now; what cannot is dropped (and reported). */
  close(): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    this.enqueueBatch();
    this.writeOut(true);
    if (this.pendingBytes) {
      this.drop(this.pendingBytes - this.offset);
      this.pending.length = 0;
      this.pendingBytes = 0;
    }
    this.closed = true;
    this.reportDropped();
  }
}

/**
 * The terminal size a console in `config` offers its guest: the host terminal's, when the
 * console is on the tty and stdout is one; none otherwise.
 */
export function terminalSize(config: ConsoleConfig): { cols: number; rows: number } | undefined {
  if (config.mode !== 'Tty' || !process.stdout.isTTY) return undefined;
  const cols = process.stdout.columns;
  const rows = process.stdout.rows;
  return cols > 0 && rows > 0 && cols <= 0xffff && rows <= 0xffff ? { cols, rows } : undefined;
}

export function openConsoleSink(config: SerialConfig, opts: ConsoleSinkOptions = {}): ConsoleSink {
  const device = opts.device ?? 'serial';
  switch (config.mode) {
    case 'Off':
    case 'Null':
      return { write() {}, onInput() {}, offerHeldInput() {}, pauseInput() {}, resumeInput() {}, close() {} };
    case 'File': {
      if (!config.file) throw new ConsoleConfigError(`${device} file mode needs a file path`);
      // The path may come from a snapshot: append only to a regular file (created 0600),
      // never through a symlink, never to a FIFO or device.
      let opened: { fd: number; size: number };
      try {
        opened = openAppendFile(config.file);
      } catch (e) {
        throw new ConsoleConfigError(`${device} file ${e instanceof HostFileError ? e.message : (e as Error).message}`);
      }
      const { fd, size } = opened;
      const max = opts.maxFileBytes ?? SERIAL_FILE_DEFAULT_MAX_BYTES;
      const w = new ConsoleOutput(fd, { ...opts, name: `${device} file`, room: Math.max(0, max - size), maxFileBytes: max });
      return {
        write: (b) => w.write(b),
        onInput() {},
        offerHeldInput() {},
        pauseInput() {},
        resumeInput() {},
        close() {
          w.close();
          fs.closeSync(fd);
        },
      };
    }
    case 'Tty':
      return terminalSink(1, process.stdin, { ...opts, name: 'stdout' });
    case 'Pty': {
      // A new pseudo-terminal per VMM (a restored VM gets a new one too): the user opens its
      // slave, whose path is logged and shown by vm.info.
      const pty = native().openPty();
      let input: tty.ReadStream;
      try {
        input = new tty.ReadStream(pty.fd);
      } catch (e) {
        native().closeFd(pty.fd);
        native().closeFd(pty.slaveFd);
        throw e;
      }
      // (a read error is not the guest's to see, and must not end the VMM)
      input.on('error', (err) => opts.log?.warn(`${device}-pty`, { device, err: err.message }, 'reading the console pty failed'));
      return terminalSink(pty.fd, input, { ...opts, name: `${device} pty` }, {
        path: pty.path,
        close: () => {
          input.destroy(); // closes the master
          native().closeFd(pty.slaveFd);
        },
      });
    }
    default:
      throw new ConsoleConfigError(`${device} mode ${config.mode} is not supported yet (use tty, pty, file=PATH, null or off)`);
  }
}

/**
 * A terminal's end of a console: output to `outFd`, input from `input` in raw mode (the guest
 * gets every key, Ctrl-C included, as a serial line would). Input the device has no room for
 * is held, and reading stops, until offerHeldInput() finds room; a paused VM leaves input in
 * the host's buffer.
 */
function terminalSink(outFd: number, input: NodeJS.ReadStream | tty.ReadStream, opts: ConsoleOutputOptions, own: { path?: string; close?: () => void } = {}): ConsoleSink {
  const w = new ConsoleOutput(outFd, opts);
  let listener: ((d: Buffer) => void) | undefined;
  let deliver: ((bytes: Uint8Array) => number) | undefined;
  // Bytes read that the device has not taken yet.
  let held: Uint8Array | null = null;
  let vmPaused = false;
  const readIfReady = () => {
    if (listener && !held && !vmPaused) input.resume();
  };
  const offer = (bytes: Uint8Array) => {
    const taken = deliver!(bytes);
    held = taken < bytes.length ? bytes.subarray(taken) : null;
    if (held) input.pause();
  };
  return {
    ...(own.path ? { path: own.path } : {}),
    write: (b) => w.write(b),
    onInput(cb) {
      if (input.isTTY) input.setRawMode(true);
      deliver = cb;
      listener = (d: Buffer) => {
        // The stream may still emit a chunk it had buffered when it was paused.
        if (held) {
          const both = new Uint8Array(held.length + d.length);
          both.set(held);
          both.set(d, held.length);
          held = both;
          input.pause();
          return;
        }
        offer(new Uint8Array(d));
      };
      input.on('data', listener);
      input.resume();
    },
    offerHeldInput() {
      if (!held || vmPaused) return;
      offer(held);
      readIfReady();
    },
    pauseInput: () => {
      vmPaused = true;
      input.pause();
    },
    resumeInput: () => {
      vmPaused = false;
      if (held) offer(held);
      readIfReady();
    },
    close() {
      w.close();
      if (listener) input.off('data', listener);
      if (input.isTTY) input.setRawMode(false);
      input.pause();
      own.close?.();
    },
  };
}
