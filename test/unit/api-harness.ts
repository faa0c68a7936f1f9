// Shared pieces of the API tests (unit and host tiers): an in-process VMM behind a real API
// socket (no KVM object exists until a VM boots), a recorder of every reply (so each test file
// can check all of them against the OpenAPI contract), and the contract validator itself,
// built on openapi-response-validator.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { ExecutionContext, TestFn } from 'ava';
import OpenAPIResponseValidator from 'openapi-response-validator';
import YAML from 'yaml';

import { TernClient, type RawReply } from '../../src/api/client';
import { ApiServer, type ApiLimits } from '../../src/api/server';
import { VmmApi } from '../../src/api/vmm-api';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';

export const REPO = path.resolve(__dirname, '..', '..', '..');
const CONTRACT_FILE = path.join('shared', 'reference', 'cloud-hypervisor-openapi.yaml');

/** The main checkout's folder when REPO is a git worktree of it (a worktree's .git is a file). */
function mainCheckout(repo: string): string | undefined {
  try {
    const m = /^gitdir:\s*(.+)$/m.exec(fs.readFileSync(path.join(repo, '.git'), 'utf8'));
    // <main>/.git/worktrees/<name>
    return m ? path.resolve(repo, m[1].trim(), '..', '..', '..') : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Where the contract is looked for: TERN_OPENAPI if set, else beside the project (../shared/
 * reference), from this checkout or, in a git worktree, from the main checkout it belongs to.
 */
export function contractCandidates(repo = REPO, env = process.env): string[] {
  if (env.TERN_OPENAPI) return [path.resolve(env.TERN_OPENAPI)];
  const roots = [repo, mainCheckout(repo)].filter((r): r is string => r !== undefined);
  return [...new Set(roots.map((r) => path.resolve(r, '..', CONTRACT_FILE)))];
}

/** The contract lives beside the project, not in it: only this file looks for it. */
export const CONTRACT_PATH = contractCandidates().find((p) => fs.existsSync(p)) ?? contractCandidates()[0];

export function tempDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface Reply {
  method: string;
  /** endpoint name after /api/v1/, or the raw request path when it is not under it */
  endpoint: string;
  status: number;
  contentType?: string;
  body: Buffer;
}

/** Every reply an API test file saw, for its contract test. */
export class ReplyRecorder {
  readonly replies: Reply[] = [];

  add(r: Reply): void {
    this.replies.push(r);
  }
}

export interface ApiRig {
  vmm: Vmm;
  server: ApiServer;
  socket: string;
  client: TernClient;
  vmmShutdowns: number;
  /** request through the client, recorded */
  call(method: 'GET' | 'PUT', endpoint: string, body?: unknown): Promise<RawReply>;
  close(): Promise<void>;
}

export async function startApi(recorder: ReplyRecorder, dir = tempDir('tern-api-'), limits?: Partial<ApiLimits>): Promise<ApiRig> {
  const vmm = new Vmm({ log: silentLogger() });
  const socket = path.join(dir, 'api.sock');
  const rig = {} as ApiRig;
  rig.vmmShutdowns = 0;
  const server = await ApiServer.listen({ path: socket }, {
    api: new VmmApi(vmm),
    log: silentLogger(),
    onVmmShutdown: () => rig.vmmShutdowns++,
    limits,
  });
  const client = new TernClient({ socketPath: socket, timeoutMs: 20_000 });
  Object.assign(rig, {
    vmm,
    server,
    socket,
    client,
    async call(method: 'GET' | 'PUT', endpoint: string, body?: unknown) {
      const r = await client.request(method, endpoint, body);
      recorder.add({ method, endpoint, status: r.status, contentType: r.headers['content-type'], body: r.body });
      return r;
    },
    async close() {
      client.close();
      await server.close();
      await vmm.close();
    },
  });
  return rig;
}

export function bodyJson(r: { body: Buffer }): unknown {
  return JSON.parse(r.body.toString('utf8'));
}

/** Send raw bytes on a fresh connection; resolves with everything received until the peer closes. */
export function rawExchange(
  socket: string,
  bytes: Buffer | string,
  opts: { end?: boolean; timeoutMs?: number } = {},
): Promise<{ data: Buffer; timedOut: boolean }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const c = net.connect(socket);
    let done = false;
    const finish = (timedOut: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      c.destroy();
      resolve({ data: Buffer.concat(chunks), timedOut });
    };
    const timer = setTimeout(() => finish(true), opts.timeoutMs ?? 5000);
    c.on('data', (d) => chunks.push(d));
    c.on('close', () => finish(false));
    c.on('error', () => finish(false));
    c.on('connect', () => {
      c.write(bytes);
      if (opts.end ?? true) c.end();
    });
  });
}

export interface ParsedResponse {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

/**
 * Split a byte stream into HTTP/1.1 responses (Content-Length framing only, which is all the
 * API uses). Throws on anything that is not a well-formed response.
 */
export function parseResponses(data: Buffer): ParsedResponse[] {
  const out: ParsedResponse[] = [];
  let rest = data;
  while (rest.length) {
    const end = rest.indexOf('\r\n\r\n');
    if (end < 0) throw new Error(`incomplete response head: ${JSON.stringify(rest.toString('latin1').slice(0, 200))}`);
    const [statusLine, ...lines] = rest.subarray(0, end).toString('latin1').split('\r\n');
    const m = /^HTTP\/1\.1 (\d{3}) /.exec(statusLine);
    if (!m) throw new Error(`bad status line ${JSON.stringify(statusLine)}`);
    const headers: Record<string, string> = {};
    for (const l of lines) {
      const i = l.indexOf(':');
      if (i <= 0) throw new Error(`bad header line ${JSON.stringify(l)}`);
      headers[l.slice(0, i).toLowerCase()] = l.slice(i + 1).trim();
    }
    const len = headers['content-length'] !== undefined ? Number(headers['content-length']) : 0;
    if (headers['transfer-encoding']) throw new Error('unexpected Transfer-Encoding');
    const bodyStart = end + 4;
    if (rest.length < bodyStart + len) throw new Error('truncated response body');
    out.push({ status: Number(m[1]), headers, body: rest.subarray(bodyStart, bodyStart + len) });
    rest = rest.subarray(bodyStart + len);
  }
  return out;
}

// ---- the contract --------------------------------------------------------------------------

/** The shape of every error reply: Cloud Hypervisor's message chain, outermost first. */
const ERROR_BODY_SCHEMA = { type: 'array', items: { type: 'string' }, minItems: 1 };

interface OpenApiDoc {
  paths: Record<string, Record<string, { responses: Record<string, { content?: unknown }> }>>;
  components: Record<string, unknown>;
}

export class Contract {
  private readonly validators = new Map<string, OpenAPIResponseValidator>();

  constructor(readonly doc: OpenApiDoc) {}

  static load(): Contract | null {
    if (!fs.existsSync(CONTRACT_PATH)) return null;
    return new Contract(YAML.parse(fs.readFileSync(CONTRACT_PATH, 'utf8')) as OpenApiDoc);
  }

  /**
   * The document's responses for an operation, with the error-body schema for error statuses
   * it lists without content and as the default for the ones it does not list (the contract
   * describes no error bodies, but Cloud Hypervisor sends this shape for all of them).
   */
  private validatorFor(method: string, endpoint: string): OpenAPIResponseValidator {
    const key = `${method} ${endpoint}`;
    let v = this.validators.get(key);
    if (v) return v;
    const op = this.doc.paths[`/${endpoint}`]?.[method.toLowerCase()];
    const errorResponse = { description: 'error', content: { 'application/json': { schema: ERROR_BODY_SCHEMA } } };
    const responses: Record<string, unknown> = { default: errorResponse };
    for (const [status, r] of Object.entries(op?.responses ?? {})) {
      responses[status] = Number(status) >= 400 && !r.content ? errorResponse : r;
    }
    v = new OpenAPIResponseValidator({ responses, components: this.doc.components } as never);
    this.validators.set(key, v);
    return v;
  }

  /** Problems with one reply; empty when it matches. */
  check(r: Reply): string[] {
    const problems: string[] = [];
    const op = this.doc.paths[`/${r.endpoint}`]?.[r.method.toLowerCase()];
    if (op && r.status < 400 && !Object.hasOwn(op.responses, String(r.status))) {
      problems.push(`status ${r.status} is not one the contract lists for ${r.method} ${r.endpoint}`);
    }
    if (!op && r.status < 400) problems.push(`${r.method} ${r.endpoint} is not in the contract but answered ${r.status}`);
    let body: unknown = null;
    if (r.body.length) {
      try {
        body = JSON.parse(r.body.toString('utf8'));
      } catch {
        problems.push('the body is not JSON');
      }
      if (r.contentType !== 'application/json') problems.push(`Content-Type is ${r.contentType}`);
    }
    const result = this.validatorFor(r.method, r.endpoint).validateResponse(r.status, body);
    if (result) problems.push(...result.errors.map((e: { path?: string; message: string }) => `${e.path ?? ''} ${e.message}`.trim()));
    return problems;
  }
}

/** "METHOD endpoint" of a reply, as contract tests list what they expect to have checked. */
export const replyKey = (r: Pick<Reply, 'method' | 'endpoint'>): string => `${r.method} ${r.endpoint}`;

/** The expected "METHOD endpoint"s no recorded reply answered: the scenario stopped short. */
export function unansweredEndpoints(recorder: ReplyRecorder, expected: readonly string[]): string[] {
  const seen = new Set(recorder.replies.map(replyKey));
  return expected.filter((k) => !seen.has(k));
}

/**
 * Declare this file's contract test: it runs after the file's other serial tests and checks
 * every recorded reply, and first that replies from every endpoint in `expected` ("METHOD
 * endpoint") were recorded, so a scenario that broke early cannot pass on the few replies it
 * got. Skipped, saying why, where the OpenAPI document is absent.
 */
export function contractTest(test: TestFn, recorder: ReplyRecorder, label: string, expected: readonly string[]): void {
  const contract = Contract.load();
  if (!contract) {
    const why = `the OpenAPI document is absent (looked for ${contractCandidates().join(', ')}; TERN_OPENAPI names another)`;
    console.log(`contract test (${label}) skipped: ${why}`);
    test.serial.skip(`contract (${label}): skipped, ${why}`, (t: ExecutionContext) => t.pass());
    return;
  }
  test.serial(`contract (${label}): every reply matches the Cloud Hypervisor OpenAPI document`, (t: ExecutionContext) => {
    t.true(expected.length > 0, 'the test names the endpoints it expects to have checked');
    t.deepEqual(unansweredEndpoints(recorder, expected), [], 'every endpoint the scenario calls was answered and recorded');
    const failures: string[] = [];
    for (const r of recorder.replies) {
      const problems = contract.check(r);
      if (problems.length) failures.push(`${r.method} ${r.endpoint} -> ${r.status} ${r.body.toString('utf8').slice(0, 200)}: ${problems.join('; ')}`);
    }
    t.deepEqual(failures, [], `${failures.length} of ${recorder.replies.length} replies break the contract`);
    const checked = new Set(recorder.replies.map(replyKey));
    t.log(`${recorder.replies.length} replies from ${checked.size} endpoints checked against ${path.basename(CONTRACT_PATH)}, among them ${expected.join(', ')}`);
  });
}
