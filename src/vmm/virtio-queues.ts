// The host side of a VM's virtio devices: the queue doorbells (ioeventfds at each queue's
// notify address, placed where BAR 0 decodes now), and serving the queues the store says are
// live. Serving reads the queue's rings and cursors from the store, hands each chain to the
// device's worker, writes the used ring through GuestMemory (so every page the device writes
// is in the VMM dirty bitmap), and records the new cursors in the store with one event per
// batch. A worker may finish a chain later (disk I/O): the chain is then in flight, and its
// completion writes the used ring and records the cursor. A queue is served only while the
// vCPUs run, and a pause waits for every request in flight: a snapshot or migration never
// holds half a request.
//
// A queue whose worker can name a native server for it (a raw disk's request queues, a net
// card's queues) is served by a native thread instead (native/block_queue.cc,
// native/net_queue.cc): the doorbell goes to that thread and the interrupt comes from it, so neither waits for this thread. The store keeps the cursors it had
// when the thread started; stopping the thread (a pause, a reset, a change of MSI-X routes, a
// doorbell that moves) records the cursors it reached, so a snapshot or migration, which pause
// first, always has them. A queue is handed to a thread only while its MSI-X vector can be
// delivered (enabled, unmasked), since the thread's irqfd has no route otherwise: every change
// of routes stops the threads first and starts them again afterwards.
import type { GuestLog } from '../util/guest-log';
import type { Effect } from '../devices/device';
import { PCI_SEGMENT_ID, pciBarRegions, pciFunctionModels, pciSlotOfDevice, type PciSegmentState } from '../devices/pci';
import { msixControl, msixRoutes } from '../devices/pci/msix';
import {
  VIRTIO_MSI_NO_VECTOR,
  VirtioBar,
  VirtioFeature,
  virtioEvents,
  hasFeature,
  ringAddress,
  virtioLive,
  type VirtioFunctionModel,
  type VirtioFunctionState,
} from '../devices/virtio/transport';
import {
  VirtqueueError,
  availableCount,
  popChain,
  publishAvailEvent,
  pushUsed,
  queueRingsProblem,
  ringIndexFields,
  shouldInterrupt,
  type DescriptorChain,
  type QueueRings,
} from '../devices/virtio/virtqueue';
import type { GuestMemory } from '../memory/guest-memory';
import { EventFdFlags, native, type NativeEventfdWatcher, type NativeQueueOptions, type NativeQueueServer, type NativeVm } from '../native/kvm';
import type { RootState, Store } from '../state';

/** What serves a device's requests on the host. */
export interface VirtioDeviceWorker {
  /**
   * Serves one chain of queue `queue` of the device `fn` (its state now); returns the bytes it
   * wrote into the chain's writable buffers, or a promise of them when the work takes I/O.
   * Throwing a VirtqueueError (synchronously) says the driver broke the queue.
   */
  chain(fn: VirtioFunctionState, queue: number, chain: DescriptorChain, memory: GuestMemory): ChainResult | Promise<ChainResult>;
  /**
   * Whether the device has work for a chain of `queue` now (default: always). A queue whose
   * buffers wait for the host (a console's receive queue) keeps them until it has.
   */
  ready?(queue: number): boolean;
  /** The driver rang `queue`'s doorbell: a device whose buffers wait for the host hears of new ones first. */
  buffersPosted?(queue: number): void;
  /**
   * Host input for the device: `serve(queue)` serves that queue now; returns how many bytes
   * the guest took (the rest is the caller's to keep).
   */
  offerInput?(bytes: Uint8Array, serve: (queue: number) => void): number;
  /**
   * How a native thread may serve queue `queue` of `fn` (a raw disk's request queue, a net
   * card's receive or transmit queue); undefined: this worker serves its chains itself.
   */
  nativeQueue?(fn: VirtioFunctionState, queue: number): NativeQueueSpec | undefined;
}

/** What a native thread serves a queue with: a disk (native/block_queue.cc) or a tap (native/net_queue.cc). */
export type NativeQueueSpec = { kind: 'block'; disk: NativeDisk } | { kind: 'net'; tapFd: number; receive: boolean; mergeable: boolean; txHoldUs: number; txHoldMinFrame: number };

/** One enabled queue as VirtioQueues.health() sees it (ring fields null where RAM holds no ring). */
export interface QueueHealth {
  device: string;
  queue: number;
  live: boolean;
  status: number;
  /** who serves it: a native thread, this thread, or a native thread once its vector can be delivered */
  served: 'native' | 'js' | 'awaiting-vector';
  nextAvail: number;
  nextUsed: number;
  inFlight: number;
  availIdx: number | null;
  usedEvent: number | null;
  usedIdx: number | null;
  availEvent: number | null;
  vector: number;
  vectorMasked: boolean | null;
  vectorPending: boolean;
  msixEnabled: boolean;
  functionMasked: boolean;
  /** the vector's GSI, whether KVM routes it, and the messages the JavaScript thread sent on it */
  msi?: { gsi: number | null; routed: boolean; sent: number; lastSentMsAgo: number | null };
  /** a natively served queue: the interrupts its thread raised (irqfd writes), and the last one's age */
  threadInterrupts?: { sent: number; lastSentMsAgo: number | null };
}

/** A disk as native/block_queue.cc serves it. */
export interface NativeDisk {
  imageFd: number;
  /** sectors */
  capacity: number;
  readonly: boolean;
  /** what GET_ID answers */
  id: string;
}

/** What serving a chain came to: the bytes written into its writable buffers, and what it adds to the device's counters. */
export interface ChainResult {
  written: number;
  counters?: Record<string, number>;
  /**
   * The device's own state after this chain, when the chain changed it (a net card's control
   * command). Only a chain served at once may: it goes into the store with the cursors.
   */
  deviceState?: unknown;
}

function sumCounters(into: Record<string, number> | undefined, add: Record<string, number> | undefined): Record<string, number> | undefined {
  if (!add) return into;
  const out = into ?? {};
  for (const [k, v] of Object.entries(add)) out[k] = (out[k] ?? 0) + v;
  return out;
}

export interface VirtioQueuesOptions {
  store: Store<RootState>;
  vm: NativeVm;
  memory: GuestMemory;
  /** lines a guest can trigger (a broken queue) */
  guestLog: GuestLog;
  /** the device workers by device id */
  workers: ReadonlyMap<string, VirtioDeviceWorker>;
  /** runs the effects of the events this dispatches (MSI-X messages) */
  runEffects: (effects: readonly Effect[]) => void;
  /** the irqfd of MSI-X vector `vector` of `device`, if it has one */
  irqfdOf?: (device: string, vector: number) => number | undefined;
  /** what a health report says of MSI-X vector `vector` of `device` */
  msiHealth?: (device: string, vector: number) => QueueHealth['msi'];
}

/** Chains served per queue before other work gets the thread: the rest is served next turn. */
const CHAINS_PER_TURN = 1024;

interface Doorbell {
  fd: number;
  address: number;
  device: string;
  queue: number;
}

export class VirtioQueues {
  private readonly doorbells = new Map<string, Doorbell>();
  private readonly byFd = new Map<number, Doorbell>();
  private watcher?: NativeEventfdWatcher;
  private running = false;
  private readonly again = new Set<string>();
  private againScheduled = false;
  /** chains handed to workers and not finished yet */
  private readonly inFlight = new Set<Promise<void>>();
  /** chains finished and not yet in their used rings, by queue (flushed once per turn) */
  private readonly completed = new Map<string, { device: string; queue: number; epoch: number; used: { head: number; written: number; counters?: Record<string, number> }[] }>();
  private flushScheduled = false;
  /**
   * Per device, how many times its driver reset it (or it needed a reset): a request that
   * finishes after one belongs to a queue that is gone, and must not touch the new one.
   */
  private readonly epochs = new Map<string, number>();
  /** queues served by native threads, by `device\0queue` */
  private readonly nativeQueues = new Map<string, { device: string; queue: number; doorbell: Doorbell; handle: NativeQueueServer }>();
  /** chains of each queue handed to workers and not finished yet, by `device\0queue` */
  private readonly pendingChains = new Map<string, number>();
  /**
   * Queues a native thread should serve that wait for their vector to be deliverable (a net
   * card's, which nothing else serves): a change of routes must look at them again, or a
   * receive queue whose driver has posted all its buffers would wait for a kick that never comes.
   */
  private readonly awaitingThread = new Set<string>();

  constructor(private readonly opts: VirtioQueuesOptions) {}

  private segment(): PciSegmentState | undefined {
    return this.opts.store.getState().devices.instances[PCI_SEGMENT_ID] as PciSegmentState | undefined;
  }

  private virtioFunctions(seg = this.segment()): { fn: VirtioFunctionState; model: VirtioFunctionModel<unknown> }[] {
    if (!seg) return [];
    const out: { fn: VirtioFunctionState; model: VirtioFunctionModel<unknown> }[] = [];
    for (const fn of Object.values(seg.functions)) {
      const model = pciFunctionModels[fn.kind] as VirtioFunctionModel<unknown> | undefined;
      if (model && 'type' in model) out.push({ fn: fn as VirtioFunctionState, model });
    }
    return out;
  }

  /**
   * Put each queue's doorbell ioeventfd where its function's BAR 0 decodes now, and take away
   * those of BARs that moved or stopped decoding (the guest writing BARs, a reset).
   * `segment`: the functions, when the store does not hold them yet (a machine built from
   * saved state before the store takes it).
   */
  syncDoorbells(segment = this.segment()): void {
    const wanted = new Map<string, { address: number; device: string; queue: number }>();
    for (const { fn, model } of this.virtioFunctions(segment)) {
      const bar = pciBarRegions(fn.config, model.layout).find((r) => r.bar === VirtioBar.INDEX && r.space === 'mmio');
      if (!bar) continue;
      fn.virtio.queues.forEach((_, queue) => {
        const address = bar.base + VirtioBar.NOTIFY + queue * VirtioBar.NOTIFY_MULTIPLIER;
        wanted.set(`${fn.id}/${queue}/${address}`, { address, device: fn.id, queue });
      });
    }
    for (const [key, d] of this.doorbells) if (!wanted.has(key)) this.removeDoorbell(key, d);
    for (const [key, w] of wanted) if (!this.doorbells.has(key)) this.addDoorbell(key, w);
  }

  private addDoorbell(key: string, w: { address: number; device: string; queue: number }): void {
    this.watcher ??= native().watchEventfds((fd, _count, error) => this.rung(fd, error));
    const fd = native().eventfd(0, EventFdFlags.NONBLOCK | EventFdFlags.CLOEXEC);
    try {
      // Linux writes the queue index as 16 bits; another width exits to the VMM and is served the same.
      this.opts.vm.ioeventfd(fd, BigInt(w.address), 2);
      this.watcher.add(fd);
    } catch (e) {
      native().closeFd(fd);
      throw e;
    }
    const d = { fd, ...w };
    this.doorbells.set(key, d);
    this.byFd.set(fd, d);
  }

  private removeDoorbell(key: string, d: Doorbell): void {
    this.stopNative(queueKey(d.device, d.queue));
    this.watcher?.remove(d.fd);
    try {
      this.opts.vm.ioeventfd(d.fd, BigInt(d.address), 2, { deassign: true });
    } finally {
      native().closeFd(d.fd);
      this.doorbells.delete(key);
      this.byFd.delete(d.fd);
    }
  }

  /**
   * A doorbell rang. What goes wrong serving it is the VMM's fault (a driver's is a needs-reset):
   * it is logged here, since the watcher would otherwise stop watching the doorbell.
   */
  private rung(fd: number, error?: Error): void {
    const d = this.byFd.get(fd);
    if (!d) return;
    if (error) {
      this.opts.guestLog.error(`virtio-doorbell:${d.device}`, { device: d.device, queue: d.queue, err: error }, 'a virtio doorbell stopped working');
      return;
    }
    try {
      this.notify(d.device, d.queue);
    } catch (e) {
      this.opts.guestLog.error(`virtio-serve:${d.device}`, { device: d.device, queue: d.queue, err: e }, 'serving a virtio queue failed');
    }
  }

  /** The driver rang queue `queue` of `device` (through its ioeventfd or an exit). */
  notify(device: string, queue: number): void {
    if (!this.running) return;
    const n = this.nativeQueues.get(queueKey(device, queue));
    // (a doorbell rung through an exit, not its ioeventfd: the thread hears of it the same way)
    if (n) return native().eventfdWrite(n.doorbell.fd, 1n);
    this.opts.workers.get(device)?.buffersPosted?.(queue);
    this.serve(device, queue);
  }

  /**
   * Host input for `device` (a console's keystrokes): served into its queue now, while the
   * vCPUs run; returns the bytes the guest had buffers for.
   */
  offerInput(device: string, bytes: Uint8Array): number {
    const worker = this.opts.workers.get(device);
    if (!this.running || !worker?.offerInput) return 0;
    return worker.offerInput(bytes, (queue) => this.serve(device, queue));
  }

  /** The vCPUs run (a boot, a resume, a restored or migrated VM): serve what was posted meanwhile. */
  start(): void {
    this.running = true;
    this.serveAll();
  }

  /** Nothing new is served until start(); requests in flight still finish (see drain()). */
  pause(): void {
    this.running = false;
    this.stopAllNative();
  }

  /** Resolves once no request is in flight (after pause(): the device state is then final). */
  async drain(): Promise<void> {
    while (this.inFlight.size) await Promise.all([...this.inFlight]);
    this.flushCompleted();
  }

  /** The driver reset `device`: requests still in flight finish without touching its new queues. */
  deviceReset(device: string): void {
    this.epochs.set(device, (this.epochs.get(device) ?? 0) + 1);
    for (const key of [...this.awaitingThread]) if (key.startsWith(`${device}\u0000`)) this.awaitingThread.delete(key);
    // The store's queues are back at power-on: the threads' cursors belong to queues that are gone.
    for (const [key, n] of [...this.nativeQueues]) if (n.device === device) this.stopNative(key, { keepCursors: false });
  }

  /**
   * MSI-X routes are about to change (the guest masked, unmasked or reprogrammed a vector):
   * native threads stop first, so none raises an interrupt on a route that is gone. Serving
   * starts them again where the new routes allow. True when a thread was stopped.
   */
  routesChanging(): boolean {
    const any = this.nativeQueues.size > 0 || this.awaitingThread.size > 0;
    this.stopAllNative();
    return any;
  }

  /** Stop `device`'s native threads and serve its queues again: they start as its state now says. */
  private restartNative(device: string): void {
    for (const [key, n] of [...this.nativeQueues]) if (n.device === device) this.stopNative(key);
    const fn = this.virtioFunctions().find((f) => f.fn.id === device)?.fn;
    fn?.virtio.queues.forEach((q, i) => q.enabled && this.serve(device, i));
  }

  /** Move what native threads counted into the store (vm.counters reads it there). */
  collectCounters(): void {
    for (const n of this.nativeQueues.values()) this.recordCounters(n.device, n.queue, n.handle.takeCounters());
  }

  /** Every enabled queue of every live device. */
  serveAll(): void {
    if (!this.running) return;
    for (const { fn } of this.virtioFunctions()) {
      if (!virtioLive(fn.virtio)) continue;
      fn.virtio.queues.forEach((q, i) => q.enabled && this.serve(fn.id, i));
    }
  }

  /** The live device `device`, its queue `queue` and where its rings are; undefined when it is not served now. */
  private liveQueue(device: string, queue: number): { fn: VirtioFunctionState; q: VirtioFunctionState['virtio']['queues'][number]; rings: QueueRings } | undefined {
    const seg = this.segment();
    const slot = seg && pciSlotOfDevice(seg, device);
    const fn = slot === undefined ? undefined : (seg!.functions[slot] as VirtioFunctionState);
    const q = fn?.virtio.queues[queue];
    if (!fn || !q || !q.enabled || !virtioLive(fn.virtio)) return undefined;
    const desc = ringAddress(q.desc);
    const avail = ringAddress(q.driver);
    const used = ringAddress(q.device);
    if (desc === null || avail === null || used === null) throw new VirtqueueError(`queue ${queue}: a ring address above 2^53`);
    const rings: QueueRings = {
      size: q.size,
      desc,
      avail,
      used,
      eventIdx: hasFeature(fn.virtio.driverFeatures, VirtioFeature.RING_EVENT_IDX),
      indirect: hasFeature(fn.virtio.driverFeatures, VirtioFeature.RING_INDIRECT_DESC),
    };
    const problem = queueRingsProblem(this.opts.memory, rings);
    if (problem) throw new VirtqueueError(`queue ${queue}: ${problem}`);
    return { fn, q, rings };
  }

  private serve(device: string, queue: number): void {
    const worker = this.opts.workers.get(device);
    if (!worker) return;
    const { memory } = this.opts;
    try {
      const live = this.liveQueue(device, queue);
      if (!live) return;
      const { q, rings } = live;
      let fn = live.fn;
      if (this.startNative(worker, fn, queue, rings)) return;
      let c = { nextAvail: q.nextAvail, nextUsed: q.nextUsed };
      let served = 0;
      let counters: Record<string, number> | undefined;
      let deviceState: unknown;
      for (;;) {
        let waiting = false;
        while (served < CHAINS_PER_TURN) {
          if (worker.ready && !worker.ready(queue)) {
            waiting = true;
            break;
          }
          const popped = popChain(memory, rings, c);
          if (!popped) break;
          const result = worker.chain(fn, queue, popped.chain, memory);
          if ('then' in result) {
            c = popped.cursors;
            this.track(device, queue, popped.chain.head, result);
          } else {
            c = pushUsed(memory, rings, popped.cursors, popped.chain.head, result.written);
            counters = sumCounters(counters, result.counters);
            // (the next chain of the batch sees what this one changed)
            if (result.deviceState !== undefined) fn = { ...fn, device: (deviceState = result.deviceState) };
          }
          served++;
        }
        if (served >= CHAINS_PER_TURN) {
          this.serveLater(device, queue);
          break;
        }
        // With EVENT_IDX the driver kicks only when it passes avail_event: publish it, then
        // look again for buffers posted before it could see the new value. Buffers left for
        // the host (waiting) need no kick while some remain; once none do, the next ones must
        // be heard of, or input held for them would wait for a kick that never comes.
        if (!rings.eventIdx) break;
        if (waiting && availableCount(memory, rings, c) > 0) break;
        publishAvailEvent(memory, rings, c);
        if (availableCount(memory, rings, c) === 0) break;
      }
      if (c.nextAvail === q.nextAvail && c.nextUsed === q.nextUsed) return;
      this.record(device, queue, rings, q.nextUsed, c, counters, deviceState);
      // What the device's threads serve may follow its state (a card's active pairs).
      if (deviceState !== undefined) this.restartNative(device);
    } catch (e) {
      this.broken(device, queue, e);
    }
  }

  /** Record the queue's new cursors; an interrupt when the driver asked to hear of used buffers. */
  private record(device: string, queue: number, rings: QueueRings, usedBefore: number, c: { nextAvail: number; nextUsed: number }, counters?: Record<string, number>, deviceState?: unknown): void {
    const interrupt = c.nextUsed !== usedBefore && shouldInterrupt(this.opts.memory, rings, usedBefore, c.nextUsed);
    const served = { queue, nextAvail: c.nextAvail, nextUsed: c.nextUsed, interrupt, ...(counters ? { counters } : {}), ...(deviceState !== undefined ? { deviceState } : {}) };
    const r = this.opts.store.dispatch(virtioEvents.queueServed(PCI_SEGMENT_ID, device, served));
    this.opts.runEffects(r.effects);
  }

  /**
   * A driver that broke its queue breaks its own device, nothing else: the device needs a
   * reset, and the guest's other devices and queues go on. Anything else is the VMM's fault.
   */
  private broken(device: string, queue: number, e: unknown): void {
    if (!(e instanceof VirtqueueError)) throw e;
    this.opts.guestLog.warn(`virtio-needs-reset:${device}`, { device, queue, reason: e.message }, 'virtio device needs a reset: its driver broke a queue');
    this.deviceReset(device);
    const r = this.opts.store.dispatch(virtioEvents.needsReset(PCI_SEGMENT_ID, device, e.message));
    this.opts.runEffects(r.effects);
  }

  /**
   * A chain a worker finishes later. Its used element goes in with the others finished in the
   * same turn: one store event and at most one interrupt per queue per turn, however many
   * requests the turn completed (unless the queue is gone meanwhile).
   */
  private track(device: string, queue: number, head: number, result: Promise<ChainResult>): void {
    const epoch = this.epochs.get(device) ?? 0;
    const key = queueKey(device, queue);
    this.pendingChains.set(key, (this.pendingChains.get(key) ?? 0) + 1);
    const done: Promise<void> = result
      .then(
        ({ written, counters }) => {
          let batch = this.completed.get(key);
          // (a reset between two completions: the older one belongs to a queue that is gone)
          if (!batch || batch.epoch < epoch) this.completed.set(key, (batch = { device, queue, epoch, used: [] }));
          else if (batch.epoch > epoch) return;
          batch.used.push({ head, written, counters });
          if (!this.flushScheduled) {
            this.flushScheduled = true;
            setImmediate(() => this.flushCompleted());
          }
        },
        (e: unknown) => {
          // A worker reports request failures in the request's status; a rejection is a fault of its own.
          this.opts.guestLog.error(`virtio-worker:${device}`, { device, queue, err: e }, 'a virtio request failed in the VMM');
        },
      )
      .finally(() => {
        this.inFlight.delete(done);
        const left = (this.pendingChains.get(key) ?? 1) - 1;
        if (left > 0) this.pendingChains.set(key, left);
        else this.pendingChains.delete(key);
      });
    this.inFlight.add(done);
  }

  /** Put the used elements of the chains finished since the last flush in, queue by queue. */
  private flushCompleted(): void {
    this.flushScheduled = false;
    const batches = [...this.completed.values()];
    this.completed.clear();
    for (const { device, queue, epoch, used } of batches) {
      if ((this.epochs.get(device) ?? 0) !== epoch) continue;
      try {
        const live = this.liveQueue(device, queue);
        if (!live) continue;
        let c = { nextAvail: live.q.nextAvail, nextUsed: live.q.nextUsed };
        let counters: Record<string, number> | undefined;
        for (const u of used) {
          c = pushUsed(this.opts.memory, live.rings, c, u.head, u.written);
          counters = sumCounters(counters, u.counters);
        }
        this.record(device, queue, live.rings, live.q.nextUsed, c, counters);
      } catch (e) {
        this.broken(device, queue, e);
      }
    }
  }

  private serveLater(device: string, queue: number): void {
    this.again.add(queueKey(device, queue));
    if (this.againScheduled) return;
    this.againScheduled = true;
    setImmediate(() => {
      this.againScheduled = false;
      const keys = [...this.again];
      this.again.clear();
      for (const k of keys) {
        const [d, q] = k.split('\u0000');
        this.notify(d, Number(q));
      }
    });
  }

  /**
   * Hand queue `queue` of `fn` to a native thread, when its worker names a native server for
   * it, its vector can be delivered, and no chain of it is still with the JavaScript worker
   * (its completion will write the used ring, once flushed). True when a thread serves it now.
   */
  private startNative(worker: VirtioDeviceWorker, fn: VirtioFunctionState, queue: number, rings: QueueRings): boolean {
    const key = queueKey(fn.id, queue);
    if (this.nativeQueues.has(key)) return true;
    // (a chain finished but not yet flushed into the used ring counts as still with the worker:
    // the thread would fill the used slot the flush is about to write)
    if (!this.running || !worker.nativeQueue || this.pendingChains.has(key) || this.completed.has(key)) return false;
    const spec = worker.nativeQueue(fn, queue);
    const q = fn.virtio.queues[queue];
    const doorbell = [...this.doorbells.values()].find((d) => d.device === fn.id && d.queue === queue);
    const model = pciFunctionModels[fn.kind] as VirtioFunctionModel<unknown>;
    if (!spec || !doorbell) return false;
    const interruptFd =
      q.vector === VIRTIO_MSI_NO_VECTOR || q.vector >= model.msixLayout.vectors || msixRoutes(fn.msix, fn.config, model.msixLayout)[q.vector].masked
        ? undefined
        : this.opts.irqfdOf?.(fn.id, q.vector);
    if (interruptFd === undefined) {
      this.awaitingThread.add(key);
      return false;
    }
    this.awaitingThread.delete(key);
    this.watcher?.remove(doorbell.fd);
    let handle: NativeQueueServer;
    const onBroken = (reason: string) => this.nativeBroken(key, reason);
    try {
      const options: NativeQueueOptions = {
        memory: this.opts.memory.regions.map((r) => r.hostRange()),
        ...rings,
        nextAvail: q.nextAvail,
        nextUsed: q.nextUsed,
        kickFd: doorbell.fd,
        interruptFd,
      };
      handle =
        spec.kind === 'block'
          ? native().serveBlockQueue({ ...options, ...spec.disk }, onBroken)
          : native().serveNetQueue({ ...options, tapFd: spec.tapFd, receive: spec.receive, mergeable: spec.mergeable, txHoldUs: spec.txHoldUs, txHoldMinFrame: spec.txHoldMinFrame }, onBroken);
    } catch (e) {
      this.watcher?.add(doorbell.fd);
      throw e;
    }
    this.nativeQueues.set(key, { device: fn.id, queue, doorbell, handle });
    return true;
  }

  /** A native thread found its queue broken: it has stopped; the device needs a reset. */
  private nativeBroken(key: string, reason: string): void {
    const n = this.nativeQueues.get(key);
    if (!n) return;
    this.stopNative(key);
    this.broken(n.device, n.queue, new VirtqueueError(reason));
  }

  /**
   * Stop the native thread serving `key`, if one does: its cursors (unless the queue was reset
   * meanwhile) and its counts go into the store, and its doorbell back to the watcher.
   */
  private stopNative(key: string, opts: { keepCursors: boolean } = { keepCursors: true }): void {
    const n = this.nativeQueues.get(key);
    if (!n) return;
    this.nativeQueues.delete(key);
    const end = n.handle.stop();
    if (this.byFd.get(n.doorbell.fd) === n.doorbell) this.watcher?.add(n.doorbell.fd);
    const stored = this.queueState(n.device, n.queue);
    if (!stored) return;
    const cursors = opts.keepCursors ? { nextAvail: end.nextAvail, nextUsed: end.nextUsed } : { nextAvail: stored.nextAvail, nextUsed: stored.nextUsed };
    const counters = countersOf(end.counters);
    // The thread raised every interrupt its requests called for but the one for the chains it
    // handed back as it stopped: that one goes as the vector's state now allows (a masked
    // vector keeps it pending), and none to a device the driver reset.
    const interrupt = opts.keepCursors && end.interrupt;
    if (cursors.nextAvail === stored.nextAvail && cursors.nextUsed === stored.nextUsed && !counters && !interrupt) return;
    const served = { queue: n.queue, ...cursors, interrupt, ...(counters ? { counters } : {}) };
    this.opts.store.dispatch(virtioEvents.queueServed(PCI_SEGMENT_ID, n.device, served));
  }

  private stopAllNative(): void {
    for (const key of [...this.nativeQueues.keys()]) this.stopNative(key);
  }

  /** The store's state of queue `queue` of `device`, whether or not the device is live. */
  private queueState(device: string, queue: number): { nextAvail: number; nextUsed: number } | undefined {
    const seg = this.segment();
    const slot = seg && pciSlotOfDevice(seg, device);
    const fn = slot === undefined ? undefined : (seg!.functions[slot] as VirtioFunctionState);
    return fn?.virtio.queues[queue];
  }

  /** Counts a native thread gathered, into the store, with the cursors the store has. */
  private recordCounters(device: string, queue: number, c: Record<string, number>): void {
    const counters = countersOf(c);
    const q = this.queueState(device, queue);
    if (!counters || !q) return;
    this.opts.store.dispatch(virtioEvents.queueServed(PCI_SEGMENT_ID, device, { queue, nextAvail: q.nextAvail, nextUsed: q.nextUsed, interrupt: false, counters }));
  }

  /**
   * What each queue looks like now, from both sides: the store's cursors (a native thread's
   * are those it started from), the ring fields in guest RAM, and the vector's MSI-X state.
   * For a health report when a guest seems stuck: a driver waiting on a request the device
   * never took shows avail.idx past the cursors; one waiting on an interrupt shows used.idx
   * past used_event.
   */
  health(): QueueHealth[] {
    const out: QueueHealth[] = [];
    const noRing = { availIdx: null, usedEvent: null, usedIdx: null, availEvent: null };
    for (const { fn, model } of this.virtioFunctions()) {
      const routes = msixRoutes(fn.msix, fn.config, model.msixLayout);
      const { enabled: msixEnabled, functionMasked } = msixControl(fn.config, model.msixLayout);
      fn.virtio.queues.forEach((q, queue) => {
        if (!q.enabled) return;
        const key = queueKey(fn.id, queue);
        const avail = ringAddress(q.driver);
        const used = ringAddress(q.device);
        const fields = avail === null || used === null ? noRing : ringIndexFields(this.opts.memory, { size: q.size, avail, used });
        const vectorPending = q.vector < model.msixLayout.vectors ? ((fn.msix.pending[q.vector >> 5] ?? 0) >>> (q.vector & 31)) & 1 : 0;
        const native = this.nativeQueues.get(key);
        out.push({
          device: fn.id,
          queue,
          live: virtioLive(fn.virtio),
          status: fn.virtio.status,
          served: native ? 'native' : this.awaitingThread.has(key) ? 'awaiting-vector' : 'js',
          nextAvail: q.nextAvail,
          nextUsed: q.nextUsed,
          inFlight: this.pendingChains.get(key) ?? 0,
          ...fields,
          vector: q.vector,
          vectorMasked: routes[q.vector]?.masked ?? null,
          vectorPending: vectorPending === 1,
          msixEnabled,
          functionMasked,
          ...(q.vector < model.msixLayout.vectors && this.opts.msiHealth ? { msi: this.opts.msiHealth(fn.id, q.vector) } : {}),
          ...(native ? { threadInterrupts: native.handle.interrupts() } : {}),
        });
      });
    }
    return out;
  }

  /** Wait for requests in flight, then take every doorbell away and stop the watcher. */
  async close(): Promise<void> {
    this.running = false;
    this.stopAllNative();
    await this.drain();
    for (const [key, d] of [...this.doorbells]) {
      try {
        this.removeDoorbell(key, d);
      } catch {
        /* the KVM VM may be gone already */
      }
    }
    this.watcher?.close();
    this.watcher = undefined;
  }
}

const queueKey = (device: string, queue: number): string => `${device}\u0000${queue}`;

/** The non-zero counts, or undefined when there are none. */
function countersOf(c: Record<string, number>): Record<string, number> | undefined {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(c)) if (v > 0) out[k] = v;
  return Object.keys(out).length ? out : undefined;
}
