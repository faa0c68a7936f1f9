// Live migration over TCP with TLS (Cloud Hypervisor's tls_dir): mutual authentication with a
// CA, each side's certificate checked by the other. The certificates are made here with the
// openssl command line; the tiny kernel counts on the serial port through every test.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import type { GuestMemory } from '../../src/memory/guest-memory';
import { MigrationEvents } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { capturingLogger, waitUntil } from './harness';
import { TINY_KERNEL_MAGIC, TinyKernelStatus, tinyVmConfig } from './tiny-kernel';

const until = (what: string, cond: () => boolean, ms = 30_000): Promise<void> => waitUntil(what, cond, ms);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-migration-tls-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

let nextPort = 21000 + (process.pid % 20000);

const openssl = (...args: string[]): void => void execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });

/** A CA: its key and self-signed certificate in `dir`. */
function makeCa(name: string): string {
  const dir = path.join(tmp, `ca-${name}`);
  fs.mkdirSync(dir);
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj', `/CN=${name} CA`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign',
    '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'));
  return dir;
}

/** A certificate the CA in `ca` signed, for `san` (e.g. IP:127.0.0.1), as `out`-cert.pem and `out`-key.pem in `dir`. */
function issue(ca: string, dir: string, out: 'server' | 'client', san: string): void {
  fs.mkdirSync(dir, { recursive: true });
  const key = path.join(dir, `${out}-key.pem`);
  const csr = path.join(dir, `${out}.csr`);
  const ext = path.join(dir, `${out}.ext`);
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', `/CN=${out}`, '-keyout', key, '-out', csr);
  fs.writeFileSync(ext, `subjectAltName=${san}\nextendedKeyUsage=serverAuth,clientAuth\n`);
  openssl('x509', '-req', '-in', csr, '-CA', path.join(ca, 'cert.pem'), '-CAkey', path.join(ca, 'key.pem'), '-CAcreateserial', '-days', '2', '-extfile', ext, '-out', path.join(dir, `${out}-cert.pem`));
  fs.chmodSync(key, 0o600);
}

/** A tls_dir for one side: `trust`'s certificate as ca-cert.pem, and this side's own, signed by `signer`. */
function tlsDir(name: string, side: 'server' | 'client', trust: string, signer: string, san = 'IP:127.0.0.1,DNS:localhost'): string {
  const dir = path.join(tmp, name);
  issue(signer, dir, side, san);
  fs.copyFileSync(path.join(trust, 'cert.pem'), path.join(dir, 'ca-cert.pem'));
  return dir;
}

const caA = makeCa('A');
const caB = makeCa('B');

async function bootCounting(name: string): Promise<Vmm> {
  const cfg = await tinyVmConfig(`tls ${name}`, path.join(tmp, `${name}.serial`));
  const vmm = new Vmm({ log: silentLogger() });
  await vmm.create(cfg);
  await vmm.boot();
  await until('the guest has initialised', () => vmm.guestMemory()!.readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC);
  return vmm;
}

const guestCount = (vmm: Vmm): number => vmm.guestMemory()?.readU32(TinyKernelStatus.COUNT) ?? -1;

async function countsOn(t: { true: (v: boolean, m?: string) => void }, vmm: Vmm, where: string): Promise<void> {
  const c = guestCount(vmm);
  await until(`the guest counts on ${where}`, () => guestCount(vmm) >= c + 2);
  t.true(vmm.state.vm.status === 'Running', `running ${where}`);
}

/** A destination listening with `tls_dir` (or none); resolves once it listens, with its receive's outcome to come. */
async function listening(dst: Vmm, url: string, tls_dir?: string): Promise<{ outcome: Promise<string> }> {
  const ready = new Promise<void>((r) => {
    const sub = dst.store.events$.subscribe((e) => e.type === MigrationEvents.ReceiveReady && (sub.unsubscribe(), r()));
  });
  const outcome = dst.receiveMigration({ receiver_url: url, ...(tls_dir && { tls_dir }) }).then(
    () => 'received',
    (e: Error) => `failed: ${e.message}`,
  );
  await Promise.race([ready, outcome]);
  // (wrapped: an async function's returned promise would be waited for, not handed over)
  return { outcome };
}

/** The source's migration's end: 'finished', or the failure's reason. */
function migrationEnd(src: Vmm): Promise<string> {
  return new Promise((resolve) => {
    const sub = src.store.events$.subscribe((e) => {
      if (e.type === MigrationEvents.Finished) resolve('finished');
      else if (e.type === MigrationEvents.Failed) resolve(`failed: ${JSON.stringify(e.payload)}`);
      else return;
      sub.unsubscribe();
    });
  });
}

/** Ask `src` to migrate: how it ended ('finished' or the failure), or why the request was refused. */
function attempt(src: Vmm, opts: { destination_url: string; tls_dir?: string }): Promise<string> {
  return src.sendMigration({ ...opts, timeout_s: 20 }).then(() => migrationEnd(src), (e: Error) => `refused: ${e.message}`);
}

test.serial('with tls_dir on both sides the guest migrates over TCP, two connections each with TLS, and counts on; a plain source is refused by a TLS destination', async (t) => {
  const src = await bootCounting('ok');
  const dstLog = capturingLogger('debug');
  const dst = new Vmm({ log: dstLog.log });
  try {
    const serverDir = tlsDir('ok-dst', 'server', caA, caA);
    const clientDir = tlsDir('ok-src', 'client', caA, caA);
    // A source without TLS gets nowhere: the destination wants a handshake first.
    let url = `tcp:127.0.0.1:${nextPort++}`;
    let { outcome } = await listening(dst, url, serverDir);
    const plain = attempt(src, { destination_url: url });
    t.regex(await outcome, /^failed: TLS with the source failed/);
    t.regex(await plain, /^(refused|failed)/);
    await countsOn(t, src, 'at the source after the plain attempt');

    url = `tcp:127.0.0.1:${nextPort++}`;
    ({ outcome } = await listening(dst, url, serverDir));
    const end = migrationEnd(src);
    // (random pages above the tiny kernel's 8 MiB: frames for the second connection to carry)
    (src.guestMemory() as GuestMemory).write(16 << 20, crypto.randomBytes(32 << 20));
    await src.sendMigration({ destination_url: url, tls_dir: clientDir, connections: 2 });
    t.is(await outcome, 'received');
    t.is(await end, 'finished');
    const second = dstLog.lines.find((l) => l.msg === 'migration: a memory connection ended') as unknown as { frames: number } | undefined;
    t.true((second?.frames ?? 0) > 0, 'the second connection, with its own TLS, carried Memory frames');
    await until('the source has let the VM go', () => src.state.vm.status === 'Shutdown');
    await countsOn(t, dst, 'at the destination');
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});

test.serial('a source whose certificate another CA signed is refused, and a destination whose certificate names another host: the guest runs on at the source', async (t) => {
  const src = await bootCounting('refused');
  const dst = new Vmm({ log: silentLogger() });
  try {
    const serverDir = tlsDir('ref-dst', 'server', caA, caA);
    // signed by B: the destination trusts only A
    const strangerDir = tlsDir('ref-src-b', 'client', caA, caB);
    let url = `tcp:127.0.0.1:${nextPort++}`;
    let { outcome } = await listening(dst, url, serverDir);
    const stranger = attempt(src, { destination_url: url, tls_dir: strangerDir });
    t.regex(await outcome, /^failed: TLS with the source failed: its certificate is not accepted \(UNABLE_TO_/);
    t.regex(await stranger, /^(refused|failed)/);
    await countsOn(t, src, 'at the source after a stranger tried');

    // The destination's certificate is A's, but for another name than 127.0.0.1.
    const elsewhereDir = tlsDir('ref-dst-other', 'server', caA, caA, 'DNS:migrate.example.org');
    const clientDir = tlsDir('ref-src', 'client', caA, caA);
    url = `tcp:127.0.0.1:${nextPort++}`;
    ({ outcome } = await listening(dst, url, elsewhereDir));
    const misnamed = await attempt(src, { destination_url: url, tls_dir: clientDir });
    t.regex(misnamed, /TLS with the destination failed: .*(127\.0\.0\.1|IP)/);
    t.regex(await outcome, /^failed/);
    await countsOn(t, src, 'at the source after the misnamed destination');
    t.is(src.state.vm.status, 'Running');
    t.is(dst.state.vm.status, 'NotCreated', 'nothing was built at the destination');
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});

test.serial('a receive waiting for a source\'s TLS handshake ends at once when cancelled, and can receive again', async (t) => {
  const dst = new Vmm({ log: silentLogger() });
  try {
    const serverDir = tlsDir('cancel-dst', 'server', caA, caA);
    const port = nextPort++;
    const { outcome } = await listening(dst, `tcp:127.0.0.1:${port}`, serverDir);
    // a client that connects and says nothing
    const silent = net.connect({ host: '127.0.0.1', port });
    await new Promise((r) => silent.once('connect', r));
    // (time for the destination to accept it and start waiting for the handshake)
    await new Promise((r) => setTimeout(r, 300));
    const started = Date.now();
    dst.cancelMigration();
    t.regex(await outcome, /^failed: cancelled/);
    t.true(Date.now() - started < 2000, `ended ${Date.now() - started} ms after the cancel, not at the handshake's timeout`);
    silent.destroy();
    const again = await listening(dst, `tcp:127.0.0.1:${nextPort++}`, serverDir);
    dst.cancelMigration();
    t.regex(await again.outcome, /^failed: cancelled/);
  } finally {
    await dst.shutdownVmm();
  }
});

test.serial('a tls_dir the side cannot use fails the request at once, naming the file and never its contents', async (t) => {
  const src = await bootCounting('baddir');
  const dst = new Vmm({ log: silentLogger() });
  try {
    const url = `tcp:127.0.0.1:${nextPort++}`;
    const clientDir = tlsDir('bad-src', 'client', caA, caA);
    const refuse = (dir: string) => src.sendMigration({ destination_url: url, tls_dir: dir }).then(() => 'started', (e: Error) => e.message);
    // a missing key
    const noKey = path.join(tmp, 'bad-nokey');
    fs.mkdirSync(noKey);
    for (const f of ['ca-cert.pem', 'client-cert.pem']) fs.copyFileSync(path.join(clientDir, f), path.join(noKey, f));
    t.regex(await refuse(noKey), /client-key\.pem: missing/);
    // a key through a symlink
    const linked = path.join(tmp, 'bad-link');
    fs.mkdirSync(linked);
    for (const f of ['ca-cert.pem', 'client-cert.pem']) fs.copyFileSync(path.join(clientDir, f), path.join(linked, f));
    fs.symlinkSync(path.join(clientDir, 'client-key.pem'), path.join(linked, 'client-key.pem'));
    t.regex(await refuse(linked), /client-key\.pem: is a symbolic link/);
    // a key that is not the certificate's, and a "certificate" that is a secret
    const mismatched = path.join(tmp, 'bad-mismatch');
    fs.mkdirSync(mismatched);
    fs.copyFileSync(path.join(clientDir, 'ca-cert.pem'), path.join(mismatched, 'ca-cert.pem'));
    fs.copyFileSync(path.join(clientDir, 'client-cert.pem'), path.join(mismatched, 'client-cert.pem'));
    fs.copyFileSync(path.join(caA, 'key.pem'), path.join(mismatched, 'client-key.pem'));
    t.regex(await refuse(mismatched), /not a usable set/);
    fs.writeFileSync(path.join(mismatched, 'client-cert.pem'), 'SECRET-TOKEN-1234\n');
    const garbage = await refuse(mismatched);
    t.regex(garbage, /not a usable set/);
    t.false(garbage.includes('SECRET-TOKEN'), 'the error does not echo the file');
    t.regex(await refuse(path.join(clientDir, 'ca-cert.pem')), /is not a directory/);
    // The receiving side checks its directory before it listens.
    const events: string[] = [];
    const sub = dst.store.events$.subscribe((e) => events.push(e.type));
    const failed = await dst.receiveMigration({ receiver_url: url, tls_dir: clientDir }).then(() => 'received', (e: Error) => e.message);
    t.regex(failed, /server-cert\.pem: missing/);
    sub.unsubscribe();
    t.deepEqual(events, [], 'a request that fails its own checks reports no migration');
    // and the destination can receive afterwards
    const serverDir = tlsDir('bad-dst', 'server', caA, caA);
    const { outcome } = await listening(dst, url, serverDir);
    await src.sendMigration({ destination_url: url, tls_dir: clientDir });
    t.is(await outcome, 'received');
    await countsOn(t, dst, 'at the destination');
  } finally {
    await src.shutdownVmm();
    await dst.shutdownVmm();
  }
});
