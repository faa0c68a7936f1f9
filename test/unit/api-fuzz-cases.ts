// Malformed requests for the API fuzz tests, generated from a seed, and the runner that sends
// them (several connections at once) and checks every reply: each complete request must get a
// well-formed reply with a Cloud Hypervisor-style error body. Used against a VMM with no VM
// (test/unit/api-fuzz.test.ts, no KVM) and against one running a guest (test/host).
import { ReplyRecorder, parseResponses, rawExchange, type ParsedResponse } from './api-harness';

/** mulberry32: small, seedable, good enough to pick test cases reproducibly */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The seed both fuzz runs use (TERN_FUZZ_SEED replays another), and how many requests fly at once. */
export const FUZZ_SEED = Number(process.env.TERN_FUZZ_SEED ?? 0x7e4a);
export const FUZZ_PARALLEL = 8;

export const ENDPOINTS = [
  ['GET', 'vmm.ping'], ['PUT', 'vmm.shutdown'], ['PUT', 'vm.create'], ['PUT', 'vm.boot'], ['PUT', 'vm.delete'],
  ['PUT', 'vm.shutdown'], ['PUT', 'vm.reboot'], ['PUT', 'vm.pause'], ['PUT', 'vm.resume'], ['PUT', 'vm.power-button'],
  ['GET', 'vm.info'], ['GET', 'vm.counters'],
] as const;
/** endpoints whose call changes something: fuzz cases must never reach them with a valid request */
export const NO_BODY_PUTS = ENDPOINTS.filter(([m, e]) => m === 'PUT' && e !== 'vm.create').map(([, e]) => e);

function request(method: string, target: string, headers: string[] = [], body: Buffer | string = ''): Buffer {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(body);
  const head = [`${method} ${target} HTTP/1.1`, 'Host: localhost', ...headers];
  if (b.length && !headers.some((h) => /^(content-length|transfer-encoding):/i.test(h))) head.push(`Content-Length: ${b.length}`);
  return Buffer.concat([Buffer.from(`${head.join('\r\n')}\r\n\r\n`), b]);
}

function randomJson(depth = 0): unknown {
  switch (int(depth > 3 ? 5 : 8)) {
    case 0: return null;
    case 1: return rand() < 0.5;
    case 2: return rand() < 0.5 ? int(1e6) - 5e5 : rand() * 1e20;
    case 3: return 'x'.repeat(int(20));
    case 4: return pick(['', 'Tty', 'File', '/dev/null', '\u0000', '\ud800', '💥']);
    case 5: return Array.from({ length: int(4) }, () => randomJson(depth + 1));
    default: {
      const o: Record<string, unknown> = {};
      for (let i = 0; i < int(4); i++) o[pick(['payload', 'cpus', 'memory', 'serial', 'disks', 'kernel', 'boot_vcpus', 'size', 'mode', '__proto__', 'id'])] = randomJson(depth + 1);
      return o;
    }
  }
}

/** A VmConfig with one field given a wrong type (or a required one missing). */
function wrongShapeConfig(): unknown {
  const good = (): Record<string, any> => ({
    payload: { kernel: '/k', cmdline: 'x' },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 << 20 },
    serial: { mode: 'Null' },
    disks: [{ path: '/d', id: 'd0' }],
  });
  const c = good();
  const wrong = pick([() => 'str', () => 12, () => [], () => ({}), () => true, () => -1, () => 1.5, () => 2 ** 60]);
  switch (int(9)) {
    case 0: c.payload = wrong(); break;
    case 1: c.payload.kernel = pick([1, true, [], {}]); break;
    case 2: c.cpus.boot_vcpus = pick(['1', 0, -3, 1.5, null, [], {}]); if (c.cpus.boot_vcpus === null) delete c.cpus.max_vcpus; break;
    case 3: c.memory = pick([{ size: 'big' }, { size: -1 }, { size: 1.25 }, {}, 'lots', 5]); break;
    case 4: c.serial = pick([{ mode: 'Loud' }, { mode: 3 }, {}, 'tty', [{ mode: 'Tty' }]]); break;
    case 5: c.disks = pick([{ path: '/d' }, 'disk', [1, 2], [{ path: 5 }], [{ pci_device_id: 999 }]]); break;
    case 6: delete c.payload; break;
    case 7: return pick([[], 'config', 42, true, null]);
    default: c[pick(['net', 'fs', 'vsock', 'rng', 'console', 'platform'])] = pick([3, 'x', [{ id: 7 }], { cid: 'three' }]);
  }
  return c;
}

export interface Case {
  kind: string;
  bytes: Buffer;
  /** a whole request: it must get a well-formed error reply */
  complete: boolean;
  /** endpoint name for the contract recorder, when the request targets one */
  method?: string;
  endpoint?: string;
}

/** The cases for one seed: the same seed gives the same cases. */
export function generate(seed: number): Case[] {
  rand = prng(seed);
  const cases: Case[] = [];
  const add = (kind: string, n: number, make: () => Omit<Case, 'kind'>) => {
    for (let i = 0; i < n; i++) cases.push({ kind, ...make() });
  };
  add('random bytes', 250, () => ({ bytes: randomBytes(1 + int(600)), complete: false }));
  add('truncated HTTP', 200, () => {
    const [m, e] = pick(ENDPOINTS);
    const full = request(m, `/api/v1/${e}`, ['Accept: */*'], e === 'vm.create' ? '{"payload":{"kernel":"/k"}}' : '');
    return { bytes: full.subarray(0, 1 + int(full.length - 2)), complete: false };
  });
  add('wrong method', 250, () => {
    const [m, e] = pick(ENDPOINTS);
    const method = pick(['POST', 'DELETE', 'PATCH', 'OPTIONS', 'TRACE', 'PROPFIND', 'CONNECT', m === 'GET' ? 'PUT' : 'GET']);
    return { bytes: request(method, method === 'CONNECT' ? 'localhost:1' : `/api/v1/${e}`), complete: true, method, endpoint: e };
  });
  add('huge headers', 100, () => {
    // well past the 16 KiB limit (Node counts header bytes loosely, so not just past it)
    const headers = rand() < 0.5
      ? [`X-Big: ${'h'.repeat((32 << 10) + int(64 << 10))}`]
      : Array.from({ length: 2000 + int(3000) }, (_, i) => `X-H${i}: ${'v'.repeat(10)}`);
    return { bytes: request('GET', '/api/v1/vmm.ping', headers), complete: true, method: 'GET', endpoint: 'vmm.ping' };
  });
  add('JSON of wrong shapes', 300, () => {
    const body = JSON.stringify(rand() < 0.7 ? wrongShapeConfig() : randomJson());
    return { bytes: request('PUT', '/api/v1/vm.create', ['Content-Type: application/json'], body), complete: true, method: 'PUT', endpoint: 'vm.create' };
  });
  add('migration bodies of wrong shapes', 200, () => {
    // Never a valid body: a migration must not start (or listen) because of a fuzz case.
    const endpoint = pick(['vm.send-migration', 'vm.receive-migration']);
    const key = endpoint === 'vm.send-migration' ? 'destination_url' : 'receiver_url';
    const badUrl = pick<unknown>([
      null, 7, true, [], {}, '', 'tcp:', 'tcp:host', 'tcp:host:0', 'tcp:host:99999', 'tcp::1:80', 'unix:', 'unix:relative/path',
      `udp:h:1`, `file:///tmp/x`, `tcp:${randomBytes(1 + int(20)).toString('hex')}`, `unix:/${'a'.repeat(200)}`, randomJson(),
    ]);
    const body = pick([
      () => ({ [key]: badUrl }),
      () => ({ [key]: badUrl, downtime_ms: randomJson(), timeout_strategy: pick(['cancel', 'CANCEL', 'Abort', 1]) }),
      () => ({ [key]: 'tcp:127.0.0.1:1', ...(endpoint === 'vm.send-migration' ? { timeout_s: pick([0, -1, 1.5, '10', null]) } : { memory_mode: pick(['precopy', 'Postcopy', 0]) }) }),
      () => ({ [key]: 'tcp:127.0.0.1:1', tls_dir: '/etc' }),
      () => ({ [key]: badUrl, extra_field: randomJson() }),
      () => randomJson(),
    ])();
    return { bytes: request('PUT', `/api/v1/${endpoint}`, ['Content-Type: application/json'], JSON.stringify(body) ?? 'null'), complete: true, method: 'PUT', endpoint };
  });
  add('not JSON', 100, () => {
    const body = pick(['{', '{"payload":', 'null,', "{'a':1}", '{"a":1}}', '\u0000', 'NaN', '[1,]', '{"a":01}']) + (rand() < 0.3 ? randomBytes(int(40)).toString('latin1') : '');
    return { bytes: request('PUT', '/api/v1/vm.create', [], body), complete: true, method: 'PUT', endpoint: 'vm.create' };
  });
  add('deep nesting', 100, () => {
    const d = 129 + int(rand() < 0.2 ? 200_000 : 2000);
    const [open, close] = rand() < 0.5 ? ['[', ']'] : ['{"a":', '}'];
    const body = `{"payload":{"kernel":"/k"},"x":${open.repeat(d)}1${close.repeat(d)}}`;
    return { bytes: request('PUT', '/api/v1/vm.create', [], body), complete: true, method: 'PUT', endpoint: 'vm.create' };
  });
  add('oversized body (declared)', 40, () => {
    const len = (4 << 20) + 1 + int(1 << 30);
    return { bytes: request('PUT', '/api/v1/vm.create', [`Content-Length: ${len}`], randomBytes(int(1000))), complete: true, method: 'PUT', endpoint: 'vm.create' };
  });
  add('oversized body (chunked)', 10, () => {
    const chunk = Buffer.alloc(1 << 20, 0x20);
    const parts = [];
    for (let i = 0; i < 5; i++) parts.push(Buffer.from(`${chunk.length.toString(16)}\r\n`), chunk, Buffer.from('\r\n'));
    parts.push(Buffer.from('0\r\n\r\n'));
    return { bytes: request('PUT', '/api/v1/vm.create', ['Transfer-Encoding: chunked'], Buffer.concat(parts)), complete: true, method: 'PUT', endpoint: 'vm.create' };
  });
  add('body where none belongs', 200, () => {
    const e = rand() < 0.8 ? pick(NO_BODY_PUTS) : pick(['vmm.ping', 'vm.info', 'vm.counters']);
    const method = ENDPOINTS.find(([, x]) => x === e)![0];
    const body = rand() < 0.5 ? JSON.stringify(randomJson()) || '1' : randomBytes(1 + int(200));
    return { bytes: request(method, `/api/v1/${e}`, [], body), complete: true, method, endpoint: e };
  });
  add('unknown path', 250, () => {
    const p = pick([
      () => `/api/v1/${pick(['vm.resize', 'vm.add-net', 'vm.nmi', 'vm.coredump', 'vm.add-fs', 'vm.remove-device'])}`,
      () => `/api/v2/vmm.ping`,
      () => `/api/v1/${randomBytes(1 + int(30)).toString('hex')}`,
      () => `/${'../'.repeat(int(10))}etc/passwd`,
      () => `/api/v1/vm.boot%00`,
      () => `/api/v1/vm.boot/extra`,
      () => `/API/V1/VMM.PING`,
      () => `http://localhost/api/v1/${pick(['x', 'vm.bootx', 'vmm'])}`,
    ])();
    const method = pick(['GET', 'PUT']);
    return { bytes: request(method, p, [], rand() < 0.3 ? '{"a":1}' : ''), complete: true, method, endpoint: p.replace(/^(http:\/\/localhost)?\/api\/v1\//, '') };
  });
  add('broken framing', 200, () => {
    const e = pick(NO_BODY_PUTS);
    // Each of these is refused by the HTTP parser (HTTP/2.0, HTTP/0.9 and doubled spaces are
    // accepted by it, so they are not here: they would be real calls).
    const variant = pick([
      () => request('PUT', `/api/v1/${e}`, [`Content-Length: ${pick(['abc', '-1', '1, 2', '0x10', ' ', '+1'])}`]),
      () => request('PUT', `/api/v1/${e}`, ['Transfer-Encoding: chunked'], 'zz\r\nabc\r\n0\r\n\r\n'),
      () => request('PUT', `/api/v1/${e}`, ['Content-Length: 3', 'Transfer-Encoding: chunked'], 'abc'),
      () => request('PUT', `/api/v1/${e}`, ['Content-Length: 1', 'Content-Length: 2'], 'ab'),
      () => Buffer.from(`PUT /api/v1/${e} HTTP/${pick(['9.9', '1.x', '', '1.1 extra', '1.2'])}\r\nHost: x\r\n\r\n`),
      () => Buffer.from(`PUT /api/v1/${e} HTTP/1.1\r\nNo colon here\r\n\r\n`),
      () => Buffer.from(`PUT /api/v1/${e} HTTP/1.1\r\nBad\u0001Name: x\r\n\r\n`),
      () => Buffer.from(`PUT /api/v1/${e} HTTP/1.1\r\nHost: x\r\n Folded: y\r\n\r\n`),
      () => Buffer.from(`PUT /api/v1/${e} HTTP/1.1\nHost: x\n\n`),
    ])();
    return { bytes: variant, complete: true, method: 'PUT', endpoint: e };
  });
  return cases;
}

export function isErrorReply(r: ParsedResponse): string | null {
  if (r.status < 400 || r.status > 599) return `status ${r.status}`;
  if (r.headers['content-type'] !== 'application/json') return `Content-Type ${r.headers['content-type']}`;
  let body: unknown;
  try {
    body = JSON.parse(r.body.toString('utf8'));
  } catch {
    return `body is not JSON: ${r.body.toString('latin1').slice(0, 80)}`;
  }
  if (!Array.isArray(body) || body.length === 0 || !body.every((s) => typeof s === 'string')) return `body is not a message chain: ${r.body}`;
  return null;
}

let rand = prng(0);
const int = (n: number) => Math.floor(rand() * n);
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)];
const randomBytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));

/** "METHOD endpoint" of every endpoint the cases are certain to reach (for the contract test) */
export const FUZZED_ENDPOINTS = ['GET vmm.ping', 'PUT vm.create', ...NO_BODY_PUTS.map((e) => `PUT ${e}`)];

/**
 * Every `share`-th case of each kind, so that a slow machine (in the lab's emulated CPU all the
 * cases took 115 s against a running VM) still sends every kind of malformed request.
 */
export function everyNthOfEachKind(cases: Case[], share: number): Case[] {
  const seen = new Map<string, number>();
  return cases.filter((c) => {
    const i = seen.get(c.kind) ?? 0;
    seen.set(c.kind, i + 1);
    return i % share === 0;
  });
}

export interface FuzzResult {
  problems: string[];
  /** per kind of case: sent, and how many got any reply */
  byKind: Map<string, { n: number; replied: number }>;
}

/**
 * Send every case on its own connection, `parallel` at a time, record each reply in `recorder`
 * and collect what is wrong. `alive` is asked after each case: false stops the run.
 */
export async function runFuzz(socket: string, cases: Case[], recorder: ReplyRecorder, parallel: number, alive: () => string | null): Promise<FuzzResult> {
  const problems: string[] = [];
  const byKind = new Map<string, { n: number; replied: number }>();
  let next = 0;
  const worker = async () => {
    while (next < cases.length) {
      const c = cases[next++];
      const { data, timedOut } = await rawExchange(socket, c.bytes, { timeoutMs: 10_000 });
      const k = byKind.get(c.kind) ?? { n: 0, replied: 0 };
      k.n++;
      byKind.set(c.kind, k);
      if (timedOut) problems.push(`${c.kind}: no answer and no close within 10 s`);
      if (!data.length) {
        if (c.complete) problems.push(`${c.kind}: a complete request got no reply: ${JSON.stringify(c.bytes.subarray(0, 120).toString('latin1'))}`);
        continue;
      }
      k.replied++;
      let replies: ParsedResponse[];
      try {
        replies = parseResponses(data);
      } catch (e) {
        problems.push(`${c.kind}: malformed reply (${(e as Error).message})`);
        continue;
      }
      for (const r of replies) {
        const bad = isErrorReply(r);
        if (bad) problems.push(`${c.kind}: ${bad} for ${JSON.stringify(c.bytes.subarray(0, 120).toString('latin1'))}`);
        if (c.endpoint !== undefined) recorder.add({ method: c.method!, endpoint: c.endpoint, status: r.status, contentType: r.headers['content-type'], body: r.body });
      }
      const dead = alive();
      if (dead) {
        problems.push(`${dead} after a ${c.kind} case`);
        return;
      }
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
  return { problems, byKind };
}
