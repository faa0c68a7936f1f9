// Guest RAM is a memfd (shmem), and the kernel gives shmem transparent huge pages only where
// /sys/kernel/mm/transparent_hugepage/shmem_enabled allows: with Debian's default (never) a
// memfd keeps 4 KiB pages whatever MADV_HUGEPAGE says, where anonymous memory (QEMU's, Cloud
// Hypervisor's) gets huge pages. An operator who asked for thp=on is told, once per VMM.
import fs from 'node:fs';

const SHMEM_ENABLED = '/sys/kernel/mm/transparent_hugepage/shmem_enabled';

/** The mode shmem_enabled selects: its bracketed word ("always within_size advise [never] deny force"). */
export function selectedShmemThp(text: string): string | undefined {
  return /\[([\w-]+)\]/.exec(text)?.[1];
}

/**
 * Why RAM advised huge pages gets none on this host, or undefined when it may (or the kernel
 * has no such setting). `text` stands for the file's contents (tests).
 */
export function shmemThpRefusal(text?: string): string | undefined {
  let contents = text;
  if (contents === undefined) {
    try {
      contents = fs.readFileSync(SHMEM_ENABLED, 'utf8');
    } catch {
      return undefined;
    }
  }
  const mode = selectedShmemThp(contents);
  if (mode !== 'never' && mode !== 'deny') return undefined;
  return `${SHMEM_ENABLED} is ${mode}: guest RAM (a memfd) gets no transparent huge pages although thp=on asks for them; advise (or always) grants them`;
}

let told = false;

/** shmemThpRefusal(), the first time a VMM asks; undefined after. */
export function shmemThpRefusalOnce(): string | undefined {
  if (told) return undefined;
  const why = shmemThpRefusal();
  if (why) told = true;
  return why;
}
