// MSI-X delivery for the PCI functions of a VM: each vector of each function gets a KVM GSI
// and an irqfd, and KVM's GSI routing table is derived from the store (every function's MSI-X
// table and enable bits give its routes), so a restored or migrated VM routes exactly as the
// guest programmed it. Sending a message is a write to the vector's irqfd: the interrupt
// reaches the guest without a system call that waits for a vCPU.
import { IOAPIC_PINS } from '../boot/layout';
import type { PciFunctionModel, PciFunctionRegistry, PciSegmentState } from '../devices/pci';
import { type MsixLayout, type MsixState, msixRoutes } from '../devices/pci/msix';
import { EventFdFlags, native, type IrqRoute, type NativeVm } from '../native/kvm';

/** KVM's x86 routing table holds at most this many entries (KVM_MAX_IRQ_ROUTES). */
const KVM_MAX_IRQ_ROUTES = 4096;
/** The first GSI above the IOAPIC's pins: where MSI routes start. */
const FIRST_MSI_GSI = IOAPIC_PINS;

/** KVM's own default routes, which a routing table replaces and so must repeat: PIC pins 0-15 and IOAPIC pins 0-23. */
function irqchipRoutes(): IrqRoute[] {
  const out: IrqRoute[] = [];
  for (let gsi = 0; gsi < IOAPIC_PINS; gsi++) {
    if (gsi < 16) out.push({ gsi, type: 'irqchip', irqchip: gsi < 8 ? 0 : 1, pin: gsi % 8 });
    out.push({ gsi, type: 'irqchip', irqchip: 2, pin: gsi });
  }
  return out;
}

interface MsixFunction {
  id: string;
  layout: MsixLayout;
  msix: MsixState;
  config: readonly number[];
}

/** Functions with MSI-X, in slot order: the order their GSIs are given out in. */
function msixFunctions(segment: PciSegmentState, registry: PciFunctionRegistry): MsixFunction[] {
  const out: MsixFunction[] = [];
  for (const slot of Object.keys(segment.functions).sort()) {
    const fn = segment.functions[slot] as { id?: string; msix?: MsixState; config: number[]; kind: string };
    const model = registry[fn.kind] as (PciFunctionModel & { msixLayout?: MsixLayout }) | undefined;
    if (model?.msixLayout && fn.msix && typeof fn.id === 'string') out.push({ id: fn.id, layout: model.msixLayout, msix: fn.msix, config: fn.config });
  }
  return out;
}

export class MsiRouting {
  /**
   * per device id: the first GSI of its vectors, one irqfd per vector, and per vector the
   * messages this thread sent and when the last went (for health reports)
   */
  private readonly vectors = new Map<string, { firstGsi: number; fds: number[]; sent: number[]; sentAt: number[] }>();
  private lastTable = '';
  /** GSIs the table last given to KVM routes as MSIs */
  private routedGsis = new Set<number>();

  constructor(
    private readonly vm: NativeVm,
    private readonly registry: PciFunctionRegistry,
  ) {}

  /**
   * Make KVM's routing match `segment`: irqfds for functions not seen before, then the whole
   * table (a routing table is replaced, not patched). Cheap when nothing changed.
   */
  sync(segment: PciSegmentState | undefined): void {
    const functions = segment ? msixFunctions(segment, this.registry) : [];
    const routes = irqchipRoutes();
    let gsi = FIRST_MSI_GSI;
    const fresh: { id: string; firstGsi: number; count: number }[] = [];
    for (const f of functions) {
      const known = this.vectors.get(f.id);
      const firstGsi = known?.firstGsi ?? gsi;
      if (!known) fresh.push({ id: f.id, firstGsi, count: f.layout.vectors });
      gsi = Math.max(gsi, firstGsi + f.layout.vectors);
      for (const r of msixRoutes(f.msix, f.config, f.layout)) {
        // A masked vector keeps no route: nothing may fire it, and KVM is not asked to keep
        // a message the guest may still be writing.
        if (!r.masked) routes.push({ gsi: firstGsi + r.vector, type: 'msi', addressLo: r.addressLow, addressHi: r.addressHigh, data: r.data });
      }
    }
    if (routes.length > KVM_MAX_IRQ_ROUTES || gsi > KVM_MAX_IRQ_ROUTES) throw new RangeError(`${gsi - FIRST_MSI_GSI} MSI-X vectors: KVM routes at most ${KVM_MAX_IRQ_ROUTES} GSIs`);
    const table = JSON.stringify(routes);
    if (table !== this.lastTable) {
      this.vm.setGsiRouting(routes);
      this.lastTable = table;
      this.routedGsis = new Set(routes.filter((r) => r.type === 'msi').map((r) => r.gsi));
    }
    for (const f of fresh) {
      const fds: number[] = [];
      try {
        for (let v = 0; v < f.count; v++) {
          const fd = native().eventfd(0, EventFdFlags.NONBLOCK | EventFdFlags.CLOEXEC);
          fds.push(fd);
          this.vm.irqfd(fd, f.firstGsi + v);
        }
      } catch (e) {
        for (const fd of fds) native().closeFd(fd);
        throw e;
      }
      this.vectors.set(f.id, { firstGsi: f.firstGsi, fds, sent: fds.map(() => 0), sentAt: fds.map(() => 0) });
    }
  }

  /** The irqfd of vector `vector` of device `id`, once sync() has given it one. */
  irqfd(id: string, vector: number): number | undefined {
    return this.vectors.get(id)?.fds[vector];
  }

  /** Send vector `vector` of device `id` (the store said it is live and its route is in place). */
  send(id: string, vector: number): void {
    const v = this.vectors.get(id);
    const fd = v?.fds[vector];
    if (fd === undefined) throw new Error(`MSI-X vector ${vector} of '${id}' has no irqfd`);
    native().eventfdWrite(fd, 1n);
    v!.sent[vector]++;
    v!.sentAt[vector] = Date.now();
  }

  /**
   * What a health report says of a vector: its GSI, whether KVM routes that GSI now, and the
   * messages this thread sent on it (a native queue thread's own go uncounted here).
   */
  vectorHealth(id: string, vector: number, now = Date.now()): { gsi: number | null; routed: boolean; sent: number; lastSentMsAgo: number | null } {
    const v = this.vectors.get(id);
    const known = v !== undefined && vector < v.fds.length;
    const gsi = known ? v.firstGsi + vector : null;
    const sent = known ? v.sent[vector] : 0;
    return { gsi, routed: gsi !== null && this.routedGsis.has(gsi), sent, lastSentMsAgo: sent ? now - v!.sentAt[vector] : null };
  }

  /** Close the irqfds (the KVM VM goes with them). */
  close(): void {
    for (const { fds } of this.vectors.values()) for (const fd of fds) native().closeFd(fd);
    this.vectors.clear();
  }
}
