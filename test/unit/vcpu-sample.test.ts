// The health report's reading of a parked vCPU's local APIC and pending events (KVM's structs
// as KVM_GET_LAPIC and KVM_GET_VCPU_EVENTS give them), and of the code and stack it runs on.
import test from 'ava';

import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import { formatCodeLine, pageInRam, readGuestVirtual, summarizeLapic, summarizeVcpuEvents } from '../../src/vmm/vcpu-sample';

function lapicPage(set: (page: Buffer) => void): string {
  const page = Buffer.alloc(1024);
  set(page);
  return page.toString('base64');
}

test('the APIC summary lists the vectors pending (IRR) and in service (ISR), with TPR, PPR and the timer LVT', (t) => {
  const b64 = lapicPage((p) => {
    p.writeUInt32LE(0x20, 0x80); // TPR
    p.writeUInt32LE(0x30, 0xa0); // PPR
    p.writeUInt32LE(1 << 5, 0x100 + 16); // ISR: vector 37
    p.writeUInt32LE(((1 << 2) | (1 << 31)) >>> 0, 0x200 + 7 * 16); // IRR: vectors 226 and 255
    p.writeUInt32LE(0x400ec, 0x320); // TSC-deadline mode, vector 0xec
  });
  t.deepEqual(summarizeLapic(b64), { tpr: 0x20, ppr: 0x30, irr: [226, 255], isr: [37], lvtTimer: '0x400ec' });
});

test('a truncated APIC state is refused, not read past its end', (t) => {
  t.throws(() => summarizeLapic(Buffer.alloc(512).toString('base64')), { message: /512 bytes/ });
});

test('the events summary tells an interrupt being injected, an exception, the interrupt shadow and NMI state', (t) => {
  const ev = Buffer.alloc(64);
  ev[8] = 1; // interrupt.injected
  ev[9] = 0x41; // interrupt.nr
  ev[11] = 1; // interrupt.shadow
  ev[13] = 1; // nmi.pending
  ev[3] = 1; // exception.pending
  ev[1] = 14; // exception.nr: #PF
  ev[2] = 1; // exception.has_error_code
  ev.writeUInt32LE(0x10, 4); // an instruction fetch
  t.deepEqual(summarizeVcpuEvents(ev.toString('base64')), {
    injecting: 0x41,
    exception: { vector: 14, errorCode: 0x10, injected: false },
    interruptShadow: true,
    nmiPending: true,
    nmiMasked: false,
  });
  ev[3] = 0;
  ev[0] = 1; // exception.injected
  ev[1] = 6; // #UD
  ev[2] = 0;
  t.deepEqual(summarizeVcpuEvents(ev.toString('base64')).exception, { vector: 6, errorCode: null, injected: true });
  t.deepEqual(summarizeVcpuEvents(Buffer.alloc(64).toString('base64')), { injecting: null, exception: null, interruptShadow: false, nmiPending: false, nmiMasked: false });
  t.throws(() => summarizeVcpuEvents(Buffer.alloc(8).toString('base64')));
});

// A guest whose page tables map virtual page 0xffff_8000_0000_1000 to physical 0x5000 and
// 0xffff_8000_0000_2000 to 0x100000 (beyond a 1 MiB RAM: MMIO, say); nothing else.
function pagedGuest() {
  const ram = new Uint8Array(1 << 20).map((_, i) => i & 0xff);
  const maps = new Map<bigint, bigint>([
    [0xffff_8000_0000_1000n, 0x5000n],
    [0xffff_8000_0000_2000n, 0x10_0000n],
  ]);
  const translated: bigint[] = [];
  const vcpu = {
    translate(va: bigint): bigint | null {
      translated.push(va);
      const page = maps.get(va & ~0xfffn);
      return page === undefined ? null : page + (va & 0xfffn);
    },
  };
  const memory = {
    read(addr: number, len: number): Uint8Array {
      if (addr + len > ram.length) throw new Error('not inside guest RAM');
      return ram.subarray(addr, addr + len);
    },
  };
  return { vcpu, memory, translated };
}

test('guest virtual reads go through the vCPU page by page; unmapped pages and pages outside RAM read as null', (t) => {
  const { vcpu, memory, translated } = pagedGuest();
  // 4 bytes of an unmapped page, 4 of the mapped one (physical 0x5000..), 4 of the page outside RAM
  const bytes = readGuestVirtual(vcpu, memory, 0xffff_8000_0000_0ffcn, 4);
  t.deepEqual(bytes, [null, null, null, null]);
  const across = readGuestVirtual(vcpu, memory, 0xffff_8000_0000_0ffcn, 4 + 4096 + 4);
  t.is(across.length, 4104);
  t.deepEqual(across.slice(0, 5), [null, null, null, null, 0x00]);
  t.deepEqual(across.slice(4, 4 + 4096), Array.from({ length: 4096 }, (_, i) => (0x5000 + i) & 0xff));
  t.deepEqual(across.slice(4100), [null, null, null, null]);
  t.deepEqual(translated.slice(-3), [0xffff_8000_0000_0ffcn, 0xffff_8000_0000_1000n, 0xffff_8000_0000_2000n], 'one translation per page');
  // An address at the top of the address space wraps instead of growing past 64 bits.
  t.deepEqual(readGuestVirtual(vcpu, memory, 0xffff_ffff_ffff_fffen, 4), [null, null, null, null]);
  t.is(translated.at(-1), 0n);
});

test('the code line marks the byte at rip and shows unreadable bytes as ??', (t) => {
  t.is(formatCodeLine([0xfb, 0xf4, 0xeb, 0xfc, null], 2), 'fb f4 <eb> fc ??');
  t.is(formatCodeLine([null, 0x0f], 0), '<??> 0f');
});

test('a page-table root is in RAM only when its whole page is', (t) => {
  // 1 MiB of RAM at 0 and 1 MiB at 4 GiB
  const memory = new GuestMemory([
    new GuestRegion({ guestAddress: 0, size: 1 << 20, chunks: [new ArrayBuffer(1 << 20)], chunkSize: 1 << 20 }),
    new GuestRegion({ guestAddress: 2 ** 32, size: 1 << 20, chunks: [new ArrayBuffer(1 << 20)], chunkSize: 1 << 20 }),
  ]);
  t.true(pageInRam(memory, 0x5000n));
  t.true(pageInRam(memory, 0x1_0000_0000n));
  t.false(pageInRam(memory, 0x10_0000n), 'just past the first region');
  t.false(pageInRam(memory, 0x1_0016_d000n), 'past the second');
  t.false(pageInRam(memory, 0xf_ffff_ffff_f000n), 'the top of the physical address space');
});
