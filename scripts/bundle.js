// Bundles each CLI into one file under dist/bin/. Node resolving and reading hundreds of small
// module files (rxjs, pino, immer) dominated VMM start-up where file access is slow; one file
// is read once.
const path = require('node:path');
const fs = require('node:fs');
const esbuild = require('esbuild');

const root = path.resolve(__dirname, '..');
const entries = ['tern', 'tern-remote']
  .map((name) => ({ name, file: path.join(root, 'dist', 'src', 'cli', `${name}.js`) }))
  .filter((e) => fs.existsSync(e.file));

for (const e of entries) {
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
