// Running the CLIs under test and waiting on the files they write, shared by the host and lab
// tiers.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

export const REPO = path.resolve(__dirname, '..', '..', '..');
export const TERN_REMOTE = path.join(REPO, 'dist', 'bin', 'tern-remote.js');

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run `tern-remote --api-socket SOCKET ARGS...` to completion; never rejects on a failed command. */
export function runTernRemote(socket: string, args: string[], input?: string): Promise<CliRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [TERN_REMOTE, '--api-socket', socket, ...args], { stdio: 'pipe' });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.once('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input ?? '');
  });
}

/** Like runTernRemote, but a non-zero exit is an error carrying stderr. */
export async function ternRemote(socket: string, ...args: string[]): Promise<string> {
  const r = await runTernRemote(socket, args);
  if (r.code !== 0) throw new Error(`tern-remote ${args.join(' ')} exited ${String(r.code)}: ${r.stderr.trim()}`);
  return r.stdout;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Wait until `file` exists. */
export async function waitForPath(file: string, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!fs.existsSync(file)) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${file}`);
    await sleep(50);
  }
}

/**
 * Connect to the UNIX socket `file` once a server accepts there. The file appears at bind(), a
 * moment before listen(): a client that connects in between (a loaded host can stretch that
 * moment), or before the file exists, is refused and tries again.
 */
export async function connectWhenListening(file: string, timeoutMs = 20_000): Promise<net.Socket> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(file, () => resolve(s));
        s.once('error', reject);
      });
    } catch (e) {
      if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for a server on ${file}: ${(e as Error).message}`);
      await sleep(20);
    }
  }
}

/** Wait until a server accepts connections on the UNIX socket `file` (connectWhenListening). */
export async function waitForListening(file: string, timeoutMs = 20_000): Promise<void> {
  (await connectWhenListening(file, timeoutMs)).destroy();
}

/** Wait until the text of `file` from byte `from` on matches `re`; returns that text. */
export async function waitForFileText(file: string, re: RegExp, timeoutMs: number, from = 0): Promise<string> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const text = fs.existsSync(file) ? fs.readFileSync(file, 'latin1').slice(from) : '';
    if (re.test(text)) return text;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${re} in ${file}; it has:\n${text.slice(-2000)}`);
    await sleep(100);
  }
}
