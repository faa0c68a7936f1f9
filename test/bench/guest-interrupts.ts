// The interrupts a guest took per virtio queue, as its /proc/interrupts counts them: what each
// VMM made the guest handle for the same traffic (an interrupt costs the guest its handler and,
// without posted interrupts, exits for the injection and the EOI).

/** A guest shell command printing one `GUEST-IRQS name=count ...` line of the virtio vectors. */
export const GUEST_IRQS_CMD = `echo GUEST-IRQS $(awk '/virtio/ {print $NF "=" $2}' /proc/interrupts)`;

/** Every GUEST-IRQS line in a console output, in order: vector name to count. */
export function guestIrqSnapshots(output: string): Map<string, number>[] {
  return [...output.matchAll(/^GUEST-IRQS ?(.*)$/gm)].map(
    (m) =>
      new Map(
        m[1]
          .trim()
          .split(/\s+/)
          .filter((kv) => /^\S+=\d+$/.test(kv))
          .map((kv) => {
            const at = kv.lastIndexOf('=');
            return [kv.slice(0, at), Number(kv.slice(at + 1))] as [string, number];
          }),
      ),
  );
}

/** "input.0 1234 (2.1/MiB), output.0 ..." between two snapshots, per MiB moved when `mib` is given. */
export function describeGuestIrqs(before: Map<string, number> | undefined, after: Map<string, number> | undefined, mib?: number): string {
  if (!before || !after) return 'no guest interrupt counts';
  return [...after]
    .map(([name, n]) => [name.replace(/^virtio\d+-/, ''), n - (before.get(name) ?? 0)] as const)
    .filter(([name, d]) => d > 0 || !name.startsWith('config'))
    .map(([name, d]) => `${name} ${d}${mib ? ` (${(d / mib).toFixed(1)}/MiB)` : ''}`)
    .join(', ');
}
