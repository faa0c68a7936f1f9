// The tiny PVH kernel (test/guests/pvh-counter.S), built at run time into an ELF64 with a
// XEN_ELFNOTE_PHYS32_ENTRY note: what the VMM-level tests boot instead of Linux, which
// cannot boot on this host's /dev/kvm. Its serial protocol is described in the source.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';

import { parseElfKernel } from '../../src/boot/elf-pvh';
import type { VmConfig } from '../../src/config/vm-config';
import { GuestProcess } from '../linux/guest-process';
import { GUEST_SOURCES, guestBuildDir } from './harness';

const run = promisify(execFile);

/** Where the kernel's PT_LOAD segment goes (p_paddr). */
export const TINY_KERNEL_LOAD_ADDRESS = 0x20_0000;

/** The status block the kernel keeps in RAM (u32 each, little-endian). */
export const TinyKernelStatus = {
  /** COUNT lines printed so far */
  COUNT: 0x30_0000,
  /** LAPIC timer ticks (100 ms each) */
  TICKS: 0x30_0004,
  /** serial RX interrupts taken */
  RX_IRQS: 0x30_0008,
  /** TINY_KERNEL_MAGIC once the kernel has initialised */
  MAGIC: 0x30_000c,
} as const;
export const TINY_KERNEL_MAGIC = 0x594e4954; // "TINY"

/** The 'd' command writes the counter into the first dword of these pages. */
export const TINY_KERNEL_DIRTY_BASE = 0x40_0000;
export const TINY_KERNEL_DIRTY_PAGES = 256;

/** Single-byte commands the kernel reads from COM1. */
export const TinyKernelCommand = {
  POWEROFF: 'p',
  I8042_RESET: 'r',
  ACPI_RESET: 'a',
  TRIPLE_FAULT: 't',
  DIRTY: 'd',
  /** prints "STATUS count=<n> ticks=<n> rxirqs=<n>" */
  STATUS: 's',
  /** followed by one byte, printed back as "ECHO <byte>" */
  ECHO: 'e',
  /** asks 1000 times for sleep state S1 (which Tern refuses), then prints "SLEPT" */
  SLEEP_REQUESTS: 'z',
  /** prints "PCI <id> <class> <ecam id>": 00:00.0's dwords 0 and 8 through 0xcf8/0xcfc, dword 0 through ECAM */
  PCI_HOST_BRIDGE: 'c',
  /** runs the mailbox (TINY_KERNEL_MAILBOX), prints "MBOX <count>" */
  MAILBOX: 'm',
} as const;

/** The mailbox: u32 count, then 16-byte entries {op, address, value, result} from +16. */
export const TINY_KERNEL_MAILBOX = 0x31_0000;
export const TINY_KERNEL_MAILBOX_MAX = 64;
export const MailboxOp = { WRITE8: 1, WRITE16: 2, WRITE32: 3, READ32: 4 } as const;
/** MSI vectors the kernel takes, and where it counts each one's interrupts (u32 each). */
export const TINY_KERNEL_MSI_VECTOR_BASE = 0x40;
export const TINY_KERNEL_MSI_VECTORS = 8;
export const TINY_KERNEL_MSI_COUNTS = 0x30_0020;

export const TINY_KERNEL_BANNER = 'TINY-KERNEL-BOOT';
/** Lines per second of the COUNT loop (one per LAPIC timer tick). */
export const TINY_KERNEL_LINES_PER_SECOND = 10;

let built: Promise<string> | undefined;

/** Assemble and link the tiny kernel once per process; resolves to the ELF's path. */
export function buildTinyKernel(): Promise<string> {
  built ??= (async () => {
    const dir = guestBuildDir();
    const obj = path.join(dir, 'pvh-counter.o');
    const elf = path.join(dir, 'pvh-counter.elf');
    await run('gcc', ['-c', '-o', obj, path.join(GUEST_SOURCES, 'pvh-counter.S')]);
    await run('ld', [
      '-nostdlib', '-static', '--build-id=none', '-z', 'max-page-size=0x1000', '-z', 'noexecstack',
      '-T', path.join(GUEST_SOURCES, 'pvh-counter.ld'), '-o', elf, obj,
    ]);
    return elf;
  })();
  built.catch(() => (built = undefined));
  return built;
}

/** The tiny kernel as it lies in guest RAM from TINY_KERNEL_LOAD_ADDRESS (its segments, zero-filled past their file bytes). */
export async function tinyKernelImage(): Promise<Buffer> {
  const file = fs.readFileSync(await buildTinyKernel());
  const elf = parseElfKernel(file);
  const image = Buffer.alloc(elf.end - TINY_KERNEL_LOAD_ADDRESS);
  for (const seg of elf.segments) file.copy(image, seg.paddr - TINY_KERNEL_LOAD_ADDRESS, seg.fileOffset, seg.fileOffset + seg.fileSize);
  return image;
}

/**
 * The COUNT values of the whole lines in `output`, in order. Console output arrives a few bytes
 * at a time: a last line still being printed ("COUNT 1" of "COUNT 130") is not a count.
 */
export function countsIn(output: string): number[] {
  return [...output.matchAll(/^COUNT (\d+)\n/gm)].map((m) => Number(m[1]));
}

/** The last STATUS line in `output`, parsed. */
export function lastStatus(output: string): { count: number; ticks: number; rxirqs: number } | undefined {
  const all = [...output.matchAll(/^STATUS count=(\d+) ticks=(\d+) rxirqs=(\d+)\n/gm)];
  const m = all[all.length - 1];
  return m && { count: Number(m[1]), ticks: Number(m[2]), rxirqs: Number(m[3]) };
}

/** The highest COUNT printed in `output`, or -1. */
export function lastCount(output: string): number {
  const c = countsIn(output);
  return c.length ? c[c.length - 1] : -1;
}

// Node's start-up is most of what a tern process costs (the guest itself mostly sleeps in
// HLT). Starting a handful at once on a small, busy host starves them all, so at most
// START_SLOTS processes start at a time; a slot frees at the first output, exit, or after
// START_HOLD_MS.
const START_SLOTS = 2;
const START_HOLD_MS = 3000;
let startsInFlight = 0;
const startQueue: (() => void)[] = [];

async function startSlot(): Promise<() => void> {
  if (startsInFlight >= START_SLOTS) await new Promise<void>((r) => startQueue.push(r));
  startsInFlight++;
  let released = false;
  return () => {
    if (released) return;
    released = true;
    startsInFlight--;
    startQueue.shift()?.();
  };
}

/**
 * Spawn `node dist/bin/tern.js ARGS` (or, with `launcher`, `dist/bin/tern ARGS` as users start
 * it, from its startup snapshot) as a GuestProcess, a few at a time.
 */
export async function startTern(args: string[], opts: { launcher?: boolean } = {}): Promise<GuestProcess> {
  const release = await startSlot();
  const vm = opts.launcher ? GuestProcess.ternLauncher(args) : GuestProcess.tern(args);
  const timer = setTimeout(release, START_HOLD_MS);
  const done = (): void => {
    clearTimeout(timer);
    release();
  };
  vm.child.stdout.once('data', done);
  vm.child.stderr.once('data', done);
  void vm.exited.then(done);
  return vm;
}

/**
 * Start the real `tern` CLI on the tiny kernel. `args` come after the defaults, so a later
 * --serial or --cpus there wins over the default one (the parser keeps the last value).
 */
export async function startTinyVm(args: string[] = [], opts: { cmdline?: string; launcher?: boolean } = {}): Promise<GuestProcess> {
  return startTern([
    '--kernel', await buildTinyKernel(),
    '--cmdline', opts.cmdline ?? 'tiny',
    '--cpus', 'boot=1', '--memory', 'size=64M', '--serial', 'tty', '--console', 'off',
    ...args,
  ], { launcher: opts.launcher });
}

/** A VM config for the tiny kernel: one vCPU, 64 MiB, its serial port into `serialFile`, no console. */
export async function tinyVmConfig(cmdline: string, serialFile: string): Promise<VmConfig> {
  return {
    payload: { kernel: await buildTinyKernel(), cmdline },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: serialFile },
    console: { mode: 'Off' },
  };
}
