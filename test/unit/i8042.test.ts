import test from 'ava';
import {
  CTR_AUXDIS,
  CTR_AUXINT,
  CTR_KBDDIS,
  CTR_KBDINT,
  I8042Command,
  STATUS_AUX,
  STATUS_CMD,
  STATUS_OBF,
  STATUS_SYS,
  STATUS_TIMEOUT,
  type I8042State,
  i8042Device,
  i8042InitialState,
  i8042Transition,
} from '../../src/devices/i8042';
import { DeviceHarness } from './device-harness';

// Device-relative offsets: 0x60 -> 0, 0x64 -> 4
const DATA = 0;
const CMD = 4;

function kbc(ctr?: number) {
  const s = i8042InitialState();
  return new DeviceHarness<I8042State>(ctr === undefined ? s : { ...s, ctr }, i8042Transition);
}

/** Issue a command and read its one-byte response the way a polling driver does. */
function query(h: DeviceHarness<I8042State>, cmd: number): number {
  h.out(CMD, cmd);
  if (!(h.in(CMD) & STATUS_OBF)) throw new Error(`no response to 0x${cmd.toString(16)}`);
  return h.in(DATA);
}

test('self test answers 0x55 and sets the system flag', (t) => {
  const h = kbc(0);
  t.is(h.in(CMD) & STATUS_SYS, 0);
  t.is(query(h, I8042Command.SelfTest), 0x55);
  t.is(h.in(CMD) & STATUS_SYS, STATUS_SYS);
});

test('interface tests answer 0x00', (t) => {
  const h = kbc(0);
  t.is(query(h, I8042Command.KbdTest), 0x00);
  t.is(query(h, I8042Command.AuxTest), 0x00);
});

test('command byte read and write', (t) => {
  const h = kbc(0);
  h.out(CMD, I8042Command.WriteCtr);
  t.is(h.in(CMD) & STATUS_CMD, STATUS_CMD);
  h.out(DATA, 0x65);
  t.is(h.in(CMD) & STATUS_CMD, 0);
  t.is(query(h, I8042Command.ReadCtr), 0x65);
});

test('enable and disable commands flip the command byte bits', (t) => {
  const h = kbc(0);
  h.out(CMD, I8042Command.KbdDisable);
  h.out(CMD, I8042Command.AuxDisable);
  t.is(query(h, I8042Command.ReadCtr) & (CTR_KBDDIS | CTR_AUXDIS), CTR_KBDDIS | CTR_AUXDIS);
  h.out(CMD, I8042Command.KbdEnable);
  h.out(CMD, I8042Command.AuxEnable);
  t.is(query(h, I8042Command.ReadCtr) & (CTR_KBDDIS | CTR_AUXDIS), 0);
});

test('output buffer: reading data clears OBF; a stale read returns the last byte', (t) => {
  const h = kbc(0);
  h.out(CMD, I8042Command.SelfTest);
  t.is(h.in(CMD) & STATUS_OBF, STATUS_OBF);
  t.is(h.in(DATA), 0x55);
  t.is(h.in(CMD) & STATUS_OBF, 0);
  t.is(h.in(DATA), 0x55);
});

test('responses raise IRQ 1 only when the command byte enables it', (t) => {
  const h = kbc(0);
  query(h, I8042Command.SelfTest);
  t.deepEqual(h.take(), []);
  h.out(CMD, I8042Command.WriteCtr);
  h.out(DATA, CTR_KBDINT);
  query(h, I8042Command.KbdTest);
  t.deepEqual(h.take(), [{ type: 'irq.pulse', gsi: 1 }]);
});

test('aux loopback echoes the byte as aux data on IRQ 12', (t) => {
  const h = kbc(CTR_AUXINT);
  h.out(CMD, I8042Command.AuxLoop);
  h.out(DATA, 0x5a);
  t.is(h.in(CMD) & (STATUS_OBF | STATUS_AUX), STATUS_OBF | STATUS_AUX);
  t.is(h.in(DATA), 0x5a);
  t.deepEqual(h.take(), [{ type: 'irq.pulse', gsi: 12 }]);
});

test('bytes for the absent keyboard and mouse time out at once', (t) => {
  const h = kbc(CTR_KBDINT | CTR_AUXINT);
  h.out(DATA, 0xf2); // keyboard "identify"
  t.is(h.in(CMD) & (STATUS_OBF | STATUS_TIMEOUT | STATUS_AUX), STATUS_OBF | STATUS_TIMEOUT);
  t.is(h.in(DATA), 0xfe);
  t.is(h.in(CMD) & STATUS_TIMEOUT, 0);
  h.out(CMD, I8042Command.AuxSend);
  h.out(DATA, 0xf2);
  t.is(h.in(CMD) & (STATUS_OBF | STATUS_TIMEOUT | STATUS_AUX), STATUS_OBF | STATUS_TIMEOUT | STATUS_AUX);
  t.deepEqual(h.take(), [
    { type: 'irq.pulse', gsi: 1 },
    { type: 'irq.pulse', gsi: 12 },
  ]);
});

test('0xFE pulses the reset line', (t) => {
  const h = kbc();
  h.out(CMD, I8042Command.PulseReset);
  t.deepEqual(h.take(), [{ type: 'vm.reset', source: 'i8042' }]);
  h.out(CMD, 0xff); // pulse nothing
  t.deepEqual(h.take(), []);
});

test('clearing output port bit 0 resets too', (t) => {
  const h = kbc();
  t.is(query(h, I8042Command.ReadOutputPort) & 1, 1);
  h.take();
  h.out(CMD, I8042Command.WriteOutputPort);
  h.out(DATA, 0xfe);
  t.deepEqual(h.take(), [{ type: 'vm.reset', source: 'i8042' }]);
});

test('i8042Device owns ports 0x60 and 0x64 only', (t) => {
  t.deepEqual(i8042Device().ranges, [
    { space: 'pio', base: 0x60, length: 1, deviceOffset: 0 },
    { space: 'pio', base: 0x64, length: 1, deviceOffset: 4 },
  ]);
});
