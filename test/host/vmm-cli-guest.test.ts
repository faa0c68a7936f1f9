// The real `tern` CLI booting the tiny PVH kernel, driven over its serial console like a
// user at a terminal: boot, command line, serial input, poweroff and the three resets.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { GuestProcess } from '../linux/guest-process';
import { formatCodeLine, type VcpuSample } from '../../src/vmm/vcpu-sample';
import { sleep } from './harness';
import { TINY_KERNEL_BANNER, TINY_KERNEL_LOAD_ADDRESS, buildTinyKernel, countsIn, lastStatus, startTinyVm, tinyKernelImage } from './tiny-kernel';

const T = 30_000;

/** Type 'p' and expect a clean exit 0. */
async function powerOff(vm: GuestProcess): Promise<void> {
  vm.type('p');
  const { code, signal } = await vm.exit(T);
  if (code !== 0) throw new Error(`exit ${code} ${signal}; stderr:\n${vm.stderr.slice(-2000)}`);
}

const boots = (vm: GuestProcess): number => vm.output.split(`${TINY_KERNEL_BANNER}\n`).length - 1;

test('boots, echoes the command line byte for byte, counts, and powers off with exit 0', async (t) => {
  // Quotes, '=' and ',' pass through untouched; UTF-8 arrives as its bytes (read as latin1).
  const cmdline = 'console=ttyS0 tern.cmd="echo a,b" x=1 ü';
  const vm = await startTinyVm([], { cmdline });
  try {
    const started = Date.now();
    await vm.waitFor(/^COUNT 0\n/m, T);
    const firstLine = Date.now();
    await vm.waitFor(/^COUNT 5\n/m, T);
    const rate = 5 / ((Date.now() - firstLine) / 1000);
    t.log(`first COUNT ${firstLine - started} ms after spawn; ${rate.toFixed(1)} lines/s`);
    const expected = `${TINY_KERNEL_BANNER}\nCMDLINE ${Buffer.from(cmdline, 'utf8').toString('latin1')}\nCOUNT 0\n`;
    t.is(vm.output.slice(0, expected.length), expected);
    const counts = countsIn(vm.output);
    t.deepEqual(counts, counts.map((_, i) => i), 'consecutive counts from 0');
    t.true(rate > 1 && rate < 30, `about 10 lines/s (timer-paced, not a spin), got ${rate.toFixed(1)}`);
    await powerOff(vm);
    t.is(boots(vm), 1);
  } finally {
    vm.kill();
  }
});

test('SIGUSR2 logs a health report (vCPU threads and exits, the UART) and the guest counts on', async (t) => {
  const vm = await startTinyVm();
  try {
    await vm.waitFor(/^COUNT 2\n/m, T);
    const from = vm.stderr.length;
    const seen = vm.output.length;
    vm.child.kill('SIGUSR2');
    for (let i = 0; i < 100 && !vm.stderr.slice(from).includes('"health report"'); i++) await sleep(50);
    const line = vm.stderr.slice(from).split('\n').find((l) => l.includes('"health report"'));
    t.truthy(line, `a health report on stderr: ${vm.stderr.slice(from, from + 500)}`);
    const { health } = JSON.parse(line!) as { health: { status: string; vcpus: { id: number; thread: string; exits: number; lastExitMsAgo: number; threadCpuMs: number | null }[]; serial: { txBytes: number; ier: number }; queues: unknown[] } };
    t.is(health.status, 'Running');
    t.is(health.vcpus.length, 1);
    t.like(health.vcpus[0], { id: 0, thread: 'running' });
    t.true(health.vcpus[0].exits > 10, `the vCPU's exits are counted: ${health.vcpus[0].exits}`);
    t.true(health.vcpus[0].lastExitMsAgo >= 0 && health.vcpus[0].lastExitMsAgo < 10_000);
    // (the CPU its thread used: found by the thread's name, a count of /proc's 10 ms ticks)
    t.is(typeof health.vcpus[0].threadCpuMs, 'number', 'the vCPU thread\'s CPU time is reported');
    t.is(health.vcpus[0].threadCpuMs! % 10, 0);
    t.true(health.serial.txBytes >= seen, 'the UART counted what it sent');
    t.deepEqual(health.queues, [], 'no virtio device, no queue');
    // Where the vCPU was: five samples, each inside the kernel, in its ring 0, with the local
    // APIC's timer as the kernel set it (periodic, vector 0x20); the kernel sleeps in sti;hlt.
    const { vcpuSamples } = JSON.parse(line!) as { vcpuSamples: { samples: VcpuSample[][] } };
    t.is(vcpuSamples.samples.length, 1);
    t.is(vcpuSamples.samples[0].length, 5, JSON.stringify(vcpuSamples));
    for (const s of vcpuSamples.samples[0]) {
      const rip = Number(s.rip);
      t.true(rip >= TINY_KERNEL_LOAD_ADDRESS && rip < TINY_KERNEL_LOAD_ADDRESS + 0x10000, `rip ${s.rip} in the kernel`);
      t.is(s.cpl, 0);
      t.is(s.apic.lvtTimer, `0x${((1 << 17) | 0x20).toString(16)}`);
      t.deepEqual(s.apic.isr, [], 'no interrupt left without its EOI');
      t.is(s.exception, null, 'no exception on its way');
      t.is(s.cr3, '0x0', 'paging is off');
      t.true(s.pageTableRootInRam);
    }
    t.true(vcpuSamples.samples[0].some((s) => s.mpState === 'halted' && s.interruptsEnabled), 'caught sleeping in hlt, interrupts on');
    // The code line is the kernel's own bytes around rip (paging is off: virtual is physical),
    // and a vCPU asleep in hlt has just run sti (fb) and hlt (f4).
    const image = await tinyKernelImage();
    for (const s of vcpuSamples.samples[0]) {
      const at = Number(s.rip) - TINY_KERNEL_LOAD_ADDRESS;
      t.is(s.code, formatCodeLine([...image.subarray(at - 32, at + 32)], 32), `code at ${s.rip}`);
      t.is(s.stack.length, 8);
      t.true(s.stack.every((w) => w !== null), 'the stack is in RAM');
    }
    t.true(vcpuSamples.samples[0].some((s) => s.mpState === 'halted' && s.code.includes('fb f4 <')), 'sti;hlt just behind rip');
    const counted = vm.output.length;
    await vm.waitFor(/^COUNT 5\n/m, T, counted);
    await powerOff(vm);
  } finally {
    vm.kill();
  }
});

test('typed bytes reach the guest through the 16550A RX interrupt: e+x echoes "ECHO x"', async (t) => {
  const vm = await startTinyVm();
  try {
    await vm.waitFor(/^COUNT 1\n/m, T);
    // Separately (the guest waits for the second byte) and together in one write.
    let from = vm.output.length;
    vm.type('e');
    await sleep(300);
    vm.type('x');
    await vm.waitFor(/^ECHO x\n/m, T, from);
    from = vm.output.length;
    vm.type('eY');
    await vm.waitFor(/^ECHO Y\n/m, T, from);
    from = vm.output.length;
    vm.type('s');
    await vm.waitFor(/^STATUS .*\n/m, T, from);
    const status = lastStatus(vm.output)!;
    t.true(status.rxirqs >= 1, `the guest took RX interrupts: ${JSON.stringify(status)}`);
    t.true(status.ticks >= 1, 'the LAPIC timer ticks');
    t.true(status.count >= 2);
    await powerOff(vm);
  } finally {
    vm.kill();
  }
});

for (const [key, how] of [['r', 'i8042 0xFE'], ['a', 'ACPI reset register'], ['t', 'triple fault']] as const) {
  test(`'${key}' (${how}) reboots: a second boot from a fresh machine, then 'p' exits 0`, async (t) => {
    const vm = await startTinyVm([], { cmdline: `reset-${key}` });
    try {
      await vm.waitFor(/^COUNT 2\n/m, T);
      const from = vm.output.length;
      vm.type(key);
      await vm.waitFor(new RegExp(`^${TINY_KERNEL_BANNER}\\nCMDLINE reset-${key}\\nCOUNT 0\\n`, 'm'), T, from);
      await vm.waitFor(/^COUNT 1\n/m, T, from);
      t.is(boots(vm), 2);
      t.notRegex(vm.output, /EXCEPTION/);
      await powerOff(vm);
      t.is(boots(vm), 2);
    } finally {
      vm.kill();
    }
  });
}

test('a paste longer than the UART buffer reaches the guest whole, in order', async (t) => {
  const vm = await startTinyVm();
  try {
    await vm.waitFor(/^COUNT 1\n/m, T);
    // 60 "e<letter>" pairs: 120 bytes in one write, nearly twice the UART's 64-byte buffer.
    // The last letter, z, appears only once.
    const letters = [...Array.from({ length: 59 }, (_, i) => String.fromCharCode(65 + (i % 26))), 'z'];
    const from = vm.output.length;
    vm.type(letters.map((l) => `e${l}`).join(''));
    await vm.waitFor(/^ECHO z\n/m, T, from);
    const echoed = [...vm.output.slice(from).matchAll(/^ECHO (.)\n/gm)].map((m) => m[1]);
    t.deepEqual(echoed, letters);
    await powerOff(vm);
  } finally {
    vm.kill();
  }
});

test('--cpus boot=2: the AP waits for SIPI and the boot vCPU keeps counting; top -H names each vCPU thread', async (t) => {
  const vm = await startTinyVm(['--cpus', 'boot=2']);
  try {
    await vm.waitFor(/^COUNT 5\n/m, T);
    const counts = countsIn(vm.output);
    t.deepEqual(counts, counts.map((_, i) => i));
    const taskDir = `/proc/${vm.child.pid}/task`;
    const names = fs.readdirSync(taskDir).map((tid) => fs.readFileSync(path.join(taskDir, tid, 'comm'), 'utf8').trim());
    t.deepEqual(names.filter((n) => n.startsWith('tern vcpu')).sort(), ['tern vcpu 0', 'tern vcpu 1'], names.join(', '));
    await powerOff(vm);
    t.is(boots(vm), 1);
  } finally {
    vm.kill();
  }
});

test('a guest reset whose reboot fails (the kernel file is gone) ends the CLI with exit 1 and says why', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-cli-vanishing-'));
  try {
    const kernel = path.join(dir, 'kernel.elf');
    fs.copyFileSync(await buildTinyKernel(), kernel);
    const vm = await startTinyVm(['--kernel', kernel]);
    try {
      await vm.waitFor(/^COUNT 1\n/m, T);
      fs.rmSync(kernel);
      vm.type('a');
      const { code } = await vm.exit(T);
      t.is(code, 1, vm.stderr.slice(-2000));
      t.regex(vm.stderr, /cannot read kernel/);
    } finally {
      vm.kill();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
