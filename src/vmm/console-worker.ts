// The host side of virtio-console: what the guest transmits goes to the console's sink; what
// the host types goes into the receive queue's buffers, as many bytes as the guest posted room
// for. Input the guest has no room for stays in the sink (it stops reading its tty), and the
// guest posting buffers offers it again: so, like the serial port, the console holds no input
// of its own between turns, and a snapshot never loses a keystroke it had taken.
import { VIRTIO_CONSOLE_MAX_CHAIN_BYTES, VirtioConsoleQueue } from '../devices/virtio/console';
import { readFromChain, writeToChain } from '../devices/virtio/virtqueue';
import type { ConsoleSink } from './console-sink';
import type { ChainResult, VirtioDeviceWorker } from './virtio-queues';

export function consoleWorker(sink: ConsoleSink): VirtioDeviceWorker {
  // Host input being offered to the guest, only for the length of one offerInput() call.
  let incoming: Uint8Array | null = null;
  let taken = 0;
  return {
    ready(queue) {
      return queue !== VirtioConsoleQueue.RECEIVE || (incoming !== null && taken < incoming.length);
    },
    chain(_fn, queue, chain, memory): ChainResult {
      if (queue === VirtioConsoleQueue.TRANSMIT) {
        // Device-writable buffers in a transmit chain are the driver's mistake: nothing is written to them.
        const bytes = readFromChain(memory, chain, VIRTIO_CONSOLE_MAX_CHAIN_BYTES);
        if (bytes.length) sink.write(bytes);
        const counters: Record<string, number> = { tx_bytes: bytes.length };
        if (chain.readableBytes > bytes.length) counters.tx_dropped = chain.readableBytes - bytes.length;
        return { written: 0, counters };
      }
      if (queue !== VirtioConsoleQueue.RECEIVE || incoming === null) return { written: 0 };
      const n = writeToChain(memory, chain, incoming.subarray(taken));
      taken += n;
      return { written: n, counters: { rx_bytes: n } };
    },
    offerInput(bytes, serve) {
      incoming = bytes;
      taken = 0;
      try {
        serve(VirtioConsoleQueue.RECEIVE);
        return taken;
      } finally {
        incoming = null;
      }
    },
    buffersPosted(queue) {
      if (queue === VirtioConsoleQueue.RECEIVE) sink.offerHeldInput();
    },
  };
}
