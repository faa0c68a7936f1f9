// Generates the checks of every schema a saved state is checked against (each slice, each
// device model, each PCI function and virtio device) into dist/src/state/state-checks.json,
// after tsc and before the bundles (scripts/bundle.js puts a copy beside them). A restore or a
// migration's destination then checks its first state without generating them: that was the
// larger part of its first check (in the nested lab, a third of a second on every destination).
// A schema missing here is compiled on first use, as before, so a stale table costs time, never
// a wrong answer.
const fs = require('node:fs');
const path = require('node:path');
const { TypeCompiler } = require('@sinclair/typebox/compiler');

const root = path.resolve(__dirname, '..');
const built = (p) => path.join(root, 'dist', 'src', p);
const { schemaFingerprint } = require(built('state/state-schema.js'));
const { COMPILED_CHECKS_FILE } = require(built('state/compiled-checks.js'));
const { rootSlices } = require(built('state/root.js'));
const { deviceModels } = require(built('devices/index.js'));
const { pciFunctionModels } = require(built('devices/pci/segment.js'));

const schemas = [
  ...Object.values(rootSlices).map((s) => s.schema),
  ...Object.values(deviceModels).map((m) => m.stateSchema),
  ...Object.values(pciFunctionModels).flatMap((m) => [m.stateSchema, m.type?.deviceSchema]),
].filter(Boolean);

const table = {};
for (const schema of schemas) {
  const code = TypeCompiler.Code(schema, [], { language: 'javascript' });
  // (state-schema.ts binds only `format`: a check calling a custom kind or a hash is left to it)
  if (/\b(kind|hash)\(/.test(code)) continue;
  table[schemaFingerprint(schema)] = code;
}
fs.writeFileSync(built(`state/${COMPILED_CHECKS_FILE}`), JSON.stringify(table));
process.stdout.write(`compile-state-checks: ${Object.keys(table).length} of ${schemas.length} schemas\n`);
