// The host files a restore acts on, without KVM: a snapshot's serial file destination is opened
// only as a regular file (no symlink, no FIFO, created 0600), payload-style reads are capped,
// and the restoring client chooses the consoles' host ends through the API and the CLI.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ApiError } from '../../src/api/errors';
import { VmmApi } from '../../src/api/vmm-api';
import { parseTernArgs } from '../../src/cli/tern-args';
import { silentLogger } from '../../src/util/log';
import { readRegularFile } from '../../src/util/host-file';
import { openConsoleSink } from '../../src/vmm/console-sink';
import { Vmm } from '../../src/vmm/vmm';
import { tempDir } from './snapshot-fixture';

const dir = tempDir('tern-hostfile-');

test('a serial file named through a symlink is refused and the symlink target is untouched', (t) => {
  const target = path.join(dir, 'cron-job');
  fs.writeFileSync(target, 'original\n');
  const link = path.join(dir, 'serial-link');
  fs.symlinkSync(target, link);
  t.throws(() => openConsoleSink({ mode: 'File', file: link }), { message: /serial file .*serial-link: is a symbolic link/ });
  t.is(fs.readFileSync(target, 'utf8'), 'original\n');
});

test('a serial file that is a FIFO or a device is refused without blocking', (t) => {
  const fifo = path.join(dir, 'serial-fifo');
  if (spawnSync('mkfifo', [fifo]).status !== 0) return t.pass('mkfifo unavailable');
  t.throws(() => openConsoleSink({ mode: 'File', file: fifo }), { message: /serial-fifo: is not a regular file/ });
  t.throws(() => openConsoleSink({ mode: 'File', file: '/dev/null' }), { message: /\/dev\/null: is not a regular file/ });
});

test('a new serial file is created 0600 and appended to', (t) => {
  const file = path.join(dir, 'serial.log');
  const old = process.umask(0o022);
  try {
    const sink = openConsoleSink({ mode: 'File', file });
    sink.write([0x68, 0x69]);
    sink.close();
  } finally {
    process.umask(old);
  }
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  t.is(fs.readFileSync(file, 'utf8'), 'hi');
});

test('host files are read only up to their cap, and never through a symlink', (t) => {
  const file = path.join(dir, 'kernel');
  fs.writeFileSync(file, Buffer.alloc(5000, 1));
  t.is(readRegularFile(file, 5000).length, 5000);
  t.throws(() => readRegularFile(file, 4999), { message: /kernel: is 5000 bytes, more than the 4999 allowed/ });
  const link = path.join(dir, 'kernel-link');
  fs.symlinkSync('/etc/hostname', link);
  t.throws(() => readRegularFile(link, 1 << 20), { message: /kernel-link: is a symbolic link/ });
});

test('vm.restore takes the consoles host ends from the client, checked like vm.create', async (t) => {
  const api = new VmmApi(new Vmm({ log: silentLogger() }));
  const bad = await t.throwsAsync(api.restore({ source_url: `file://${dir}/none`, serial: { mode: 'File', file: 7 } }));
  t.is((bad as ApiError).status, 400);
  t.regex((bad as ApiError).chain.join(' '), /serial must be a SerialConfig/);
  const badConsole = await t.throwsAsync(api.restore({ source_url: `file://${dir}/none`, console: { mode: 'Telepathy' } }));
  t.is((badConsole as ApiError).status, 400);
  // A well-formed override reaches the restore, which then fails on the missing snapshot.
  const missing = await t.throwsAsync(api.restore({ source_url: `file://${dir}/none`, serial: { mode: 'File', file: path.join(dir, 'x.log') } }));
  t.is((missing as ApiError).status, 500);
  t.regex((missing as ApiError).chain.join(' '), /no such directory/);
});

test('tern --restore accepts --serial and --console as the host ends of the restored VM', (t) => {
  const a = parseTernArgs(['--restore', 'source_url=file:///snap', '--serial', 'file=/var/log/s.log', '--console', 'off']);
  t.deepEqual(a.restore, { source_url: 'file:///snap', serial: { mode: 'File', file: '/var/log/s.log' }, console: { mode: 'Off' } });
  t.is(a.vm, null);
});
