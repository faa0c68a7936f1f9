// The first 32 bytes on a UNIX-socket migration connection, read by the destination with a
// recvmsg() of its own before Node reads the socket, because in a local migration they carry
// the guest's memory fds (SCM_RIGHTS) and an ordinary read would drop them:
//
//   0 magic "TERNMIGR"   8 u32 protocol version   12 u32 number of fds attached   16 reserved
//
// TCP connections have no preamble: no fds can travel there.
import type net from 'node:net';
import { native } from '../native/kvm';
import { MigrationProtocolError } from './frames';

export const PREAMBLE_BYTES = 32;
const MAGIC = 'TERNMIGR';
export const MAX_MEMORY_FDS = 64;

function socketFd(socket: net.Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('the migration socket has no file descriptor');
  return fd;
}

export function sendPreamble(socket: net.Socket, protocol: number, fds: readonly number[], timeoutMs: number): void {
  const b = Buffer.alloc(PREAMBLE_BYTES);
  b.write(MAGIC, 0, 'latin1');
  b.writeUInt32LE(protocol, 8);
  b.writeUInt32LE(fds.length, 12);
  native().sendWithFds(socketFd(socket), b, [...fds], timeoutMs);
}

/**
 * Read the preamble off a connection accepted paused; the fds are the caller's to close. The
 * JavaScript thread never blocks on it: each try takes the preamble only if it has arrived
 * (the source sends it whole, in one sendmsg), otherwise it waits a little and tries again.
 */
export async function receivePreamble(socket: net.Socket, timeoutMs: number): Promise<{ protocol: number; fds: number[] }> {
  const fd = socketFd(socket);
  const deadline = Date.now() + timeoutMs;
  let got: { data: Buffer; fds: number[] } | undefined;
  for (let wait = 1; !got; wait = Math.min(50, wait * 2)) {
    try {
      got = native().recvWithFds(fd, PREAMBLE_BYTES, MAX_MEMORY_FDS, 0);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ETIMEDOUT') throw new MigrationProtocolError(`reading the preamble failed: ${(e as Error).message}`);
      if (Date.now() >= deadline) throw new MigrationProtocolError(`the source sent no preamble within ${timeoutMs / 1000} s`);
      await new Promise((r) => setTimeout(r, wait));
    }
  }
  const { data, fds } = got;
  const closeAll = () => fds.forEach((fd) => native().closeFd(fd));
  if (data.toString('latin1', 0, 8) !== MAGIC) {
    closeAll();
    throw new MigrationProtocolError('the connection did not start with a migration preamble');
  }
  const announced = data.readUInt32LE(12);
  if (announced !== fds.length) {
    closeAll();
    throw new MigrationProtocolError(`the preamble announces ${announced} fds but ${fds.length} arrived`);
  }
  return { protocol: data.readUInt32LE(8), fds };
}
