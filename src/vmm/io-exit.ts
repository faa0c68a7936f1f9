// A vCPU's port or MMIO exit as a bus access, dispatched to the store, and the value the
// guest reads back. Port accesses are at most 4 bytes and stay numbers; an MMIO access wider
// than 4 bytes carries its data as a bigint both ways, because a number holds only 53 bits
// exactly and a 64-bit register write or read must arrive whole.
import type { BusAccess } from '../devices/bus';
import type { VcpuExit } from '../native/kvm';
import { dispatchIo, type RootState, type Store } from '../state';
import type { DispatchResult } from '../state/store';

export type IoExit = Extract<VcpuExit, { kind: 'io' | 'mmio' }>;

/** The bus access an I/O exit stands for. */
export function busAccessOf(exit: IoExit, nowNs: number): BusAccess {
  if (exit.kind === 'io') {
    return { space: 'pio', direction: exit.direction === 'in' ? 'read' : 'write', address: exit.port, size: exit.size, data: exit.data, nowNs };
  }
  const direction = exit.direction;
  const address = Number(exit.address);
  // KVM reports MMIO fragments of 1 to 8 bytes; the wide ones keep every bit as a bigint.
  if (exit.size > 4) return { space: 'mmio', direction, address, size: 8, data: exit.data, nowNs };
  return { space: 'mmio', direction, address, size: exit.size as 1 | 2 | 4, data: Number(exit.data), nowNs };
}

/**
 * Dispatch an I/O exit; `value` is what the guest reads (a number for port reads, a bigint for
 * MMIO reads, so a 64-bit register value reaches the guest exactly), undefined for writes.
 */
export function dispatchIoExit(
  store: Store<RootState>,
  exit: IoExit,
  nowNs: number,
): { effects: DispatchResult['effects']; value?: number | bigint } {
  const r = dispatchIo(store, busAccessOf(exit, nowNs));
  if (r.value === undefined) return { effects: r.effects };
  if (exit.kind === 'io') return { effects: r.effects, value: Number(r.value) };
  return { effects: r.effects, value: typeof r.value === 'bigint' ? r.value : BigInt(r.value) };
}
