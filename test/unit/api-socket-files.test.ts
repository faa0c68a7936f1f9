// The API socket's files sit where the user said, often in a directory others can write to. A
// planted symlink (or hard link, or FIFO) at the lock or socket path must not make the VMM,
// often root, create, lock or change the mode of another file: it refuses with a clear error
// and the target is untouched.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import { ApiServer } from '../../src/api/server';
import { VmmApi } from '../../src/api/vmm-api';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { GuestProcess } from '../linux/guest-process';
import { tempDir } from './api-harness';

const dir = tempDir('tern-api-files-');

function listen(socket: string): Promise<ApiServer> {
  return ApiServer.listen({ path: socket }, { api: new VmmApi(new Vmm({ log: silentLogger() })), log: silentLogger() });
}

/** A file some other owner cares about, and how to see it was not touched. */
function precious(name: string): { file: string; untouched(): boolean } {
  const file = path.join(dir, name);
  fs.writeFileSync(file, 'precious', { mode: 0o644 });
  const before = fs.statSync(file);
  return {
    file,
    untouched: () => {
      const st = fs.statSync(file);
      return fs.readFileSync(file, 'utf8') === 'precious' && (st.mode & 0o777) === 0o644 && st.mtimeMs === before.mtimeMs;
    },
  };
}

test('a symlink planted at the lock path is refused; its target is neither created nor changed', async (t) => {
  const target = precious('lock-target');
  const socket = path.join(dir, 'a.sock');
  fs.symlinkSync(target.file, `${socket}.lock`);
  await t.throwsAsync(listen(socket), { message: /a\.sock\.lock: the API socket lock is a symbolic link; refusing to follow it/ });
  t.true(target.untouched());
  t.false(fs.existsSync(socket), 'no socket was created');

  const nowhere = path.join(dir, 'would-be-created');
  const socket2 = path.join(dir, 'b.sock');
  fs.symlinkSync(nowhere, `${socket2}.lock`);
  await t.throwsAsync(listen(socket2), { message: /symbolic link/ });
  t.false(fs.existsSync(nowhere), 'a dangling link does not create its target');
});

test('a hard link or a FIFO planted at the lock path is refused at once', async (t) => {
  const target = precious('hardlink-target');
  const socket = path.join(dir, 'c.sock');
  fs.linkSync(target.file, `${socket}.lock`);
  await t.throwsAsync(listen(socket), { message: /c\.sock\.lock: the API socket lock has 2 hard links/ });
  t.true(target.untouched());

  const socket2 = path.join(dir, 'd.sock');
  execFileSync('mkfifo', [`${socket2}.lock`]);
  const started = Date.now();
  await t.throwsAsync(listen(socket2), { message: /d\.sock\.lock: the API socket lock cannot be opened \(ENXIO\)/ });
  t.true(Date.now() - started < 2000, 'no wait for a reader');
});

test('a symlink planted at the socket path is refused and left as it is; a good socket is 0600 whatever the umask', async (t) => {
  const target = precious('socket-target');
  const socket = path.join(dir, 'e.sock');
  fs.symlinkSync(target.file, socket);
  await t.throwsAsync(listen(socket), { message: /exists and is not a socket/ });
  t.true(fs.lstatSync(socket).isSymbolicLink());
  t.true(target.untouched());

  const mask = process.umask(0);
  try {
    const good = path.join(dir, 'f.sock');
    const server = await listen(good);
    t.is(fs.lstatSync(good).mode & 0o777, 0o600);
    t.is(fs.lstatSync(`${good}.lock`).mode & 0o777, 0o600);
    await server.close();
  } finally {
    process.umask(mask);
  }
});

test('tern refuses a planted lock link with a one-line error naming it, exit 1', async (t) => {
  const target = precious('cli-target');
  const socket = path.join(dir, 'g.sock');
  fs.symlinkSync(target.file, `${socket}.lock`);
  const vmm = GuestProcess.tern(['--api-socket', `path=${socket}`]);
  const { code } = await vmm.exit(20_000);
  t.is(code, 1);
  t.regex(vmm.stderr, /tern: error: --api-socket: .*g\.sock\.lock: the API socket lock is a symbolic link; refusing to follow it\n/);
  t.true(target.untouched());
});
