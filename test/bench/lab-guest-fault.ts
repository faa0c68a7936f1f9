// A guest kernel that panicked in a bench run. In the nested lab a guest now and then takes the
// lab's emulated-SVM double fault (seen at entry_SYSCALL_64, under tern and QEMU alike): that run
// says nothing about the VMM, so the bench runs it again instead of giving up every pair.
export const GUEST_PANIC_RE = /Kernel panic - not syncing[^\n]*/;

export class GuestPanic extends Error {
  constructor(readonly vmm: 'tern' | 'qemu', line: string, output: string) {
    super(`the ${vmm} guest's kernel panicked (${line.trim()}): ${output.slice(-3000)}`);
  }
}

/** The panic line in a guest's console output, if its kernel panicked. */
export function panicLine(output: string): string | undefined {
  return GUEST_PANIC_RE.exec(output)?.[0];
}
