// Bundles each CLI into one file under dist/bin/. Node resolving and reading hundreds of small
// module files (rxjs, pino, immer) dominated VMM start-up where file access is slow; one file
// is read once.
const path = require('node:path');
const fs = require('node:fs');
const { spawnSync } = require('node:child_process');
const esbuild = require('esbuild');

const root = path.resolve(__dirname, '..');

/**
 * Shell that sets $cpu to the CPU's feature flags (the first `flags` line of /proc/cpuinfo),
 * with no process started: the launcher runs it on every start, the build to write the stamp.
 */
const CPU_FLAGS_SH = `cpu=
while read -r key rest; do
  if [ "$key" = flags ]; then cpu=$rest; break; fi
done < /proc/cpuinfo`;

const entries = ['tern', 'tern-remote']
  .map((name) => ({ name, file: path.join(root, 'dist', 'src', 'cli', `${name}.js`) }))
  .filter((e) => fs.existsSync(e.file));

// (--startup-snapshot: only this machine's snapshot of the bundles already built)
const snapshotOnly = process.argv.includes('--startup-snapshot');

for (const e of snapshotOnly ? [] : entries) {
  esbuild.buildSync({
    entryPoints: [e.file],
    outfile: path.join(root, 'dist', 'bin', `${e.name}.js`),
    bundle: true,
    platform: 'node',
    target: 'node20',
    minify: true,
    // Logs name an error by its class (pino's err.type): keep class and function names.
    keepNames: true,
    sourcemap: true,
    logLevel: 'warning',
  });
  fs.chmodSync(path.join(root, 'dist', 'bin', `${e.name}.js`), 0o755);
}

// The state checks the build generated (scripts/compile-state-checks.js) are read from beside
// the code that uses them: in the bundles, that is dist/bin.
const checks = path.join(root, 'dist', 'src', 'state', 'state-checks.json');
if (!snapshotOnly && fs.existsSync(checks)) fs.copyFileSync(checks, path.join(root, 'dist', 'bin', 'state-checks.json'));

// tern's V8 startup snapshot: the whole CLI loaded and initialised once, here, so that a VMM
// starts by deserialising a heap instead of compiling and running its modules (start-up is
// what serverless users of a VMM measure). dist/bin/tern, the command on the PATH, starts from
// the snapshot built by the very node binary that runs it on a CPU with the same features, and
// from tern.js where there is none. A snapshot only loads on the kind of CPU it was built on,
// so each kind has its own (tern.<key>.blob): a build shared by machines of two kinds (a host
// and a VM on it, or a fleet on one file system) gets one for the other kind with
// `node scripts/bundle.js --startup-snapshot`, run there; it leaves the bundles as they are.
// Where the build is read-only to the machine (a shared install), TERN_STARTUP_SNAPSHOT_DIR
// names a directory of the machine's own for those snapshots, which the launcher then
// searches first.
const bin = path.join(root, 'dist', 'bin');
const snapshotEntry = path.join(root, 'dist', 'src', 'cli', 'tern-snapshot.js');
if (snapshotOnly) {
  if (!fs.existsSync(path.join(bin, 'tern-snapshot.js'))) {
    process.stderr.write('bundle: --startup-snapshot needs a full build first (npm run build)\n');
    process.exit(1);
  }
  process.exit(buildTernSnapshot() ? 0 : 1);
}
if (fs.existsSync(snapshotEntry)) {
  bundleSnapshotEntry();
  // A new bundle makes every snapshot of the old one stale, whatever CPU it was built for.
  for (const f of fs.readdirSync(bin)) if (/^tern(\..*)?\.blob(\.node)?(\.tmp-\d+)?$/.test(f)) fs.rmSync(path.join(bin, f), { force: true });
  buildTernSnapshot();
  writeLauncher();
}

/** The snapshot's entry: the CLI bundled with a require that defers node:http. */
function bundleSnapshotEntry() {
  const entry = path.join(bin, 'tern-snapshot.js');
  esbuild.buildSync({
    entryPoints: [snapshotEntry],
    outfile: entry,
    bundle: true,
    platform: 'node',
    target: 'node20',
    minify: true,
    keepNames: true,
    logLevel: 'warning',
    // While a snapshot is built, node:http cannot even load (Node 20), nor node:tls be held in
    // it (its OpenSSL bindings are no references a snapshot can keep): the bundle's require of
    // them returns a stand-in that loads the module on first use, after the snapshot started.
    banner: {
      js: `const __ternRequire = ((real) => {
  const later = new Set(['http', 'node:http', 'https', 'node:https', 'tls', 'node:tls']);
  return (id) => {
    if (!later.has(id)) return real(id);
    let m;
    const load = () => (m ??= real(id));
    return new Proxy({}, {
      get: (_, k) => (k === '__esModule' ? undefined : load()[k]),
      has: (_, k) => k in load(),
      ownKeys: () => Reflect.ownKeys(load()),
      getOwnPropertyDescriptor: (_, k) => { const d = Object.getOwnPropertyDescriptor(load(), k); if (d) d.configurable = true; return d; },
    });
  };
})(require);
(function (require, exports) {`,
    },
    footer: { js: '})(__ternRequire, {});' },
  });
}

/** This CPU's flags (the launcher's own reading of /proc/cpuinfo, so the two always agree). */
function cpuFlags() {
  return spawnSync('sh', ['-c', `${CPU_FLAGS_SH}\nprintf '%s' "$cpu"`], { encoding: 'utf8' }).stdout;
}

/**
 * Build the startup snapshot for this node binary and this CPU's features, beside those built
 * for other kinds of CPU; written under temporary names and renamed, so a launcher starting
 * meanwhile sees the old pair or the new one. Returns whether there is one.
 */
function buildTernSnapshot() {
  const entry = path.join(bin, 'tern-snapshot.js');
  const cpu = cpuFlags();
  const key = require('node:crypto').createHash('sha256').update(cpu).digest('hex').slice(0, 16);
  const dir = process.env.TERN_STARTUP_SNAPSHOT_DIR || bin;
  // (a directory of the machine's own is only this user's to write: the launcher runs what is
  // in it, and ignores one that is not)
  if (dir !== bin) fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const blob = path.join(dir, `tern.${key}.blob`);
  const stamp = `${blob}.node`;
  const tmp = (f) => `${f}.tmp-${process.pid}`;
  for (const f of [stamp, blob]) fs.rmSync(f, { force: true });
  const r = spawnSync(process.execPath, ['--snapshot-blob', tmp(blob), '--build-snapshot', entry], {
    cwd: bin,
    encoding: 'utf8',
    // (Node warns that some built-in modules are not verified in snapshots: the tests are. No
    // NODE_OPTIONS: V8 flags in it would be the snapshot's, and node refuses to start from it
    // without them; the launcher uses it only where NODE_OPTIONS is unset.)
    env: { ...process.env, NODE_NO_WARNINGS: '1', NODE_OPTIONS: '' },
  });
  if (r.status !== 0 || !fs.existsSync(tmp(blob))) {
    process.stderr.write(`bundle: no startup snapshot (tern starts from tern.js): ${(r.stderr || r.error?.message || '').trim().split('\n').slice(-3).join(' | ')}\n`);
    fs.rmSync(tmp(blob), { force: true });
    return false;
  }
  // The snapshot holds this directory (where the addon is found from) and this bundle, and
  // only loads into this node binary on a CPU with these features (V8 compiled its code for
  // them, and refuses the snapshot elsewhere): the launcher uses it only where all of these
  // still hold (a snapshot kept outside the build outlives the bundle it was made of). The
  // stamp names the directory and the binary (the launcher compares files, not spellings of
  // their paths); it takes the binary's modification time and the blob the bundle's, to the
  // nanosecond, which the launcher compares with its shell's own test (a binary or a bundle
  // replaced since has another, even one older than the snapshot, as a package's is).
  const node = fs.realpathSync(process.execPath);
  fs.writeFileSync(tmp(stamp), `${fs.realpathSync(bin)}\n${node}\n${cpu}\n`);
  copyModificationTime(node, tmp(stamp));
  copyModificationTime(entry, tmp(blob));
  fs.renameSync(tmp(blob), blob);
  fs.renameSync(tmp(stamp), stamp);
  return true;
}

/** Give `file` the modification time of `like`, to the nanosecond (touch -r; utimes rounds it). */
function copyModificationTime(like, file) {
  if (spawnSync('touch', ['-r', like, file]).status === 0) return;
  const st = fs.statSync(like);
  fs.utimesSync(file, st.atime, st.mtime);
}

function writeLauncher() {
  const launcher = path.join(bin, 'tern');
  fs.writeFileSync(
    launcher,
    `#!/bin/sh
# tern: the VMM, started from a V8 startup snapshot (tern.KEY.blob, in $TERN_STARTUP_SNAPSHOT_DIR
# or beside this script) built of this bundle by the node binary on the PATH on a CPU with the
# same features, and from the plain bundle (tern.js) where there is none. It runs no program but
# node (shell built-ins only; stat where TERN_STARTUP_SNAPSHOT_DIR is set, readlink where the
# launcher is reached through a symbolic link, as a package manager's bin link is): each one
# started costs a VMM's start-up a fork and an exec.
case $0 in */*) bin=\${0%/*} ;; *) bin=. ;; esac
if [ -L "$0" ]; then real=$(readlink -f "$0") && bin=\${real%/*}; fi
# One malloc arena for all of the VMM's threads unless the user says otherwise: glibc gives
# threads arenas of their own, and the VMM's few threads (V8's, libuv's, vCPUs, queues) each
# kept one mostly empty. (README, Memory per idle VM: what it saves, what it costs.)
MALLOC_ARENA_MAX=\${MALLOC_ARENA_MAX:-1}
export MALLOC_ARENA_MAX
node=
ifs=$IFS
IFS=:
set -f
for dir in $PATH; do
  if [ -f "\${dir:-.}/node" ] && [ -x "\${dir:-.}/node" ]; then node=\${dir:-.}/node; break; fi
done
set +f
IFS=$ifs
[ -n "$node" ] || { echo "tern: node is not on the PATH" >&2; exit 127; }
# A snapshot directory of the machine's own counts only if this user owns it and nobody else
# may write to it: what is in it runs as this user.
own=
if [ -n "$TERN_STARTUP_SNAPSHOT_DIR" ] && [ -d "$TERN_STARTUP_SNAPSHOT_DIR" ] && [ -O "$TERN_STARTUP_SNAPSHOT_DIR" ]; then
  case $(stat -c %a "$TERN_STARTUP_SNAPSHOT_DIR") in
    *[2367]? | *[2367]) ;;
    *) own=$TERN_STARTUP_SNAPSHOT_DIR ;;
  esac
fi
# (the same modification time, to the nanosecond)
same_time() { [ -e "$1" ] && [ -e "$2" ] && ! [ "$1" -nt "$2" ] && ! [ "$2" -nt "$1" ]; }
flags_read=
# Node refuses a snapshot built with other V8 flags than it runs with, and exits: with
# NODE_OPTIONS set (it may hold V8 flags, --max-old-space-size say) the plain bundle starts.
# (The snapshot is built with no NODE_OPTIONS.)
if [ -z "$NODE_OPTIONS" ]; then
  for stamp in \${own:+"$own"/tern.*.blob.node} "$bin"/tern.*.blob.node; do
    [ -r "$stamp" ] && [ -r "\${stamp%.node}" ] || continue
    if [ -z "$flags_read" ]; then
${CPU_FLAGS_SH.replace(/^/gm, '      ')}
      flags_read=1
    fi
    { read -r built_bin; read -r built_node; read -r built_cpu; } < "$stamp"
    # (-ef: the same file, however its path is spelled; the stamp has the time of the node binary
    # that built the snapshot, the blob the time of the bundle it was made of)
    if [ "$built_cpu" = "$cpu" ] && [ "$built_bin" -ef "$bin" ] && [ "$built_node" -ef "$node" ] &&
      same_time "$node" "$stamp" && same_time "$bin/tern-snapshot.js" "\${stamp%.node}"; then
      exec "$node" --snapshot-blob "\${stamp%.node}" "$bin/tern.js" "$@"
    fi
  done
fi
exec "$node" "$bin/tern.js" "$@"
`,
    { mode: 0o755 },
  );
  fs.chmodSync(launcher, 0o755);
}
