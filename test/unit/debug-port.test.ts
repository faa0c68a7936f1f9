import test from 'ava';
import { type DebugPortState, debugPortDevice, debugPortInitialState, debugPortTransition } from '../../src/devices/debug-port';
import { DeviceHarness } from './device-harness';

test('writes report boot progress and latch the code', (t) => {
  const h = new DeviceHarness<DebugPortState>(debugPortInitialState(), debugPortTransition);
  t.is(h.in(0), 0xff);
  h.out(0, 0x12);
  h.out(0, 0x34);
  t.deepEqual(h.take(), [
    { type: 'boot.progress', code: 0x12 },
    { type: 'boot.progress', code: 0x34 },
  ]);
  t.is(h.state.lastCode, 0x34);
  t.is(h.state.writes, 2);
  t.is(h.in(0), 0x34);
});

test('debugPortDevice sits at 0x80', (t) => {
  t.deepEqual(debugPortDevice().ranges, [{ space: 'pio', base: 0x80, length: 1 }]);
});
