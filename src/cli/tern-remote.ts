#!/usr/bin/env node
// `tern-remote --api-socket PATH COMMAND`: ch-remote's commands against a VMM's API socket.
// Replies with a body are printed as received; an error reply prints its message chain and
// exits 1. `events` follows the VMM's event stream, printed in the event monitor's format.
import fs from 'node:fs';
import http from 'node:http';
import { TernApiError, TernClient } from '../api/client';
import { formatMonitorEvent } from '../api/event-monitor';
import { TERN_VERSION } from '../version';

type Command = { method: 'GET' | 'PUT'; endpoint: string; about: string };

const COMMANDS: Record<string, Command> = {
  ping: { method: 'GET', endpoint: 'vmm.ping', about: 'check that the VMM answers; prints its version' },
  info: { method: 'GET', endpoint: 'vm.info', about: "the VM's configuration and state" },
  counters: { method: 'GET', endpoint: 'vm.counters', about: 'device and bus counters' },
  create: { method: 'PUT', endpoint: 'vm.create', about: 'create the VM from a JSON VmConfig (FILE, or - for stdin)' },
  boot: { method: 'PUT', endpoint: 'vm.boot', about: 'boot the created VM' },
  delete: { method: 'PUT', endpoint: 'vm.delete', about: 'delete the VM' },
  pause: { method: 'PUT', endpoint: 'vm.pause', about: 'pause the VM' },
  resume: { method: 'PUT', endpoint: 'vm.resume', about: 'resume the paused VM' },
  reboot: { method: 'PUT', endpoint: 'vm.reboot', about: 'reboot the VM' },
  shutdown: { method: 'PUT', endpoint: 'vm.shutdown', about: 'stop the VM (it can boot again)' },
  'power-button': { method: 'PUT', endpoint: 'vm.power-button', about: 'press the ACPI power button' },
  snapshot: { method: 'PUT', endpoint: 'vm.snapshot', about: 'snapshot the paused VM into file:///DIR (a new directory)' },
  restore: { method: 'PUT', endpoint: 'vm.restore', about: 'restore a VM: source_url=file:///DIR[,resume=on][,prefault=on][,memory_restore_mode=copy|ondemand]' },
  'shutdown-vmm': { method: 'PUT', endpoint: 'vmm.shutdown', about: 'end the VMM process' },
  events: { method: 'GET', endpoint: 'vmm.events', about: 'follow the event stream until the VMM ends' },
};

const ARG_NAMES: Record<string, string> = { create: 'create [FILE|-]', snapshot: 'snapshot URL', restore: 'restore CONFIG' };
const TAKES_ARG = new Set(Object.keys(ARG_NAMES));

const USAGE = `Usage: tern-remote --api-socket PATH COMMAND [ARG]
Commands:
${Object.entries(COMMANDS)
  .map(([name, c]) => `  ${(ARG_NAMES[name] ?? name).padEnd(18)}${c.about}`)
  .join('\n')}
Options:
  --api-socket PATH   the VMM's API socket (tern --api-socket)
  -V, --version       print the version
  -h, --help          print this help`;

function usage(message: string): never {
  process.stderr.write(`tern-remote: ${message}\n${USAGE}\n`);
  process.exit(2);
}

interface Parsed {
  socket: string;
  command: string;
  arg?: string;
}

function parse(argv: string[]): Parsed {
  let socket: string | undefined;
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h' || a === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    }
    if (a === '-V' || a === '--version') {
      process.stdout.write(`tern-remote v${TERN_VERSION}\n`);
      process.exit(0);
    }
    if (a === '--api-socket') {
      socket = argv[++i];
      if (socket === undefined) usage('--api-socket needs a path');
    } else if (a.startsWith('--api-socket=')) socket = a.slice('--api-socket='.length);
    else if (a.startsWith('-') && a !== '-') usage(`unknown option ${a}`);
    else rest.push(a);
  }
  if (!socket) usage('--api-socket PATH is required');
  const [command, arg, ...extra] = rest;
  if (!command) usage('no command given');
  if (!Object.hasOwn(COMMANDS, command)) usage(`unknown command ${command}`);
  if (extra.length || (arg !== undefined && !TAKES_ARG.has(command))) usage(`too many arguments for ${command}`);
  if (arg === undefined && (command === 'snapshot' || command === 'restore')) usage(`${command} needs an argument`);
  return { socket, command, arg };
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

const RESTORE_MODES: Record<string, string> = { copy: 'Copy', ondemand: 'OnDemand' };

/** ch-remote's `restore source_url=...,prefault=on` as a RestoreConfig body. */
function restoreBody(arg: string): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  for (const part of arg.split(',')) {
    const eq = part.indexOf('=');
    const k = eq < 0 ? 'source_url' : part.slice(0, eq);
    const v = eq < 0 ? part : part.slice(eq + 1);
    if (k === 'source_url') body[k] = v;
    else if (k === 'memory_restore_mode') {
      // as ch-remote does: any case on the command line, the contract's spelling on the wire
      const mode = Object.hasOwn(RESTORE_MODES, v.toLowerCase()) ? RESTORE_MODES[v.toLowerCase()] : undefined;
      if (!mode) usage(`restore: memory_restore_mode=${v} must be copy or ondemand`);
      body[k] = mode;
    } else if (k === 'resume' || k === 'prefault') {
      if (v !== 'on' && v !== 'off' && v !== 'true' && v !== 'false') usage(`restore: ${k}=${v} must be on or off`);
      body[k] = v === 'on' || v === 'true';
    } else usage(`restore: unknown key ${k}`);
  }
  if (!body.source_url) usage('restore needs source_url=file:///DIR');
  return body;
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

async function main(): Promise<void> {
  const { socket, command, arg } = parse(process.argv.slice(2));
  const client = new TernClient({ socketPath: socket, timeoutMs: 0 });
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
  const body = command === 'create' ? readConfig(arg) : command === 'snapshot' ? { destination_url: arg } : command === 'restore' ? restoreBody(arg!) : undefined;
  let reply;
  try {
    reply = await client.request(method, endpoint, body);
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
