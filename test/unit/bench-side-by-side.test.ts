import test from 'ava';
import { checkPeerRun, LabGuestFault, labGuestFault, panicLine, stalledVcpuCause, ternRunEnded } from '../bench/lab-guest-fault';
import { GuestProcess } from '../linux/guest-process';
import type { PeerRun } from '../lab/qemu-peer';
import { printRatios, sideBySide } from '../bench/side-by-side';

/** Run `f` with stdout captured; returns what it wrote. */
async function captured<T>(f: () => Promise<T>): Promise<{ value: T; out: string }> {
  const write = process.stdout.write.bind(process.stdout);
  let out = '';
  process.stdout.write = ((s: string | Uint8Array) => {
    out += String(s);
    return true;
  }) as typeof process.stdout.write;
  try {
    return { value: await f(), out };
  } finally {
    process.stdout.write = write;
  }
}

const PANIC = '[   12.345678] Kernel panic - not syncing: Fatal exception in interrupt';

test('a panic in the console or a run past its limit is the lab\'s fault; a guest that failed otherwise is not', (t) => {
  t.is(panicLine(`boot\n${PANIC}\n[ end Kernel panic ]`), PANIC.slice(PANIC.indexOf('Kernel')));
  t.regex(labGuestFault('tern', `boot\n${PANIC}\n`)!.message, /^the tern guest kernel panicked \(Kernel panic - not syncing: Fatal exception in interrupt\)/);
  t.regex(labGuestFault('qemu', 'TERN-GUEST-USERSPACE\n', 240_000)!.message, /^the qemu guest gave no result within 240 s/);
  t.is(labGuestFault('tern', 'NETBENCH send MiBps=12\nTERN-GUEST-EXIT 1\n'), undefined);
  t.regex(labGuestFault('qemu', 'TERN-GUEST-USERSPACE\nNETBENCH send MiBps=12\n', undefined, { resetEndsVmm: true })!.message, /^the qemu guest ended before its jobs did/);
  t.is(labGuestFault('qemu', 'NETBENCH send MiBps=12\nTERN-GUEST-EXIT 1\n', undefined, { resetEndsVmm: true }), undefined, 'a guest that failed and said so is no lab fault');
});

test.serial('a run whose guest kernel panicked runs again; every pair is complete and in order', async (t) => {
  let ternCalls = 0;
  let qemuCalls = 0;
  const { value, out } = await captured(() =>
    sideBySide(
      'net',
      3,
      async (i) => {
        ternCalls++;
        if (ternCalls === 2) throw labGuestFault('tern', `console\n${PANIC}\n`)!;
        return [10 + i];
      },
      async (i) => {
        qemuCalls++;
        if (qemuCalls === 3) throw labGuestFault('qemu', 'TERN-GUEST-USERSPACE\n', 240_000)!;
        return [20 + i];
      },
    ),
  );
  t.deepEqual(value, { tern: [[10], [11], [12]], qemu: [[20], [21], [22]] });
  t.is(ternCalls, 4);
  t.is(qemuCalls, 4);
  t.regex(out, /net run 2\/3: tern's run was lost to the lab, running it again/);
  t.regex(out, /net run 3\/3: qemu's run was lost to the lab, running it again/);
  t.regex(out, /net: 2 runs repeated after the lab lost them/);
});

test.serial('any other failure ends the bench at once, and so do more panics than runs', async (t) => {
  let calls = 0;
  await t.throwsAsync(
    captured(() =>
      sideBySide(
        'block',
        3,
        async () => {
          calls++;
          throw new Error('tern exited 1');
        },
        async () => [1],
      ),
    ),
    { message: 'tern exited 1' },
  );
  t.is(calls, 1);
  calls = 0;
  await t.throwsAsync(
    captured(() =>
      sideBySide(
        'block',
        2,
        async () => [1],
        async () => {
          calls++;
          throw labGuestFault('qemu', 'TERN-GUEST-USERSPACE\n', 240_000)!;
        },
      ),
    ),
    { instanceOf: LabGuestFault },
  );
  t.is(calls, 3, 'two reruns for two pairs, then the third panic ends it');
});

test.serial('the table gives each job the ratio of the medians and the median of the pairs\' ratios', async (t) => {
  const { out } = await captured(async () =>
    printRatios('title', [{ name: 'TCP guest to host', metric: 'MiB/s' }], { tern: [[100], [300], [120]], qemu: [[100], [100], [240]] }),
  );
  // medians 120 and 100 (1.20); pair ratios 1.00, 3.00, 0.50 (median 1.00)
  t.regex(out, /\| TCP guest to host \| 120\.0 MiB\/s \| 100\.0 MiB\/s \| 1\.20 \| 1\.00 \(1\.00, 3\.00, 0\.50\) \|/);
});

test('a QEMU run is checked once: its guest ended with 0, or the lab lost it, or it failed', (t) => {
  const run = (output: string, guestStatus: number, timedOut = false): PeerRun => ({ output, guestStatus, timedOut, userspaceMs: 1, guestExitMs: 2, totalMs: 3, qemuExitCode: 0, stderr: '' });
  t.notThrows(() => checkPeerRun(run('NETBENCH send MiBps=1\nTERN-GUEST-EXIT 0\n', 0), 240_000));
  t.throws(() => checkPeerRun(run('TERN-GUEST-USERSPACE\n', -1, true), 240_000), { instanceOf: LabGuestFault, message: /no result within 240 s/ });
  t.throws(() => checkPeerRun(run('TERN-GUEST-USERSPACE\n', -1), 240_000), { instanceOf: LabGuestFault, message: /a reset/ });
  const failed = t.throws(() => checkPeerRun(run('TERN-GUEST-EXIT 3\n', 3), 240_000));
  t.false(failed instanceof LabGuestFault);
  t.regex(failed!.message, /^QEMU guest ended with 3/);
});

test('a stall whose vCPU has its page tables outside guest RAM is named from the health report', (t) => {
  const sample = (rip: string, cr3: string, inRam: boolean) => ({
    rip, cpl: 0, interruptsEnabled: true, exception: { vector: 14, errorCode: 16, injected: true }, cr2: rip, cr3, pageTableRootInRam: inRam,
  });
  const line = (samples: unknown[][]) => JSON.stringify({ level: 40, msg: 'health report', vcpuSamples: { samples } });
  const stuck = line([[sample('0xffffffff81000000', '0x5f32000', true)], [sample('0xffffffffc060d20c', '0x11b48c000', false)]]);
  t.is(stalledVcpuCause(`not json\n${stuck}`), 'vCPU 1 faults on its own fetch at 0xffffffffc060d20c (exception 14), its CR3 0x11b48c000 outside guest RAM');
  t.is(stalledVcpuCause(line([[sample('0xffffffff81000000', '0x5f32000', true)]])), undefined, 'a vCPU whose page tables are in RAM');
  t.is(stalledVcpuCause(JSON.stringify({ msg: 'health report', vcpuSamples: { notSampled: 'the VM is paused or pausing' } })), undefined);
  const fault = labGuestFault('tern', 'TERN-GUEST-USERSPACE\n', 240_000, { cause: stalledVcpuCause(stuck) })!;
  t.regex(fault.message, /^the tern guest gave no result within 240 s \(vCPU 1 faults on its own fetch at 0xffffffffc060d20c/);
});

/**
 * A real process in a bench's tern's place: prints `lines` on its console, then nothing, and
 * answers SIGUSR2 with a health report line whose vCPU has its page tables in RAM or not.
 */
function reportingStandIn(opts: { rootInRam: boolean; lines: number; exitAfterMs?: number }): GuestProcess {
  const report = JSON.stringify({ level: 40, msg: 'health report', vcpuSamples: { samples: [[{ rip: '0xffffffffc05fd20c', cr3: '0x102b34000', exception: { vector: 14 }, pageTableRootInRam: opts.rootInRam }]] } });
  const script = `
    process.on('SIGUSR2', () => process.stderr.write(${JSON.stringify(report + '\n')}));
    let n = 0;
    setInterval(() => { if (n < ${opts.lines}) console.log('line ' + n++); }, 50);
    ${opts.exitAfterMs !== undefined ? `setTimeout(() => process.exit(0), ${opts.exitAfterMs});` : ''}
  `;
  return new GuestProcess(process.execPath, ['-e', script]);
}

test('a bench run whose guest went quiet with a vCPU that can never run again is given up then, not at its time limit', async (t) => {
  const vm = reportingStandIn({ rootInRam: false, lines: 3 });
  try {
    const started = Date.now();
    const err = await t.throwsAsync(ternRunEnded(vm, 60_000, 300), { instanceOf: LabGuestFault });
    t.regex(err!.message, /^the tern guest can never run again \(vCPU 0 faults on its own fetch at 0xffffffffc05fd20c \(exception 14\), its CR3 0x102b34000 outside guest RAM\)/);
    t.true(Date.now() - started < 10_000, `given up after ${Date.now() - started} ms`);
  } finally {
    vm.kill();
  }
});

test('a quiet guest whose vCPUs are sound is only asked again: its run ends as it would', async (t) => {
  const vm = reportingStandIn({ rootInRam: true, lines: 2, exitAfterMs: 1500 });
  try {
    await ternRunEnded(vm, 20_000, 200);
    t.true(vm.stderr.includes('"health report"'), 'it was asked where its vCPUs are');
    t.is(vm.child.exitCode, 0);
  } finally {
    vm.kill();
  }
});
