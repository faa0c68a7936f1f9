// The health report's reading of a parked vCPU's local APIC and pending events (KVM's structs
// as KVM_GET_LAPIC and KVM_GET_VCPU_EVENTS give them).
import test from 'ava';

import { summarizeLapic, summarizeVcpuEvents } from '../../src/vmm/vcpu-sample';

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

test('the events summary tells an interrupt being injected, the interrupt shadow and NMI state', (t) => {
  const ev = Buffer.alloc(64);
  ev[8] = 1; // interrupt.injected
  ev[9] = 0x41; // interrupt.nr
  ev[11] = 1; // interrupt.shadow
  ev[13] = 1; // nmi.pending
  t.deepEqual(summarizeVcpuEvents(ev.toString('base64')), { injecting: 0x41, interruptShadow: true, nmiPending: true, nmiMasked: false });
  t.deepEqual(summarizeVcpuEvents(Buffer.alloc(64).toString('base64')), { injecting: null, interruptShadow: false, nmiPending: false, nmiMasked: false });
  t.throws(() => summarizeVcpuEvents(Buffer.alloc(8).toString('base64')));
});
