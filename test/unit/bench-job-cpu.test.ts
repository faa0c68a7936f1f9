import test from 'ava';
import { describeJobCpu, JobCpuMeter } from '../bench/job-cpu';

/**
 * Keep this thread busy until `ms` have passed and the process has used `ms` of CPU: on a machine
 * busy with other test workers, a thread busy for 300 ms of wall time may get only 240 of CPU.
 */
function burn(ms: number): void {
  const end = Date.now() + ms;
  const cpuStart = process.cpuUsage();
  const cpuMs = () => {
    const used = process.cpuUsage(cpuStart);
    return (used.user + used.system) / 1000;
  };
  let x = 0;
  while (Date.now() < end || cpuMs() < ms) x += Math.sqrt(x + 1);
}

test('the CPU a process spends between console markers is measured per job and named by thread', (t) => {
  const meter = new JobCpuMeter(() => process.pid, [/START/, /^JOB a /m, /^JOB b /m]);
  meter.feed('boot\nSTA');
  meter.feed('RT\n');
  burn(300);
  meter.feed('JOB a done\n');
  meter.feed('JOB a done again\n'); // a marker already seen takes no second sample
  burn(30);
  const [a, b] = meter.jobs();
  t.is(b, undefined, 'the second job has not ended');
  t.truthy(a);
  // (utime and stime count in 10 ms ticks)
  t.true(a!.vmmMs >= 250 && a!.vmmMs <= 2000, `${a!.vmmMs} ms`);
  t.is(a!.threads[0][0], 'main', JSON.stringify(a!.threads));
  t.true(a!.busy > 0 && a!.busy <= 1);
  meter.feed('JOB b done\n');
  t.truthy(meter.jobs()[1]);
  t.true(a!.wallMs >= 300, `${a!.wallMs} ms`);
  t.regex(describeJobCpu(a), /^VMM \d+\.\d\d s CPU in \d+\.\d\d s \(main \d+\.\d\d.*\), machine \d+% busy/);
  t.is(describeJobCpu(undefined), 'no CPU figures');
});

test('a VMM that has exited gives no figures rather than failing the bench', (t) => {
  const meter = new JobCpuMeter(() => 2 ** 22 + 12345, [/A/, /B/]);
  meter.feed('A B');
  t.deepEqual(meter.jobs(), [undefined]);
});
