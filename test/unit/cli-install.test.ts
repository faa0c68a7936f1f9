// The CLIs as installed: `tern` and `tern-remote` on the PATH after scripts/setup.sh, and the
// bundled `tern` logging errors under their real class names (pino's err.type).
import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const REPO = path.resolve(__dirname, '..', '..', '..');

test('the bundled tern logs an error under its class name, not a minified one', (t) => {
  const missing = path.join(os.tmpdir(), `tern-no-such-snapshot-${process.pid}`);
  const r = spawnSync(process.execPath, [path.join(REPO, 'dist', 'bin', 'tern.js'), '--restore', `source_url=file://${missing}`], { encoding: 'utf8' });
  t.is(r.status, 1, r.stderr);
  const logged = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { err?: { type?: string } });
  const types = logged.map((l) => l.err?.type).filter(Boolean);
  t.deepEqual(types, ['SnapshotError'], r.stderr);
});

test('scripts/setup.sh puts tern and tern-remote on the PATH, pointing at this build', (t) => {
  // The same lines setup.sh runs, against a scratch prefix instead of npm's global one.
  const setup = fs.readFileSync(path.join(REPO, 'scripts', 'setup.sh'), 'utf8');
  const block = setup.slice(setup.indexOf('bindir='));
  t.true(block.startsWith('bindir='), 'setup.sh links the CLIs into a bin directory');
  const prefix = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-prefix-'));
  try {
    const script = block.replace(/^bindir=.*$/m, `bindir=${prefix}/bin`);
    const r = spawnSync('bash', ['-euo', 'pipefail', '-c', script], { cwd: REPO, encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    const env = { ...process.env, PATH: `${prefix}/bin:${path.dirname(process.execPath)}:/usr/bin:/bin` };
    const version = spawnSync('tern', ['--version'], { env, encoding: 'utf8' });
    t.is(version.status, 0, version.stderr);
    t.regex(version.stdout, /\d+\.\d+\.\d+/);
    const help = spawnSync('tern-remote', ['--help'], { env, encoding: 'utf8' });
    t.is(help.status, 0, help.stderr);
    t.regex(help.stdout + help.stderr, /ping/);
  } finally {
    fs.rmSync(prefix, { recursive: true, force: true });
  }
});
