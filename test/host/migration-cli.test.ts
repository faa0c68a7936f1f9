// Live migration through the real CLIs, as an operator runs it: a `tern` started with only
// --api-socket receives (`tern-remote receive-migration`), the source is told to send
// (`tern-remote send-migration`, ch-remote's syntax), the guest's COUNT lines continue on the
// destination's console, the source VMM exits 0, and its event monitor tells the story.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import { runTernRemote, waitForPath } from '../support/processes';
import { tempDir } from '../unit/api-harness';
import { countsIn, startTern, startTinyVm } from './tiny-kernel';

const T = 40_000;
const dir = tempDir('tern-migration-cli-');
let nextPort = 30000 + (process.pid % 20000);

async function migrate(
  t: import('ava').ExecutionContext,
  name: string,
  opts: { url: string; sendArgs: string; receiveArgs?: string; memory?: string; launcher?: boolean },
): Promise<void> {
  const srcSock = path.join(dir, `${name}-src.sock`);
  const dstSock = path.join(dir, `${name}-dst.sock`);
  const monitor = path.join(dir, `${name}-events.json`);
  const src = await startTinyVm(['--api-socket', `path=${srcSock}`, '--event-monitor', `path=${monitor}`, ...(opts.memory ? ['--memory', opts.memory] : [])], { launcher: opts.launcher });
  const dst = await startTern(['--api-socket', `path=${dstSock}`], { launcher: opts.launcher });
  try {
    await src.waitFor(/^COUNT 3\n/m, T);
    await waitForPath(srcSock);
    await waitForPath(dstSock);
    const received = runTernRemote(dstSock, ['receive-migration', `receiver_url=${opts.url}${opts.receiveArgs ?? ''}`]);
    // The destination listens once it reports so in its progress.
    for (let i = 0; i < 200; i++) {
      const p = await runTernRemote(dstSock, ['migration-progress']);
      if (p.code === 0 && /listening/.test(p.stdout)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const sent = await runTernRemote(srcSock, ['send-migration', opts.sendArgs]);
    t.is(sent.code, 0, sent.stderr);
    const r = await received;
    t.is(r.code, 0, r.stderr);
    const exit = await src.exited;
    t.deepEqual(exit, { code: 0, signal: null }, 'the source VMM exits once the VM runs at the destination');
    const last = Math.max(...countsIn(src.output));
    await dst.waitFor(new RegExp(`^COUNT ${last + 3}\\n`, 'm'), T);
    // The console's lines go on without a gap: the first whole line at the destination follows
    // the source's last (the pause may have cut one line in two).
    const after = countsIn(dst.output);
    t.true(after[0] === last + 1 || after[0] === last + 2, `source ended at COUNT ${last}, destination went on at ${after[0]}`);
    const broken = after.findIndex((c, i) => i > 0 && c !== after[i - 1] + 1);
    if (broken > 0) {
      // What a broken sequence looked like, for the run's log: the consoles and each VMM's log.
      await new Promise((r) => setTimeout(r, 2000));
      t.log(`source console (tail):\n${src.output.slice(-600)}\nsource log (tail):\n${src.stderr.slice(-3000)}`);
      t.log(`destination console:\n${dst.output.slice(-2500)}\ndestination log (tail):\n${dst.stderr.slice(-4000)}`);
    }
    t.is(broken, -1, `the destination's COUNT lines go up by one: ${after.join(' ')}`);
    const events = fs.readFileSync(monitor, 'utf8');
    for (const e of ['migration-started', 'migration-finished']) t.true(events.includes(`"event": "${e}"`), e);
    // A local migration hands RAM over: it has no memory rounds.
    t.is(events.includes('"event": "migration-memory-iteration"'), !opts.sendArgs.includes('local=on'));
    const info = JSON.parse((await runTernRemote(dstSock, ['info'])).stdout);
    t.is(info.state, 'Running');
  } finally {
    src.kill();
    dst.kill();
    await Promise.all([src.exited, dst.exited]);
  }
}

test.serial('tern-remote send-migration over TCP to a tern started with only --api-socket', async (t) => {
  const port = nextPort++;
  await migrate(t, 'tcp', { url: `tcp:127.0.0.1:${port}`, sendArgs: `destination_url=tcp:127.0.0.1:${port}` });
});

test.serial('tern-remote send-migration local=on over a UNIX socket with memory shared=on', async (t) => {
  const url = `unix:${path.join(dir, 'local-mig.sock')}`;
  await migrate(t, 'local', { url, sendArgs: `destination_url=${url},local=on`, memory: 'size=64M,shared=on' });
});

test.serial('tern-remote send-migration over TCP with tls_dir on both sides, both VMMs started as users start them (from the startup snapshot)', async (t) => {
  // One CA, and a certificate for 127.0.0.1 that serves as both server and client here.
  const tls = path.join(dir, 'tls');
  fs.mkdirSync(tls);
  const openssl = (...args: string[]) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl('req', '-x509', ...ec, '-days', '2', '-subj', '/CN=test CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign', '-keyout', path.join(tls, 'ca-key.pem'), '-out', path.join(tls, 'ca-cert.pem'));
  openssl('req', ...ec, '-subj', '/CN=host', '-keyout', path.join(tls, 'server-key.pem'), '-out', path.join(tls, 'host.csr'));
  fs.writeFileSync(path.join(tls, 'host.ext'), 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n');
  openssl('x509', '-req', '-in', path.join(tls, 'host.csr'), '-CA', path.join(tls, 'ca-cert.pem'), '-CAkey', path.join(tls, 'ca-key.pem'), '-CAcreateserial', '-days', '2', '-extfile', path.join(tls, 'host.ext'), '-out', path.join(tls, 'server-cert.pem'));
  fs.copyFileSync(path.join(tls, 'server-cert.pem'), path.join(tls, 'client-cert.pem'));
  fs.copyFileSync(path.join(tls, 'server-key.pem'), path.join(tls, 'client-key.pem'));
  const port = nextPort++;
  await migrate(t, 'tls', {
    url: `tcp:127.0.0.1:${port}`,
    receiveArgs: `,tls_dir=${tls}`,
    sendArgs: `destination_url=tcp:127.0.0.1:${port},tls_dir=${tls}`,
    launcher: true,
  });
});
