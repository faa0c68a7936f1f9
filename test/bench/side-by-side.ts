// The shape of every device benchmark: tern and QEMU run the same guest jobs in turn, a run
// each at a time (so drift in the lab hits both alike), and the medians are printed with the
// ratio tern/QEMU.
import { LabGuestFault } from './lab-guest-fault';
import { median } from './median';

export interface SideBySideJob {
  name: string;
  /** the unit of the job's figure (higher is better) */
  metric: string;
}

export type SideBySideResults = Record<'tern' | 'qemu', number[][]>;

/**
 * `runs` rounds of `tern()` then `qemu()`, each giving one figure per job; `afterTern` (a CPU
 * profile summary) after each tern run. Each run's figures are printed as they come. A run whose
 * guest was lost to the lab (LabGuestFault: a panic or a stall) runs again, up to `runs` times in
 * all; any other failure ends the bench.
 */
export async function sideBySide(label: string, runs: number, tern: (run: number) => Promise<number[]>, qemu: (run: number) => Promise<number[]>, afterTern?: (run: number) => void): Promise<SideBySideResults> {
  const results: SideBySideResults = { tern: [], qemu: [] };
  let reruns = 0;
  const attempt = async (vmm: 'tern' | 'qemu', i: number, run: (run: number) => Promise<number[]>): Promise<number[]> => {
    for (;;) {
      try {
        return await run(i);
      } catch (e) {
        if (!(e instanceof LabGuestFault) || reruns >= runs) throw e;
        reruns++;
        process.stdout.write(`${label} run ${i + 1}/${runs}: ${vmm}'s run was lost to the lab, running it again (rerun ${reruns} of at most ${runs}): ${e.message.split('\n')[0].slice(0, 200)}\n`);
        process.stderr.write(`${label} run ${i + 1}/${runs}, ${vmm}'s lost run: ${e.message}\n`);
      }
    }
  };
  for (let i = 0; i < runs; i++) {
    results.tern.push(await attempt('tern', i, tern));
    process.stdout.write(`${label} run ${i + 1}/${runs}: tern ${results.tern[i].join(' ')}\n`);
    afterTern?.(i);
    results.qemu.push(await attempt('qemu', i, qemu));
    process.stdout.write(`${label} run ${i + 1}/${runs}: qemu ${results.qemu[i].join(' ')}\n`);
  }
  if (reruns) process.stdout.write(`${label}: ${reruns} runs repeated after the lab lost them\n`);
  return results;
}

/**
 * The medians of each job, side by side, as a Markdown table under `title`, with the median of
 * the pairs' own ratios beside the ratio of the medians: a pair runs back to back, so its ratio
 * is less moved by the lab's drift between pairs than the medians are.
 */
export function printRatios(title: string, jobs: readonly SideBySideJob[], results: SideBySideResults): void {
  process.stdout.write(`\n${title}\n| job | tern | QEMU 7.2 | ratio | median of pair ratios (each pair) |\n|---|---|---|---|---|\n`);
  jobs.forEach((j, k) => {
    const ours = median(results.tern.map((r) => r[k]));
    const peer = median(results.qemu.map((r) => r[k]));
    const pairs = results.tern.map((r, i) => r[k] / results.qemu[i][k]);
    process.stdout.write(`| ${j.name} | ${ours.toFixed(1)} ${j.metric} | ${peer.toFixed(1)} ${j.metric} | ${(ours / peer).toFixed(2)} | ${median(pairs).toFixed(2)} (${pairs.map((x) => x.toFixed(2)).join(', ')}) |\n`);
  });
}
