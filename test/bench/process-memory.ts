// Resident memory of a VMM process apart from guest RAM, measured the same way for every VMM:
// sum the Rss of every mapping in /proc/PID/smaps except the mappings that back guest RAM
// (the largest mappings, at least as large as the guest's RAM regions).
import fs from 'node:fs';

interface Mapping {
  sizeKiB: number;
  rssKiB: number;
  name: string;
}

function parseSmaps(text: string): Mapping[] {
  const maps: Mapping[] = [];
  let cur: Mapping | undefined;
  for (const line of text.split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      cur = { sizeKiB: 0, rssKiB: 0, name: head[1] };
      maps.push(cur);
      continue;
    }
    const kv = /^(Size|Rss):\s+(\d+) kB/.exec(line);
    if (kv && cur) {
      if (kv[1] === 'Size') cur.sizeKiB = Number(kv[2]);
      else cur.rssKiB = Number(kv[2]);
    }
  }
  return maps;
}

/**
 * KiB resident outside guest RAM. `guestRamKiB` is the guest's memory size; mappings at least
 * `minRamMappingKiB` large are taken as guest RAM (a 512 MiB guest is one mapping in QEMU and
 * in Tern), and the excluded size must add up to the guest's RAM.
 */
export function vmmOverheadKiB(pid: number, guestRamKiB: number): { overheadKiB: number; guestResidentKiB: number } {
  const maps = parseSmaps(fs.readFileSync(`/proc/${pid}/smaps`, 'utf8'));
  const sorted = [...maps].sort((a, b) => b.sizeKiB - a.sizeKiB);
  let excluded = 0;
  let guestResidentKiB = 0;
  const ram = new Set<Mapping>();
  for (const m of sorted) {
    if (excluded >= guestRamKiB) break;
    ram.add(m);
    excluded += m.sizeKiB;
    guestResidentKiB += m.rssKiB;
  }
  const overheadKiB = maps.filter((m) => !ram.has(m)).reduce((n, m) => n + m.rssKiB, 0);
  return { overheadKiB, guestResidentKiB };
}
