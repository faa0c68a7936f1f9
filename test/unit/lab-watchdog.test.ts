// The lab's watchdog against a real lab VM: a lab whose heartbeat stops, or whose kernel reports
// a stuck CPU, is killed long before its timeout, and the runner is told why. (A test of the
// test machinery; it needs QEMU, not KVM.)
import test from 'ava';
import { LabFrozenError, runInLab } from '../lab/lab';

process.env.TERN_LAB_MODE = 'lab';

test.serial('a lab whose heartbeat stops is killed after the silence limit, not at its timeout', async (t) => {
  const started = Date.now();
  // Stop the lab init's heartbeat loop (the parent of its `sleep`), then hang.
  const err = await t.throwsAsync(
    runInLab({ script: 'echo job-running; kill -STOP $(ps -o ppid= -C sleep); sleep 600', timeoutMs: 10 * 60_000, heartbeatS: 2, silenceLimitMs: 10_000 }),
    { instanceOf: LabFrozenError },
  );
  const took = Date.now() - started;
  t.regex(err!.message, /no heartbeat for \d+ s/);
  t.regex(err!.outputTail, /job-running/, 'the job\'s output up to the freeze is kept');
  t.regex(err!.consoleTail, /lab-init: job starts/, 'and the lab\'s console');
  t.regex(err!.cpuState, /RIP=[0-9a-f]{16}/, 'QEMU\'s monitor reported where the lab\'s CPUs were');
  t.true(took < 5 * 60_000, `killed after ${Math.round(took / 1000)} s`);
});

test.serial('a lab whose kernel reports a stuck CPU is killed at once', async (t) => {
  // The job writes the kernel's report to the kernel log, as a stuck CPU would.
  const err = await t.throwsAsync(
    runInLab({
      script: 'echo "<0>watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [node:123]" > /dev/kmsg; sleep 600',
      timeoutMs: 10 * 60_000, silenceLimitMs: 0,
    }),
    { instanceOf: LabFrozenError },
  );
  t.regex(err!.message, /its kernel reported: watchdog: BUG: soft lockup - CPU#1 stuck/);
});

test.serial('a lab that keeps its heartbeat runs a silent job to the end', async (t) => {
  // The job is silent for twice the limit; only the lab's heartbeats (every second here) keep it
  // going. The limit is eight heartbeats, room for a few that a loaded host delays (the unit tier
  // runs its files side by side with this lab), and shorter than the lab's boot (10-20 s here),
  // which it does not count: the heartbeat starts with the job.
  const r = await runInLab({ script: 'sleep 16; echo done-after-silence', timeoutMs: 10 * 60_000, heartbeatS: 1, silenceLimitMs: 8_000 });
  t.is(r.exitCode, 0);
  t.regex(r.output, /done-after-silence/);
  t.notRegex(r.output, /TERN-LAB-ALIVE|lab-init:/, 'the job\'s output is apart from the console and its heartbeats');
});
