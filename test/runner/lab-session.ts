// Runs test files in ONE lab boot (booting the lab is the expensive part), one ava process per
// file so that the runner always knows which files have finished. If the lab stops making
// progress (lab.ts's watchdog) or runs out of time, the files that did not finish run once more
// in a fresh lab boot: one freeze costs minutes, not the run.
//
// The lab's nested KVM (SVM emulated by TCG) now and then loses a guest: an interrupt that never
// arrives, a guest kernel that resets. So in the tiers that ask for it, a file's failed tests run
// once more, alone, in the same boot: a serial file's right after it, a parallel file's once both
// lanes are done. A test that passes then is reported as flaky, by name, with its first failure
// left in the log; one that fails again fails.
import { LabFrozenError, LabOptions, LabResult, LabTimeoutError, runInLab, shq } from '../lab/lab';
import { Counts, countTap } from './tap-counts';

export interface TestFile {
  /** The tier the file belongs to (kvm, linux). */
  tier: string;
  /** Path of the compiled test file, relative to the repository. */
  file: string;
}

export interface FileResult extends TestFile {
  counts: Counts;
  tap: string;
  exitCode: number | null;
  /** Why the file has no complete result of its own (the lab froze under it, or never ran it). */
  note?: string;
  /** Its failed tests run once more (a serial file of a retried tier): what that run reported. */
  retry?: { tap: string; exitCode: number | null };
}

export interface LabSessionResult {
  results: FileResult[];
  /** One line per lab boot: how it ended. */
  boots: string[];
}

// The markers frame each file's TAP output and name the file by its place in the boot's list (a
// list may hold one file more than once). A file's own output cannot end its frame early: the
// END marker carries a per-run nonce.
const begin = (nonce: string) => new RegExp(`^TERN-TEST-BEGIN ${nonce} (\\d+) `);
const end = (nonce: string) => new RegExp(`^TERN-TEST-END ${nonce} (\\d+) (\\d+) `);
// A file of a parallel lane prints its TAP only when it ends: this marker heads that output.
const tapFollows = (nonce: string) => new RegExp(`^TERN-TEST-TAP ${nonce} (\\d+) `);
// A serial file's failed tests run again: these frame that run's TAP.
const retryBegin = (nonce: string) => new RegExp(`^TERN-TEST-RETRY ${nonce} (\\d+) `);
const retryEnd = (nonce: string) => new RegExp(`^TERN-TEST-RETRY-END ${nonce} (\\d+) (\\d+) `);

/** Failed tests of one file that are run again; more than this many failing is no flake. */
export const MAX_RETRIED_TESTS = 2;

/**
 * The lab job. Files of a parallel tier (kvm) run two at a time, each lane taking the next file
 * from a shared queue; their TAP goes to a file that is printed whole, with the END marker,
 * under a lock, so the console never mixes two files. The other files (linux: heavy guests for
 * the lab's 2 CPUs) then run one at a time, streaming their output live. The failed tests of a
 * file of a retried tier run once more (retry_failed). Inside a file, tests
 * run one at a time: on a host they may overlap, but ten VMMs starting at once in the emulated
 * lab take longer to start than the tests' guards allow.
 */
function jobScript(files: TestFile[], nonce: string, avaTimeout: string, parallelTiers: string[], retryTiers: string[]): string {
  const indexed = files.map((f, k) => ({ ...f, k }));
  const parallel = indexed.filter((f) => parallelTiers.includes(f.tier));
  const serial = indexed.filter((f) => !parallelTiers.includes(f.tier));
  const arr = (name: string, xs: string[]) => `${name}=(${xs.map(shq).join(' ')})`;
  const ava = `node node_modules/ava/entrypoints/cli.mjs --tap --timeout=${avaTimeout}`;
  return [
    'work=$(mktemp -d /tmp/tern-tests.XXXXXX)',
    'echo 0 > "$work/next"',
    `say() { flock "$work/lock" echo "$*"; }`,
    // retry_failed K FILE TAP STATUS [retry]: with retry, the tests TAP names as failed run once
    // more (by exact title: ava's --match takes "*" as a wildcard and a leading "!" as a
    // negation, so such titles are not retried).
    'retry_failed() {',
    '  if [ "$4" = 0 ] || [ "$5" != retry ]; then return 0; fi',
    `  mapfile -t failed < <(sed -n -E '/# TODO/d; s/^not ok [0-9]+ - (.+)$/\\1/p' "$3")`,
    `  if [ "\${#failed[@]}" -lt 1 ] || [ "\${#failed[@]}" -gt ${MAX_RETRIED_TESTS} ]; then return 0; fi`,
    '  m=()',
    `  for f in "\${failed[@]}"; do case "$f" in *'*'*|'!'*) return 0 ;; esac; m+=(--match "$f"); done`,
    `  echo "TERN-TEST-RETRY ${nonce} $1 $2"`,
    `  ${ava} --serial "\${m[@]}" "$2" 2>&1`,
    `  echo "TERN-TEST-RETRY-END ${nonce} $1 $? $2"`,
    '}',
    arr('pk', parallel.map((f) => String(f.k))),
    arr('pfile', parallel.map((f) => f.file)),
    arr('pretry', parallel.map((f) => (retryTiers.includes(f.tier) ? 'retry' : 'once'))),
    'take() { flock "$work/lock" sh -c \'n=$(cat "$1"); echo $((n+1)) > "$1"; echo "$n"\' _ "$work/next"; }',
    'lane() {',
    '  while :; do',
    '    i=$(take); [ "$i" -lt "${#pfile[@]}" ] || return 0',
    `    say "TERN-TEST-BEGIN ${nonce} \${pk[$i]} \${pfile[$i]}"`,
    `    ${ava} --serial "\${pfile[$i]}" > "$work/$i.tap" 2>&1; st=$?`,
    '    echo "$st" > "$work/$i.status"',
    `    flock "$work/lock" sh -c 'echo "TERN-TEST-TAP ${nonce} $2 $4"; cat "$1"; echo "TERN-TEST-END ${nonce} $2 $3 $4"' _ "$work/$i.tap" "\${pk[$i]}" "$st" "\${pfile[$i]}"`,
    '  done',
    '}',
    'lane & lane & wait',
    // A parallel file's failed tests run once more after both lanes, alone (as a serial file's do).
    'for i in "${!pfile[@]}"; do retry_failed "${pk[$i]}" "${pfile[$i]}" "$work/$i.tap" "$(cat "$work/$i.status" 2>/dev/null || echo 0)" "${pretry[$i]}"; done',
    'run_file() {',
    `  echo "TERN-TEST-BEGIN ${nonce} $1 $2"`,
    `  ${ava} --serial "$2" 2>&1 | tee "$work/s$1.tap"; st=\${PIPESTATUS[0]}`,
    `  echo "TERN-TEST-END ${nonce} $1 $st $2"`,
    '  retry_failed "$1" "$2" "$work/s$1.tap" "$st" "$3"',
    '}',
    ...serial.map((f) => `run_file ${f.k} ${shq(f.file)}${retryTiers.includes(f.tier) ? ' retry' : ''}`),
  ].join('\n');
}

interface BootOutcome {
  finished: FileResult[];
  /** Places in the boot's list of the files that finished. */
  finishedAt: Set<number>;
  /** The files that had begun and not ended when the boot stopped. */
  interrupted: TestFile[];
  error?: Error;
  durationMs: number;
}

async function oneBoot(files: TestFile[], opts: LabSessionOptions, nonce: string): Promise<BootOutcome> {
  const finished: FileResult[] = [];
  const finishedAt = new Set<number>();
  const running = new Set<number>();
  // A file's TAP is every line between the previous marker and its END marker.
  let since = '';
  let partial = '';
  const beginRe = begin(nonce);
  const endRe = end(nonce);
  const tapRe = tapFollows(nonce);
  const retryBeginRe = retryBegin(nonce);
  const retryEndRe = retryEnd(nonce);
  const byPlace = new Map<number, FileResult>();
  const onLine = (line: string) => {
    const rb = retryBeginRe.exec(line);
    if (rb && byPlace.has(Number(rb[1]))) {
      since = '';
      opts.onRetry?.(byPlace.get(Number(rb[1]))!);
      return;
    }
    const re = retryEndRe.exec(line);
    if (re && byPlace.has(Number(re[1]))) {
      byPlace.get(Number(re[1]))!.retry = { tap: since, exitCode: Number(re[2]) };
      since = '';
      return;
    }
    const b = beginRe.exec(line);
    if (b && files[Number(b[1])]) {
      running.add(Number(b[1]));
      since = '';
      opts.onFileStart?.(files[Number(b[1])]);
      return;
    }
    const o = tapRe.exec(line);
    if (o && running.has(Number(o[1]))) {
      since = '';
      opts.onFileOutput?.(files[Number(o[1])]);
      return;
    }
    const e = endRe.exec(line);
    if (e && running.has(Number(e[1]))) {
      const k = Number(e[1]);
      const exitCode = Number(e[2]);
      const result: FileResult = { ...files[k], tap: since, exitCode, counts: countTap(since, exitCode) };
      running.delete(k);
      finishedAt.add(k);
      byPlace.set(k, result);
      since = '';
      finished.push(result);
      opts.onFileEnd?.(result);
      return;
    }
    since += `${line}\n`;
    opts.onLine?.(line);
  };
  const started = Date.now();
  try {
    const r = await (opts.runLab ?? runInLab)({
      script: jobScript(files, nonce, opts.avaTimeout, opts.parallelTiers ?? [], opts.retryTiers ?? []),
      timeoutMs: opts.timeoutMs,
      silenceLimitMs: opts.silenceLimitMs,
      env: opts.env,
      cwd: opts.cwd,
      onConsole: opts.onConsole,
      onOutput: (chunk) => {
        partial += chunk;
        const lines = partial.split('\n');
        partial = lines.pop() ?? '';
        for (const l of lines) onLine(l);
      },
    });
    if (partial) onLine(partial);
    const error = finished.length < files.length ? new Error(`the lab job ended with status ${r.exitCode} after ${finished.length} of ${files.length} files`) : undefined;
    const interrupted = [...running].map((k) => files[k]);
    return { finished, finishedAt, interrupted, error, durationMs: Date.now() - started };
  } catch (e) {
    const interrupted = [...running].map((k) => files[k]);
    return { finished, finishedAt, interrupted, error: e as Error, durationMs: Date.now() - started };
  }
}

export interface LabSessionOptions {
  cwd: string;
  /** Wall-clock limit of one lab boot. */
  timeoutMs: number;
  /** Heartbeat silence that counts as a frozen lab (lab.ts default when absent). */
  silenceLimitMs?: number;
  /** ava's per-test timeout inside the lab, e.g. "15m". */
  avaTimeout: string;
  /** Tiers whose files may run two at a time. */
  parallelTiers?: string[];
  /** Tiers whose serial files' failed tests run once more (see the top of this file). */
  retryTiers?: string[];
  env?: Record<string, string>;
  onLine?: (line: string) => void;
  onConsole?: (line: string) => void;
  onFileStart?: (f: TestFile) => void;
  /** A file of a parallel tier ended: its whole output follows (a serial file's streams after onFileStart). */
  onFileOutput?: (f: TestFile) => void;
  onFileEnd?: (r: FileResult) => void;
  /** A file's failed tests are about to run once more. */
  onRetry?: (r: FileResult) => void;
  /** What boots the lab (runInLab; a test passes its own to play a lab that freezes). */
  runLab?: (o: LabOptions) => Promise<LabResult>;
  /** Receives what QEMU's monitor said about the CPUs of a lab that froze. */
  onFreezeEvidence?: (cpuState: string) => void;
  /** Called when a boot ends without finishing its files, before the fresh boot. */
  onBootFailed?: (why: string, remaining: TestFile[]) => void;
}

const describe = (e: Error): string =>
  e instanceof LabFrozenError ? `the lab froze: ${e.why}` : e instanceof LabTimeoutError ? `the lab ran past ${Math.round(e.timeoutMs / 1000)} s` : e.message.split('\n')[0];

/**
 * Run `files` in one lab boot; the files a failed boot left unfinished (the interrupted one
 * included) run once more in a fresh boot. Files that still have no result count as failed.
 */
export async function runInLabSession(files: TestFile[], opts: LabSessionOptions, nonce: () => string): Promise<LabSessionResult> {
  const results: FileResult[] = [];
  const boots: string[] = [];
  let unfinished = files;
  for (let attempt = 1; attempt <= 2 && unfinished.length > 0; attempt++) {
    const outcome = await oneBoot(unfinished, opts, nonce());
    results.push(...outcome.finished);
    const remaining = unfinished.filter((_, k) => !outcome.finishedAt.has(k));
    const secs = (outcome.durationMs / 1000).toFixed(0);
    if (!outcome.error && remaining.length === 0) {
      boots.push(`lab boot ${attempt}: ${outcome.finished.length} files in ${secs} s`);
      unfinished = [];
      break;
    }
    const why = outcome.error ? describe(outcome.error) : 'unknown';
    const during = outcome.interrupted.length ? ` during ${outcome.interrupted.map((f) => f.file).join(', ')}` : '';
    boots.push(`lab boot ${attempt}: ${why}${during}, after ${outcome.finished.length} of ${unfinished.length} files in ${secs} s`);
    unfinished = remaining;
    if (outcome.error instanceof LabFrozenError) opts.onFreezeEvidence?.(outcome.error.cpuState);
    if (attempt === 1 && unfinished.length > 0) opts.onBootFailed?.(`${why}${during}`, unfinished);
    if (attempt === 2) {
      for (const f of unfinished) {
        const interrupted = outcome.interrupted.includes(f);
        results.push({
          ...f,
          tap: '',
          exitCode: null,
          counts: { passed: 0, failed: 1, skipped: 0 },
          note: interrupted ? `interrupted twice: ${why}` : `never ran: ${why}`,
        });
      }
    }
  }
  return { results, boots };
}
