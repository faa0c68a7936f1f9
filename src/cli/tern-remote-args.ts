// tern-remote's command line: ch-remote's commands and their argument syntax, turned into the
// request bodies ch-remote sends, so tern-remote drives Cloud Hypervisor as well as Tern.
import { parseMigrationUrl } from '../api/migration-url';
import { MAX_MIGRATION_CONNECTIONS, type ReceiveMigrationData, type SendMigrationData } from '../api/schema';
import { MIGRATION_DEFAULTS } from '../migration/migration-options';
import { TERN_VERSION } from '../version';
import { parseIdIntegerLists, parseKeyValues, splitTopLevel } from './option-values';
import { deviceEntry, diskEntry, netEntry } from './tern-args';

type Command = { method: 'GET' | 'PUT'; endpoint: string; about: string };

export const COMMANDS: Readonly<Record<string, Command>> = {
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
  'add-disk': { method: 'PUT', endpoint: 'vm.add-disk', about: 'add a disk to the VM before it boots: path=P[,readonly=on][,image_type=qcow2][,id=ID]...' },
  'add-net': { method: 'PUT', endpoint: 'vm.add-net', about: 'add a net device to the VM before it boots: tap=NAME[,ip=A,mask=M][,mac=MAC][,host_mac=MAC][,mtu=N][,id=ID]...' },
  snapshot: { method: 'PUT', endpoint: 'vm.snapshot', about: 'snapshot the paused VM into file:///DIR (a new directory)' },
  restore: { method: 'PUT', endpoint: 'vm.restore', about: 'restore a VM: source_url=file:///DIR[,resume=on][,prefault=on][,memory_restore_mode=copy|ondemand][,net_fds=[ID@[FD,...],...]]' },
  'send-migration': { method: 'PUT', endpoint: 'vm.send-migration', about: 'send the VM, showing progress until it ended (with --no-wait, return once it started)' },
  'receive-migration': { method: 'PUT', endpoint: 'vm.receive-migration', about: 'receive a VM; returns once it runs here' },
  'migration-progress': { method: 'GET', endpoint: 'vm.migration-progress', about: 'the migration in progress, or the last one, as JSON (Tern only)' },
  'migration-cancel': { method: 'PUT', endpoint: 'vm.migration-cancel', about: 'cancel the migration in progress on this VMM (Tern only)' },
  'shutdown-vmm': { method: 'PUT', endpoint: 'vmm.shutdown', about: 'end the VMM process' },
  events: { method: 'GET', endpoint: 'vmm.events', about: 'follow the event stream until the VMM ends' },
};

const ARG_NAMES: Record<string, string> = {
  create: 'create [FILE|-]',
  'add-disk': 'add-disk DISK',
  'add-net': 'add-net NET',
  snapshot: 'snapshot URL',
  restore: 'restore CONFIG',
  'send-migration': 'send-migration CONFIG',
  'receive-migration': 'receive-migration CONFIG',
};
/** commands that need their argument */
const NEEDS_ARG = new Set(['add-disk', 'add-net', 'snapshot', 'restore', 'send-migration', 'receive-migration']);
/**
 * Command flags: `--local` is the send-migration flag of ch-remote before its option string
 * (`send-migration --local unix:/PATH`); `--wait` and `--no-wait` are Tern's.
 */
const COMMAND_FLAGS: Readonly<Record<string, readonly string[]>> = { 'send-migration': ['--local', '--wait', '--no-wait'] };

export const TERN_REMOTE_USAGE = `Usage: tern-remote --api-socket PATH COMMAND [ARG]
Commands:
${Object.entries(COMMANDS)
  .map(([name, c]) => `  ${(ARG_NAMES[name] ?? name).padEnd(26)}${c.about}`)
  .join('\n')}
Migration CONFIG, as ch-remote's (keys in any order; a bare URL is taken as the url):
  send-migration     destination_url=tcp:HOST:PORT|unix:/PATH[,local=on][,downtime_ms=300][,timeout_s=3600]
                     [,timeout_strategy=cancel|ignore][,connections=1][,memory_mode=precopy]
                     (--local URL is ch-remote's older spelling of local=on)
  receive-migration  receiver_url=tcp:ADDR:PORT|unix:/PATH[,memory_mode=precopy][,zone_updates=[ID@NODE,...]]
Options:
  --api-socket PATH   the VMM's API socket (tern --api-socket)
  --no-wait           send-migration: return once the migration has started, as ch-remote
                      does; by default (or with --wait) it is followed until it ends (a
                      progress bar on a terminal, a line a second otherwise) and tern-remote
                      exits 0 once the destination runs the VM, 1 with the reason if it failed
  -V, --version       print the version
  -h, --help          print this help`;

/** A command line tern-remote cannot run: printed with the usage, exit code 2. */
export class RemoteUsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RemoteUsageError';
  }
}

export interface RemoteArgs {
  socket: string;
  command: string;
  arg?: string;
  /** command flags given (`--local`, `--wait`) */
  flags: ReadonlySet<string>;
}

export type RemoteInvocation = { kind: 'help' } | { kind: 'version'; text: string } | ({ kind: 'run' } & RemoteArgs);

export function parseTernRemoteArgs(argv: readonly string[]): RemoteInvocation {
  let socket: string | undefined;
  const rest: string[] = [];
  const flags = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h' || a === '--help') return { kind: 'help' };
    if (a === '-V' || a === '--version') return { kind: 'version', text: `tern-remote v${TERN_VERSION}` };
    if (a === '--api-socket') {
      socket = argv[++i];
      if (socket === undefined) throw new RemoteUsageError('--api-socket needs a path');
    } else if (a.startsWith('--api-socket=')) socket = a.slice('--api-socket='.length);
    else if (a === '--local' || a === '--wait' || a === '--no-wait') flags.add(a);
    else if (a.startsWith('-') && a !== '-') throw new RemoteUsageError(`unknown option ${a}`);
    else rest.push(a);
  }
  if (!socket) throw new RemoteUsageError('--api-socket PATH is required');
  const [command, arg, ...extra] = rest;
  if (!command) throw new RemoteUsageError('no command given');
  if (!Object.hasOwn(COMMANDS, command)) throw new RemoteUsageError(`unknown command ${command}`);
  for (const f of flags) if (!(COMMAND_FLAGS[command] ?? []).includes(f)) throw new RemoteUsageError(`${command} takes no ${f}`);
  if (extra.length || (arg !== undefined && !Object.hasOwn(ARG_NAMES, command))) throw new RemoteUsageError(`too many arguments for ${command}`);
  if (arg === undefined && NEEDS_ARG.has(command)) throw new RemoteUsageError(`${command} needs an argument`);
  return { kind: 'run', socket, command, arg, flags };
}

function optionValues(command: string, arg: string, keys: readonly string[], bareKey: string): Record<string, string> {
  try {
    return parseKeyValues(command, arg, keys, bareKey);
  } catch (e) {
    throw new RemoteUsageError((e as Error).message);
  }
}

/** ch-remote's on|off: also true|false and empty, in any case */
function toggle(command: string, key: string, v: string): boolean {
  const l = v.toLowerCase();
  if (l === 'on' || l === 'true') return true;
  if (l === 'off' || l === 'false' || l === '') return false;
  throw new RemoteUsageError(`${command}: ${key}=${v} must be on or off`);
}

/** a whole number from 1 up (ch-remote's NonZero fields) */
function positive(command: string, key: string, v: string, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^\d+$/.test(v)) throw new RemoteUsageError(`${command}: ${key}=${v} is not a whole number`);
  const n = Number(v);
  if (n === 0) throw new RemoteUsageError(`${command}: ${key} must be non-zero`);
  if (n > max) throw new RemoteUsageError(`${command}: ${key}=${v} must not exceed ${max}`);
  return n;
}

/** a command-line spelling, in any case, as the contract spells it on the wire */
function contractEnum<T extends string>(command: string, key: string, v: string, values: readonly T[]): T {
  const found = values.find((x) => x.toLowerCase() === v.toLowerCase());
  if (!found) throw new RemoteUsageError(`${command}: ${key}=${v} must be ${values.map((x) => x.toLowerCase()).join(' or ')}`);
  return found;
}

function checkUrl(command: string, key: string, url: string): void {
  try {
    parseMigrationUrl(url);
  } catch (e) {
    throw new RemoteUsageError(`${command}: ${key} ${(e as Error).message}`);
  }
}

const RESTORE_MODES: Record<string, string> = { copy: 'Copy', ondemand: 'OnDemand' };

/** ch-remote's `add-disk path=...,readonly=on` as a DiskConfig body: the syntax of `--disk`. */
export function addDiskBody(arg: string): Record<string, unknown> {
  try {
    return diskEntry(arg);
  } catch (e) {
    throw new RemoteUsageError((e as Error).message);
  }
}

/** ch-remote's `add-net tap=...,mac=...` as a NetConfig body: the syntax of `--net`. */
/** ch-remote's `add-net` argument as a NetConfig; `fds` (from `fd=`) are this process's taps, sent with the request, not in it. */
export function addNetBody(arg: string): Record<string, unknown> {
  try {
    return netEntry(arg);
  } catch (e) {
    throw new RemoteUsageError((e as Error).message);
  }
}

/**
 * Cloud Hypervisor's `net_fds=[net0@[3,4],net1@[5]]`: for each card, descriptors of this
 * process that are its tap's queues.
 */
export function parseNetFds(v: string): { id: string; fds: number[] }[] {
  try {
    return parseIdIntegerLists('restore', 'net_fds', v).map(({ id, values }) => ({ id, fds: values }));
  } catch (e) {
    throw new RemoteUsageError((e as Error).message);
  }
}

/**
 * A restore body's taps, taken out to go with the request (SCM_RIGHTS) in net_fds order, as
 * ch-remote sends them: each entry keeps its count, its fd numbers become null.
 */
export function takeRestoreFds(body: Record<string, unknown>): { body: Record<string, unknown>; fds: number[] } {
  if (!Array.isArray(body.net_fds)) return { body, fds: [] };
  const entries = body.net_fds as { id: string; num_fds: number; fds: number[] | null }[];
  return { body: { ...body, net_fds: entries.map((e) => ({ ...e, fds: null })) }, fds: entries.flatMap((e) => e.fds ?? []) };
}

/** ch-remote's `restore source_url=...,prefault=on[,net_fds=[ID@[FD,...]]]` as a RestoreConfig body. */
export function restoreBody(arg: string): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  let parts: string[];
  try {
    parts = splitTopLevel(arg);
  } catch (e) {
    throw new RemoteUsageError(`restore: ${(e as Error).message} in "${arg}"`);
  }
  for (const part of parts) {
    const eq = part.indexOf('=');
    const k = eq < 0 ? 'source_url' : part.slice(0, eq);
    const v = eq < 0 ? part : part.slice(eq + 1);
    if (k === 'source_url') body[k] = v;
    else if (k === 'memory_restore_mode') {
      // as ch-remote does: any case on the command line, the contract's spelling on the wire
      const mode = Object.hasOwn(RESTORE_MODES, v.toLowerCase()) ? RESTORE_MODES[v.toLowerCase()] : undefined;
      if (!mode) throw new RemoteUsageError(`restore: memory_restore_mode=${v} must be copy or ondemand`);
      body[k] = mode;
    } else if (k === 'resume' || k === 'prefault') {
      if (v !== 'on' && v !== 'off' && v !== 'true' && v !== 'false') throw new RemoteUsageError(`restore: ${k}=${v} must be on or off`);
      body[k] = v === 'on' || v === 'true';
    } else if (k === 'net_fds') {
      body[k] = parseNetFds(v).map(({ id, fds }) => ({ id, num_fds: fds.length, fds }));
    } else throw new RemoteUsageError(`restore: unknown key ${k}`);
  }
  if (!body.source_url) throw new RemoteUsageError('restore needs source_url=file:///DIR');
  return body;
}

/** The bodies as ch-remote writes them: every field, null for a path not given (the API reads null as absent). */
export type ChRemoteSendBody = Omit<SendMigrationData, 'tls_dir'> & { tls_dir: string | null };
export type ChRemoteReceiveBody = Omit<ReceiveMigrationData, 'tls_dir'> & { tls_dir: string | null; vfio_fds: null };

const SEND_KEYS = ['destination_url', 'local', 'preserve_source', 'downtime_ms', 'timeout_s', 'timeout_strategy', 'connections', 'tls_dir', 'memory_mode'];

/**
 * ch-remote's `send-migration destination_url=URL[,local=on,...]` (or its older form, a bare
 * URL with `--local`) as the SendMigrationData it sends: every field, defaults filled in,
 * checked as ch-remote checks it before sending.
 */
export function sendMigrationBody(arg: string, localFlag = false): ChRemoteSendBody {
  const cmd = 'send-migration';
  const kv = optionValues(cmd, arg, SEND_KEYS, 'destination_url');
  const url = kv.destination_url;
  if (!url) throw new RemoteUsageError(`${cmd}: destination_url is required`);
  checkUrl(cmd, 'destination_url', url);
  const body: ChRemoteSendBody = {
    destination_url: url,
    local: localFlag || (kv.local !== undefined && toggle(cmd, 'local', kv.local)),
    preserve_source: kv.preserve_source !== undefined && toggle(cmd, 'preserve_source', kv.preserve_source),
    downtime_ms: kv.downtime_ms !== undefined ? positive(cmd, 'downtime_ms', kv.downtime_ms) : MIGRATION_DEFAULTS.downtime_ms,
    timeout_s: kv.timeout_s !== undefined ? positive(cmd, 'timeout_s', kv.timeout_s) : MIGRATION_DEFAULTS.timeout_s,
    timeout_strategy: kv.timeout_strategy !== undefined ? contractEnum(cmd, 'timeout_strategy', kv.timeout_strategy, ['Cancel', 'Ignore'] as const) : MIGRATION_DEFAULTS.timeout_strategy,
    connections: kv.connections !== undefined ? positive(cmd, 'connections', kv.connections, MAX_MIGRATION_CONNECTIONS) : 1,
    tls_dir: kv.tls_dir ?? null,
    memory_mode: kv.memory_mode !== undefined ? contractEnum(cmd, 'memory_mode', kv.memory_mode, ['Precopy', 'Postcopy'] as const) : 'Precopy',
  };
  const connections = body.connections ?? 1;
  const unix = url.startsWith('unix:');
  if (unix && connections > 1) throw new RemoteUsageError(`${cmd}: a unix: socket takes one connection`);
  if (unix && body.tls_dir !== null) throw new RemoteUsageError(`${cmd}: TLS works over tcp: only`);
  if (body.local && !unix) throw new RemoteUsageError(`${cmd}: local=on needs a unix: destination_url`);
  if (body.preserve_source && !body.local) throw new RemoteUsageError(`${cmd}: preserve_source=on needs local=on`);
  if (body.memory_mode === 'Postcopy' && (body.local || connections > 1)) {
    throw new RemoteUsageError(`${cmd}: memory_mode=postcopy takes neither local=on nor more than one connection`);
  }
  return body;
}

const RECEIVE_KEYS = ['receiver_url', 'tls_dir', 'memory_mode', 'vfio_fds', 'iommufd_fd', 'zone_updates'];

/** ch-remote's `receive-migration receiver_url=URL[,...]` (or a bare URL) as the ReceiveMigrationData it sends. */
export function receiveMigrationBody(arg: string): ChRemoteReceiveBody {
  const cmd = 'receive-migration';
  const kv = optionValues(cmd, arg, RECEIVE_KEYS, 'receiver_url');
  const url = kv.receiver_url;
  if (!url) throw new RemoteUsageError(`${cmd}: receiver_url is required`);
  checkUrl(cmd, 'receiver_url', url);
  for (const k of ['vfio_fds', 'iommufd_fd']) {
    if (kv[k] !== undefined) throw new RemoteUsageError(`${cmd}: ${k} passes file descriptors, which tern-remote does not send`);
  }
  const tls_dir = kv.tls_dir ?? null;
  if (url.startsWith('unix:') && tls_dir !== null) throw new RemoteUsageError(`${cmd}: TLS works over tcp: only`);
  return {
    receiver_url: url,
    tls_dir,
    memory_mode: kv.memory_mode !== undefined ? contractEnum(cmd, 'memory_mode', kv.memory_mode, ['Precopy', 'Postcopy'] as const) : 'Precopy',
    vfio_fds: null,
    zone_updates: kv.zone_updates !== undefined ? zoneUpdates(cmd, kv.zone_updates) : [],
  };
}

/** `[id@node,id@node]`, ch-remote's list of memory zones and their new host NUMA nodes */
function zoneUpdates(cmd: string, v: string): { id: string; host_numa_node: number }[] {
  const m = /^\[(.*)\]$/.exec(v);
  if (!m) throw new RemoteUsageError(`${cmd}: zone_updates=${v} must be a [ID@NODE,...] list`);
  if (m[1] === '') return [];
  return m[1].split(',').map((item) => {
    const at = item.lastIndexOf('@');
    const id = item.slice(0, at);
    const node = item.slice(at + 1);
    if (at <= 0 || !/^\d+$/.test(node) || Number(node) > 0xffff_ffff) throw new RemoteUsageError(`${cmd}: zone_updates item ${item} must be ID@NODE`);
    return { id, host_numa_node: Number(node) };
  });
}
