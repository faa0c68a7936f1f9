// Where a console device's bytes go (and, for a tty, where its input comes from).
// Output is batched per event-loop turn: the guest writes one byte per I/O exit, and a write(2)
// per byte would cost more than the exit itself.
import fs from 'node:fs';
import { SerialConfig } from '../config/vm-config';
import { HostFileError, openAppendFile } from '../util/host-file';

export interface ConsoleSink {
  write(bytes: number[]): void;
  /**
   * Host-side input (tty mode). The callback gets raw bytes and returns how many the device
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

class BatchedWriter {
  private pending: number[] = [];
  private scheduled = false;
  /** the reader went away (EPIPE): the guest keeps running, its output goes nowhere */
  private closed = false;

  constructor(private readonly fd: number) {}

  write(bytes: number[]): void {
    if (this.closed) return;
    for (const b of bytes) this.pending.push(b);
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  flush(): void {
    this.scheduled = false;
    if (this.pending.length === 0) return;
    const buf = Buffer.from(this.pending);
    this.pending = [];
    let off = 0;
    while (off < buf.length) {
      try {
        off += fs.writeSync(this.fd, buf, off);
      } catch (e) {
        // A non-blocking stdout (pipe) may be full: wait for it rather than drop guest output.
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') continue;
        // A closed terminal or pipe reader is not a VM failure; a serial line would just drop bytes.
        if ((e as NodeJS.ErrnoException).code === 'EPIPE') {
          this.closed = true;
          return;
        }
        throw e;
      }
    }
  }
}

export function openConsoleSink(config: SerialConfig): ConsoleSink {
  switch (config.mode) {
    case 'Off':
    case 'Null':
      return { write() {}, onInput() {}, offerHeldInput() {}, pauseInput() {}, resumeInput() {}, close() {} };
    case 'File': {
      if (!config.file) throw new ConsoleConfigError('serial file mode needs a file path');
      // The path may come from a snapshot: append only to a regular file (created 0600),
      // never through a symlink, never to a FIFO or device.
      let fd: number;
      try {
        fd = openAppendFile(config.file);
      } catch (e) {
        throw new ConsoleConfigError(`serial file ${e instanceof HostFileError ? e.message : (e as Error).message}`);
      }
      const w = new BatchedWriter(fd);
      return {
        write: (b) => w.write(b),
        onInput() {},
        offerHeldInput() {},
        pauseInput() {},
        resumeInput() {},
        close() {
          w.flush();
          fs.closeSync(fd);
        },
      };
    }
    case 'Tty': {
      const w = new BatchedWriter(1);
      const stdin = process.stdin;
      let listener: ((d: Buffer) => void) | undefined;
      let deliver: ((bytes: Uint8Array) => number) | undefined;
      // Bytes read from stdin that the device has not taken yet.
      let held: Uint8Array | null = null;
      let vmPaused = false;
      const readIfReady = () => {
        if (listener && !held && !vmPaused) stdin.resume();
      };
      const offer = (bytes: Uint8Array) => {
        const taken = deliver!(bytes);
        held = taken < bytes.length ? bytes.subarray(taken) : null;
        if (held) stdin.pause();
      };
      return {
        write: (b) => w.write(b),
        onInput(cb) {
          // Raw mode so the guest gets every key, Ctrl-C included, as a serial line would.
          if (stdin.isTTY) stdin.setRawMode(true);
          deliver = cb;
          listener = (d: Buffer) => {
            // stdin may still emit a chunk it had buffered when it was paused.
            if (held) {
              const both = new Uint8Array(held.length + d.length);
              both.set(held);
              both.set(d, held.length);
              held = both;
              stdin.pause();
              return;
            }
            offer(new Uint8Array(d));
          };
          stdin.on('data', listener);
          stdin.resume();
        },
        offerHeldInput() {
          if (!held || vmPaused) return;
          offer(held);
          readIfReady();
        },
        pauseInput: () => {
          vmPaused = true;
          stdin.pause();
        },
        resumeInput: () => {
          vmPaused = false;
          if (held) offer(held);
          readIfReady();
        },
        close() {
          w.flush();
          if (listener) stdin.off('data', listener);
          if (stdin.isTTY) stdin.setRawMode(false);
          stdin.pause();
        },
      };
    }
    default:
      throw new ConsoleConfigError(`serial mode ${config.mode} is not supported yet (use tty, file=PATH, null or off)`);
  }
}
