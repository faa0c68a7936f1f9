// `npm test`: every test, each where this machine can run it.
//
//   tier    what it needs        where it runs
//   unit    nothing              here, always
//   kvm     a working /dev/kvm   here if /dev/kvm works, else in the nested lab
//   linux   vmx/svm (boots Linux) here if the CPU has vmx/svm, else in the nested lab
//
// Everything that goes to the lab runs in ONE lab boot (lab-session.ts). The summary says
// which tier ran where and how many tests passed, failed and were skipped; a tier that could
// not run counts as failed. The last line is "total: N passed, N failed, N skipped".
//
// `node dist/test/runner/run-tests.js [tier...]` runs only the named tiers. TERN_TEST_KVM forces
// the machine kind (machine-kind.ts), e.g. TERN_TEST_KVM=none to send KVM tests to the lab.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fixturesDir } from '../lab/fixtures';
import { MachineKind, probeMachine } from './machine-kind';
import { FileResult, TestFile, runInLabSession } from './lab-session';
import { Counts, addCounts, countTap, countsLine, failedTests, settleRetry, zeroCounts } from './tap-counts';

const REPO = path.resolve(__dirname, '..', '..', '..');
const AVA = path.join(REPO, 'node_modules', 'ava', 'entrypoints', 'cli.mjs');

type TierName = 'unit' | 'kvm' | 'linux';
type Place = 'host' | 'lab';

interface Tier {
  name: TierName;
  dir: string;
  what: string;
  /** ava options for this tier's files. */
  ava: string[];
}

const TIERS: Tier[] = [
  { name: 'unit', dir: 'dist/test/unit', what: 'needs no KVM', ava: [] },
  { name: 'kvm', dir: 'dist/test/host', what: 'tiny guests and the real CLI on /dev/kvm', ava: [] },
  { name: 'linux', dir: 'dist/test/linux', what: 'Debian kernels under tern and QEMU', ava: ['--serial', '--timeout=15m'] },
];

function placeOf(tier: TierName, machine: MachineKind): Place {
  if (tier === 'unit') return 'host';
  if (tier === 'kvm') return machine.kvm === 'none' ? 'lab' : 'host';
  return machine.kvm === 'hardware' ? 'host' : 'lab';
}

function testFiles(dir: string): string[] {
  const abs = path.join(REPO, dir);
  if (!fs.existsSync(abs)) return [];
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.test.js')) out.push(path.relative(REPO, p));
    }
  };
  walk(abs);
  return out;
}

interface TierResult {
  tier: Tier;
  place: Place;
  counts: Counts;
  failures: string[];
  /** tests that failed and then passed when run once more (lab tiers that retry) */
  flaky?: string[];
  durationMs: number;
  note?: string;
}

const print = (s: string) => process.stdout.write(`${s}\n`);

/** One ava process over `files` here, TAP streamed to stdout. */
function runAvaHere(tier: Tier, files: string[]): Promise<{ counts: Counts; failures: string[] }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [AVA, '--tap', ...tier.ava, ...files], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let tap = '';
    const onData = (d: Buffer) => {
      const s = d.toString();
      tap += s;
      process.stdout.write(s);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('error', (e) => {
      tap += `not ok - ${tier.name}: cannot start ava: ${e.message}\n`;
    });
    child.once('close', (code) => resolve({ counts: countTap(tap, code), failures: failedTests(tap) }));
  });
}

function tierFromFiles(tier: Tier, place: Place, results: FileResult[], durationMs: number): TierResult {
  let counts = zeroCounts();
  const failures: string[] = [];
  const flaky: string[] = [];
  for (const r of results) {
    const settled = settleRetry(r.tap, r.counts, r.retry);
    counts = addCounts(counts, settled.counts);
    failures.push(...settled.failures);
    flaky.push(...settled.flaky.map((f) => `${r.file}: ${f}`));
    if (r.note) failures.push(`${r.file}: ${r.note}`);
    else if (r.counts.failed > 0 && failedTests(r.tap).length === 0) failures.push(`${r.file}: ava exited ${String(r.exitCode)}`);
  }
  return { tier, place, counts, failures, flaky, durationMs };
}

const placeText = (r: TierResult): string =>
  r.place === 'lab' ? 'in the nested lab' : r.tier.name === 'unit' ? 'on this host' : r.tier.name === 'kvm' ? 'on this host\'s /dev/kvm' : 'on this host (vmx/svm)';

async function main(): Promise<void> {
  const wanted = process.argv.slice(2) as TierName[];
  for (const w of wanted) {
    if (!TIERS.some((t) => t.name === w)) {
      process.stderr.write(`run-tests: unknown tier '${w}' (tiers: ${TIERS.map((t) => t.name).join(', ')})\n`);
      process.exit(2);
    }
  }
  const tiers = TIERS.filter((t) => wanted.length === 0 || wanted.includes(t.name));
  const machine = probeMachine();
  const kindText = { none: 'no usable /dev/kvm', kvm: '/dev/kvm that cannot boot Linux (no vmx/svm)', hardware: 'hardware virtualization (vmx/svm)' }[machine.kvm];
  print(`machine: ${kindText}${machine.reason ? ` (${machine.reason})` : ''}`);
  for (const t of tiers) print(`tier ${t.name} (${t.what}): ${placeOf(t.name, machine) === 'lab' ? 'in the nested lab' : 'here'}`);

  const results: TierResult[] = [];
  for (const t of tiers.filter((t) => placeOf(t.name, machine) === 'host')) {
    const files = testFiles(t.dir);
    print(`\n── tier ${t.name}: ${files.length} files here ──`);
    const started = Date.now();
    if (files.length === 0) {
      results.push({ tier: t, place: 'host', counts: { passed: 0, failed: 1, skipped: 0 }, failures: [`no test files in ${t.dir}`], durationMs: 0 });
      continue;
    }
    const r = await runAvaHere(t, files);
    results.push({ tier: t, place: 'host', ...r, durationMs: Date.now() - started });
  }

  const labTiers = tiers.filter((t) => placeOf(t.name, machine) === 'lab');
  let boots: string[] = [];
  if (labTiers.length > 0) {
    const files: TestFile[] = labTiers.flatMap((t) => testFiles(t.dir).map((file) => ({ tier: t.name, file })));
    print(`\n── tiers ${labTiers.map((t) => t.name).join(' + ')}: ${files.length} files in one lab boot ──`);
    const started = Date.now();
    // When each file began, so that its end line says how long it took (two kvm files run at once).
    const fileStarted = new Map<string, number>();
    const took = (file: string) => {
      const t = fileStarted.get(file);
      return t === undefined ? '' : ` in ${((Date.now() - t) / 1000).toFixed(0)} s`;
    };
    const session = await runInLabSession(
      files,
      {
        cwd: REPO,
        // One boot's limit; a boot that freezes is followed by one fresh boot for what is left.
        timeoutMs: Number(process.env.TERN_LAB_TIMEOUT_MS ?? 25 * 60_000),
        avaTimeout: '15m',
        parallelTiers: ['kvm'],
        // (the lab's nested KVM loses a guest now and then, a Linux one or a tiny one: an
        // interrupt that never comes, a reset; see lab-session.ts)
        retryTiers: ['kvm', 'linux'],
        env: { TERN_FIXTURES: fixturesDir(), ...(process.env.CI !== undefined ? { CI: process.env.CI } : {}) },
        onLine: (l) => print(l),
        onConsole: (l) => print(`lab console: ${l}`),
        // Two kvm files run at once, each printing when it ends: name the file its output is from.
        onFileStart: (f) => {
          fileStarted.set(f.file, Date.now());
          print(`# ${f.tier}: ${f.file} started`);
        },
        onFileOutput: (f) => print(`# ${f.tier}: output of ${f.file}`),
        onFileEnd: (r) => print(`# ${r.file}: ${countsLine(r.counts)}${took(r.file)}`),
        onRetry: (r) => print(`# ${r.file}: its failed tests run once more: ${failedTests(r.tap).join('; ')}`),
        onFreezeEvidence: (cpus) => print(`lab: the frozen lab's CPUs, from QEMU's monitor:\n${cpus}`),
        onBootFailed: (why, remaining) => print(`\nlab: ${why}; running the ${remaining.length} unfinished files in a fresh lab boot`),
      },
      () => randomBytes(8).toString('hex'),
    );
    boots = session.boots;
    const duration = Date.now() - started;
    for (const t of labTiers) {
      results.push(tierFromFiles(t, 'lab', session.results.filter((r) => r.tier === t.name), duration));
      if (!session.results.some((r) => r.tier === t.name)) {
        const last = results[results.length - 1];
        last.counts.failed++;
        last.failures.push(`no test files in ${t.dir}`);
      }
    }
  }

  print('\n── summary ──');
  let total = zeroCounts();
  for (const r of results) {
    total = addCounts(total, r.counts);
    print(`tier ${r.tier.name.padEnd(5)} ${placeText(r).padEnd(26)} ${countsLine(r.counts).padEnd(36)} ${(r.durationMs / 1000).toFixed(0)} s`);
  }
  for (const b of boots) print(b);
  const flaky = results.flatMap((r) => (r.flaky ?? []).map((f) => `${r.tier.name}: ${f}`));
  if (flaky.length) {
    print('flaky (failed, then passed when run once more; the first failure is above):');
    for (const f of flaky) print(`  ${f}`);
  }
  const failures = results.flatMap((r) => r.failures.map((f) => `${r.tier.name}: ${f}`));
  if (failures.length) {
    print('failed:');
    for (const f of failures.slice(0, 50)) print(`  ${f}`);
  }
  print(`total: ${countsLine(total)}`);
  process.exit(total.failed === 0 ? 0 : 1);
}

main().catch((e) => {
  process.stderr.write(`run-tests: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
