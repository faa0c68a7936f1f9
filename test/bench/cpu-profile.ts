// Reading a V8 CPU profile (node --cpu-prof) written by a VMM under a benchmark: where its
// JavaScript thread spent its time, by function, named by their place in the sources (the CLI
// is one bundled file with a source map).
import fs from 'node:fs';
import { SourceMap } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number }; children?: number[] }[];
  /** monotonic clock, microseconds (the clock of the pause-steps line's from_us and to_us) */
  startTime: number;
  samples: number[];
  timeDeltas: number[];
}

/**
 * The functions a V8 CPU profile (--cpu-prof) spent most time in, by self time; with `window`,
 * only the samples inside it (the pause, or the time right after it), named by `window.what`.
 */
export function profileSummary(label: string, dir: string, window?: { fromUs: number; toUs: number; what?: string }): string {
  let files: string[] = [];
  try {
    files = fs.readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'));
  } catch {
    /* the process wrote none */
  }
  if (!files.length) return `  ${label}: no CPU profile written\n`;
  const p = JSON.parse(fs.readFileSync(path.join(dir, files[0]), 'utf8')) as CpuProfile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  // The CLI is one bundled file: name each function by its place in the sources.
  const maps = new Map<string, SourceMap | undefined>();
  const mapFor = (url: string) => {
    if (!maps.has(url)) {
      try {
        maps.set(url, new SourceMap(JSON.parse(fs.readFileSync(`${fileURLToPath(url)}.map`, 'utf8'))));
      } catch {
        maps.set(url, undefined);
      }
    }
    return maps.get(url);
  };
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const nameOf = (id: number) => {
    const f = byId.get(id)!.callFrame;
    const entry = (f.url.startsWith('file:') ? mapFor(f.url)?.findEntry(f.lineNumber, f.columnNumber) : undefined) as { originalSource?: string; originalLine?: number } | undefined;
    const where = entry?.originalSource !== undefined && entry.originalLine !== undefined ? `${entry.originalSource.replace(/^.*?(node_modules|src)\//, '$1/')}:${entry.originalLine + 1}` : `${path.basename(f.url)}:${f.lineNumber + 1}`;
    return `${f.functionName || '(anonymous)'} ${where}`;
  };
  // In the pause, each function is named with its callers (three up): what ran it matters there.
  const keyOf = (id: number) => {
    const chain = [nameOf(id)];
    for (let up = parent.get(id); window && up !== undefined && chain.length < 4 && byId.get(up)!.callFrame.functionName !== '(root)'; up = parent.get(up)) chain.push(nameOf(up));
    return chain.join(' < ');
  };
  let total = 0;
  let at = p.startTime;
  p.samples.forEach((id, i) => {
    at += p.timeDeltas[i] ?? 0;
    if (window && (at < window.fromUs || at > window.toUs)) return;
    const key = keyOf(id);
    const us = p.timeDeltas[i] ?? 0;
    self.set(key, (self.get(key) ?? 0) + us);
    total += us;
  });
  const top = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, 25);
  const what = window ? `${window.what ?? 'in the pause'} (${((window.toUs - window.fromUs) / 1000).toFixed(0)} ms)` : 'in all';
  return `  ${label} CPU profile, ${(total / 1000).toFixed(0)} ms sampled ${what}; self time:\n${top.map(([k, us]) => `    ${(us / 1000).toFixed(0).padStart(7)} ms  ${k}`).join('\n')}\n`;
}

