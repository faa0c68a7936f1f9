// Where a vCPU is in its guest and what stands between it and an interrupt, read while it is
// parked for a moment. For a health report on a guest gone silent: a vCPU that makes no exits
// and whose thread keeps using CPU runs the guest somewhere, and a few of these samples say
// where (one address or a small loop), whether interrupts are enabled there, and which vectors
// its local APIC holds pending (IRR) or in service (ISR, an interrupt whose EOI never came
// blocks every vector of its priority class and below).
import { KvmMpState } from '../boot/boot';
import { KVM_LAPIC_STATE_SIZE } from '../boot/vcpu-init';
import type { NativeVcpu } from '../native/kvm';
import type { GuestMemory } from '../memory/guest-memory';

/** RFLAGS.IF */
const RFLAGS_IF = 1n << 9n;
const MSR_IA32_TSC = 0x10;
const MSR_IA32_TSC_DEADLINE = 0x6e0;
/** Local APIC registers in struct kvm_lapic_state (the APIC page's first KiB, 16 bytes apart). */
const APIC_TPR = 0x80;
const APIC_PPR = 0xa0;
const APIC_ISR = 0x100;
const APIC_IRR = 0x200;
const APIC_LVT_TIMER = 0x320;
/**
 * struct kvm_vcpu_events: exception {injected, nr, has_error_code, pending, error_code (u32 at 4)}
 * at 0, interrupt {injected, nr, soft, shadow} at 8, nmi {injected, pending, masked} at 12.
 */
const EVENTS_EXCEPTION = 0;
const EVENTS_INTERRUPT = 8;
const EVENTS_NMI = 12;
const EVENTS_MIN_SIZE = 16;

export interface VcpuSample {
  /** the guest's instruction pointer, hex */
  rip: string;
  /** privilege level (0: the guest's kernel) */
  cpl: number;
  /** RFLAGS.IF: the guest takes external interrupts here */
  interruptsEnabled: boolean;
  /** the instruction before blocked interrupts for one more (sti, mov ss) */
  interruptShadow: boolean;
  /** the vector KVM is injecting on the next entry, if any */
  injecting: number | null;
  /** an exception KVM has pending or is injecting (vector, error code), if any */
  exception: { vector: number; errorCode: number | null; injected: boolean } | null;
  nmiPending: boolean;
  nmiMasked: boolean;
  /** KVM_MP_STATE_*: runnable, halted... */
  mpState: string;
  apic: LapicSummary;
  /** TSC-deadline timer: TSC cycles until the deadline (negative: overdue), null when unarmed */
  timerDueInCycles: string | null;
  /** CR2 (the last page fault's address) and CR3 (the page tables), hex */
  cr2: string;
  cr3: string;
  /**
   * CR3's page-table root lies in guest RAM. When it does not, nothing the vCPU fetches
   * translates: it faults on its own instruction for good (a corrupt guest state).
   */
  pageTableRootInRam: boolean;
  /**
   * The code around rip as a kernel oops prints it: hex bytes, the one at rip in <>; bytes the
   * vCPU cannot reach through its page tables, or outside RAM, are "??". Matched against the
   * guest's binaries, it names the loop a vCPU is caught in.
   */
  code: string;
  /** The first quadwords at rsp, hex (return addresses name the callers); null when unmapped. */
  stack: (string | null)[];
}

/** Bytes the code line shows before rip, and from rip on (a loop's jump back lies behind rip). */
const CODE_BEFORE = 32;
const CODE_AFTER = 32;
const STACK_WORDS = 8;
const PAGE = 4096n;
/** CR3's page-table root: bits 12-51 (below them PCID or cache flags, bit 63 the no-flush hint) */
const CR3_ROOT = 0x000f_ffff_ffff_f000n;

/** Whether a guest physical page lies in RAM (`regionFor` throws for one that does not). */
export function pageInRam(memory: Pick<GuestMemory, 'regionFor'>, address: bigint): boolean {
  if (address + PAGE > BigInt(Number.MAX_SAFE_INTEGER)) return false;
  try {
    memory.regionFor(Number(address), Number(PAGE));
    return true;
  } catch {
    return false;
  }
}

/**
 * Guest memory at a virtual address as the vCPU sees it, a page at a time: each byte, or null
 * where the page is unmapped or not guest RAM.
 */
export function readGuestVirtual(vcpu: Pick<NativeVcpu, 'translate'>, memory: Pick<GuestMemory, 'read'>, address: bigint, length: number): (number | null)[] {
  const out: (number | null)[] = [];
  let va = BigInt.asUintN(64, address);
  while (out.length < length) {
    const inPage = Number(PAGE - (va % PAGE));
    const n = Math.min(inPage, length - out.length);
    let bytes: Uint8Array | null = null;
    const pa = vcpu.translate(va);
    if (pa !== null && pa + BigInt(n) <= BigInt(Number.MAX_SAFE_INTEGER)) {
      try {
        bytes = memory.read(Number(pa), n);
      } catch {
        bytes = null; // (MMIO or a hole: nothing to show)
      }
    }
    for (let i = 0; i < n; i++) out.push(bytes ? bytes[i] : null);
    va = BigInt.asUintN(64, va + BigInt(n));
  }
  return out;
}

/** The oops-style code line: hex bytes, the byte at `at` in <>, unreadable ones ??. */
export function formatCodeLine(bytes: (number | null)[], at: number): string {
  return bytes
    .map((b, i) => {
      const hex = b === null ? '??' : b.toString(16).padStart(2, '0');
      return i === at ? `<${hex}>` : hex;
    })
    .join(' ');
}

function stackWords(bytes: (number | null)[]): (string | null)[] {
  const words: (string | null)[] = [];
  for (let w = 0; w + 8 <= bytes.length; w += 8) {
    const part = bytes.slice(w, w + 8);
    if (part.some((b) => b === null)) {
      words.push(null);
      continue;
    }
    let v = 0n;
    for (let i = 7; i >= 0; i--) v = (v << 8n) | BigInt(part[i] as number);
    words.push(`0x${v.toString(16)}`);
  }
  return words;
}

export interface LapicSummary {
  tpr: number;
  ppr: number;
  /** vectors requested and not yet delivered */
  irr: number[];
  /** vectors delivered and not yet ended with an EOI */
  isr: number[];
  /** LVT timer register, hex (bit 16 masked; bits 17-18 the mode, 2 = TSC deadline) */
  lvtTimer: string;
}

/** The vectors set in a 256-bit APIC register (eight 32-bit words, 16 bytes apart). */
function vectorsIn(page: Buffer, at: number): number[] {
  const vectors: number[] = [];
  for (let word = 0; word < 8; word++) {
    const bits = page.readUInt32LE(at + word * 16);
    for (let bit = 0; bit < 32; bit++) if (bits & (1 << bit)) vectors.push(word * 32 + bit);
  }
  return vectors;
}

/** The registers of struct kvm_lapic_state (base64, as KVM_GET_LAPIC gives it) a stuck interrupt shows in. */
export function summarizeLapic(b64: string): LapicSummary {
  const page = Buffer.from(b64, 'base64');
  if (page.length < KVM_LAPIC_STATE_SIZE) throw new Error(`a local APIC state of ${page.length} bytes, not ${KVM_LAPIC_STATE_SIZE}`);
  return {
    tpr: page.readUInt32LE(APIC_TPR) & 0xff,
    ppr: page.readUInt32LE(APIC_PPR) & 0xff,
    irr: vectorsIn(page, APIC_IRR),
    isr: vectorsIn(page, APIC_ISR),
    lvtTimer: `0x${page.readUInt32LE(APIC_LVT_TIMER).toString(16)}`,
  };
}

/** The interrupt and NMI parts of struct kvm_vcpu_events (base64). */
export function summarizeVcpuEvents(b64: string): Pick<VcpuSample, 'interruptShadow' | 'injecting' | 'exception' | 'nmiPending' | 'nmiMasked'> {
  const ev = Buffer.from(b64, 'base64');
  if (ev.length < EVENTS_MIN_SIZE) throw new Error(`vCPU events of ${ev.length} bytes, fewer than ${EVENTS_MIN_SIZE}`);
  const injected = ev[EVENTS_EXCEPTION] !== 0;
  const pending = ev[EVENTS_EXCEPTION + 3] !== 0;
  return {
    exception:
      injected || pending
        ? { vector: ev[EVENTS_EXCEPTION + 1], errorCode: ev[EVENTS_EXCEPTION + 2] ? ev.readUInt32LE(EVENTS_EXCEPTION + 4) : null, injected }
        : null,
    injecting: ev[EVENTS_INTERRUPT] ? ev[EVENTS_INTERRUPT + 1] : null,
    interruptShadow: ev[EVENTS_INTERRUPT + 3] !== 0,
    nmiPending: ev[EVENTS_NMI + 1] !== 0,
    nmiMasked: ev[EVENTS_NMI + 2] !== 0,
  };
}

const MP_STATE_NAMES = new Map<number, string>(Object.entries(KvmMpState).map(([name, v]) => [v, name.toLowerCase().replace('_', '-')]));

/** Read one sample of a parked vCPU (its thread out of KVM_RUN). */
export function readVcpuSample(vcpu: NativeVcpu, memory: Pick<GuestMemory, 'read' | 'regionFor'>): VcpuSample {
  const regs = vcpu.getRegs();
  const sregs = vcpu.getSregs();
  const msrs = new Map(vcpu.getMsrs([MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]).map((m) => [m.index, m.data]));
  const deadline = msrs.get(MSR_IA32_TSC_DEADLINE);
  const tsc = msrs.get(MSR_IA32_TSC);
  const mp = vcpu.getMpState();
  return {
    rip: `0x${regs.rip.toString(16)}`,
    cpl: sregs.cs.dpl,
    interruptsEnabled: (regs.rflags & RFLAGS_IF) !== 0n,
    ...summarizeVcpuEvents(vcpu.getVcpuEvents()),
    mpState: MP_STATE_NAMES.get(mp) ?? String(mp),
    apic: summarizeLapic(vcpu.getLapic()),
    timerDueInCycles: deadline && tsc !== undefined ? String(BigInt.asIntN(64, deadline - tsc)) : null,
    cr2: `0x${sregs.cr2.toString(16)}`,
    cr3: `0x${sregs.cr3.toString(16)}`,
    pageTableRootInRam: pageInRam(memory, sregs.cr3 & CR3_ROOT),
    code: formatCodeLine(readGuestVirtual(vcpu, memory, regs.rip - BigInt(CODE_BEFORE), CODE_BEFORE + CODE_AFTER), CODE_BEFORE),
    stack: stackWords(readGuestVirtual(vcpu, memory, regs.rsp, STACK_WORDS * 8)),
  };
}
