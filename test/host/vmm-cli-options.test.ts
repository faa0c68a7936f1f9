// The `tern` CLI's process contract with the tiny PVH kernel: signals, serial modes, and
// the exit codes and messages for bad options and unusable kernels.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { waitForFileText } from '../support/processes';

import { CPU_PROFILES, CpuProfileUnavailableError, applyCpuProfile, type CpuProfile } from '../../src/boot/cpu-profile';
import { native } from '../../src/native/kvm';
import type { GuestProcess } from '../linux/guest-process';
import { GUEST_SOURCES, sleep } from './harness';
import { TINY_KERNEL_BANNER, buildTinyKernel, countsIn, startTern, startTinyVm } from './tiny-kernel';

const T = 30_000;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-cli-options-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

function jsonLines(text: string): Record<string, unknown>[] {
  return text
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}



test('SIGTERM ends a running VM with exit 0 and logs the shutdown as pino JSON', async (t) => {
  // -v: the shutdown line is info level; the default level (warn) keeps stderr quiet.
  const vm = await startTinyVm(['-v']);
  try {
    await vm.waitFor(/^COUNT 2\n/m, T);
    vm.child.kill('SIGTERM');
    const { code, signal } = await vm.exit(T);
    t.is(code, 0, vm.stderr);
    t.is(signal, null);
    const logs = jsonLines(vm.stderr);
    const down = logs.find((l) => l.why === 'SIGTERM' && /shut/i.test(String(l.msg)));
    t.truthy(down, vm.stderr);
    t.like(down, { name: 'tern', level: 30, code: 0 });
    t.is(typeof down!.time, 'number');
    t.true(vm.stderr.split('\n').filter(Boolean).every((l) => l.startsWith('{')), 'stderr is only JSON log lines');
  } finally {
    vm.kill();
  }
});

/**
 * How many of a process's threads run under a seccomp filter (mode 2 in /proc). KVM's own
 * worker (kvm-nx-lpage-recovery), forked from a vCPU thread inside KVM_RUN, inherits the filter
 * but never runs user code: it is not counted.
 */
function filteredThreads(pid: number): number {
  let n = 0;
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    if (fs.readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').startsWith('kvm-')) continue;
    const status = fs.readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
    if (/^Seccomp:\s+2$/m.test(status)) n++;
  }
  return n;
}

test('--seccomp: each vCPU thread runs under a filter by default (true, log), and none with false', async (t) => {
  for (const [args, expected] of [[[], 2], [['--seccomp', 'log'], 2], [['--seccomp', 'false'], 0]] as [string[], number][]) {
    const vm = await startTinyVm(['--cpus', 'boot=2', ...args]);
    try {
      await vm.waitFor(/^COUNT 2\n/m, T);
      // The vCPU threads only; Node's own threads stay unfiltered.
      t.is(filteredThreads(vm.child.pid!), expected, `tern ${args.join(' ')}`);
      vm.child.kill('SIGTERM');
      t.is((await vm.exit(T)).code, 0, vm.stderr);
    } finally {
      vm.kill();
    }
  }
});

test('--serial file=PATH sends the console to the file and nothing to stdout', async (t) => {
  const file = path.join(tmp, 'serial.txt');
  const vm = await startTinyVm(['--serial', `file=${file}`], { cmdline: 'to-a-file' });
  try {
    const text = await waitForFileText(file, /^COUNT 3\n/m, T);
    t.true(text.startsWith(`${TINY_KERNEL_BANNER}\nCMDLINE to-a-file\nCOUNT 0\n`), text.slice(0, 200));
    const counts = countsIn(text);
    t.deepEqual(counts, counts.map((_, i) => i));
    vm.child.kill('SIGTERM');
    t.is((await vm.exit(T)).code, 0, vm.stderr);
    t.is(vm.output, '');
  } finally {
    vm.kill();
  }
});

async function waitForStderr(vm: GuestProcess, re: RegExp, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!re.test(vm.stderr)) {
    if (Date.now() > end || vm.child.exitCode !== null) throw new Error(`no ${re} on stderr:\n${vm.stderr.slice(-2000)}`);
    await sleep(50);
  }
}

test('a console reader that goes away (EPIPE) does not end the VM; input still works', async (t) => {
  const vm = await startTinyVm();
  try {
    await vm.waitFor(/^COUNT 1\n/m, T);
    vm.child.stdout.destroy();
    await sleep(500); // a few COUNT lines hit the closed pipe
    t.is(vm.child.exitCode, null, vm.stderr);
    vm.type('p');
    const { code } = await vm.exit(T);
    t.is(code, 0, vm.stderr);
    t.notRegex(vm.stderr, /EPIPE|internal error/);
  } finally {
    vm.kill();
  }
});

test('--serial null runs the guest and prints nothing', async (t) => {
  const vm = await startTinyVm(['--serial', 'null', '-vv']);
  try {
    // Nothing to see from the guest: once the kernel is loaded, the process must stay up
    // (a guest failure would end it with exit 1).
    await waitForStderr(vm, /"msg":"kernel loaded"/, T);
    await sleep(1500);
    t.is(vm.child.exitCode, null, vm.stderr);
    t.is(vm.output, '');
    vm.child.kill('SIGTERM');
    t.is((await vm.exit(T)).code, 0, vm.stderr);
    t.is(vm.output, '');
    // (a host whose shmem_enabled keeps huge pages from guest RAM says so: a fact about the
    // host, not about this run)
    const warnings = vm.stderr.split('\n').filter((l) => /"level":(40|50|60)/.test(l) && !l.includes('shmem_enabled'));
    t.deepEqual(warnings, [], vm.stderr);
  } finally {
    vm.kill();
  }
});

// The parser itself is covered in test/unit/cli-args.test.ts; these check the process contract.
const BAD_OPTIONS: [string, (kernel: string) => string[], RegExp][] = [
  ['an unknown option', (k) => ['--kernel', k, '--bogus'], /--bogus: unknown option/],
  ['an option without its value', () => ['--kernel'], /--kernel: needs a value/],
  ['boot options without a kernel', () => ['--cmdline', 'x'], /--kernel/],
  ['a bad option value', (k) => ['--kernel', k, '--cpus', 'boot=two'], /--cpus/],
];

for (const [what, args, re] of BAD_OPTIONS) {
  test(`${what} exits 2 with a one-line error`, async (t) => {
    const vm = await startTern(args(await buildTinyKernel()));
    try {
      const { code } = await vm.exit(T);
      t.is(code, 2, vm.stderr);
      const lines = vm.stderr.split('\n').filter(Boolean);
      t.is(lines.length, 1, vm.stderr);
      t.regex(lines[0], /^tern: error: /);
      t.regex(lines[0], re);
      t.is(vm.output, '');
    } finally {
      vm.kill();
    }
  });
}

test('a missing kernel file exits 1 with an error naming the path', async (t) => {
  const missing = path.join(tmp, 'no-such-dir', 'vmlinux');
  const vm = await startTern(['--kernel', missing, '--memory', 'size=64M', '--serial', 'tty', '--console', 'off']);
  try {
    const { code } = await vm.exit(T);
    t.is(code, 1, vm.stderr);
    const plain = vm.stderr.split('\n').filter((l) => l.startsWith('tern: '));
    t.is(plain.length, 1, vm.stderr);
    t.true(plain[0].startsWith('tern: error: '), plain[0]);
    t.true(plain[0].endsWith(`cannot read kernel ${missing}: missing`), plain[0]);
    t.is(vm.output, '');
  } finally {
    vm.kill();
  }
});

test('a file that is not a kernel exits 1 with an error naming the path', async (t) => {
  const notKernel = path.join(GUEST_SOURCES, 'pvh-counter.ld');
  const vm = await startTern(['--kernel', notKernel, '--memory', 'size=64M', '--serial', 'tty', '--console', 'off']);
  try {
    const { code } = await vm.exit(T);
    t.is(code, 1, vm.stderr);
    const plain = vm.stderr.split('\n').filter((l) => l.startsWith('tern: '));
    t.is(plain.length, 1, vm.stderr);
    t.regex(plain[0], /^tern: error: .*unknown kernel format/);
    t.true(plain[0].includes(notKernel), plain[0]);
  } finally {
    vm.kill();
  }
});

/** The profiles this host's KVM can give a guest, and the first one it cannot (if any). */
function hostProfiles(): { offered: CpuProfile[]; lacking?: { profile: CpuProfile; missing: readonly string[] } } {
  const kvm = native().openKvm();
  try {
    const supported = kvm.supportedCpuid();
    const offered: CpuProfile[] = [];
    for (const profile of CPU_PROFILES) {
      try {
        applyCpuProfile(supported, profile);
        offered.push(profile);
      } catch (e) {
        if (!(e instanceof CpuProfileUnavailableError)) throw e;
        return { offered, lacking: { profile, missing: e.missing } };
      }
    }
    return { offered };
  } finally {
    kvm.close();
  }
}

test('--cpus profile: the highest profile this host offers boots and runs; the next one exits 1 naming what the host lacks', async (t) => {
  const { offered, lacking } = hostProfiles();
  t.true(offered.includes('x86-64'), 'every x86-64 host offers the baseline');
  const best = offered[offered.length - 1];
  const vm = await startTinyVm(['--cpus', `boot=1,profile=${best}`]);
  try {
    await vm.waitFor(/^COUNT 2\n/m, T);
    t.true(countsIn(vm.output).length >= 2, `${best} boots`);
  } finally {
    vm.kill();
    await vm.exited;
  }
  if (!lacking) {
    t.log('this host offers every profile: no refusal to check');
    return;
  }
  const refused = await startTinyVm(['--cpus', `boot=1,profile=${lacking.profile}`]);
  try {
    const { code } = await refused.exit(T);
    t.is(code, 1, refused.stderr);
    const plain = refused.stderr.split('\n').filter((l) => l.startsWith('tern: '));
    t.is(plain.length, 1, refused.stderr);
    t.true(
      plain[0].endsWith(`CPU profile ${lacking.profile} needs features this host's CPU or KVM lacks: ${lacking.missing.join(', ')}`),
      plain[0],
    );
    t.notRegex(refused.output, new RegExp(TINY_KERNEL_BANNER), 'nothing ran');
  } finally {
    refused.kill();
  }
});
