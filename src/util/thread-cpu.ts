// The CPU time of a process's threads by thread name, from Linux's per-thread /proc stat: a
// health report tells a vCPU thread spinning in the guest from one halted there, and the
// benchmarks say which thread the CPU went to.
import fs from 'node:fs';

/** USER_HZ: /proc reports CPU times in clock ticks of 1/100 s. */
export const TICK_MS = 10;

/**
 * CPU ms (user and system) of each thread of `pid`, by name (the main thread, whose id is the
 * process's, as "main"; threads of one name are summed). Empty when the process is gone.
 */
export function threadCpuMsByName(pid: number = process.pid): Map<string, number> {
  const out = new Map<string, number>();
  let tids: string[];
  try {
    tids = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tids) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      // (the name in parentheses may hold spaces: the fields after it are counted from its end)
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const ms = (Number(fields[11]) + Number(fields[12])) * TICK_MS;
      const name = tid === String(pid) ? 'main' : fs.readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
      out.set(name, (out.get(name) ?? 0) + ms);
    } catch {
      // (the thread ended meanwhile)
    }
  }
  return out;
}
