// The host's side of the lab's network tests: TCP servers on the address Tern gives a tap's
// host side, which a guest reaches over its virtio-net card.
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import type { GuestProcess } from './guest-process';

/** What the tests give the tap's host side and the guest's card. */
export const HOST_IP = '192.168.249.1';
export const GUEST_IP = '192.168.249.2';
export const GUEST_MAC = '52:54:00:7e:4e:01';
export const TAP = 'terntap0';
const MIB = 1024 * 1024;

/**
 * A server whose close() also drops the connections it accepted: a guest killed mid-stream
 * never closes its end, and an open socket would keep this test's process alive forever.
 */
export function tcpServer(onConnection: (sock: net.Socket) => void): net.Server {
  const open = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    open.add(sock);
    sock.on('close', () => open.delete(sock));
    sock.on('error', () => undefined);
    onConnection(sock);
  });
  const close = server.close.bind(server);
  server.close = (cb?: (err?: Error) => void) => {
    for (const s of open) s.destroy();
    return close(cb);
  };
  return server;
}

/** `p`, or an error naming `what` (with the guest's console and the VMM's log) after `ms`. */
export function within<T>(p: Promise<T>, ms: number, what: string, vm: GuestProcess): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}; console:\n${vm.output.slice(-2000)}\nVMM log:\n${vm.stderr.slice(-3000)}`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** Listen on the tap's address (it exists once Tern has made the tap). */
export function listenOn(server: net.Server, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, HOST_IP, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

/** Listen on the tap's address: one connection, whose bytes are hashed until `size` have come, then closed. */
export function receiver(port: number, size: number): { listen(): Promise<void>; done: Promise<{ bytes: number; md5: string }>; close(): void } {
  let resolve!: (v: { bytes: number; md5: string }) => void;
  const done = new Promise<{ bytes: number; md5: string }>((r) => (resolve = r));
  const server = tcpServer((sock) => {
    const hash = createHash('md5');
    let bytes = 0;
    sock.on('data', (d: Buffer) => {
      hash.update(d);
      bytes += d.length;
      if (bytes >= size) sock.end();
    });
    sock.on('close', () => resolve({ bytes, md5: hash.digest('hex') }));
  });
  return { listen: () => listenOn(server, port), done, close: () => server.close() };
}

/** Listen on the tap's address: send `size` random bytes to the one connection, then end it; resolves their md5. */
export function sender(port: number, size: number): { listen(): Promise<void>; md5: Promise<string>; close(): void } {
  let resolve!: (v: string) => void;
  const md5 = new Promise<string>((r) => (resolve = r));
  const server = tcpServer((sock) => {
    const hash = createHash('md5');
    let sent = 0;
    const pump = () => {
      while (sent < size) {
        const chunk = randomBytes(Math.min(MIB, size - sent));
        hash.update(chunk);
        sent += chunk.length;
        if (!sock.write(chunk)) return void sock.once('drain', pump);
      }
      sock.end(() => resolve(hash.digest('hex')));
    };
    pump();
  });
  return { listen: () => listenOn(server, port), md5, close: () => server.close() };
}

