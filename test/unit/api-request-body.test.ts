// Request-body checks of the API, without a server: JSON decoding limits and the VmConfig
// contract (types, nulls, unknown fields, id clashes); and the package entry point.
import test from 'ava';
import path from 'node:path';

import { ApiError } from '../../src/api/errors';
import { MAX_JSON_DEPTH, checkVmConfig, parseJsonBody } from '../../src/api/request-body';

const parse = (text: string) => parseJsonBody(Buffer.from(text));
const statusOf = (fn: () => unknown): number | undefined => {
  try {
    fn();
  } catch (e) {
    return e instanceof ApiError ? e.status : -1;
  }
  return undefined;
};

test('nesting is counted outside strings only, up to the limit', (t) => {
  const deep = (n: number) => `${'['.repeat(n)}${']'.repeat(n)}`;
  t.notThrows(() => parse(deep(MAX_JSON_DEPTH)));
  t.is(statusOf(() => parse(deep(MAX_JSON_DEPTH + 1))), 400);
  t.deepEqual(parse(`{"s":"${'['.repeat(500)}\\"${'{'.repeat(500)}"}`), { s: `${'['.repeat(500)}"${'{'.repeat(500)}` });
});

test('null members mean "not given"; nulls inside arrays stay', (t) => {
  t.deepEqual(parse('{"a":null,"b":[null,1],"c":{"d":null}}'), { b: [null, 1], c: {} });
  t.is(parse('null'), null);
});

test('bad UTF-8 and malformed JSON are 400', (t) => {
  t.is(statusOf(() => parseJsonBody(Buffer.from([0x22, 0xc3, 0x28, 0x22]))), 400);
  t.is(statusOf(() => parse('{"a":')), 400);
  t.is(statusOf(() => parse('')), 400);
});

test("checkVmConfig: cpus.tern_profile is kept when it names a profile, 400 otherwise; Cloud Hypervisor's cpus.profile is ignored", (t) => {
  const cpus = { boot_vcpus: 1, max_vcpus: 1 };
  const base = { payload: { kernel: '/k' } };
  t.deepEqual(checkVmConfig({ ...base, cpus: { ...cpus, tern_profile: 'x86-64-v2' } }), { ...base, cpus: { ...cpus, tern_profile: 'x86-64-v2' } });
  t.is(statusOf(() => checkVmConfig({ ...base, cpus: { ...cpus, tern_profile: 'skylake' } })), 400);
  t.is(statusOf(() => checkVmConfig({ ...base, cpus: { ...cpus, tern_profile: 3 } })), 400);
  t.deepEqual(checkVmConfig({ ...base, cpus: { ...cpus, profile: 'sapphire-rapids' } }), { ...base, cpus });
});

test('checkVmConfig: types per the contract, unknown fields dropped, ids unique across device lists', (t) => {
  const base = { payload: { kernel: '/k' } };
  t.deepEqual(checkVmConfig({ ...base, extra: 1, disks: [{ path: '/d', bogus: true }] }), { ...base, disks: [{ path: '/d' }] });
  t.is(statusOf(() => checkVmConfig({ ...base, cpus: { boot_vcpus: 1 } })), 400, 'max_vcpus is required');
  t.is(statusOf(() => checkVmConfig({ ...base, memory: { size: 2.5 } })), 400);
  t.is(statusOf(() => checkVmConfig({ ...base, net: [{ id: 'x' }], vsock: { cid: 3, socket: '/s', id: 'x' } })), 409);
  t.is(statusOf(() => checkVmConfig({ ...base, disks: [{ id: 'a' }, { id: 'b' }], pmem: [{ file: '/f', id: 'c' }] })), undefined);
  const polluted = parse('{"payload":{"kernel":"/k"},"__proto__":{"polluted":true}}');
  const clean = checkVmConfig(polluted) as Record<string, unknown>;
  t.false(Object.hasOwn(clean, '__proto__'));
  t.is(({} as Record<string, unknown>).polluted, undefined);
});

test('the package entry exports TernClient without loading the native addon', (t) => {
  const entry = path.resolve(__dirname, '..', '..', 'src', 'index.js');
  const before = new Set(Object.keys(require.cache));
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const pkg = require(entry) as Record<string, unknown>;
  t.is(typeof pkg.TernClient, 'function');
  t.is(typeof pkg.TernApiError, 'function');
  const loaded = Object.keys(require.cache).filter((k) => !before.has(k));
  t.false(loaded.some((k) => k.endsWith('.node') || k.includes(`${path.sep}native${path.sep}`)), loaded.join('\n'));
});
