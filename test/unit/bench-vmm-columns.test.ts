// The benchmarks' column lists: a column names the VMM, its environment and its build.
import test from 'ava';
import path from 'node:path';
import { columnCli, columnEnv, columnVmm } from '../bench/vmm-columns';

test('a column gives its VMM, its +NAME=VALUE environment and its @DIR build', (t) => {
  t.is(columnVmm('tern'), 'tern');
  t.is(columnVmm('tern:4+MALLOC_ARENA_MAX=2'), 'tern');
  t.is(columnVmm('qemu'), 'qemu');
  t.deepEqual(columnEnv('tern+MALLOC_ARENA_MAX=2+NODE_OPTIONS=--max-semi-space-size=1'), { MALLOC_ARENA_MAX: '2', NODE_OPTIONS: '--max-semi-space-size=1' });
  t.deepEqual(columnEnv('tern'), {});
  t.is(columnCli('tern'), undefined, "this checkout's build");
  t.is(columnCli('tern@/work/base'), path.join('/work/base', 'dist', 'bin', 'tern.js'));
  t.is(columnCli('tern:2@/work/base+X=1'), path.join('/work/base', 'dist', 'bin', 'tern.js'), 'the build ends where the environment begins');
  t.deepEqual(columnEnv('tern@/work/base+X=1'), { X: '1' });
});
