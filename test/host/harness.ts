// Shared pieces of the host-tier tests: build a tiny assembly guest, create a VM with one RAM
// slot and one vCPU already in 64-bit mode, and run the vCPU until its thread stops.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';

import {
  RFLAGS_FIXED,
  RFLAGS_IOPL3,
  longModeSregs,
  writeBootGdt,
  writeIdentityPageTables,
} from '../../src/boot/x86/long-mode';
import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import {
  MemorySlotInfo,
  NativeKvm,
  NativeVcpu,
  NativeVm,
  Regs,
  VcpuExit,
  VcpuExitHandler,
  VcpuStartOptions,
  native,
} from '../../src/native/kvm';

export const GUEST_LOAD_ADDRESS = 0x10_0000;
export const GUEST_STACK_TOP = 0x20_0000;
/** Port the test guests write to when they are done. */
export const EXIT_PORT = 0x501;

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');
export const GUEST_SOURCES = path.join(REPO_ROOT, 'test', 'guests');

export interface GuestImage {
  name: string;
  code: Uint8Array;
  loadAddress: number;
  /** Global and local symbols of the linked guest, by name. */
  symbols: Record<string, number>;
}

let buildDir: string | undefined;
const built = new Map<string, GuestImage>();

/** A per-process scratch directory for built guests, removed when the process exits. */
export function guestBuildDir(): string {
  if (!buildDir) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-guests-'));
    process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
    buildDir = dir;
  }
  return buildDir;
}

/** Assemble and link test/guests/<name>.S at `loadAddress`, flat binary. */
export function buildGuest(name: string, loadAddress = GUEST_LOAD_ADDRESS): GuestImage {
  const key = `${name}@${loadAddress}`;
  const cached = built.get(key);
  if (cached) return cached;
  const src = path.join(GUEST_SOURCES, `${name}.S`);
  const elf = path.join(guestBuildDir(), `${name}-${loadAddress.toString(16)}.elf`);
  const bin = elf.replace(/\.elf$/, '.bin');
  execFileSync('gcc', [
    '-nostdlib', '-static', '-no-pie', '-Wl,--build-id=none',
    `-Wl,-Ttext=0x${loadAddress.toString(16)}`, '-Wl,-e,_start',
    '-o', elf, src,
  ]);
  execFileSync('objcopy', ['-O', 'binary', '-j', '.text', elf, bin]);
  const symbols: Record<string, number> = {};
  for (const line of execFileSync('nm', [elf], { encoding: 'utf8' }).split('\n')) {
    const m = /^([0-9a-f]+)\s+\w\s+(\S+)$/.exec(line.trim());
    if (m) symbols[m[2]] = parseInt(m[1], 16);
  }
  const image = { name, code: new Uint8Array(fs.readFileSync(bin)), loadAddress, symbols };
  built.set(key, image);
  return image;
}

export interface TestVmOptions {
  memSize?: number;
  /** In-kernel irqchip (PIC/IOAPIC/LAPIC) and PIT. Default false. */
  irqchip?: boolean;
  ring?: 0 | 3;
  guest?: GuestImage;
  /** Passed to writeIdentityPageTables. */
  presetDirty?: boolean;
  /** Extra register values (rip defaults to the guest's load address). */
  regs?: Partial<Regs>;
}

export interface TestVm {
  kvm: NativeKvm;
  vm: NativeVm;
  vcpu: NativeVcpu;
  mem: GuestMemory;
  slot: MemorySlotInfo;
  close(): void;
}

export function createTestVm(opts: TestVmOptions = {}): TestVm {
  const memSize = opts.memSize ?? 16 * 1024 * 1024;
  const ring = opts.ring ?? 3;
  const kvm = native().openKvm();
  const vm = kvm.createVm();
  if (opts.irqchip) {
    vm.setTssAddr(0xfeffd000);
    vm.setIdentityMapAddr(0xfeffc000n);
    vm.createIrqchip();
    vm.createPit2();
  }
  const slot = vm.addMemorySlot({ slot: 0, guestAddress: 0n, size: memSize, name: 'test-ram' });
  const mem = new GuestMemory([
    new GuestRegion({
      guestAddress: 0,
      size: memSize,
      chunks: slot.chunks!,
      chunkSize: slot.chunkSize,
      dirtyBitmap: vm.vmmDirtyBitmap(0),
    }),
  ]);
  writeBootGdt(mem, { userPortIo: true });
  const cr3 = writeIdentityPageTables(mem, { user: ring === 3, presetDirty: opts.presetDirty });
  if (opts.guest) mem.write(opts.guest.loadAddress, opts.guest.code);

  const vcpu = addVcpu(kvm, vm, 0, { cr3, ring, rip: opts.guest?.loadAddress ?? GUEST_LOAD_ADDRESS, regs: opts.regs });
  return {
    kvm, vm, vcpu, mem, slot,
    close() {
      vcpu.close();
      vm.close();
      kvm.close();
    },
  };
}

/** Create vCPU `id` in 64-bit mode on the boot GDT and page tables, at `rip`. */
export function addVcpu(
  kvm: NativeKvm,
  vm: NativeVm,
  id: number,
  opts: { cr3: number; ring: 0 | 3; rip: number; regs?: Partial<Regs> },
): NativeVcpu {
  const vcpu = vm.createVcpu(id);
  vcpu.setCpuid(kvm.supportedCpuid());
  vcpu.setSregs(longModeSregs(vcpu.getSregs(), { cr3: opts.cr3, ring: opts.ring }));
  vcpu.setRegs({
    rax: 0n, rbx: 0n, rcx: 0n, rdx: 0n, rsi: 0n, rdi: 0n, rsp: BigInt(GUEST_STACK_TOP), rbp: 0n,
    r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n,
    rip: BigInt(opts.rip),
    // IOPL 3 for hosts that honour it; the TSS bitmap covers hosts that do not.
    rflags: RFLAGS_FIXED | (opts.ring === 3 ? RFLAGS_IOPL3 : 0n),
    ...opts.regs,
  });
  return vcpu;
}

export interface RunResult {
  /** Every exit reported, in order, including the final 'stopped'. */
  exits: VcpuExit[];
}

/**
 * Start the vCPU with `handler` and resolve once the thread reports 'stopped'.
 * An 'out' to EXIT_PORT stops the vCPU unless the handler says otherwise.
 * Rejects (after stopping the vCPU) if it has not stopped within timeoutMs.
 */
export function runVcpu(
  vcpu: NativeVcpu,
  handler: VcpuExitHandler = () => undefined,
  // A guard against a guest that never stops, not a measure of speed: in the nested lab, other
  // tests' synchronous guest builds can hold this process's event loop for seconds.
  timeoutMs = 60_000,
  options?: VcpuStartOptions,
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const exits: VcpuExit[] = [];
    let timedOut: Error | undefined;
    const timer = setTimeout(() => {
      // Stop the thread and report the timeout once it has stopped, so that the caller's
      // cleanup (closing the vCPU) does not fail on a running thread and hide this error.
      timedOut = new Error(`vCPU did not stop within ${timeoutMs} ms; exits so far: ${JSON.stringify(exits, bigintReplacer)}`);
      vcpu.stop();
    }, timeoutMs);
    vcpu.start((exit) => {
      exits.push(exit);
      if (exit.kind === 'stopped') {
        clearTimeout(timer);
        if (timedOut) reject(timedOut);
        else resolve({ exits });
        return undefined;
      }
      const r = handler(exit);
      if (r === undefined && exit.kind === 'io' && exit.direction === 'out' && exit.port === EXIT_PORT) return 'stop';
      return r;
    }, options);
  });
}

export function bigintReplacer(_k: string, v: unknown): unknown {
  return typeof v === 'bigint' ? `0x${v.toString(16)}` : v;
}

/** Page numbers whose bit is set in a dirty bitmap. */
export function dirtyPages(bitmap: Uint8Array): number[] {
  const pages: number[] = [];
  for (let i = 0; i < bitmap.length; i++) {
    if (!bitmap[i]) continue;
    for (let b = 0; b < 8; b++) if (bitmap[i] & (1 << b)) pages.push(i * 8 + b);
  }
  return pages;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Poll cond every 20 ms until it holds; fail naming `what` after timeoutMs. */
export async function waitUntil(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    await sleep(20);
  }
}

/** A pino logger (at `level`) whose lines are kept, parsed. */
export function capturingLogger(level: pino.Level = 'info'): { log: pino.Logger; lines: { msg: string; level: number; suppressed?: number; [k: string]: unknown }[] } {
  const lines: { msg: string; level: number; suppressed?: number }[] = [];
  const log = pino({ level }, { write: (s: string) => void lines.push(JSON.parse(s)) });
  return { log, lines };
}

/** The VmFlags of this process's mapping of `fd` (a memfd), from /proc/self/smaps. */
export function vmFlagsOfMemfd(fd: number): string[] {
  // (the fd's link and the mapping's name are both "/memfd:NAME (deleted)")
  const target = fs.readlinkSync(`/proc/self/fd/${fd}`);
  const [m] = mappingsNamed(target);
  if (!m) throw new Error(`no mapping of ${target}`);
  return m.flags;
}

/**
 * This process's mappings named `name` (as smaps names it): address range and VmFlags. A
 * mapping outlives its VM until V8 collects the ArrayBuffers over it.
 */
export function mappingsNamed(name: string): { range: string; flags: string[] }[] {
  const lines = fs.readFileSync('/proc/self/smaps', 'utf8').split('\n');
  const out: { range: string; flags: string[] }[] = [];
  lines.forEach((l, at) => {
    if (!/^[0-9a-f]+-[0-9a-f]+ /.test(l) || !l.endsWith(` ${name}`)) return;
    const flags = lines.slice(at + 1).find((x) => x.startsWith('VmFlags:'))!;
    out.push({ range: l.split(' ')[0], flags: flags.slice('VmFlags:'.length).trim().split(/\s+/) });
  });
  return out;
}
