// A C++ exception must never leave the addon: one that reaches V8's frames terminates the
// process (SIGABRT). Out-of-memory is the natural source, so these run a child Node process
// that lowers its own address-space limit and then makes the addon allocate.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import test from 'ava';

const KVM_MODULE = path.resolve(__dirname, '..', '..', 'src', 'native', 'kvm.js');

/**
 * Run `body` in a child Node process after the prelude; `limitAs(extraBytes)` caps the child's
 * address space at its current size plus extraBytes. Returns the child's status, signal and output.
 */
function runLimited(body: string) {
  const script = `
    const { spawnSync } = require('node:child_process');
    const fs = require('node:fs');
    const { native } = require(${JSON.stringify(KVM_MODULE)});
    const n = native();
    const vmSize = () => Number(/VmSize:\\s+(\\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;
    const limitAs = (extra) => {
      const r = spawnSync('prlimit', ['--pid', String(process.pid), '--as=' + (vmSize() + extra)], { stdio: 'ignore' });
      if (r.status !== 0) throw new Error('prlimit failed');
    };
    const report = (o) => { fs.writeSync(1, JSON.stringify(o)); process.exit(0); };
    ${body}
  `;
  return spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
}

test('a native allocation that fails throws a JS error (ENOMEM) instead of aborting the process', (t) => {
  // A 500 MB path: converting it to a C++ string fails under a 256 MB address-space margin.
  const r = runLimited(`
    const big = Buffer.alloc(500 << 20, 0x61).toString('latin1');
    limitAs(256 << 20);
    try { n.openKvm(big); report({ thrown: false }); }
    catch (e) { report({ thrown: true, code: e.code, message: e.message, isError: e instanceof Error }); }
  `);
  t.is(r.signal, null, `the child was killed by ${r.signal}: ${r.stderr.slice(-300)}`);
  t.is(r.status, 0, r.stderr.slice(-300));
  t.deepEqual(JSON.parse(r.stdout), { thrown: true, code: 'ENOMEM', message: 'out of memory in the native addon', isError: true });
});

test('a vCPU thread that cannot be created is a JS error (EAGAIN), and the vCPU stays usable', (t) => {
  // Under a 2 MB margin there is no room for the thread's 8 MB stack.
  const r = runLimited(`
    const kvm = n.openKvm();
    const vm = kvm.createVm();
    const vcpu = vm.createVcpu(0);
    limitAs(2 << 20);
    let error;
    try { vcpu.start(() => 'stop'); } catch (e) { error = { code: e.code, message: e.message }; }
    let idle;
    try { vcpu.getRegs(); vcpu.close(); idle = true; } catch (e) { idle = e.message; }
    report({ error, idle });
  `);
  t.is(r.signal, null, `the child was killed by ${r.signal}: ${r.stderr.slice(-300)}`);
  t.is(r.status, 0, r.stderr.slice(-300));
  const out = JSON.parse(r.stdout);
  t.is(out.error?.code, 'EAGAIN');
  t.regex(out.error?.message ?? '', /^starting the vCPU thread failed: /);
  t.true(out.idle, 'the vCPU is idle again: its state can be read and it can be closed');
});
