import test from 'ava';
import { parseTernArgs } from '../../src/cli/tern-args';
import { OptionError } from '../../src/cli/option-values';
import { RemoteUsageError, addDiskBody, parseTernRemoteArgs, restoreBody, takeRestoreFds } from '../../src/cli/tern-remote-args';

test('the issue example parses into a VmConfig', (t) => {
  const a = parseTernArgs([
    '--kernel', 'vmlinux', '--initramfs', 'initrd.img', '--cmdline', 'console=ttyS0',
    '--cpus', 'boot=2', '--memory', 'size=512M', '--serial', 'tty', '--console', 'off',
  ]);
  t.deepEqual(a.vm, {
    payload: { kernel: 'vmlinux', initramfs: 'initrd.img', cmdline: 'console=ttyS0' },
    cpus: { boot_vcpus: 2, max_vcpus: 2 },
    memory: { size: 512 * 1024 * 1024 },
    serial: { mode: 'Tty' },
    console: { mode: 'Off' },
  });
});

test('one tty, one device: --serial tty with the console left on the tty is refused, as Cloud Hypervisor refuses it', (t) => {
  const base = ['--kernel', 'vmlinux', '--serial', 'tty'];
  const e = t.throws(() => parseTernArgs(base), { instanceOf: OptionError });
  t.regex(e!.message, /Console mode tty specified for both serial and console/);
  t.throws(() => parseTernArgs([...base, '--console', 'tty']), { instanceOf: OptionError });
  for (const console of ['off', 'null', 'file=/tmp/hvc.log']) t.notThrows(() => parseTernArgs([...base, '--console', console]), console);
  // The console alone on the tty is Cloud Hypervisor's default.
  t.notThrows(() => parseTernArgs(['--kernel', 'vmlinux']));
});

test('k=v lists, quoted values, --opt=value and file serial', (t) => {
  const a = parseTernArgs([
    '--kernel=k', '--memory', 'size=2G,shared=on', '--serial', 'file="/var/log/a,b.log"',
    '--api-socket', '/run/t.sock', '--event-monitor', 'fd=3', '-vv',
  ]);
  t.deepEqual(a.vm?.memory, { size: 2 * 1024 ** 3, shared: true });
  t.deepEqual(a.vm?.serial, { mode: 'File', file: '/var/log/a,b.log' });
  t.deepEqual(a.apiSocket, { path: '/run/t.sock' });
  t.deepEqual(a.eventMonitor, { fd: 3 });
  t.is(a.verbosity, 2);
});

test('only --api-socket means no VM: the VMM waits for API calls', (t) => {
  const a = parseTernArgs(['--api-socket', 'path=/tmp/x.sock']);
  t.is(a.vm, null);
  t.deepEqual(a.apiSocket, { path: '/tmp/x.sock' });
});

test("--seccomp takes Cloud Hypervisor's true|false|log; the filter is on by default", (t) => {
  t.is(parseTernArgs(['--api-socket', 'path=/tmp/x.sock']).seccomp, 'trap');
  t.is(parseTernArgs(['--api-socket', 'path=/tmp/x.sock', '--seccomp', 'true']).seccomp, 'trap');
  t.is(parseTernArgs(['--api-socket', 'path=/tmp/x.sock', '--seccomp=false']).seccomp, 'off');
  t.is(parseTernArgs(['--api-socket', 'path=/tmp/x.sock', '--seccomp', 'log']).seccomp, 'log');
});

test('--cpus profile=NAME picks the CPU profile the guest boots with', (t) => {
  const a = parseTernArgs(['--kernel', 'k', '--cpus', 'boot=2,profile=x86-64-v3']);
  t.deepEqual(a.vm?.cpus, { boot_vcpus: 2, max_vcpus: 2, tern_profile: 'x86-64-v3' });
  t.is(parseTernArgs(['--kernel', 'k', '--cpus', 'profile=host']).vm?.cpus?.tern_profile, 'host');
  t.false('tern_profile' in parseTernArgs(['--kernel', 'k', '--cpus', 'boot=1']).vm!.cpus!, 'absent unless given');
});

for (const [argv, fragment] of [
  [['--frobnicate'], '--frobnicate: unknown option'],
  [['--kernel', 'k', '--cpus', 'boot=two'], '--cpus: boot="two" is not a whole number'],
  [['--kernel', 'k', '--cpus', 'boot=4,max=2'], '--cpus: max=2 is smaller than boot=4'],
  [['--kernel', 'k', '--cpus', 'profile=skylake'], '--cpus: profile="skylake" is not one of host, x86-64, x86-64-v2, x86-64-v3, x86-64-v4'],
  [['--kernel', 'k', '--memory', 'size=12Q'], '--memory: size="12Q" is not a size'],
  [['--kernel', 'k', '--memory', 'size=512M,colour=blue'], '--memory: unknown parameter "colour"'],
  [['--kernel', 'k', '--serial', 'telepathy'], '--serial: "telepathy" is not one of'],
  [['--cmdline', 'x'], '--kernel: a VM needs --kernel'],
  [['--kernel'], '--kernel: needs a value'],
  [['--kernel', 'k', '--restore', 'source_url=file:///x'], '--restore: cannot be combined'],
  [['--api-socket', 'path=/tmp/x.sock', '--seccomp', 'errno'], '--seccomp: "errno" is not one of true, false, log'],
] as [string[], string][]) {
  test(`rejects ${argv.join(' ')}`, (t) => {
    const e = t.throws(() => parseTernArgs(argv), { instanceOf: OptionError });
    t.true(e!.message.startsWith(fragment), e!.message);
    t.false(e!.message.includes('\n'));
  });
}

test('--serial-file-max takes a size for the VMM, not for the VM config', (t) => {
  const a = parseTernArgs(['--kernel', '/k', '--serial', 'file=/tmp/s.log', '--serial-file-max', '2M']);
  t.is(a.serialFileMaxBytes, 2 << 20);
  t.deepEqual(a.vm?.serial, { mode: 'File', file: '/tmp/s.log' });
  t.throws(() => parseTernArgs(['--serial-file-max', 'lots']), { instanceOf: OptionError });
});

test("--no-shutdown is Cloud Hypervisor's flag: off unless given", (t) => {
  t.falsy(parseTernArgs(['--api-socket', 'path=/tmp/x.sock']).noShutdown);
  t.true(parseTernArgs(['--api-socket', 'path=/tmp/x.sock', '--no-shutdown']).noShutdown);
});

test('--disk takes several disks after one flag, as Cloud Hypervisor does, and spells image_type as the contract', (t) => {
  const a = parseTernArgs(['--kernel', 'k', '--disk', 'path=/a.img,readonly=on', 'path=/b.qcow2,image_type=qcow2,num_queues=2', '--disk', 'path=/c.img', '--rng', 'src=/dev/urandom']);
  t.deepEqual(a.vm?.disks, [
    { path: '/a.img', readonly: true },
    { path: '/b.qcow2', image_type: 'Qcow2', num_queues: 2 },
    { path: '/c.img' },
  ]);
  t.deepEqual(a.vm?.rng, { src: '/dev/urandom' });
  t.throws(() => parseTernArgs(['--kernel', 'k', '--disk', 'path=/a,image_type=vmdk']), { message: /image_type=vmdk/ });
});

test("tern-remote add-disk takes ch-remote's disk syntax and needs it", (t) => {
  const a = parseTernRemoteArgs(['--api-socket', '/run/t.sock', 'add-disk', 'path=/d.qcow2,readonly=on,image_type=qcow2,id=data']);
  t.like(a, { kind: 'run', command: 'add-disk', arg: 'path=/d.qcow2,readonly=on,image_type=qcow2,id=data' });
  t.deepEqual(addDiskBody('path=/d.qcow2,readonly=on,image_type=qcow2,id=data'), { path: '/d.qcow2', readonly: true, image_type: 'Qcow2', id: 'data' });
  t.throws(() => parseTernRemoteArgs(['--api-socket', '/run/t.sock', 'add-disk']), { message: /add-disk needs an argument/ });
  t.throws(() => addDiskBody('readonly'), { instanceOf: RemoteUsageError });
});

test('--net fd= names taps this process holds, one per queue pair, in Cloud Hypervisor\'s integer-list syntax', (t) => {
  const a = parseTernArgs(['--kernel', 'k', '--console', 'off', '--net', 'mac=de:ad:be:ef:12:34,fd=[3,7],num_queues=4', 'fd=9', '--net', 'fd=[10-12],num_queues=6']);
  t.deepEqual(
    a.vm!.net!.map((n) => [n.fds, n.num_queues, n.mac]),
    [
      [[3, 7], 4, 'de:ad:be:ef:12:34'],
      [[9], undefined, undefined],
      [[10, 11, 12], 6, undefined],
    ],
  );
  for (const bad of ['fd=x', 'fd=[3,', 'fd=[5-3]', 'fd=[-1]']) t.throws(() => parseTernArgs(['--kernel', 'k', '--console', 'off', '--net', bad]), { instanceOf: OptionError }, bad);
});

test('--net with --restore names the tap a restored card opens, and nothing else', (t) => {
  const a = parseTernArgs(['--restore', 'source_url=file:///s', '--net', 'id=_net0,tap=tap9', 'id=up,tap=tap10']);
  t.deepEqual(a.restore?.net, [{ id: '_net0', tap: 'tap9' }, { id: 'up', tap: 'tap10' }]);
  t.is(a.vm, null);
  t.throws(() => parseTernArgs(['--restore', 'source_url=file:///s', '--net', 'tap=tap9']), { message: /id=ID,tap=NAME only/ });
  t.throws(() => parseTernArgs(['--restore', 'source_url=file:///s', '--net', 'id=_net0,tap=tap9,mac=52:54:00:00:00:01']), { message: /id=ID,tap=NAME only/ });
});

test('tern-remote restore takes ch-remote\'s net_fds=[ID@[FD,...],...]: counts in the body, the descriptors sent beside it', (t) => {
  const body = restoreBody('source_url=file:///s,net_fds=[net0@[3,4],up@[5]],resume=on');
  t.deepEqual(body, {
    source_url: 'file:///s',
    resume: true,
    net_fds: [
      { id: 'net0', num_fds: 2, fds: [3, 4] },
      { id: 'up', num_fds: 1, fds: [5] },
    ],
  });
  // as ch-remote sends it: the fd numbers out of the body, in net_fds order, with the request
  t.deepEqual(takeRestoreFds(body), {
    body: { source_url: 'file:///s', resume: true, net_fds: [{ id: 'net0', num_fds: 2, fds: null }, { id: 'up', num_fds: 1, fds: null }] },
    fds: [3, 4, 5],
  });
  t.deepEqual(takeRestoreFds({ source_url: 'file:///s' }), { body: { source_url: 'file:///s' }, fds: [] });
  for (const bad of ['net_fds=net0@[3]', 'net_fds=[net0]', 'net_fds=[@[3]]', 'net_fds=[net0@[x]]', 'net_fds=[net0@[3]', 'net_fds=[net0@3]']) {
    t.throws(() => restoreBody(`source_url=file:///s,${bad}`), { instanceOf: RemoteUsageError }, bad);
  }
});

test('--restore net_fds=[ID@[FD,...],...] names taps tern holds as a restored card\'s queues', (t) => {
  const a = parseTernArgs(['--restore', 'source_url=file:///s,net_fds=[uplink@[3,4],_net1@[5]]']);
  t.deepEqual(a.restore?.netFds, [
    { id: 'uplink', fds: [3, 4] },
    { id: '_net1', fds: [5] },
  ]);
  for (const bad of ['net_fds=uplink@[3]', 'net_fds=[uplink]', 'net_fds=[uplink@[-1]]', 'net_fds=[uplink@[3]']) {
    t.throws(() => parseTernArgs(['--restore', `source_url=file:///s,${bad}`]), { message: /--restore/ }, bad);
  }
});
