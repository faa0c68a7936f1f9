// `node dist/test/lab/run-in-lab.js 'SCRIPT'`: run a shell script in the lab (or directly on a
// vmx/svm host) from the repository root, streaming its output; exits with its status.
import path from 'node:path';
import { runInLab } from './lab';

const script = process.argv.slice(2).join(' ');
if (!script) {
  process.stderr.write('usage: run-in-lab.js SCRIPT\n');
  process.exit(2);
}
runInLab({
  script,
  timeoutMs: Number(process.env.TERN_LAB_TIMEOUT_MS ?? 30 * 60_000),
  // TERN_LAB_MEM_MIB: more lab RAM for jobs whose guests need it (the default is lab.ts's).
  memMiB: process.env.TERN_LAB_MEM_MIB ? Number(process.env.TERN_LAB_MEM_MIB) : undefined,
  cwd: path.resolve(__dirname, '..', '..', '..'),
  env: { TERN_FIXTURES: process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures' },
  onOutput: (c) => process.stdout.write(c),
}).then(
  (r) => process.exit(r.exitCode),
  (e) => {
    process.stderr.write(`run-in-lab: ${(e as Error).message}\n`);
    process.exit(1);
  },
);
