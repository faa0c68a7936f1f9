// Typed face of the native addon (native/*.cc). The addon holds mechanism only: KVM ioctls,
// vCPU threads, guest RAM mappings, dirty bitmaps, eventfds. Every decision (what to map,
// which registers to set, what an exit means) is made in TypeScript.
//
// Conventions:
// - 64-bit values (registers, guest addresses, MSR data) cross the boundary as bigint.
// - Opaque kernel structures that are only ever saved and restored (xsave, lapic,
//   vcpu_events, debugregs, xcrs, irqchip, pit) cross as base64 strings of the raw struct,
//   so they are exact and JSON-serializable.
// - Every failed ioctl throws an Error whose message names the ioctl and errno, and whose
//   `code` is the errno name (e.g. 'EINVAL').
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export interface Regs {
  rax: bigint; rbx: bigint; rcx: bigint; rdx: bigint;
  rsi: bigint; rdi: bigint; rsp: bigint; rbp: bigint;
  r8: bigint; r9: bigint; r10: bigint; r11: bigint;
  r12: bigint; r13: bigint; r14: bigint; r15: bigint;
  rip: bigint; rflags: bigint;
}

export interface Segment {
  base: bigint; limit: number; selector: number; type: number;
  present: number; dpl: number; db: number; s: number; l: number; g: number; avl: number;
  unusable: number;
}

export interface DTable { base: bigint; limit: number }

export interface Sregs {
  cs: Segment; ds: Segment; es: Segment; fs: Segment; gs: Segment; ss: Segment;
  tr: Segment; ldt: Segment;
  gdt: DTable; idt: DTable;
  cr0: bigint; cr2: bigint; cr3: bigint; cr4: bigint; cr8: bigint;
  efer: bigint; apic_base: bigint;
  /** 256-bit pending external interrupt bitmap, as 4 u64 words. */
  interrupt_bitmap: bigint[];
}

export interface Fpu {
  fcw: number; fsw: number; ftwx: number; last_opcode: number;
  last_ip: bigint; last_dp: bigint; mxcsr: number;
  /** base64 of fpr[8][16] + xmm[16][16] */
  registers: string;
}

export interface MsrEntry { index: number; data: bigint }

/** Why a vCPU thread handed control to TypeScript. */
export type VcpuExit =
  | { kind: 'io'; direction: 'in' | 'out'; port: number; size: 1 | 2 | 4; data: number }
  | { kind: 'mmio'; direction: 'read' | 'write'; address: bigint; size: number; data: bigint }
  | { kind: 'hlt' }
  | { kind: 'shutdown' } // triple fault
  | { kind: 'system_event'; type: number; data?: bigint[] }
  | { kind: 'fail_entry'; reason: bigint }
  | { kind: 'internal_error'; suberror: number; data?: bigint[] }
  | { kind: 'unknown'; reason: number }
  | { kind: 'paused' } // the thread parked after requestPause()
  | { kind: 'stopped' } // the thread ended after stop() or a terminal exit
  | { kind: 'error'; message: string } // KVM_RUN itself failed, or the handler threw (then the vCPU stops)
  /** start() with probeForbiddenSyscall: what socket(2), which the filter forbids, gave the thread */
  | { kind: 'probe'; syscall: 'socket'; result: 'ok' | string };

/**
 * What a vCPU thread does when it makes a system call its seccomp filter does not allow:
 * 'trap' (default) reports the call on stderr and ends the process with SIGSYS; 'log' lets it
 * through and the kernel logs it (audit); 'errno' fails it with EPERM; 'off' installs no filter.
 */
export type SeccompMode = 'trap' | 'log' | 'errno' | 'off';

export interface VcpuStartOptions {
  seccomp?: SeccompMode;
  /**
   * For tests of the filter: the thread calls socket(2) once, after installing its filter and
   * before its first KVM_RUN, and reports the outcome as a 'probe' exit.
   */
  probeForbiddenSyscall?: boolean;
  /**
   * The thread parks (reporting 'paused') before its first KVM_RUN, until resume(): a migration
   * destination creates its threads before the source gives the VM up, so that running the
   * guest afterwards is only waking them.
   */
  parked?: boolean;
}

/**
 * Called on the JavaScript thread for every exit, while the vCPU thread waits.
 * For 'in' and MMIO 'read' the return value is what the guest reads (number or bigint;
 * nothing = 0); for other kinds it is ignored. Returning 'stop' ends the vCPU thread after
 * this exit. String I/O (rep ins/outs) arrives as one call per element.
 * A handler that throws gets one more call with {kind:'error', message}, then the vCPU stops.
 * 'paused' and 'stopped' are delivered after the fact (the thread does not wait for them).
 */
export type VcpuExitHandler = (exit: VcpuExit) => number | bigint | 'stop' | void;

/**
 * State getters/setters need the thread out of KVM_RUN: call them before start(), from the
 * exit handler, while paused, or after 'stopped'; otherwise they throw (code 'EBUSY').
 */
export interface NativeVcpu {
  readonly id: number;
  setCpuid(entries: CpuidEntry[]): void;
  getRegs(): Regs; setRegs(r: Regs): void;
  getSregs(): Sregs; setSregs(s: Sregs): void;
  getFpu(): Fpu; setFpu(f: Fpu): void;
  /** base64 of struct kvm_xsave (KVM_GET_XSAVE2 when available, size reported by KVM). */
  getXsave(): string; setXsave(b64: string): void;
  getXcrs(): string; setXcrs(b64: string): void;
  /** KVM_GET_MSRS: the entries up to the first MSR KVM cannot read (see readMsrs). */
  getMsrs(indices: number[]): MsrEntry[];
  /** KVM_SET_MSRS: returns how many were set (stops at the first rejected one; see writeMsrs). */
  setMsrs(entries: MsrEntry[]): number;
  getLapic(): string; setLapic(b64: string): void;
  getMpState(): number; setMpState(state: number): void;
  /** KVM_TRANSLATE: a guest virtual address through the vCPU's page tables; null when unmapped. */
  translate(address: bigint): bigint | null;
  getVcpuEvents(): string; setVcpuEvents(b64: string): void;
  getDebugRegs(): string; setDebugRegs(b64: string): void;
  /** KVM_KVMCLOCK_CTRL: tell the guest it was paused (no soft-lockup warnings). */
  kvmclockCtrl(): boolean;
  /**
   * Start the native thread that loops on KVM_RUN. Allowed again after 'stopped'. Before its
   * first KVM_RUN the thread installs a seccomp filter on itself (options.seccomp, default
   * 'trap'): ioctl(KVM_RUN) on this vCPU's fd and the few calls the thread needs to hand
   * exits to JavaScript (futex, write to libuv's eventfd, malloc's mmap family, signal return,
   * exit); nothing else.
   */
  start(handler: VcpuExitHandler, options?: VcpuStartOptions): void;
  /**
   * Kick the thread out of KVM_RUN (immediate_exit + signal); it completes a pending I/O
   * instruction, reports 'paused' and parks. No-op when parked or not running.
   */
  requestPause(): void;
  /**
   * Let a parked thread run again; true if it was parked (its 'paused' report may still be on
   * its way). A pause requested and not carried out yet is withdrawn: the thread runs on.
   */
  resume(): boolean;
  /** End the thread (kicks it if running); it reports 'stopped'. Idempotent. */
  stop(): void;
  /** Close the vCPU fd and unmap kvm_run; throws EBUSY unless the thread has stopped. */
  close(): void;
}

export interface IrqRoute {
  gsi: number;
  type: 'irqchip' | 'msi';
  /** irqchip: 0 = PIC master, 1 = PIC slave, 2 = IOAPIC */
  irqchip?: number; pin?: number;
  /** msi */
  addressLo?: number; addressHi?: number; data?: number; devid?: number;
}

export interface MemorySlotInfo {
  slot: number;
  guestAddress: bigint;
  size: number;
  /** memfd backing the slot (a private dup when fromFd was given), closed by vm.close() */
  fd: number;
  /**
   * Host mapping split in chunks of at most chunkSize bytes, in guest-address order. The
   * mapping lives until vm.close() and every chunk has been garbage-collected. Absent with
   * deferChunks: vm.memoryChunks(slot) makes them on first use.
   */
  chunks?: ArrayBuffer[];
  chunkSize: number;
}

export interface NativeVm {
  createIrqchip(): void;
  createPit2(): void;
  setTssAddr(addr: number): void;
  setIdentityMapAddr(addr: bigint): void;
  /**
   * Back [guestAddress, guestAddress+size) with a new memfd mapped MAP_SHARED, register it
   * as KVM slot `slot`, with KVM_MEM_LOG_DIRTY_PAGES unless `dirtyLogging` is false. `name`
   * labels the memfd. `fromFd` maps an existing memfd/file instead (restore, fd passing);
   * `privateMap` maps it MAP_PRIVATE (copy-on-write, lazy). `hugePages` advises the kernel to
   * back a shared mapping with transparent huge pages (MADV_HUGEPAGE). size and guestAddress
   * must be multiples of 4096; a slot number already added here throws EEXIST.
   */
  addMemorySlot(opts: {
    slot: number; guestAddress: bigint; size: number; name?: string;
    fromFd?: number; fileOffset?: number; privateMap?: boolean;
    dirtyLogging?: boolean; hugePages?: boolean;
    /** leave out `chunks` (see memoryChunks): V8 runs a full GC when it first sees them */
    deferChunks?: boolean;
  }): MemorySlotInfo;
  /** The slot's RAM as ArrayBuffer chunks; the same array every time. */
  memoryChunks(slot: number): ArrayBuffer[];
  /**
   * Pages of `slot` dirtied since the previous call: KVM_GET_DIRTY_LOG OR the VMM-side bitmap
   * (marked by markDirty / the shared bitmap). Both are cleared. One bit per 4 KiB page, bit i
   * of byte i>>3 is page i.
   */
  getDirtyBitmap(slot: number): Uint8Array;
  /**
   * KVM_MEM_LOG_DIRTY_PAGES on or off for `slot` (addMemorySlot's `dirtyLogging`, on unless
   * it said otherwise). getDirtyBitmap throws while it is off.
   */
  setDirtyLogging(slot: number, on: boolean): void;
  /** The VMM-side bitmap of `slot` itself, shared with native code, for TypeScript writers to mark. */
  vmmDirtyBitmap(slot: number): Uint8Array;
  irqLine(irq: number, level: 0 | 1): void;
  setGsiRouting(routes: IrqRoute[]): void;
  /** KVM_IRQFD: eventfd `fd` injects `gsi`. resampleFd for level-triggered lines. */
  irqfd(fd: number, gsi: number, opts?: { deassign?: boolean; resampleFd?: number }): void;
  /** KVM_IOEVENTFD: guest writes to addr (pio or mmio) signal eventfd fd without a userspace exit. */
  ioeventfd(fd: number, addr: bigint, len: number, opts?: { pio?: boolean; datamatch?: bigint; deassign?: boolean }): void;
  getIrqchip(chip: number): string; setIrqchip(chip: number, b64: string): void;
  getPit2(): string; setPit2(b64: string): void;
  /** KVM_GET_CLOCK / KVM_SET_CLOCK (kvmclock, ns) */
  getClock(): { clock: bigint; flags: number }; setClock(clock: bigint): void;
  createVcpu(id: number): NativeVcpu;
  close(): void;
}

export interface NativeKvm {
  apiVersion(): number;
  checkExtension(cap: number): number;
  supportedCpuid(): CpuidEntry[];
  /** MSR indices KVM saves/restores (KVM_GET_MSR_INDEX_LIST). */
  msrIndexList(): number[];
  createVm(): NativeVm;
  close(): void;
}

/**
 * A native thread that waits on eventfds (ioeventfd doorbells) for JavaScript. Holds the event
 * loop open while it watches at least one fd; idle or closed, it does not. A watcher that is
 * garbage-collected closes itself: keep a reference while it should report.
 */
export interface NativeEventfdWatcher {
  /**
   * Start watching `fd`, an eventfd made with EFD_NONBLOCK (a blocking one is refused, code
   * 'EINVAL'). Throws code 'EEXIST' when it is already watched, 'EBADF' after close().
   */
  add(fd: number): void;
  /**
   * Stop watching `fd`: once this returns the callback hears nothing more of it, not even
   * counts already read. Does nothing for an fd that is not watched. Call it before closing fd.
   */
  remove(fd: number): void;
  /** Stop and join the thread and let the event loop go. Idempotent. */
  close(): void;
}

/** Guest RAM as a native queue worker sees it: one entry per region (GuestRegion.hostRange). */
export interface NativeRamRange {
  guestAddress: number;
  /** the region's host mapping, in order (adjacent chunks continue each other) */
  chunks: ArrayBuffer[];
  /** the region's VMM-side dirty bitmap, one bit per page; the worker marks what it writes */
  dirty?: Uint8Array;
}

/** What every native queue server needs: the queue as the store has it, and its fds. */
export interface NativeQueueOptions {
  memory: NativeRamRange[];
  size: number;
  desc: number;
  avail: number;
  used: number;
  eventIdx: boolean;
  indirect: boolean;
  nextAvail: number;
  nextUsed: number;
  /** the queue's doorbell (its ioeventfd): the worker reads it */
  kickFd: number;
  /** the queue's MSI-X vector's irqfd: the worker writes it */
  interruptFd: number;
}

/** What serveBlockQueue needs besides the queue: the disk. */
export interface NativeBlockQueueOptions extends NativeQueueOptions {
  /** a raw image, opened without O_DIRECT */
  imageFd: number;
  /** the disk's size in sectors */
  capacity: number;
  readonly: boolean;
  /** what GET_ID answers (at most 20 bytes are used) */
  id: string;
}

/** What a block request queue's requests add to its disk's counters (vm.counters' names). */
export type BlockQueueCounters = {
  read_bytes: number;
  read_ops: number;
  write_bytes: number;
  write_ops: number;
};

/** What serveNetQueue needs besides the queue: its tap and what the guest negotiated. */
export interface NativeNetQueueOptions extends NativeQueueOptions {
  /** the queue pair's tap fd (nonblocking, with a 12-byte virtio-net header) */
  tapFd: number;
  /** a receive queue (else a transmit queue) */
  receive: boolean;
  /** VIRTIO_NET_F_MRG_RXBUF was negotiated */
  mergeable: boolean;
  /**
   * Transmit: a turn that sent a frame of txHoldMinFrame bytes or more hands its chains back
   * with the next turn's, or after txHoldUs (at most 100 000) if no frame comes: one interrupt
   * for a burst and the next. Absent or 0: every turn's chains go back at once.
   */
  txHoldUs?: number;
  txHoldMinFrame?: number;
}

/** What a net queue's frames add to its device's counters (vm.counters' names). */
export type NetQueueCounters = {
  rx_bytes: number;
  rx_frames: number;
  rx_dropped: number;
  tx_bytes: number;
  tx_frames: number;
  tx_dropped: number;
};

/** A virtqueue served by a native thread (native/block_queue.cc, native/net_queue.cc). */
export interface NativeQueueServer<C = Record<string, number>> {
  /**
   * End the thread after the request it is doing; returns the queue's cursors and what was
   * counted since the last takeCounters(). Idempotent (later calls count nothing).
   */
  /** `interrupt`: chains handed back at the stop call for an interrupt, which the caller raises. */
  stop(): { nextAvail: number; nextUsed: number; counters: C; interrupt: boolean };
  /** What was counted since the last call (the thread goes on). */
  takeCounters(): C;
  /** The interrupts the thread raised (irqfd writes the kernel took), and how long ago the last was. */
  interrupts(): { sent: number; lastSentMsAgo: number | null };
}

export type NativeBlockQueue = NativeQueueServer<BlockQueueCounters>;
export type NativeNetQueue = NativeQueueServer<NetQueueCounters>;

export interface NativeAddon {
  openKvm(path?: string): NativeKvm;
  /**
   * Serve a virtio-blk request queue on a native thread until stop(). `onBroken(reason)` runs
   * on the JavaScript thread when the driver broke the queue: the thread has stopped serving.
   * Throws when the options are malformed or the rings are not inside `memory`.
   */
  serveBlockQueue(options: NativeBlockQueueOptions, onBroken: (reason: string) => void): NativeBlockQueue;
  /** A virtio-net queue served by a native thread against a tap (native/net_queue.cc). */
  serveNetQueue(options: NativeNetQueueOptions, onBroken: (reason: string) => void): NativeNetQueue;
  /**
   * `queues` nonblocking fds of tap `name` (created if it does not exist; `%d` in the name is
   * numbered by the kernel), each with a 12-byte virtio-net header; the name it has. The tap
   * is multi-queue unless it already existed as a single-queue one.
   */
  openTap(name: string, queues: number): { name: string; fds: number[]; multiQueue: boolean };
  /**
   * A tap fd opened elsewhere (fd=, SCM_RIGHTS), made ready like openTap's: it must have been
   * opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (EINVAL otherwise). Its interface's name, and
   * a close-on-exec duplicate of `fd` the caller owns (`fd` itself stays as it was).
   */
  adoptTap(fd: number): { name: string; multiQueue: boolean; fd: number };
  /** TUNSETQUEUE: attach or detach one queue of a multi-queue tap (no error when it already is). */
  tapSetQueue(fd: number, attached: boolean): void;
  /** TUNSETOFFLOAD: the TUN_F_* offloads the guest takes. */
  tapSetOffload(fd: number, flags: number): void;
  /** The host side of an interface: IPv4 address and mask, IPv6 address and prefix length (default 64), MAC, MTU, link up. */
  configureInterface(name: string, settings: { ip?: string; mask?: string; ip6?: string; prefix6?: number; mac?: number[]; mtu?: number; up?: boolean }): void;
  /**
   * Watch eventfds on a native thread. callback(fd, count) runs on the JavaScript thread with
   * the sum of the counter values read since the fd was last reported (at most
   * Number.MAX_SAFE_INTEGER): counts coalesce, at most one call per fd per delivery. With
   * `error` set, the fd is no longer watched: reading it failed (code 'EIO': not an eventfd),
   * or the callback threw for it (the thrown value is error.cause).
   */
  watchEventfds(callback: (fd: number, count: number, error?: Error) => void): NativeEventfdWatcher;
  /** eventfd(2); flags default to EventFdFlags.CLOEXEC | EventFdFlags.NONBLOCK. */
  eventfd(initial?: number, flags?: number): number;
  /** read the 8-byte counter of an eventfd; null if it would block (EFD_NONBLOCK) */
  eventfdRead(fd: number): bigint | null;
  eventfdWrite(fd: number, value: bigint): void;
  closeFd(fd: number): void;
  /**
   * A new pseudo-terminal: its master (non-blocking, close-on-exec), its slave's path
   * (/dev/pts/N), which a user opens to reach the console, and an fd of the slave, set raw,
   * for the caller to keep open while it uses the master (else reads fail when no user has it).
   */
  openPty(): { fd: number; path: string; slaveFd: number };
  /**
   * flock(2). Exclusive unless exclusive: false; unlock: true releases. Returns false only when
   * nonblocking and another open file description holds a conflicting lock.
   */
  flock(fd: number, opts?: { exclusive?: boolean; nonblocking?: boolean; unlock?: boolean }): boolean;
  /**
   * fallocate(2) with FALLOC_FL_KEEP_SIZE and FALLOC_FL_PUNCH_HOLE ('punch-hole') or
   * FALLOC_FL_ZERO_RANGE ('zero-range'). Returns false when the file system does not support
   * the mode (EOPNOTSUPP); other failures throw.
   */
  fallocate(fd: number, mode: 'punch-hole' | 'zero-range', offset: number, length: number): boolean;
  /** Zeroed memory of `size` bytes (at most 64 MiB) starting on a 4 KiB boundary, for O_DIRECT. */
  alignedBuffer(size: number): ArrayBuffer;
  /** One byte per 4 KiB page of `view` (the last may be partial): 1 where the page is all zero. */
  zeroPages(view: Uint8Array): Uint8Array;
  /**
   * The runs of pages below `pages` set in any of `bitmaps` (bit p&7 of byte p>>3, as KVM's
   * dirty log): [firstPage, count] pairs. Each bitmap must cover `pages`.
   */
  dirtyRuns(pages: number, bitmaps: readonly Uint8Array[]): Uint32Array;
  /**
   * Write runs of `view` ([offset in view, length, file position] triples) with pwrite(2), as
   * one task on libuv's thread pool; resolves to the bytes written (fewer only if a write wrote
   * nothing), rejects with the errno of a failed write.
   */
  pwriteRuns(fd: number, view: Uint8Array, runs: Float64Array): Promise<number>;
  /** a fresh XXH64 state (seed 0), held in the returned buffer */
  xxh64Init(): Uint8Array;
  xxh64Update(state: Uint8Array, data: Uint8Array): void;
  /** the hash of everything fed so far, 16 lowercase hex digits */
  xxh64Digest(state: Uint8Array): string;
  /** lseek(fd, offset, SEEK_DATA): start of the next data at or after offset; -1 if none. */
  seekData(fd: number, offset: number): number;
  /** lseek(fd, offset, SEEK_HOLE): start of the next hole at or after offset (EOF counts). */
  seekHole(fd: number, offset: number): number;
  /** renameat2(from, to, RENAME_NOREPLACE): throws with code EEXIST when `to` exists. */
  renameNoReplace(from: string, to: string): void;
  /**
   * sendmsg all of `data` (1..64 KiB) on the UNIX stream socket `socketFd`, with `fds` (at most
   * 64) as one SCM_RIGHTS message on its first byte. The socket may be non-blocking (a
   * net.Socket's `_handle.fd`): the call waits with poll() for room, up to timeoutMs in all,
   * then throws with code 'ETIMEDOUT' (part of `data` may be out by then: drop the
   * connection). The caller keeps its own copies of `fds`.
   */
  sendWithFds(socketFd: number, data: Uint8Array, fds: number[], timeoutMs: number): void;
  /**
   * Read exactly `length` bytes (1..64 KiB) from `socketFd` and the descriptors sent with them
   * (close-on-exec), waiting with poll() up to timeoutMs in all. Never reads past `length`
   * bytes: what follows stays in the socket for Node. Throws (and closes every descriptor
   * received) when more than maxFds arrive or the control data was truncated (code
   * 'EMSGSIZE'), the peer closes first ('ECONNRESET') or the time runs out ('ETIMEDOUT').
   * The returned fds are the caller's to close.
   */
  recvWithFds(socketFd: number, length: number, maxFds: number, timeoutMs: number): { data: Buffer; fds: number[] };
  /**
   * The descriptors sent with the first bytes waiting on a stream socket, without taking the
   * bytes (MSG_PEEK): null when nothing has arrived, bytes 0 when the peer closed. More than
   * `maxFds` is an error (EMSGSIZE), every one closed.
   */
  peekFds(socketFd: number, maxFds: number): { bytes: number; fds: number[] } | null;
}

/** The most descriptors sendWithFds/recvWithFds carry in one message. */
export const MAX_PASSED_FDS = 64;
/** The most bytes sendWithFds/recvWithFds carry in one call. */
export const MAX_PASSED_BYTES = 64 * 1024;

/** eventfd(2) flags for NativeAddon.eventfd (default: CLOEXEC | NONBLOCK). */
export const EventFdFlags = {
  SEMAPHORE: 0x1,
  NONBLOCK: 0x800,
  CLOEXEC: 0x80000,
} as const;

/**
 * Read the MSRs in `indices` that this vCPU can read. KVM_GET_MSRS stops at the first
 * MSR it cannot read; that one is skipped and reading goes on after it.
 */
export function readMsrs(vcpu: NativeVcpu, indices: readonly number[]): { entries: MsrEntry[]; skipped: number[] } {
  const entries: MsrEntry[] = [];
  const skipped: number[] = [];
  let rest = [...indices];
  while (rest.length > 0) {
    const got = vcpu.getMsrs(rest);
    entries.push(...got);
    if (got.length === rest.length) break;
    skipped.push(rest[got.length]);
    rest = rest.slice(got.length + 1);
  }
  return { entries, skipped };
}

/**
 * Set every MSR of `entries` this vCPU accepts. KVM_SET_MSRS stops at the first MSR it rejects
 * (an index the destination's KVM does not know, or a value its CPU cannot hold); that one is
 * skipped and setting goes on after it. Returns how many were set and the rejected indices,
 * in order.
 */
export function writeMsrs(vcpu: NativeVcpu, entries: readonly MsrEntry[]): { set: number; rejected: number[] } {
  const rejected: number[] = [];
  let set = 0;
  let rest = [...entries];
  while (rest.length > 0) {
    const n = vcpu.setMsrs(rest);
    set += n;
    if (n >= rest.length) break;
    rejected.push(rest[n].index);
    rest = rest.slice(n + 1);
  }
  return { set, rejected };
}

let cached: NativeAddon | undefined;

/** Load the compiled addon (build/Release/tern_native.node) once. */
export function native(): NativeAddon {
  if (!cached) {
    // Compiled modules live in dist/src/native/, the bundled CLI in dist/bin/: the package
    // root is whichever ancestor holds build/Release. TERN_NATIVE_ADDON points at an addon
    // built elsewhere (a packaged or side-by-side build).
    const candidates = [path.resolve(__dirname, '..', '..', '..'), path.resolve(__dirname, '..', '..')].map((root) =>
      path.join(root, 'build', 'Release', 'tern_native.node'),
    );
    const file = process.env.TERN_NATIVE_ADDON ?? candidates.find((f) => fs.existsSync(f)) ?? candidates[0];
    // (createRequire: a CLI started from a V8 startup snapshot has a require that loads only
    // Node's built-in modules)
    cached = createRequire(file)(file) as NativeAddon;
  }
  return cached;
}

/** KVM capability numbers used by Tern (linux/kvm.h). */
export const KvmCap = {
  IRQCHIP: 0,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_VCPUS: 9,
  NR_MEMSLOTS: 10,
  PIT2: 33,
  IRQ_ROUTING: 25,
  IRQFD: 32,
  IOEVENTFD: 36,
  ADJUST_CLOCK: 39,
  XSAVE: 55,
  XCRS: 56,
  TSC_DEADLINE_TIMER: 72,
  MAX_VCPUS: 66,
  KVMCLOCK_CTRL: 76,
  IMMEDIATE_EXIT: 136,
  MANUAL_DIRTY_LOG_PROTECT2: 168,
  XSAVE2: 208,
} as const;
