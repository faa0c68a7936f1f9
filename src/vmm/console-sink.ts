// Where a console device's bytes go (and, for a tty, where its input comes from).
// Output is batched per event-loop turn: the guest writes one byte per I/O exit, and a write(2)
// per byte would cost more than the exit itself.
import fs from 'node:fs';
import { SerialConfig } from '../config/vm-config';

export interface ConsoleSink {
  write(bytes: number[]): void;
  /** Host-side input (tty mode); the callback gets raw bytes. */
  onInput(cb: (bytes: Uint8Array) => void): void;
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
      return { write() {}, onInput() {}, pauseInput() {}, resumeInput() {}, close() {} };
    case 'File': {
      if (!config.file) throw new ConsoleConfigError('serial file mode needs a file path');
      const fd = fs.openSync(config.file, 'a');
      const w = new BatchedWriter(fd);
      return {
        write: (b) => w.write(b),
        onInput() {},
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
      return {
        write: (b) => w.write(b),
        onInput(cb) {
          // Raw mode so the guest gets every key, Ctrl-C included, as a serial line would.
          if (stdin.isTTY) stdin.setRawMode(true);
          listener = (d: Buffer) => cb(new Uint8Array(d));
          stdin.on('data', listener);
          stdin.resume();
        },
        pauseInput: () => stdin.pause(),
        resumeInput: () => {
          if (listener) stdin.resume();
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
