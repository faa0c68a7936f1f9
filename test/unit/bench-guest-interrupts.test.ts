// The net bench's reading of the guest's per-queue interrupt counts.
import test from 'ava';

import { describeGuestIrqs, guestIrqSnapshots } from '../bench/guest-interrupts';

test('GUEST-IRQS lines become snapshots, and two of them the interrupts of the job between, per MiB', (t) => {
  const out = [
    'ifconfig done',
    'GUEST-IRQS virtio0-config=0 virtio0-input.0=10 virtio0-output.0=3',
    'NETBENCH send bytes=104857600 ops=1 ms=5000 MiBps=20.0 tps=0',
    'GUEST-IRQS virtio0-config=0 virtio0-input.0=510 virtio0-output.0=1603',
    'GUEST-IRQS',
  ].join('\n');
  const snaps = guestIrqSnapshots(out);
  t.is(snaps.length, 3);
  t.deepEqual([...snaps[0]], [['virtio0-config', 0], ['virtio0-input.0', 10], ['virtio0-output.0', 3]]);
  t.is(snaps[2].size, 0, 'a guest without virtio vectors prints an empty line');
  t.is(describeGuestIrqs(snaps[0], snaps[1], 100), 'input.0 500 (5.0/MiB), output.0 1600 (16.0/MiB)');
  t.is(describeGuestIrqs(snaps[0], snaps[1]), 'input.0 500, output.0 1600');
  t.is(describeGuestIrqs(snaps[1], undefined), 'no guest interrupt counts');
});
