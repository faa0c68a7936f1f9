// Per-thread CPU time by name, as the health report and the benchmarks read it.
import test from 'ava';
import { threadCpuMsByName } from '../../src/util/thread-cpu';

test('the CPU a thread burns shows under its name (the main thread\'s as "main"); a process that is gone gives nothing', (t) => {
  const before = threadCpuMsByName();
  t.true(before.has('main'));
  const end = Date.now() + 300;
  let x = 0;
  while (Date.now() < end) x += Math.sqrt(x + 1);
  const after = threadCpuMsByName();
  t.true((after.get('main') ?? 0) - (before.get('main') ?? 0) >= 200, `main: ${before.get('main')} -> ${after.get('main')} ms (${x > 0})`);
  // (above Linux's largest pid_max, 2^22: no process has it)
  t.is(threadCpuMsByName(2 ** 22 + 12345).size, 0);
});
