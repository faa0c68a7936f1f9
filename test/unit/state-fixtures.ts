// A store with every slice populated the way a running VM would populate it.
import type { VmConfig } from '../../src/config/vm-config';
import {
  serialInputEvent,
  acpiGedDevice,
  acpiPmDevice,
  cmosDevice,
  debugPortDevice,
  i8042Device,
  powerButtonPressedEvent,
  serialDevice,
} from '../../src/devices/index';
import type { NativeVcpuState } from '../../src/state/codec';
import { encodeVcpuState } from '../../src/state/codec';
import { deviceEvents } from '../../src/state/slices/devices';
import { vcpuEvents } from '../../src/state/slices/vcpus';
import { vmEvents } from '../../src/state/slices/vm';
import { type BusAccess, dispatchIo } from '../../src/state/io';
import { createStore, type StoreOptions } from '../../src/state/store';
import type { RootSlices } from '../../src/state/root';

export const MIB = 1024 * 1024;
export const NOW_NS = Date.UTC(2025, 0, 2, 3, 4, 5) * 1e6;

export const config: VmConfig = {
  payload: { kernel: '/boot/vmlinux', initramfs: '/boot/initrd.img', cmdline: 'console=ttyS0 reboot=k' },
  cpus: { boot_vcpus: 2, max_vcpus: 4 },
  memory: { size: 512 * MIB, shared: false },
  serial: { mode: 'Tty' },
  console: { mode: 'Off' },
};

const U64_MAX = (1n << 64n) - 1n;

function segment(selector: number, base: bigint) {
  return { base, limit: 0xfffff, selector, type: 11, present: 1, dpl: 0, db: 0, s: 1, l: 1, g: 1, avl: 0, unusable: 0 };
}

/** Values that a lossy number conversion would corrupt. */
export function nativeVcpu(id: number): NativeVcpuState {
  return {
    regs: {
      rax: U64_MAX, rbx: 1n << 63n, rcx: 0n, rdx: 0x1234_5678_9abc_def0n,
      rsi: 1n, rdi: 2n, rsp: 0xffff_8880_0000_0000n + BigInt(id), rbp: 3n,
      r8: 8n, r9: 9n, r10: 10n, r11: 11n, r12: 12n, r13: 13n, r14: 14n, r15: (1n << 53n) + 1n,
      rip: 0xffff_ffff_8100_0000n, rflags: 0x246n,
    },
    sregs: {
      cs: segment(0x10, 0n), ds: segment(0x18, 0n), es: segment(0x18, 0n), fs: segment(0, 0x7f00_dead_beefn),
      gs: segment(0, 0xffff_8881_3fc0_0000n), ss: segment(0x18, 0n), tr: segment(0x40, 0xfffffe0000003000n),
      ldt: { ...segment(0, 0n), unusable: 1 },
      gdt: { base: 0xfffffe0000001000n, limit: 0x7f }, idt: { base: 0xfffffe0000000000n, limit: 0xfff },
      cr0: 0x80050033n, cr2: 0n, cr3: 0x1_0a2b_3000n, cr4: 0x3706f0n, cr8: 0n, efer: 0xd01n, apic_base: 0xfee00d00n,
      interrupt_bitmap: [0n, U64_MAX, 1n << 63n, 5n],
    },
    fpu: { fcw: 0x37f, fsw: 0, ftwx: 0, last_opcode: 0, last_ip: U64_MAX, last_dp: 42n, mxcsr: 0x1f80, registers: 'AAAA' },
    msrs: [
      { index: 0x10, data: 0x1_0000_0000_0001n },
      { index: 0xc0000080, data: 0xd01n },
      { index: 0x4b564d01, data: U64_MAX },
    ],
    xsave: 'eHNhdmU=',
    xcrs: 'eGNycw==',
    lapic: 'bGFwaWM=',
    vcpuEvents: 'ZXZlbnRz',
    debugRegs: 'ZGVidWc=',
    mpState: 0,
    cpuid: [{ function: 0, index: 0, flags: 0, eax: 0xd, ebx: 0x756e6547, ecx: 0x6c65746e, edx: 0x49656e69 }],
  };
}

export function pio(direction: 'read' | 'write', address: number, data = 0, size: 1 | 2 | 4 = 1): BusAccess {
  return { space: 'pio', direction, address, size, data, nowNs: NOW_NS };
}

export function populatedStore(opts: StoreOptions<RootSlices> = {}) {
  const store = createStore({ checkJson: true, ...opts });
  store.dispatch(vmEvents.created(config));
  for (const d of [
    serialDevice({ id: 'serial0' }),
    i8042Device(),
    cmosDevice({ memorySize: config.memory!.size }),
    acpiPmDevice(),
    acpiGedDevice(),
    debugPortDevice(),
  ]) {
    store.dispatch(deviceEvents.added(d));
  }
  store.dispatch(vmEvents.booting());
  store.dispatch(vmEvents.booted());
  dispatchIo(store, pio('write', 0x3f9, 0x01)); // serial IER: RX interrupt
  dispatchIo(store, pio('write', 0x3f8, 0x41)); // 'A' to the console
  store.dispatch(serialInputEvent('serial0', [0x6c, 0x73, 0x0a]));
  dispatchIo(store, pio('write', 0x64, 0xaa)); // i8042 self test
  dispatchIo(store, pio('write', 0x70, 0x8f)); // CMOS index 0x0f, NMI masked
  dispatchIo(store, pio('write', 0x71, 0x00));
  dispatchIo(store, pio('write', 0x80, 0x2a)); // POST code
  store.dispatch(powerButtonPressedEvent('ged0')); // GED event pending, line high
  dispatchIo(store, pio('read', 0x61)); // nobody home
  dispatchIo(store, pio('write', 0x87, 0xff));
  store.dispatch(vcpuEvents.stateSaved(0, encodeVcpuState(nativeVcpu(0))));
  store.dispatch(vcpuEvents.stateSaved(1, encodeVcpuState(nativeVcpu(1))));
  return store;
}
