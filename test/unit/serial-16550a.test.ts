import test from 'ava';
import {
  IER_RDA,
  IER_RLS,
  IER_THRE,
  IIR_FIFO_ENABLED,
  IIR_NO_INT,
  IIR_RDA,
  IIR_RLS,
  IIR_THRE,
  LSR_DR,
  LSR_OE,
  LSR_TEMT,
  LSR_THRE,
  MCR_LOOP,
  SERIAL_HW_FIFO_DEPTH,
  type Serial16550aState,
  serialDevice,
  serialInitialState,
  serialOutputDropped,
  serialInput,
  serialTransition,
} from '../../src/devices/serial-16550a';
import { DeviceHarness } from './device-harness';

const RBR = 0, THR = 0, DLL = 0, IER = 1, DLM = 1, IIR = 2, FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7;

function uart(opts = {}) {
  return new DeviceHarness<Serial16550aState>(serialInitialState(opts), serialTransition);
}

function input(h: DeviceHarness<Serial16550aState>, bytes: number[]) {
  const r = serialInput(h.state, { bytes });
  h.state = r.state;
  h.effects.push(...r.effects);
}

const pulses = (h: DeviceHarness<Serial16550aState>) => h.take().filter((e) => e.type === 'irq.pulse').length;

// How Linux's 8250 driver tells UART types apart, re-expressed as a sequence of port accesses:
// an IER read/write test, a loopback MSR test, the FIFO bits in IIR, then (for a 16550A) the
// probes for compatible chips with extra registers, a 64-byte FIFO, or an IER UUE bit, and
// finally a loopback count of the FIFO depth.
function fifoDepth(h: DeviceHarness<Serial16550aState>): number {
  const lcr = h.in(LCR);
  h.out(LCR, 0);
  const oldFcr = h.in(IIR);
  const oldMcr = h.in(MCR);
  h.out(FCR, 0x07);
  h.out(MCR, MCR_LOOP);
  h.out(LCR, 0x80);
  const dl = h.in(DLL) | (h.in(DLM) << 8);
  h.out(DLL, 1);
  h.out(DLM, 0);
  h.out(LCR, 0x03);
  for (let i = 0; i < 256; i++) h.out(THR, i);
  let n = 0;
  while (h.in(LSR) & LSR_DR && n < 256) {
    h.in(RBR);
    n++;
  }
  h.out(FCR, oldFcr);
  h.out(MCR, oldMcr);
  h.out(LCR, 0x80);
  h.out(DLL, dl & 0xff);
  h.out(DLM, dl >> 8);
  h.out(LCR, lcr);
  return n;
}

function probe16550aVariants(h: DeviceHarness<Serial16550aState>): string {
  h.out(LCR, 0x80);
  if (h.in(2) === 0) return 'EFR-v1 chip';
  h.out(LCR, 0xbf);
  if (h.in(2) === 0) return 'EFR-v2 chip';
  h.out(LCR, 0);
  const mcr = h.in(MCR);
  h.out(LCR, 0xe0);
  let excr = h.in(2);
  if (!((excr ^ mcr) & MCR_LOOP)) {
    h.out(LCR, 0);
    h.out(MCR, mcr ^ MCR_LOOP);
    h.out(LCR, 0xe0);
    excr = h.in(2);
    h.out(LCR, 0);
    h.out(MCR, mcr);
    if ((excr ^ mcr) & MCR_LOOP) return 'NS16550A';
  }
  h.out(LCR, 0);
  h.out(FCR, 0x21);
  const plain = h.in(IIR) & 0xe0;
  h.out(FCR, 0x01);
  h.out(LCR, 0x80);
  h.out(FCR, 0x21);
  const withDlab = h.in(IIR) & 0xe0;
  h.out(FCR, 0x01);
  h.out(LCR, 0);
  if (plain === 0xc0 && withDlab === 0xe0) return 'TI16750';
  const ier = h.in(IER);
  h.out(IER, ier & ~0x40);
  if (!(h.in(IER) & 0x40)) {
    h.out(IER, ier | 0x40);
    if (h.in(IER) & 0x40) return 'XScale';
  }
  h.out(IER, ier);
  if (fifoDepth(h) === 64) return 'U6_16550A';
  return '16550A';
}

function detectUart(h: DeviceHarness<Serial16550aState>): string {
  const ier = h.in(IER);
  h.out(IER, 0);
  const cleared = h.in(IER) & 0x0f;
  h.out(IER, 0x0f);
  const set = h.in(IER) & 0x0f;
  h.out(IER, ier);
  if (cleared !== 0 || set !== 0x0f) return 'no UART (IER test)';
  const saveMcr = h.in(MCR);
  const saveLcr = h.in(LCR);
  h.out(MCR, 0x1a); // loop + OUT2 + RTS
  const status = h.in(MSR) & 0xf0;
  h.out(MCR, saveMcr);
  if (status !== 0x90) return `no UART (loopback MSR ${status.toString(16)})`;
  h.out(LCR, 0xbf);
  h.out(2, 0);
  h.out(LCR, 0);
  h.out(FCR, 0x01);
  let type: string;
  switch (h.in(IIR) & 0xc0) {
    case 0x00: {
      h.out(SCR, 0xa5);
      const a = h.in(SCR);
      h.out(SCR, 0x5a);
      type = a === 0xa5 && h.in(SCR) === 0x5a ? '16450' : '8250';
      break;
    }
    case 0x80:
      type = '16550';
      break;
    case 0xc0:
      type = probe16550aVariants(h);
      break;
    default:
      type = 'unknown';
  }
  h.out(LCR, saveLcr);
  h.out(MCR, saveMcr);
  h.out(FCR, 0x07);
  h.out(FCR, 0);
  h.in(RBR);
  h.out(IER, 0);
  return type;
}

test('the Linux-style autoconfig probe detects a 16550A', (t) => {
  const h = uart();
  t.is(detectUart(h), '16550A');
  // probing is silent: no console output, and the RX side is clean afterwards
  t.false(h.effects.some((e) => e.type === 'console.output'));
  t.deepEqual(h.state.rx, []);
});

test('loopback FIFO depth is the chip depth, whatever the host RX capacity', (t) => {
  const h = uart({ rxCapacity: 256 });
  h.out(FCR, 0x01);
  t.is(fifoDepth(h), SERIAL_HW_FIFO_DEPTH);
});

test('scratch register holds what is written', (t) => {
  const h = uart();
  for (const v of [0xa5, 0x5a, 0x00, 0xff]) {
    h.out(SCR, v);
    t.is(h.in(SCR), v);
  }
});

test('IER keeps only its four interrupt bits', (t) => {
  const h = uart();
  h.out(IER, 0xff);
  t.is(h.in(IER), 0x0f);
});

test('DLAB switches offsets 0 and 1 to the divisor latch', (t) => {
  const h = uart();
  h.out(IER, IER_RDA);
  h.out(LCR, 0x83);
  h.out(DLL, 0x01);
  h.out(DLM, 0x02);
  t.is(h.in(DLL), 0x01);
  t.is(h.in(DLM), 0x02);
  h.out(LCR, 0x03);
  t.is(h.in(IER), IER_RDA);
  t.is(h.state.dll, 1);
  t.is(h.state.dlm, 2);
  t.deepEqual(h.take(), []);
});

test('THR writes become console output', (t) => {
  const h = uart({ id: 'com1' });
  for (const c of 'hi') h.out(THR, c.charCodeAt(0));
  t.deepEqual(h.take(), [
    { type: 'console.output', device: 'com1', bytes: [0x68] },
    { type: 'console.output', device: 'com1', bytes: [0x69] },
  ]);
  t.is(h.in(LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
  t.is(h.state.txBytes, 2);
});

test('enabling THRE raises it at once; reading IIR clears it; re-enabling re-asserts it', (t) => {
  const h = uart();
  h.out(FCR, 0x01);
  h.out(IER, IER_THRE);
  t.deepEqual(h.take(), [{ type: 'irq.pulse', gsi: 4 }]);
  t.is(h.in(IIR), IIR_FIFO_ENABLED | IIR_THRE);
  t.is(h.in(IIR), IIR_FIFO_ENABLED | IIR_NO_INT);
  h.out(IER, 0);
  h.out(IER, IER_THRE);
  t.is(h.in(IIR) & 0x0f, IIR_THRE);
  t.is(pulses(h), 1);
});

test('each THR write with THRE enabled is a new edge', (t) => {
  const h = uart();
  h.out(IER, IER_THRE);
  h.in(IIR);
  h.take();
  h.out(THR, 0x41);
  h.out(THR, 0x42);
  const fx = h.take();
  t.is(fx.filter((e) => e.type === 'irq.pulse').length, 2);
  t.is(fx.filter((e) => e.type === 'console.output').length, 2);
});

test('host input fills the RX FIFO and raises RX-data-available once', (t) => {
  const h = uart();
  h.out(IER, IER_RDA);
  t.deepEqual(h.take(), []);
  input(h, [0x61, 0x62]);
  t.deepEqual(h.take(), [{ type: 'irq.pulse', gsi: 4 }]);
  input(h, [0x63]);
  t.is(pulses(h), 0, 'line already high: no new edge');
  t.is(h.in(IIR) & 0x0f, IIR_RDA);
  t.is(h.in(LSR) & LSR_DR, LSR_DR);
  t.deepEqual([h.in(RBR), h.in(RBR), h.in(RBR)], [0x61, 0x62, 0x63]);
  t.is(h.in(LSR) & LSR_DR, 0);
  t.is(h.in(IIR) & 0x0f, IIR_NO_INT);
  input(h, [0x64]);
  t.is(pulses(h), 1, 'drained, so the next byte is a new edge');
});

test('enabling RDA with data already waiting raises the interrupt', (t) => {
  const h = uart();
  input(h, [1]);
  t.deepEqual(h.take(), []);
  h.out(IER, IER_RDA);
  t.deepEqual(h.take(), [{ type: 'irq.pulse', gsi: 4 }]);
});

test('RX overflow drops and counts bytes and reports an overrun', (t) => {
  const h = uart({ rxCapacity: 16 });
  h.out(IER, IER_RDA | IER_RLS);
  input(h, Array.from({ length: 20 }, (_, i) => i));
  t.is(h.state.rx.length, 16);
  t.is(h.state.rxDropped, 4);
  t.is(h.in(IIR) & 0x0f, IIR_RLS, 'line status outranks data available');
  t.is(h.in(LSR) & LSR_OE, LSR_OE);
  t.is(h.in(LSR) & LSR_OE, 0, 'reading LSR clears the error');
  t.is(h.in(IIR) & 0x0f, IIR_RDA);
  t.is(h.in(RBR), 0);
});

test('IIR priority: line status > RX data > THR empty > modem status', (t) => {
  const h = uart();
  h.out(IER, 0x0f); // THRE armed
  h.out(MCR, MCR_LOOP | 0x02); // modem delta pending
  input(h, [7]); // dropped: loopback disconnects the line
  t.is(h.state.rx.length, 0);
  h.out(THR, 9); // loops back into RX
  t.is(h.in(IIR) & 0x0f, IIR_RDA);
  h.in(RBR);
  t.is(h.in(IIR) & 0x0f, IIR_THRE);
  t.is(h.in(IIR) & 0x0f, 0x00, 'THRE acknowledged: modem status left');
  h.in(MSR);
  t.is(h.in(IIR) & 0x0f, IIR_NO_INT);
});

test('loopback maps MCR outputs onto MSR inputs with deltas', (t) => {
  const h = uart();
  h.out(MCR, MCR_LOOP);
  h.in(MSR);
  h.out(MCR, MCR_LOOP | 0x0f);
  t.is(h.in(MSR), 0xf0 | 0x0b); // all lines up; DCTS, DDSR, DDCD (RI rose: no TERI)
  h.out(MCR, MCR_LOOP);
  t.is(h.in(MSR), 0x0f); // all down; TERI on RI's falling edge
  h.out(MCR, 0x0b);
  t.is(h.in(MSR) & 0xf0, 0xb0, 'outside loopback a ready terminal is attached');
});

test('FCR: clearing RX and toggling the FIFO enable empty the receive FIFO', (t) => {
  const h = uart();
  h.out(FCR, 0x01);
  input(h, [1, 2, 3]);
  h.out(FCR, 0x03);
  t.deepEqual(h.state.rx, []);
  input(h, [4]);
  h.out(FCR, 0x00);
  t.deepEqual(h.state.rx, []);
  t.is(h.in(IIR) & 0xc0, 0);
});

test('serialDevice places COM1 at 0x3f8 on GSI 4', (t) => {
  const d = serialDevice();
  t.deepEqual(d.ranges, [{ space: 'pio', base: 0x3f8, length: 8 }]);
  t.is(d.state.gsi, 4);
  t.is(d.state.schemaVersion, 2);
  t.is(d.state.txDropped, 0);
});

test('output the host dropped is counted on the device; nonsense counts are ignored', (t) => {
  const s0 = serialInitialState();
  const s1 = serialOutputDropped(s0, { bytes: 300 }).state;
  t.is(s1.txDropped, 300);
  t.is(serialOutputDropped(s1, { bytes: 5 }).state.txDropped, 305);
  for (const bytes of [0, -1, Number.NaN, Number.POSITIVE_INFINITY, 1.5]) t.is(serialOutputDropped(s1, { bytes }).state, s1);
});

test('a write-read cycle never mutates the input state', (t) => {
  const s0 = serialInitialState();
  const copy = JSON.parse(JSON.stringify(s0));
  serialTransition(s0, { space: 'pio', direction: 'write', offset: 0, size: 1, data: 0x41, nowNs: 0 });
  serialInput(s0, { bytes: [1, 2] });
  t.deepEqual(s0, copy);
});

test('the guest taking a received byte tells the console there is room for held input; an empty read does not', (t) => {
  const h = uart();
  input(h, [0x61]);
  h.take();
  t.is(h.in(RBR), 0x61);
  t.deepEqual(h.take(), [{ type: 'console.input-room', device: 'serial0' }]);
  t.is(h.in(RBR), 0);
  t.deepEqual(h.take(), [], 'nothing was taken, so no room was made');
});
