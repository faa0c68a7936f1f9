// API round-trip latency: `vmm.ping` on a real `tern --api-socket` process against a plain Node
// `http` server on a UNIX socket that answers with the same bytes (status, headers, body), each
// in its own process. One client, one keep-alive connection per server, one request in flight,
// the request bytes ch-remote sends. Blocks of calls alternate between the two so drift on a
// busy host hits both. Prints a table; the ratio is the result, not the absolute numbers.
//
//   npm run build && node dist/test/bench/api-latency.js [CALLS]    (default 10000 per server)
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

const CALLS = Number(process.argv[2] ?? process.env.TERN_BENCH_CALLS ?? 10_000);
const WARMUP = 1_000;
const BLOCK = 500;
/** the shipped CLI bundle (npm run build makes it) */
const TERN = path.resolve(__dirname, '..', '..', 'bin', 'tern.js');
const REQUEST = Buffer.from('GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n');

/** A client on one connection: send the request, wait for one whole response, time it. */
class PingClient {
  private buf = Buffer.alloc(0);
  private waiting?: (response: Buffer) => void;

  private constructor(private readonly sock: net.Socket) {
    sock.on('data', (d) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
      this.tryComplete();
    });
  }

  static connect(socketPath: string): Promise<PingClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(socketPath, () => resolve(new PingClient(s)));
      s.once('error', reject);
    });
  }

  private tryComplete(): void {
    const end = this.buf.indexOf('\r\n\r\n');
    if (end < 0 || !this.waiting) return;
    const m = /\r\ncontent-length: *(\d+)/i.exec(this.buf.subarray(0, end).toString('latin1'));
    const total = end + 4 + (m ? Number(m[1]) : 0);
    if (this.buf.length < total) return;
    const response = this.buf.subarray(0, total);
    this.buf = this.buf.subarray(total);
    const w = this.waiting;
    this.waiting = undefined;
    w(response);
  }

  /** one round trip; resolves with its duration in ns and the response bytes */
  ping(): Promise<{ ns: number; response: Buffer }> {
    return new Promise((resolve) => {
      const start = process.hrtime.bigint();
      this.waiting = (response) => resolve({ ns: Number(process.hrtime.bigint() - start), response });
      this.sock.write(REQUEST);
    });
  }

  close(): void {
    this.sock.destroy();
  }
}

/** The plain server: same status line, headers and body as the sample response from tern. */
function plainServerSource(socketPath: string, sample: Buffer): string {
  const text = sample.toString('latin1');
  const end = text.indexOf('\r\n\r\n');
  const headers: [string, string][] = text
    .slice(0, end)
    .split('\r\n')
    .slice(1)
    .map((l) => [l.slice(0, l.indexOf(':')), l.slice(l.indexOf(':') + 1).trim()] as [string, string]);
  const status = Number(text.slice(9, 12));
  const body = text.slice(end + 4);
  return `
    const http = require('node:http');
    const headers = ${JSON.stringify(headers)};
    const body = ${JSON.stringify(body)}; // a string: Node writes it with the headers in one go
    http.createServer((req, res) => {
      // tern's bytes exactly: no reason phrase, no Date, its headers in its order
      res.sendDate = false;
      res.writeHead(${status}, '', headers.flat());
      res.end(body);
    }).listen(${JSON.stringify(socketPath)}, () => process.stdout.write('ready\\n'));
  `;
}

function waitForSocket(p: string, child: ChildProcess): Promise<void> {
  return new Promise((resolve, reject) => {
    const end = Date.now() + 20_000;
    const poll = () => {
      if (child.exitCode !== null) reject(new Error(`server exited with ${child.exitCode}`));
      else if (fs.existsSync(p)) {
        const c = net.connect(p, () => {
          c.destroy();
          resolve();
        });
        c.on('error', () => setTimeout(poll, 50));
      } else if (Date.now() > end) reject(new Error(`no socket at ${p}`));
      else setTimeout(poll, 50);
    };
    poll();
  });
}

function stats(ns: number[]): { median: number; p99: number; mean: number } {
  const s = [...ns].sort((a, b) => a - b);
  const q = (f: number) => s[Math.min(s.length - 1, Math.floor(f * s.length))];
  return { median: q(0.5), p99: q(0.99), mean: s.reduce((a, b) => a + b, 0) / s.length };
}

const us = (ns: number) => (ns / 1000).toFixed(1);

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-api-bench-'));
  const ternSock = path.join(dir, 'tern.sock');
  const plainSock = path.join(dir, 'plain.sock');
  const children: ChildProcess[] = [];
  try {
    const tern = spawn(process.execPath, [TERN, '--api-socket', `path=${ternSock}`], { stdio: 'ignore' });
    children.push(tern);
    await waitForSocket(ternSock, tern);
    const ternClient = await PingClient.connect(ternSock);
    const sample = (await ternClient.ping()).response;

    const plain = spawn(process.execPath, ['-e', plainServerSource(plainSock, sample)], { stdio: 'ignore' });
    children.push(plain);
    await waitForSocket(plainSock, plain);
    const plainClient = await PingClient.connect(plainSock);
    const plainSample = (await plainClient.ping()).response;
    const strip = (b: Buffer) => b.toString('latin1').replace(/\r\nDate: [^\r]*/, '');
    if (strip(plainSample) !== strip(sample)) throw new Error(`the plain server's reply differs:\n${strip(plainSample)}\n---\n${strip(sample)}`);

    for (let i = 0; i < WARMUP; i++) {
      await ternClient.ping();
      await plainClient.ping();
    }
    const samples = { tern: [] as number[], plain: [] as number[] };
    for (let done = 0; done < CALLS; done += BLOCK) {
      const n = Math.min(BLOCK, CALLS - done);
      for (const [name, client] of [['tern', ternClient], ['plain', plainClient]] as const) {
        for (let i = 0; i < n; i++) samples[name].push((await client.ping()).ns);
      }
    }
    ternClient.close();
    plainClient.close();

    const t = stats(samples.tern);
    const p = stats(samples.plain);
    const rows = [
      ['server', 'calls', 'median µs', 'p99 µs', 'mean µs'],
      ['tern vmm.ping', String(samples.tern.length), us(t.median), us(t.p99), us(t.mean)],
      ['plain node http', String(samples.plain.length), us(p.median), us(p.p99), us(p.mean)],
      ['ratio tern/plain', '', (t.median / p.median).toFixed(2), (t.p99 / p.p99).toFixed(2), (t.mean / p.mean).toFixed(2)],
    ];
    const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
    const line = (r: string[]) => `| ${r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ')} |`;
    process.stdout.write(`API round trip, UNIX socket, one connection, ${os.cpus().length} CPUs, node ${process.version}\n`);
    process.stdout.write(`${line(rows[0])}\n|${widths.map((w, i) => (i === 0 ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|\n`);
    for (const r of rows.slice(1)) process.stdout.write(`${line(r)}\n`);
  } finally {
    for (const c of children) c.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  process.stderr.write(`api-latency: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
