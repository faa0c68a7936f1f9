import test from 'ava';
import { allOnes, busInitialState, findDevice, registerRange, unhandledAccess, unregisterDevice } from '../../src/devices/bus';
import { DeviceConflictError } from '../../src/state/errors';

function bus() {
  let b = busInitialState();
  b = registerRange(b, { space: 'pio', base: 0x3f8, length: 8 }, 'serial0');
  b = registerRange(b, { space: 'pio', base: 0x60, length: 1, deviceOffset: 0 }, 'i8042');
  b = registerRange(b, { space: 'pio', base: 0x64, length: 1, deviceOffset: 4 }, 'i8042');
  b = registerRange(b, { space: 'mmio', base: 0xd000_0000, length: 0x1000 }, 'virtio0');
  return b;
}

test('finds the owner and the device-relative offset', (t) => {
  const b = bus();
  t.deepEqual(findDevice(b, 'pio', 0x3fd), { device: 'serial0', offset: 5 });
  t.deepEqual(findDevice(b, 'pio', 0x64), { device: 'i8042', offset: 4 });
  t.deepEqual(findDevice(b, 'pio', 0x60), { device: 'i8042', offset: 0 });
  t.deepEqual(findDevice(b, 'mmio', 0xd000_0ffc), { device: 'virtio0', offset: 0xffc });
  t.is(findDevice(b, 'pio', 0x61), undefined);
  t.is(findDevice(b, 'pio', 0x400), undefined);
  t.is(findDevice(b, 'mmio', 0x3f8), undefined);
});

test('ranges stay sorted and overlaps are refused', (t) => {
  const b = bus();
  t.deepEqual(b.pio.map((r) => r.base), [0x60, 0x64, 0x3f8]);
  t.throws(() => registerRange(b, { space: 'pio', base: 0x3ff, length: 2 }, 'x'), { instanceOf: DeviceConflictError });
  t.throws(() => registerRange(b, { space: 'pio', base: 0xfff0, length: 0x20 }, 'x'), { instanceOf: DeviceConflictError });
  t.notThrows(() => registerRange(b, { space: 'pio', base: 0x400, length: 1 }, 'x'));
});

test('unregistering removes every range of a device', (t) => {
  const b = unregisterDevice(bus(), 'i8042');
  t.is(findDevice(b, 'pio', 0x60), undefined);
  t.is(findDevice(b, 'pio', 0x64), undefined);
  t.truthy(findDevice(b, 'pio', 0x3f8));
});

test('unhandled reads float high and both directions are counted', (t) => {
  let b = busInitialState();
  const r1 = unhandledAccess(b, { space: 'pio', direction: 'read', address: 0x61, size: 2, data: 0, nowNs: 0 });
  t.is(r1.value, 0xffff);
  b = r1.state;
  const r2 = unhandledAccess(b, { space: 'pio', direction: 'write', address: 0x61, size: 1, data: 3, nowNs: 0 });
  t.is(r2.value, undefined);
  b = r2.state;
  b = unhandledAccess(b, { space: 'mmio', direction: 'read', address: 0xfee0_0000, size: 4, data: 0, nowNs: 0 }).state;
  t.deepEqual(b.unhandled, { pio: { reads: 1, writes: 1 }, mmio: { reads: 1, writes: 0 } });
  t.deepEqual(b.lastUnhandled, { space: 'mmio', direction: 'read', address: 0xfee0_0000, size: 4 });
  t.is(allOnes(1), 0xff);
  t.is(allOnes(4), 0xffffffff);
  t.is(allOnes(8), 0xffff_ffff_ffff_ffffn);
});
