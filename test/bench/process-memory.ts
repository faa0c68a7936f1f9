// Memory of a VMM process apart from guest RAM, measured the same way for every VMM: sum the
// figures of every mapping in /proc/PID/smaps except the mappings that back guest RAM (the
// largest mappings, as large as the guest's RAM regions together).
import fs from 'node:fs';

interface Mapping {
  sizeKiB: number;
  rssKiB: number;
  pssKiB: number;
  /** Private_Clean + Private_Dirty: pages no other process maps */
  privateKiB: number;
  name: string;
}

function parseSmaps(text: string): Mapping[] {
  const maps: Mapping[] = [];
  let cur: Mapping | undefined;
  for (const line of text.split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      cur = { sizeKiB: 0, rssKiB: 0, pssKiB: 0, privateKiB: 0, name: head[1] };
      maps.push(cur);
      continue;
    }
    const kv = /^(Size|Rss|Pss|Private_Clean|Private_Dirty):\s+(\d+) kB/.exec(line);
    if (kv && cur) {
      const kib = Number(kv[2]);
      if (kv[1] === 'Size') cur.sizeKiB = kib;
      else if (kv[1] === 'Rss') cur.rssKiB = kib;
      else if (kv[1] === 'Pss') cur.pssKiB = kib;
      else cur.privateKiB += kib;
    }
  }
  return maps;
}

/** The mappings of `pid` that are not guest RAM (which add up to `guestRamKiB`). */
function nonRamMappings(pid: number, guestRamKiB: number): { maps: Mapping[]; guestResidentKiB: number } {
  const maps = parseSmaps(fs.readFileSync(`/proc/${pid}/smaps`, 'utf8'));
  // Tern's guest RAM is its named memfd, mapped in one or more chunks; QEMU's is anonymous,
  // found by size. (Taking the largest alone could take one of V8's reservations instead.)
  const named = maps.filter((m) => m.name.startsWith('/memfd:tern-ram'));
  const sorted = [...named, ...maps.filter((m) => !named.includes(m)).sort((a, b) => b.sizeKiB - a.sizeKiB)];
  let excluded = 0;
  let guestResidentKiB = 0;
  const ram = new Set<Mapping>();
  for (const m of sorted) {
    if (excluded >= guestRamKiB) break;
    ram.add(m);
    excluded += m.sizeKiB;
    guestResidentKiB += m.rssKiB;
  }
  return { maps: maps.filter((m) => !ram.has(m)), guestResidentKiB };
}

const sum = (maps: Mapping[], f: (m: Mapping) => number): number => maps.reduce((n, m) => n + f(m), 0);

/** KiB resident outside guest RAM, and guest RAM's own resident KiB. `guestRamKiB` is the guest's memory size. */
export function vmmOverheadKiB(pid: number, guestRamKiB: number): { overheadKiB: number; guestResidentKiB: number } {
  const { maps, guestResidentKiB } = nonRamMappings(pid, guestRamKiB);
  return { overheadKiB: sum(maps, (m) => m.rssKiB), guestResidentKiB };
}

export interface VmmMemory {
  rssKiB: number;
  pssKiB: number;
  /** unique set: pages of this process no other maps (what one more such process costs) */
  ussKiB: number;
  /** resident pages of the process's own executable file */
  executableRssKiB: number;
}

/** Resident, proportional and unique KiB of `pid` outside guest RAM. */
export function vmmMemory(pid: number, guestRamKiB: number): VmmMemory {
  const { maps } = nonRamMappings(pid, guestRamKiB);
  const exe = fs.realpathSync(`/proc/${pid}/exe`);
  return {
    rssKiB: sum(maps, (m) => m.rssKiB),
    pssKiB: sum(maps, (m) => m.pssKiB),
    ussKiB: sum(maps, (m) => m.privateKiB),
    executableRssKiB: sum(maps.filter((m) => m.name === exe), (m) => m.rssKiB),
  };
}
