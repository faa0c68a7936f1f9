// The native vCPU thread: pause/resume with a kick, stop in every state, handler
// exceptions, and the process exiting on its own once vCPUs are stopped.
import { execFile } from 'node:child_process';
import path from 'node:path';

import test from 'ava';

import type { VcpuExit } from '../../src/native/kvm';
import { VcpuRunner } from '../../src/vmm/vcpu-runner';
import { PML4_ADDRESS } from '../../src/boot/x86/long-mode';
import { TestVm, addVcpu, buildGuest, createTestVm, runVcpu, sleep } from './harness';

const FLAG = 0x19_0000;

function spinVm(): { vm: TestVm; loop: [number, number] } {
  const guest = buildGuest('spin');
  const vm = createTestVm({ guest, ring: 3, regs: { rdi: BigInt(FLAG) } });
  return { vm, loop: [guest.symbols.spin_loop, guest.symbols.spin_end] };
}

/** Start with a handler that records exits and lets tests wait for the next one of a kind. */
function startRecording(vm: TestVm) {
  const exits: VcpuExit[] = [];
  const waiters: { kind: string; resolve: (e: VcpuExit) => void }[] = [];
  vm.vcpu.start((exit) => {
    exits.push(exit);
    for (let i = 0; i < waiters.length; i++) {
      if (waiters[i].kind === exit.kind) {
        waiters.splice(i, 1)[0].resolve(exit);
        break;
      }
    }
    if (exit.kind === 'io' && exit.port === 0x501) return 'stop';
    return undefined;
  });
  return {
    exits,
    // A guard against a lost exit, not a measure of speed (see harness.ts runVcpu).
    next(kind: string, timeoutMs = 60_000): Promise<VcpuExit> {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no '${kind}' within ${timeoutMs} ms`)), timeoutMs);
        waiters.push({ kind, resolve: (e) => { clearTimeout(timer); resolve(e); } });
      });
    },
  };
}

test('requestPause kicks a spinning ring-3 guest; state is readable while parked; resume continues', async (t) => {
  const { vm, loop } = spinVm();
  try {
    const rec = startRecording(vm);
    await sleep(100);
    t.throws(() => vm.vcpu.getRegs(), { code: 'EBUSY' }, 'registers are not readable while in KVM_RUN');
    const t0 = process.hrtime.bigint();
    vm.vcpu.requestPause();
    await rec.next('paused');
    const pauseLatencyUs = Number(process.hrtime.bigint() - t0) / 1000;

    const r1 = vm.vcpu.getRegs();
    await sleep(50);
    const r2 = vm.vcpu.getRegs();
    t.true(r1.rip >= BigInt(loop[0]) && r1.rip < BigInt(loop[1]), `rip 0x${r1.rip.toString(16)} inside the loop`);
    t.true(r1.rax > 0n, 'the loop made progress');
    t.deepEqual(r2, r1, 'the vCPU stays parked');
    t.log(`pause latency ${pauseLatencyUs.toFixed(0)} µs; ${r1.rax} ring-3 iterations in ~100 ms`);

    // Resume once and pause again: it keeps counting.
    vm.vcpu.resume();
    await sleep(30);
    vm.vcpu.requestPause();
    await rec.next('paused');
    const r3 = vm.vcpu.getRegs();
    t.true(r3.rax > r1.rax, 'counting went on after resume');

    vm.mem.writeU8(FLAG, 1);
    const stopped = rec.next('stopped');
    vm.vcpu.resume();
    await stopped;
    const count = rec.exits.find((e) => e.kind === 'io' && e.port === 0x515);
    t.truthy(count, 'the guest left the loop and reported its count');
    if (count?.kind === 'io') t.true(count.data >= Number(r3.rax & 0xffffffffn) || r3.rax > 0xffffffffn);
    t.deepEqual(rec.exits.map((e) => e.kind), ['paused', 'paused', 'io', 'io', 'stopped']);
  } finally {
    vm.vcpu.stop();
    await sleep(10);
    vm.close();
  }
});

test('stop() ends a running vCPU and a parked vCPU', async (t) => {
  {
    const { vm } = spinVm();
    const rec = startRecording(vm);
    await sleep(20);
    const stopped = rec.next('stopped');
    vm.vcpu.stop();
    await stopped;
    vm.vcpu.stop(); // idempotent
    t.deepEqual(rec.exits.map((e) => e.kind), ['stopped']);
    vm.close();
  }
  {
    const { vm } = spinVm();
    const rec = startRecording(vm);
    await sleep(20);
    vm.vcpu.requestPause();
    await rec.next('paused');
    const stopped = rec.next('stopped');
    vm.vcpu.stop();
    await stopped;
    t.deepEqual(rec.exits.map((e) => e.kind), ['paused', 'stopped']);
    vm.close();
  }
});

test('close() refuses while the thread runs; a stopped vCPU can be started again', async (t) => {
  const { vm } = spinVm();
  try {
    const rec = startRecording(vm);
    t.throws(() => vm.vcpu.close(), { code: 'EBUSY' });
    t.throws(() => vm.vcpu.start(() => undefined), { code: 'EBUSY' });
    const stopped = rec.next('stopped');
    vm.vcpu.stop();
    await stopped;
    // Same vCPU, new thread: let it leave the loop this time.
    vm.mem.writeU8(FLAG, 1);
    const { exits } = await runVcpu(vm.vcpu);
    t.deepEqual(exits.map((e) => e.kind), ['io', 'io', 'stopped']);
  } finally {
    vm.close();
  }
});

test("an exception in the handler is reported as 'error' and stops the vCPU", async (t) => {
  const vm = createTestVm({ guest: buildGuest('hello'), ring: 3 });
  try {
    const { exits } = await runVcpu(vm.vcpu, (exit) => {
      if (exit.kind === 'io') throw new Error('device exploded');
      return undefined;
    });
    t.deepEqual(exits, [
      { kind: 'io', direction: 'out', port: 0x3f8, size: 1, data: 'h'.charCodeAt(0) },
      { kind: 'error', message: 'device exploded' },
      { kind: 'stopped' },
    ]);
  } finally {
    vm.close();
  }
});

test('two vCPUs run concurrently, each with its own thread and handler', async (t) => {
  const guest = buildGuest('hello');
  const vm = createTestVm({ guest, ring: 3 });
  const second = addVcpu(vm.kvm, vm.vm, 1, { cr3: PML4_ADDRESS, ring: 3, rip: guest.loadAddress });
  try {
    const texts = ['', ''];
    const collect = (i: number) => (e: VcpuExit) => {
      if (e.kind === 'io' && e.port === 0x3f8) texts[i] += String.fromCharCode(e.data);
      return undefined;
    };
    await Promise.all([runVcpu(vm.vcpu, collect(0)), runVcpu(second, collect(1))]);
    t.deepEqual(texts, ['hello from ring 3\n', 'hello from ring 3\n']);
    t.is(second.id, 1);
  } finally {
    second.close();
    vm.close();
  }
});

function runChild(script: string): Promise<{ code: number | null; stdout: string; stderr: string; ms: number }> {
  const harness = path.join(__dirname, 'harness.js');
  const t0 = Date.now();
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['-e', `const h = require(${JSON.stringify(harness)});\n${script}`],
      { timeout: 20_000 },
      (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr, ms: Date.now() - t0 });
      },
    );
  });
}

test('node exits by itself once the vCPU has stopped (with and without close)', async (t) => {
  const withClose = await runChild(`
    const vm = h.createTestVm({ guest: h.buildGuest('hello'), ring: 3 });
    let out = '';
    h.runVcpu(vm.vcpu, (e) => { if (e.kind === 'io' && e.port === 0x3f8) out += String.fromCharCode(e.data); })
      .then(() => { vm.close(); process.stdout.write(out); });
  `);
  t.is(withClose.code, 0, withClose.stderr);
  t.is(withClose.stdout, 'hello from ring 3\n');

  const withoutClose = await runChild(`
    const vm = h.createTestVm({ guest: h.buildGuest('spin'), ring: 3, regs: { rdi: 0x190000n } });
    vm.vcpu.start((e) => { if (e.kind === 'stopped') process.stdout.write('stopped'); });
    setTimeout(() => vm.vcpu.stop(), 50);
  `);
  t.is(withoutClose.code, 0, withoutClose.stderr);
  t.is(withoutClose.stdout, 'stopped');
  t.log(`child processes exited after ${withClose.ms} ms and ${withoutClose.ms} ms`);
});

test('VcpuRunner: a pause after the vCPU was already parked by a request of its own resolves at once', async (t) => {
  const { vm } = spinVm();
  const runner = new VcpuRunner(vm.vcpu, () => undefined);
  try {
    runner.start();
    await sleep(50);
    // What the machine does when the guest asks for a reset: park every vCPU, nobody waiting.
    vm.vcpu.requestPause();
    await sleep(100);
    // Then a vm.pause: the thread will not report 'paused' a second time.
    const outcome = await Promise.race([runner.pause().then(() => 'paused'), sleep(2000).then(() => 'hung')]);
    t.is(outcome, 'paused');
    runner.resume();
    await sleep(20);
    t.is(await Promise.race([runner.pause().then(() => 'paused'), sleep(2000).then(() => 'hung')]), 'paused', 'a resumed vCPU pauses as before');
  } finally {
    vm.mem.writeU8(FLAG, 1);
    runner.resume();
    await runner.stop();
    vm.close();
  }
});

test('VcpuRunner: a vCPU started parked runs no guest instruction until resumed, then runs and pauses as usual', async (t) => {
  const { vm } = spinVm();
  const runner = new VcpuRunner(vm.vcpu, () => undefined);
  try {
    const before = vm.vcpu.getRegs();
    await runner.startParked();
    await sleep(200);
    // Parked before its first KVM_RUN: state is readable and exactly as set.
    t.deepEqual(vm.vcpu.getRegs(), before, 'not one instruction ran');
    runner.resume();
    await sleep(100);
    t.is(await Promise.race([runner.pause().then(() => 'paused'), sleep(10_000).then(() => 'hung')]), 'paused');
    t.true(vm.vcpu.getRegs().rax > before.rax, 'after resume() the guest ran');
  } finally {
    vm.mem.writeU8(FLAG, 1);
    runner.resume();
    await runner.stop();
    vm.close();
  }
});

test('VcpuRunner: a vCPU parked before its first run stops cleanly', async (t) => {
  const { vm } = spinVm();
  const runner = new VcpuRunner(vm.vcpu, () => undefined);
  try {
    await runner.startParked();
    t.is(await Promise.race([runner.stop().then(() => 'stopped'), sleep(10_000).then(() => 'hung')]), 'stopped');
  } finally {
    vm.close();
  }
});

test('VcpuRunner: a resume that overtakes the report of a park (as auto-converge\'s throttle does) leaves no stale parked state: the next pause waits for the thread', async (t) => {
  const { vm } = spinVm();
  const runner = new VcpuRunner(vm.vcpu, () => undefined);
  const block = new Int32Array(new SharedArrayBuffer(4));
  try {
    runner.start();
    await sleep(50);
    for (let i = 0; i < 10; i++) {
      // What the throttle does each period: park the thread, resume it a moment later; here the
      // resume comes while this thread is too busy to have taken the thread's 'paused' report.
      vm.vcpu.requestPause();
      Atomics.wait(block, 0, 0, 20);
      runner.resume();
      await sleep(5);
      // A pause now (a migration's final one) must wait until the thread has parked again.
      const outcome = await Promise.race([runner.pause().then(() => 'paused'), sleep(5000).then(() => 'hung')]);
      t.is(outcome, 'paused', `round ${i}`);
      t.notThrows(() => vm.vcpu.getRegs(), `round ${i}: the vCPU is parked, its state readable`);
      runner.resume();
      await sleep(5);
    }
  } finally {
    vm.mem.writeU8(FLAG, 1);
    runner.resume();
    await runner.stop();
    vm.close();
  }
});

test('VcpuRunner: a resume that comes before the thread has parked withdraws the pause: the thread runs on and never parks for it', async (t) => {
  const vm = createTestVm({ guest: buildGuest('hello'), ring: 3 });
  let text = '';
  const runner: VcpuRunner = new VcpuRunner(vm.vcpu, (_id, exit) => {
    if (exit.kind !== 'io') return undefined;
    if (exit.port === 0x501) return 'stop';
    text += String.fromCharCode(Number(exit.data));
    if (text.length === 1) {
      // What auto-converge's throttle does when its resume timer fires before this thread has
      // taken the vCPU's exit: the request and the resume both land while the vCPU thread waits
      // on its handler, before it could park. Parked later, nobody would resume it.
      vm.vcpu.requestPause();
      runner.resume();
    }
    return undefined;
  });
  try {
    runner.start();
    const outcome = await Promise.race([runner.stopped.then(() => 'ran to its end'), sleep(10_000).then(() => 'stuck')]);
    t.is(outcome, 'ran to its end', `printed ${JSON.stringify(text)}, thread ${runner.threadState}`);
    t.is(text, 'hello from ring 3\n');
  } finally {
    await runner.stop();
    vm.close();
  }
});
