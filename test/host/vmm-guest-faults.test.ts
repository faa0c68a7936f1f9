// What a guest (or a failing host) can do to the VMM around its lifecycle, with the tiny PVH
// kernel in-process: floods of guest-triggered log lines, failed reboots and resumes, guest
// stops that arrive while the VM is being paused.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';

import type { VmConfig } from '../../src/config/vm-config';
import { serialInputEvent } from '../../src/devices/serial-16550a';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';
import { sleep } from './harness';
import { TINY_KERNEL_MAGIC, TinyKernelCommand, TinyKernelStatus, buildTinyKernel } from './tiny-kernel';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-guest-faults-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

async function config(name: string, kernel?: string): Promise<VmConfig & { serial: { mode: 'File'; file: string } }> {
  return {
    payload: { kernel: kernel ?? (await buildTinyKernel()), cmdline: `faults ${name}` },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: path.join(tmp, `${name}.serial`) },
  };
}

async function waitUntil(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    await sleep(20);
  }
}

const serialText = (cfg: { serial: { file: string } }): string => fs.readFileSync(cfg.serial.file, 'latin1');
/** The guest's main loop runs (its UART is set up, so input is no longer cleared away). */
const guestReady = (vmm: Vmm): boolean =>
  vmm.guestMemory()?.readU32(TinyKernelStatus.MAGIC) === TINY_KERNEL_MAGIC && vmm.guestMemory()!.readU32(TinyKernelStatus.COUNT) >= 1;

function send(vmm: Vmm, command: string): void {
  vmm.store.dispatch(serialInputEvent('serial0', Buffer.from(command, 'latin1')));
}

/** A pino logger whose lines are kept, parsed. */
function capturingLogger(): { log: pino.Logger; lines: { msg: string; level: number; suppressed?: number }[] } {
  const lines: { msg: string; level: number; suppressed?: number }[] = [];
  const log = pino({ level: 'info' }, { write: (s: string) => void lines.push(JSON.parse(s)) });
  return { log, lines };
}

test.serial('1000 guest sleep requests log a few rate-limited lines, not one per exit', async (t) => {
  const cfg = await config('sleep-flood');
  const { log, lines } = capturingLogger();
  const vmm = new Vmm({ log });
  try {
    await vmm.create(cfg);
    await vmm.boot();
    await waitUntil('the guest has initialised', () => guestReady(vmm));
    send(vmm, TinyKernelCommand.SLEEP_REQUESTS);
    await waitUntil('the guest has made its requests', () => serialText(cfg).includes('SLEPT'));
    const sleepLines = lines.filter((l) => l.msg.includes('sleep state'));
    t.true(sleepLines.length >= 1, 'the first request is logged');
    t.true(sleepLines.length <= 12, `${sleepLines.length} lines for 1000 requests`);
    t.is(vmm.state.vm.status, 'Running', 'the guest runs on');
  } finally {
    await vmm.close();
  }
});
