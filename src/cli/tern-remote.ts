#!/usr/bin/env node
// `tern-remote --api-socket PATH COMMAND`: ch-remote's commands against a VMM's API socket.
// Replies with a body are printed as received; an error reply prints its message chain and
// exits 1. `events` follows the VMM's event stream, printed in the event monitor's format.
// `send-migration` follows the migration it started: a progress bar on a terminal, plain
// progress lines otherwise, exit 0 only once the destination runs the VM. `--no-wait` returns
// once the migration has started, as ch-remote does.
import fs from 'node:fs';
import http from 'node:http';
import { TernApiError, TernClient } from '../api/client';
import { requestWithFds } from '../api/fd-request';
import { formatMonitorEvent } from '../api/event-monitor';
import { followMigration } from './migration-follow';
import {
  COMMANDS,
  RemoteUsageError,
  TERN_REMOTE_USAGE,
  addDiskBody,
  addNetBody,
  parseTernRemoteArgs,
  receiveMigrationBody,
  restoreBody,
  takeRestoreFds,
  sendMigrationBody,
  type ChRemoteSendBody,
  type RemoteArgs,
} from './tern-remote-args';

function usage(message: string): never {
  process.stderr.write(`tern-remote: ${message}\n${TERN_REMOTE_USAGE}\n`);
  process.exit(2);
}

function parse(argv: string[]): RemoteArgs {
  const inv = parseTernRemoteArgs(argv);
  if (inv.kind === 'help') {
    process.stdout.write(`${TERN_REMOTE_USAGE}\n`);
    process.exit(0);
  }
  if (inv.kind === 'version') {
    process.stdout.write(`${inv.text}\n`);
    process.exit(0);
  }
  return inv;
}

function readConfig(arg: string | undefined): string {
  const source = arg ?? '-';
  try {
    return fs.readFileSync(source === '-' ? 0 : source, 'utf8');
  } catch (e) {
    process.stderr.write(`tern-remote: cannot read ${source === '-' ? 'stdin' : source}: ${(e as Error).message}\n`);
    process.exit(1);
  }
}

function reportApiError(command: string, status: number, chain: string[]): never {
  const lines = [`tern-remote: ${command} failed: HTTP ${status} ${http.STATUS_CODES[status] ?? ''}`.trimEnd()];
  chain.forEach((m, i) => lines.push(`  ${i}: ${m}`));
  process.stderr.write(`${lines.join('\n')}\n`);
  process.exit(1);
}

function reportTransportError(socket: string, e: unknown): never {
  process.stderr.write(`tern-remote: cannot talk to the VMM at ${socket}: ${(e as Error).message}\n`);
  process.exit(1);
}

/** The request body a command sends, built as ch-remote builds it. */
function requestBody(command: string, arg: string | undefined, flags: ReadonlySet<string>): unknown {
  switch (command) {
    case 'create':
      return readConfig(arg);
    case 'add-disk':
      return addDiskBody(arg!);
    case 'add-net':
      return addNetBody(arg!);
    case 'snapshot':
      return { destination_url: arg };
    case 'restore':
      return restoreBody(arg!);
    case 'send-migration':
      return sendMigrationBody(arg!, flags.has('--local'));
    case 'receive-migration':
      return receiveMigrationBody(arg!);
    default:
      return undefined;
  }
}

/** send-migration: start it, show its progress, exit 0 once the destination runs the VM. */
async function sendAndFollow(client: TernClient, socket: string, body: ChRemoteSendBody): Promise<never> {
  const started = Date.now();
  let outcome;
  try {
    outcome = await followMigration(client, () => client.sendMigration(body), process.stdout);
  } catch (e) {
    if (e instanceof TernApiError) reportApiError('send-migration', e.status, e.chain);
    reportTransportError(socket, e);
  } finally {
    client.close();
  }
  if (!outcome.ok) {
    process.stderr.write(`tern-remote: the migration failed: ${outcome.reason}\n`);
    process.exit(1);
  }
  const ms = outcome.progress?.elapsed_ms ?? Date.now() - started;
  process.stdout.write(`migration finished in ${(ms / 1000).toFixed(1)} s\n`);
  process.exit(0);
}

async function main(): Promise<void> {
  let parsed: RemoteArgs;
  let body: unknown;
  try {
    parsed = parse(process.argv.slice(2));
    body = requestBody(parsed.command, parsed.arg, parsed.flags);
  } catch (e) {
    if (e instanceof RemoteUsageError) usage(e.message);
    throw e;
  }
  const { socket, command, flags } = parsed;
  const client = new TernClient({ socketPath: socket, timeoutMs: 0 });
  if (command === 'send-migration' && !flags.has('--no-wait')) await sendAndFollow(client, socket, body as ChRemoteSendBody);
  if (command === 'events') {
    await new Promise<void>((resolve) => {
      client.events().subscribe({
        next: (e) => process.stdout.write(formatMonitorEvent(e)),
        error: (e) => (e instanceof TernApiError ? reportApiError(command, e.status, e.chain) : reportTransportError(socket, e)),
        complete: () => resolve(),
      });
    });
    return;
  }
  const { method, endpoint } = COMMANDS[command];
  // add-net fd=... and restore net_fds=...: the taps go with the request (SCM_RIGHTS), as
  // ch-remote sends them.
  let fds: number[] = [];
  if (command === 'add-net' && Array.isArray((body as { fds?: number[] }).fds)) {
    const { fds: taps, ...rest } = body as { fds: number[] };
    fds = taps;
    body = rest;
  } else if (command === 'restore') {
    ({ body, fds } = takeRestoreFds(body as Record<string, unknown>));
  }
  let reply;
  try {
    // (a restore takes as long as its copy of guest RAM: a day, the longest a request may wait)
    reply = fds.length ? await requestWithFds(socket, 'PUT', endpoint, body, fds, command === 'restore' ? 86_400_000 : 60_000) : await client.request(method, endpoint, body);
  } catch (e) {
    reportTransportError(socket, e);
  } finally {
    client.close();
  }
  if (reply.status < 200 || reply.status > 299) {
    let chain: string[];
    try {
      const parsed = JSON.parse(reply.body.toString('utf8')) as unknown;
      chain = Array.isArray(parsed) ? parsed.map(String) : [reply.body.toString('utf8')];
    } catch {
      chain = reply.body.length ? [reply.body.toString('utf8')] : [];
    }
    reportApiError(command, reply.status, chain);
  }
  if (reply.body.length) process.stdout.write(`${reply.body.toString('utf8')}\n`);
}

main().catch((e) => {
  process.stderr.write(`tern-remote: internal error: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
