// The shape of every device benchmark: tern and QEMU run the same guest jobs in turn, a run
// each at a time (so drift in the lab hits both alike), and the medians are printed with the
// ratio tern/QEMU.
import { median } from './median';

export interface SideBySideJob {
  name: string;
  /** the unit of the job's figure (higher is better) */
  metric: string;
}

export type SideBySideResults = Record<'tern' | 'qemu', number[][]>;

/**
 * `runs` rounds of `tern()` then `qemu()`, each giving one figure per job; `afterTern` (a CPU
 * profile summary) after each tern run. Each run's figures are printed as they come.
 */
export async function sideBySide(label: string, runs: number, tern: (run: number) => Promise<number[]>, qemu: (run: number) => Promise<number[]>, afterTern?: (run: number) => void): Promise<SideBySideResults> {
  const results: SideBySideResults = { tern: [], qemu: [] };
  for (let i = 0; i < runs; i++) {
    results.tern.push(await tern(i));
    process.stdout.write(`${label} run ${i + 1}/${runs}: tern ${results.tern[i].join(' ')}\n`);
    afterTern?.(i);
    results.qemu.push(await qemu(i));
    process.stdout.write(`${label} run ${i + 1}/${runs}: qemu ${results.qemu[i].join(' ')}\n`);
  }
  return results;
}

/** The medians of each job, side by side, as a Markdown table under `title`. */
export function printRatios(title: string, jobs: readonly SideBySideJob[], results: SideBySideResults): void {
  process.stdout.write(`\n${title}\n| job | tern | QEMU 7.2 | ratio |\n|---|---|---|---|\n`);
  jobs.forEach((j, k) => {
    const ours = median(results.tern.map((r) => r[k]));
    const peer = median(results.qemu.map((r) => r[k]));
    process.stdout.write(`| ${j.name} | ${ours.toFixed(1)} ${j.metric} | ${peer.toFixed(1)} ${j.metric} | ${(ours / peer).toFixed(2)} |\n`);
  });
}
