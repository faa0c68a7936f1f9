import test from 'ava';
import {
  RTC_CENTURY,
  RTC_DAY,
  RTC_HOURS,
  RTC_MINUTES,
  RTC_MONTH,
  RTC_SECONDS,
  RTC_STATUS_A,
  RTC_STATUS_B,
  RTC_STATUS_C,
  RTC_STATUS_D,
  RTC_WEEKDAY,
  RTC_YEAR,
  STATUS_A_UIP,
  STATUS_B_24H,
  STATUS_B_BINARY,
  STATUS_B_SET,
  type CmosRtcState,
  cmosDevice,
  cmosInitialState,
  cmosTransition,
} from '../../src/devices/cmos-rtc';
import { DeviceHarness } from './device-harness';

const MIB = 1024 * 1024;
const GIB = 1024 * MIB;
// 2024-02-29 13:45:30.5 UTC, a Thursday
const T0_NS = Date.UTC(2024, 1, 29, 13, 45, 30) * 1e6 + 500_000_000;

function rtc(memorySize = 512 * MIB, offsetNs = 0) {
  const h = new DeviceHarness<CmosRtcState>(cmosInitialState({ memorySize, offsetNs }), cmosTransition);
  h.nowNs = T0_NS;
  return h;
}

function read(h: DeviceHarness<CmosRtcState>, index: number): number {
  h.out(0, index);
  return h.in(1);
}

function write(h: DeviceHarness<CmosRtcState>, index: number, value: number): void {
  h.out(0, index);
  h.out(1, value);
}

function readWord(h: DeviceHarness<CmosRtcState>, lo: number): number {
  return read(h, lo) | (read(h, lo + 1) << 8);
}

test('time registers in BCD, 24-hour mode by default', (t) => {
  const h = rtc();
  t.is(read(h, RTC_SECONDS), 0x30);
  t.is(read(h, RTC_MINUTES), 0x45);
  t.is(read(h, RTC_HOURS), 0x13);
  t.is(read(h, RTC_WEEKDAY), 5); // Sunday = 1
  t.is(read(h, RTC_DAY), 0x29);
  t.is(read(h, RTC_MONTH), 0x02);
  t.is(read(h, RTC_YEAR), 0x24);
  t.is(read(h, RTC_CENTURY), 0x20);
});

test('binary and 12-hour modes follow status B', (t) => {
  const h = rtc();
  write(h, RTC_STATUS_B, STATUS_B_BINARY);
  t.is(read(h, RTC_HOURS), 0x80 | 1); // 1 PM
  t.is(read(h, RTC_MINUTES), 45);
  t.is(read(h, RTC_YEAR), 24);
  write(h, RTC_STATUS_B, 0);
  t.is(read(h, RTC_HOURS), 0x80 | 0x01);
  write(h, RTC_STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
  t.is(read(h, RTC_HOURS), 13);
});

test('time advances with the host clock', (t) => {
  const h = rtc();
  h.nowNs += 90e9;
  t.is(read(h, RTC_MINUTES), 0x47);
  t.is(read(h, RTC_SECONDS), 0x00);
});

test('status D reports valid RAM; C reads zero; A shows UIP just before a second boundary', (t) => {
  const h = rtc();
  t.is(read(h, RTC_STATUS_D), 0x80);
  t.is(read(h, RTC_STATUS_C), 0);
  t.is(read(h, RTC_STATUS_A) & STATUS_A_UIP, 0);
  h.nowNs = T0_NS + 499_900_000; // 100 us before the next second
  t.is(read(h, RTC_STATUS_A), STATUS_A_UIP | 0x26);
});

test('setting the clock with SET keeps an offset from host time', (t) => {
  const h = rtc();
  write(h, RTC_STATUS_B, STATUS_B_24H | STATUS_B_SET);
  // A full date written one register at a time, in an order that passes through invalid dates.
  write(h, RTC_DAY, 0x31);
  write(h, RTC_MONTH, 0x12);
  write(h, RTC_YEAR, 0x99);
  write(h, RTC_CENTURY, 0x19);
  write(h, RTC_HOURS, 0x23);
  write(h, RTC_MINUTES, 0x59);
  write(h, RTC_SECONDS, 0x50);
  h.nowNs += 5e9; // frozen while SET is on
  t.is(read(h, RTC_SECONDS), 0x50);
  write(h, RTC_STATUS_B, STATUS_B_24H);
  t.is(h.state.offsetNs, Date.UTC(1999, 11, 31, 23, 59, 50) * 1e6 - h.nowNs);
  h.nowNs += 10e9;
  t.is(read(h, RTC_YEAR), 0x00);
  t.is(read(h, RTC_CENTURY), 0x20);
  t.is(read(h, RTC_MONTH), 0x01);
  t.is(read(h, RTC_SECONDS), 0x00);
});

test('writing a time register without SET moves the clock at once', (t) => {
  const h = rtc();
  write(h, RTC_HOURS, 0x08);
  t.is(read(h, RTC_HOURS), 0x08);
  t.is(read(h, RTC_MINUTES), 0x45);
  t.is(h.state.offsetNs, -5 * 3600e9);
});

test('a restored state keeps its time offset against a new host clock', (t) => {
  const h = rtc(512 * MIB, -3600e9);
  t.is(read(h, RTC_HOURS), 0x12);
  const moved = new DeviceHarness<CmosRtcState>(JSON.parse(JSON.stringify(h.state)), cmosTransition);
  moved.nowNs = T0_NS + 60e9;
  t.is(read(moved, RTC_HOURS), 0x12);
  t.is(read(moved, RTC_MINUTES), 0x46);
});

test('the index port carries the NMI mask in bit 7', (t) => {
  const h = rtc();
  h.out(0, 0x80 | RTC_SECONDS);
  t.true(h.state.nmiMasked);
  t.is(h.state.index, RTC_SECONDS);
  t.is(h.in(1), 0x30);
  h.out(0, RTC_SECONDS);
  t.false(h.state.nmiMasked);
});

test('plain CMOS bytes are read/write', (t) => {
  const h = rtc();
  write(h, 0x40, 0xab);
  t.is(read(h, 0x40), 0xab);
});

test('memory size registers for 512 MiB', (t) => {
  const h = rtc(512 * MIB);
  t.is(readWord(h, 0x15), 640);
  t.is(readWord(h, 0x17), 0xffff); // 511 MiB in KiB does not fit
  t.is(readWord(h, 0x30), 0xffff);
  t.is(readWord(h, 0x34), (512 - 16) * 16);
  t.is(read(h, 0x5b) | (read(h, 0x5c) << 8) | (read(h, 0x5d) << 16), 0);
});

test('memory size registers for 8 MiB and for 6 GiB', (t) => {
  const small = rtc(8 * MIB);
  t.is(readWord(small, 0x17), 7 * 1024);
  t.is(readWord(small, 0x34), 0);
  const big = rtc(6 * GIB);
  t.is(readWord(big, 0x34), (3 * 1024 - 16) * 16); // only what sits below the 3 GiB hole
  t.is(read(big, 0x5b) | (read(big, 0x5c) << 8) | (read(big, 0x5d) << 16), (3 * GIB) / (64 * 1024));
});

test('cmosDevice sits at 0x70-0x71', (t) => {
  t.deepEqual(cmosDevice({ memorySize: MIB * 64 }).ranges, [{ space: 'pio', base: 0x70, length: 2 }]);
});

test('writes that are not a date leave the clock as it was: 13,035 writes of 0xff to the binary month', (t) => {
  const h = rtc();
  write(h, RTC_STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
  h.out(0, RTC_MONTH);
  for (let i = 0; i < 13_035; i++) h.out(1, 0xff);
  t.true(Number.isFinite(h.state.offsetNs), `offset ${h.state.offsetNs}`);
  t.is(h.state.offsetNs, 0, 'no write moved the clock');
  t.deepEqual(JSON.parse(JSON.stringify(h.state)), h.state, 'the state is still plain JSON');
  t.is(read(h, RTC_MONTH), 2);
  t.is(read(h, RTC_YEAR), 24);
  // A valid month still sets the clock.
  write(h, RTC_MONTH, 3);
  t.is(read(h, RTC_MONTH), 3);
  t.is(read(h, RTC_DAY), 29);
});

test('invalid dates are refused in BCD and binary, live and when SET is cleared', (t) => {
  const h = rtc();
  for (const [index, value] of [
    [RTC_SECONDS, 0x60],
    [RTC_MINUTES, 0x5a], // BCD digit above 9
    [RTC_HOURS, 0x24],
    [RTC_DAY, 0x30], // February 30
    [RTC_DAY, 0x00],
    [RTC_MONTH, 0x13],
    [RTC_MONTH, 0x00],
    [RTC_YEAR, 0xa0],
    [RTC_CENTURY, 0xff],
  ]) {
    write(h, index, value);
    t.is(h.state.offsetNs, 0, `register 0x${index.toString(16)} = 0x${value.toString(16)} is refused`);
  }
  // 12-hour mode: hour 0 does not exist.
  write(h, RTC_STATUS_B, 0);
  write(h, RTC_HOURS, 0x00);
  t.is(h.state.offsetNs, 0, '12-hour hour 0 is refused');
  // Set mode: an impossible date written field by field does not become the time.
  write(h, RTC_STATUS_B, STATUS_B_SET | STATUS_B_24H | STATUS_B_BINARY);
  write(h, RTC_MONTH, 200);
  write(h, RTC_DAY, 99);
  write(h, RTC_STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
  t.is(h.state.offsetNs, 0);
  t.is(read(h, RTC_MONTH), 2);
  // Century 0: year 0050 is the year 50, not 1950.
  write(h, RTC_STATUS_B, STATUS_B_SET | STATUS_B_24H | STATUS_B_BINARY);
  write(h, RTC_CENTURY, 0);
  write(h, RTC_YEAR, 50);
  write(h, RTC_MONTH, 1);
  write(h, RTC_DAY, 1);
  write(h, RTC_STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
  t.is(read(h, RTC_CENTURY), 0);
  t.is(read(h, RTC_YEAR), 50);
});
