// virtio-console without KVM: what the driver reads of the device, and the worker between guest
// buffers and the console's host end: transmitted bytes reach the sink (a chain claiming more
// than the cap is cut and counted), host input fills the receive buffers the guest posted and
// what does not fit stays with the caller, and no input means no receive buffer is used.
import test from 'ava';
import { VIRTIO_CONSOLE_ID, VIRTIO_CONSOLE_MAX_CHAIN_BYTES, VirtioConsoleQueue, virtioConsoleConfigBytes, virtioConsoleFeatures, virtioConsoleModel } from '../../src/devices/virtio/console';
import { hasVirtioConsole, placeVirtioFunctions, virtioFunctionsOf } from '../../src/devices/virtio/vm-devices';
import type { VirtioFunctionState } from '../../src/devices/virtio/transport';
import { anonymousGuestMemory } from '../../src/memory/guest-memory';
import { consoleWorker } from '../../src/vmm/console-worker';
import type { ConsoleSink } from '../../src/vmm/console-sink';
import type { ChainResult } from '../../src/vmm/virtio-queues';
import { chainOf } from './chain-of';

test('the device offers its terminal size when it has one, and Cloud Hypervisor\'s id', (t) => {
  const c = new DataView(virtioConsoleConfigBytes({ cols: 132, rows: 43 }).buffer);
  t.is(c.getUint16(0, true), 132);
  t.is(c.getUint16(2, true), 43);
  t.is(virtioConsoleFeatures({ cols: 132, rows: 43 }), 1n, 'VIRTIO_CONSOLE_F_SIZE');
  t.is(virtioConsoleFeatures({ cols: 0, rows: 0 }), 0n, 'no size to tell: not offered');
  const fn = virtioConsoleModel.create(VIRTIO_CONSOLE_ID, { cols: 0, rows: 0 }, [256, 256]);
  t.is(fn.virtio.queues.length, 2, 'receiveq and transmitq of port 0');
  t.is(VIRTIO_CONSOLE_ID, '_console');
});

test('any console mode but Off gives the guest an hvc0, after the disks and the entropy device', (t) => {
  const base = { payload: { kernel: '/k' } };
  t.true(hasVirtioConsole(base), 'the default console is Tty');
  t.false(hasVirtioConsole({ ...base, console: { mode: 'Off' } }));
  t.true(hasVirtioConsole({ ...base, console: { mode: 'Null' } }));
  const fns = virtioFunctionsOf({ ...base, rng: { src: '/dev/urandom' }, console: { mode: 'File', file: '/tmp/x' } }, { diskSizes: new Map(), consoleSize: { cols: 80, rows: 24 } });
  t.deepEqual(fns.map((f) => f.kind), ['virtio-rng', 'virtio-console']);
  t.deepEqual(fns[1].device, { cols: 80, rows: 24 });
  t.deepEqual(Object.keys(placeVirtioFunctions(fns)), ['01.0', '02.0']);
});

/** A sink that keeps what it is given and counts offers of held input. */
function recordingSink(): ConsoleSink & { out: number[]; offered: number } {
  const s = {
    out: [] as number[],
    offered: 0,
    write: (b: Iterable<number>) => void s.out.push(...b),
    onInput() {},
    offerHeldInput: () => void s.offered++,
    pauseInput() {},
    resumeInput() {},
    close() {},
  };
  return s;
}

const fn = virtioConsoleModel.create(VIRTIO_CONSOLE_ID, { cols: 0, rows: 0 }, [256, 256]) as VirtioFunctionState;

test('transmitted bytes go to the sink in order; a chain past the cap is cut and counted', (t) => {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: 1 << 20 }]);
  mem.write(0x1000, Buffer.from('hello '));
  mem.write(0x2000, Buffer.from('world\n'));
  const sink = recordingSink();
  const w = consoleWorker(sink);
  const r = w.chain(fn, VirtioConsoleQueue.TRANSMIT, chainOf([{ addr: 0x1000, len: 6 }, { addr: 0x2000, len: 6 }], []), mem) as ChainResult;
  t.is(Buffer.from(sink.out).toString(), 'hello world\n');
  t.deepEqual(r, { written: 0, counters: { tx_bytes: 12 } });
  const big = w.chain(fn, VirtioConsoleQueue.TRANSMIT, chainOf([{ addr: 0x10000, len: VIRTIO_CONSOLE_MAX_CHAIN_BYTES + 100 }], []), mem) as ChainResult;
  t.deepEqual(big.counters, { tx_bytes: VIRTIO_CONSOLE_MAX_CHAIN_BYTES, tx_dropped: 100 });
  t.is(sink.out.length, 12 + VIRTIO_CONSOLE_MAX_CHAIN_BYTES);
  t.true(w.ready!(VirtioConsoleQueue.TRANSMIT), 'transmit chains are always served');
});

test('host input fills the posted receive buffers; what does not fit is left to the caller; no input, no buffer used', (t) => {
  const mem = anonymousGuestMemory([{ guestAddress: 0, size: 1 << 20 }]);
  const sink = recordingSink();
  const w = consoleWorker(sink);
  t.false(w.ready!(VirtioConsoleQueue.RECEIVE), 'nothing to give: the guest keeps its buffers');
  // Two posted buffers of 4 bytes each; serving pops them while the worker is ready.
  const posted = [chainOf([], [{ addr: 0x3000, len: 4 }]), chainOf([], [{ addr: 0x4000, len: 4 }])];
  const used: number[] = [];
  const serve = (queue: number) => {
    while (w.ready!(queue) && posted.length) used.push((w.chain(fn, queue, posted.shift()!, mem) as ChainResult).written);
  };
  t.is(w.offerInput!(Buffer.from('ls -l /tmp\r'), serve), 8, 'the guest had room for 8 bytes');
  t.deepEqual(used, [4, 4]);
  t.is(Buffer.from(mem.read(0x3000, 4)).toString() + Buffer.from(mem.read(0x4000, 4)).toString(), 'ls -l /t');
  t.false(w.ready!(VirtioConsoleQueue.RECEIVE), 'the input is the caller\'s again once the offer returns');
  posted.push(chainOf([], [{ addr: 0x5000, len: 64 }]));
  t.is(w.offerInput!(Buffer.from('mp\r'), serve), 3);
  t.is(Buffer.from(mem.read(0x5000, 3)).toString(), 'mp\r');
  w.buffersPosted!(VirtioConsoleQueue.RECEIVE);
  w.buffersPosted!(VirtioConsoleQueue.TRANSMIT);
  t.is(sink.offered, 1, 'new receive buffers offer the held input again');
});
