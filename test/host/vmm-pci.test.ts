// PCI segment 0 through the real VMM: the tiny kernel reads the host bridge's configuration
// space with port I/O exits (0xcf8/0xcfc) and an MMIO exit (ECAM), as a guest's PCI probe does.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { VmConfig } from '../../src/config/vm-config';
import { PCI_SEGMENT_ID, type PciSegmentState } from '../../src/devices/pci';
import { serialInputEvent } from '../../src/devices/serial-16550a';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { waitUntil } from './harness';
import { TINY_KERNEL_MAGIC, TinyKernelCommand, TinyKernelStatus, buildTinyKernel } from './tiny-kernel';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-vmm-pci-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

test.serial('a guest reading 00:00.0 through 0xcf8/0xcfc and ECAM finds the host bridge', async (t) => {
  const cfg: VmConfig & { serial: { mode: 'File'; file: string } } = {
    payload: { kernel: await buildTinyKernel(), cmdline: 'pci' },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: path.join(tmp, 'pci.serial') },
    console: { mode: 'Off' },
  };
  const vmm = new Vmm({ log: silentLogger() });
  try {
    await vmm.create(cfg);
    await vmm.boot();
    const mem = () => vmm.guestMemory()!;
    await waitUntil('the guest runs', () => mem().readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC && mem().readU32(TinyKernelStatus.COUNT) >= 1, 30_000);
    vmm.store.dispatch(serialInputEvent('serial0', Buffer.from(TinyKernelCommand.PCI_HOST_BRIDGE, 'latin1')));
    // A whole line: the end of the file may be a line still being printed.
    const line = () => /^PCI (\d+) (\d+) (\d+)\r?\n/m.exec(fs.readFileSync(cfg.serial.file, 'latin1'));
    await waitUntil('the guest prints what it read', () => line() !== null, 30_000);
    const [, id, cls, ecamId] = line()!.map(Number);
    t.is(id, 0x0d57_8086, 'vendor 0x8086, device 0x0d57');
    t.is(cls >>> 8, 0x06_00_00, 'class: host bridge');
    t.is(ecamId, id, 'ECAM reads the same dword');
    // The guest left CONFIG_ADDRESS pointing at 00:00.0 register 8: the latch is in the store.
    t.is((vmm.state.devices.instances[PCI_SEGMENT_ID] as PciSegmentState).configAddress, 0x8000_0008);
    t.is(vmm.state.bus.unhandled.pio.reads, 0, 'no port read went unowned');
  } finally {
    await vmm.close();
  }
});
