// A minimal QMP client: enough of QEMU's machine protocol for the benchmarks to stop a peer VM
// and save it with `migrate`, the way an operator would, and for the lab's watchdog to ask a
// frozen lab where its CPUs are.
import net from 'node:net';

import { connectWhenListening } from './processes';

type QmpReply = { return?: unknown; error?: { class: string; desc: string }; event?: string };

export class QmpClient {
  private buffer = '';
  private waiting: ((r: QmpReply) => void)[] = [];

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8').on('data', (d: string) => {
      this.buffer += d;
      for (let nl = this.buffer.indexOf('\n'); nl >= 0; nl = this.buffer.indexOf('\n')) {
        const line = this.buffer.slice(0, nl).trim();
        this.buffer = this.buffer.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as QmpReply & { QMP?: unknown };
        // Greetings and asynchronous events are not replies.
        if (msg.QMP !== undefined || msg.event !== undefined) continue;
        this.waiting.shift()?.(msg);
      }
    });
  }

  /** Connect to QEMU's `-qmp unix:PATH,server=on,wait=off` socket and leave capabilities mode. */
  static async connect(path: string, timeoutMs = 30_000): Promise<QmpClient> {
    const client = new QmpClient(await connectWhenListening(path, timeoutMs));
    await client.execute('qmp_capabilities');
    return client;
  }

  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.waiting.push((r) => (r.error ? reject(new Error(`QMP ${command}: ${r.error.class}: ${r.error.desc}`)) : resolve(r.return)));
      this.sock.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    });
  }

  close(): void {
    this.sock.destroy();
  }
}
