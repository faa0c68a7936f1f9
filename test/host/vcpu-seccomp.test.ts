// Every vCPU thread runs under a seccomp filter installed by itself before its first KVM_RUN:
// a system call the filter does not allow is refused (EPERM in 'errno' mode) or ends the
// process with SIGSYS and a report on stderr ('trap', the default), and guests still run.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import test from 'ava';

import type { VcpuExit } from '../../src/native/kvm';
import { buildGuest, createTestVm, runVcpu } from './harness';

test("socket(2) from a vCPU thread fails with EPERM under the 'errno' filter; the guest then runs normally", async (t) => {
  const vm = createTestVm({ guest: buildGuest('hello'), ring: 3 });
  try {
    let text = '';
    const { exits } = await runVcpu(
      vm.vcpu,
      (exit) => {
        if (exit.kind === 'io' && exit.port === 0x3f8) text += String.fromCharCode(exit.data);
      },
      10_000,
      { seccomp: 'errno', probeForbiddenSyscall: true },
    );
    t.deepEqual(exits[0], { kind: 'probe', syscall: 'socket', result: 'EPERM' });
    t.is(text, 'hello from ring 3\n', 'KVM_RUN and the exits it hands to JavaScript are allowed');
    t.is(exits.at(-1)?.kind, 'stopped');
  } finally {
    vm.close();
  }
});

test("without a filter ('off') the same socket(2) call succeeds: the EPERM above is the filter's", async (t) => {
  const vm = createTestVm({ guest: buildGuest('hlt'), ring: 0 });
  try {
    const { exits } = await runVcpu(vm.vcpu, (exit) => (exit.kind === 'probe' ? 'stop' : undefined), 10_000, {
      seccomp: 'off',
      probeForbiddenSyscall: true,
    });
    t.deepEqual(exits, [{ kind: 'probe', syscall: 'socket', result: 'ok' }, { kind: 'stopped' }]);
  } finally {
    vm.close();
  }
});

test("by default ('trap') a forbidden call from a vCPU thread ends the process with SIGSYS and names the call", (t) => {
  const harness = path.resolve(__dirname, 'harness.js');
  const script = `
    const { buildGuest, createTestVm } = require(${JSON.stringify(harness)});
    const vm = createTestVm({ guest: buildGuest('hlt'), ring: 0 });
    vm.vcpu.start(() => undefined, { probeForbiddenSyscall: true });
    setTimeout(() => { console.log('still alive'); process.exit(0); }, 5000);
  `;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30_000 });
  t.is(r.signal, 'SIGSYS', `status ${r.status}, stdout ${r.stdout}, stderr ${r.stderr.slice(-300)}`);
  // socket is system call 41 on x86-64.
  t.regex(r.stderr, /tern: seccomp: a vCPU thread made a forbidden system call \(number 41\); the process ends with SIGSYS/);
  t.notRegex(r.stdout, /still alive/);
});

test('a paused, resumed and restarted vCPU thread runs under its filter each time', async (t) => {
  const vm = createTestVm({ guest: buildGuest('spin'), ring: 3 });
  try {
    for (let round = 0; round < 2; round++) {
      const exits: VcpuExit[] = [];
      let paused!: () => void;
      const parked = new Promise<void>((r) => (paused = r));
      const stopped = new Promise<void>((resolve) => {
        vm.vcpu.start(
          (exit) => {
            exits.push(exit);
            if (exit.kind === 'paused') paused();
            if (exit.kind === 'stopped') resolve();
            return undefined;
          },
          { seccomp: 'errno', probeForbiddenSyscall: true },
        );
      });
      await new Promise((r) => setTimeout(r, 50));
      vm.vcpu.requestPause();
      await parked;
      const rip = vm.vcpu.getRegs().rip; // state access happens on the JavaScript thread
      vm.vcpu.resume();
      await new Promise((r) => setTimeout(r, 20));
      vm.vcpu.stop();
      await stopped;
      t.true(rip > 0n);
      t.deepEqual(exits[0], { kind: 'probe', syscall: 'socket', result: 'EPERM' }, `round ${round}`);
      t.deepEqual(exits.slice(1).map((e) => e.kind), ['paused', 'stopped'], `round ${round}`);
    }
  } finally {
    vm.close();
  }
});
