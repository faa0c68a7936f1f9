// Command-line arguments of `tern`, in Cloud Hypervisor's spelling: `--option k=v,k=v`.
// The result is a VmConfig (when boot options were given) plus the VMM-level settings.
import { CPU_PROFILES, isCpuProfile } from '../boot/cpu-profile';
import { ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, VmConfig, doubleTtyProblem } from '../config/vm-config';
import type { SeccompMode } from '../native/kvm';
import { OptionError, parseIdIntegerLists, parseInteger, parseIntegerList, parseKeyValues, parseOnOff, parseSize, splitTopLevel } from './option-values';

export interface SocketTarget {
  path?: string;
  fd?: number;
}

export interface RestoreArgs {
  source_url: string;
  resume?: boolean;
  prefault?: boolean;
  memory_restore_mode?: 'copy' | 'ondemand';
  /** --serial given with --restore: where the restored VM's serial output goes now */
  serial?: ConsoleConfig;
  /** --console given with --restore: the same for the virtio console */
  console?: ConsoleConfig;
  /** --net id=ID,tap=NAME given with --restore: the tap a restored card opens instead of its saved one */
  net?: { id: string; tap: string }[];
  /** net_fds=[ID@[FD,...],...]: taps this process holds, the queues of a restored card */
  netFds?: { id: string; fds: number[] }[];
}

export interface TernArgs {
  /** null when no boot option was given: the VMM waits for API calls */
  vm: VmConfig | null;
  apiSocket?: SocketTarget;
  /** --no-shutdown: a guest that powers off leaves the VMM running (Cloud Hypervisor's flag) */
  noShutdown?: boolean;
  eventMonitor?: SocketTarget;
  restore?: RestoreArgs;
  verbosity: number;
  logFile?: string;
  /** --seccomp true|false|log: what a vCPU thread's forbidden system call does (default trap) */
  seccomp: Exclude<SeccompMode, 'errno'>;
  /** --serial-file-max SIZE: cap of a --serial file=PATH output file */
  serialFileMaxBytes?: number;
  version: boolean;
  help: boolean;
}

type Handler = (value: string, acc: Accumulator) => void;

interface Accumulator {
  vm: Partial<VmConfig> & { payload: VmConfig['payload'] };
  vmOptionSeen: boolean;
  args: TernArgs;
}

function consoleConfig(option: string, value: string): ConsoleConfig {
  const kv = parseKeyValues(option, value, ['mode', 'file', 'socket'], 'mode');
  if (kv.file !== undefined) return { mode: 'File', file: kv.file };
  if (kv.socket !== undefined) return { mode: 'Socket', socket: kv.socket };
  const modes: Record<string, ConsoleMode> = { off: 'Off', null: 'Null', tty: 'Tty', pty: 'Pty' };
  const mode = modes[kv.mode ?? ''];
  if (!mode) throw new OptionError(option, `"${value}" is not one of off, null, tty, pty, file=PATH, socket=PATH`);
  return { mode };
}

function socketTarget(option: string, value: string): SocketTarget {
  const kv = parseKeyValues(option, value, ['path', 'fd'], 'path');
  if (kv.fd !== undefined && kv.path !== undefined) throw new OptionError(option, 'give path= or fd=, not both');
  if (kv.fd !== undefined) return { fd: parseInteger(option, 'fd', kv.fd, 0, 1 << 20) };
  if (!kv.path) throw new OptionError(option, 'needs path=PATH or fd=N');
  return { path: kv.path };
}

/** keys whose values are strings in the API's device configs, whatever they look like */
const STRING_KEYS = new Set(['id', 'path', 'file', 'socket', 'tag', 'tap', 'ip', 'mask', 'mac', 'host_mac', 'serial', 'src', 'vhost_socket', 'vhost_mode', 'rate_limit_group']);

/**
 * Generic device list entry: stored as given (numbers and on/off typed). Typed as the config
 * entry it stands for, but unchecked until vm.create's validator checks the whole config
 * (the CLI creates its VM through the same call as the API).
 */
export function deviceEntry<T = Record<string, unknown>>(option: string, value: string, defaults: Record<string, unknown> = {}): T {
  const out: Record<string, unknown> = { ...defaults };
  let parts: string[];
  try {
    parts = splitTopLevel(value);
  } catch (e) {
    throw new OptionError(option, `${(e as Error).message} in "${value}"`);
  }
  for (const part of parts) {
    const eq = part.indexOf('=');
    if (eq <= 0) throw new OptionError(option, `expected key=value, got "${part}"`);
    const k = part.slice(0, eq);
    const v = part.slice(eq + 1);
    out[k] = STRING_KEYS.has(k) ? v : v === 'on' ? true : v === 'off' ? false : /^\d+$/.test(v) ? Number(v) : v;
  }
  return out as T;
}

/**
 * A net card in `--net` (and ch-remote add-net) syntax. `fd=3` or `fd=[3,7]` names taps this
 * process already holds, one per queue pair (the config's `fds`).
 */
export function netEntry(value: string): Record<string, unknown> {
  const net = deviceEntry('--net', value);
  if (net.fd !== undefined) {
    net.fds = parseIntegerList('--net', 'fd', String(net.fd), 0, 0x7fff_ffff, 16);
    delete net.fd;
  }
  return net;
}

/** The command line spells image types in lower case (image_type=qcow2), the API as the contract's enum (Qcow2). */
const IMAGE_TYPES: Record<string, string> = { raw: 'Raw', qcow2: 'Qcow2', fixed_vhd: 'FixedVhd', vhdx: 'Vhdx', unknown: 'Unknown' };

/** A disk in `--disk` (and ch-remote add-disk) syntax: path=P[,readonly=on][,image_type=qcow2]... */
export function diskEntry(value: string): Record<string, unknown> {
  const disk = deviceEntry('--disk', value);
  if (typeof disk.image_type === 'string') {
    const t = IMAGE_TYPES[disk.image_type.toLowerCase()];
    if (!t) throw new OptionError('--disk', `image_type=${disk.image_type}: expected one of ${Object.keys(IMAGE_TYPES).join(', ')}`);
    disk.image_type = t;
  }
  return disk;
}

const vmOption = (fn: Handler): Handler => (value, acc) => {
  acc.vmOptionSeen = true;
  fn(value, acc);
};

const HANDLERS: Record<string, Handler> = {
  '--kernel': vmOption((v, a) => (a.vm.payload.kernel = v)),
  '--initramfs': vmOption((v, a) => (a.vm.payload.initramfs = v)),
  '--cmdline': vmOption((v, a) => (a.vm.payload.cmdline = v)),
  '--firmware': vmOption((v, a) => (a.vm.payload.firmware = v)),
  '--cpus': vmOption((v, a) => {
    const kv = parseKeyValues('--cpus', v, ['boot', 'max', 'topology', 'kvm_hyperv', 'max_phys_bits', 'affinity', 'features', 'nested', 'profile']);
    const boot = kv.boot !== undefined ? parseInteger('--cpus', 'boot', kv.boot, 1, 254) : 1;
    const max = kv.max !== undefined ? parseInteger('--cpus', 'max', kv.max, 1, 254) : boot;
    if (max < boot) throw new OptionError('--cpus', `max=${max} is smaller than boot=${boot}`);
    const cpus: CpusConfig = { boot_vcpus: boot, max_vcpus: max };
    if (kv.kvm_hyperv !== undefined) cpus.kvm_hyperv = parseOnOff('--cpus', 'kvm_hyperv', kv.kvm_hyperv);
    if (kv.max_phys_bits !== undefined) cpus.max_phys_bits = parseInteger('--cpus', 'max_phys_bits', kv.max_phys_bits, 32, 52);
    if (kv.nested !== undefined) cpus.nested = parseOnOff('--cpus', 'nested', kv.nested);
    if (kv.profile !== undefined) {
      if (!isCpuProfile(kv.profile)) throw new OptionError('--cpus', `profile="${kv.profile}" is not one of ${CPU_PROFILES.join(', ')}`);
      cpus.tern_profile = kv.profile;
    }
    a.vm.cpus = cpus;
  }),
  '--memory': vmOption((v, a) => {
    const kv = parseKeyValues('--memory', v, ['size', 'shared', 'hugepages', 'hugepage_size', 'mergeable', 'prefault', 'thp', 'hotplug_method', 'hotplug_size', 'hotplugged_size']);
    const memory: MemoryConfig = { size: kv.size !== undefined ? parseSize('--memory', 'size', kv.size) : 512 << 20 };
    if (memory.size < 16 << 20) throw new OptionError('--memory', `size=${kv.size} is below the 16M minimum`);
    if (memory.size % 4096 !== 0) throw new OptionError('--memory', `size=${kv.size} is not a multiple of 4K`);
    for (const flag of ['shared', 'hugepages', 'mergeable', 'prefault', 'thp'] as const) {
      if (kv[flag] !== undefined) memory[flag] = parseOnOff('--memory', flag, kv[flag]);
    }
    if (kv.hotplug_size !== undefined) memory.hotplug_size = parseSize('--memory', 'hotplug_size', kv.hotplug_size);
    a.vm.memory = memory;
  }),
  '--serial': vmOption((v, a) => (a.vm.serial = consoleConfig('--serial', v))),
  '--console': vmOption((v, a) => (a.vm.console = consoleConfig('--console', v))),
  '--disk': vmOption((v, a) => (a.vm.disks = [...(a.vm.disks ?? []), diskEntry(v)])),
  '--net': vmOption((v, a) => (a.vm.net = [...(a.vm.net ?? []), netEntry(v)])),
  // Cloud Hypervisor's CLI defaults for the fields its API requires
  '--fs': vmOption((v, a) => (a.vm.fs = [...(a.vm.fs ?? []), deviceEntry('--fs', v, { num_queues: 1, queue_size: 1024 })])),
  '--pmem': vmOption((v, a) => (a.vm.pmem = [...(a.vm.pmem ?? []), deviceEntry('--pmem', v)])),
  '--device': vmOption((v, a) => (a.vm.devices = [...(a.vm.devices ?? []), deviceEntry('--device', v)])),
  '--rng': vmOption((v, a) => (a.vm.rng = { src: '/dev/urandom', ...deviceEntry('--rng', v) })),
  '--vsock': vmOption((v, a) => (a.vm.vsock = deviceEntry('--vsock', v))),
  '--api-socket': (v, a) => (a.args.apiSocket = socketTarget('--api-socket', v)),
  '--event-monitor': (v, a) => (a.args.eventMonitor = socketTarget('--event-monitor', v)),
  '--log-file': (v, a) => (a.args.logFile = v),
  '--seccomp': (v, a) => {
    const modes: Record<string, TernArgs['seccomp']> = { true: 'trap', false: 'off', log: 'log' };
    const mode = modes[v];
    if (!mode) throw new OptionError('--seccomp', `"${v}" is not one of true, false, log`);
    a.args.seccomp = mode;
  },
  '--serial-file-max': (v, a) => (a.args.serialFileMaxBytes = parseSize('--serial-file-max', 'size', v)),
  '--restore': (v, a) => {
    const kv = parseKeyValues('--restore', v, ['source_url', 'resume', 'prefault', 'memory_restore_mode', 'net_fds'], 'source_url');
    if (!kv.source_url) throw new OptionError('--restore', 'needs source_url=file:///DIR');
    const r: RestoreArgs = { source_url: kv.source_url };
    if (kv.resume !== undefined) r.resume = parseOnOff('--restore', 'resume', kv.resume);
    if (kv.prefault !== undefined) r.prefault = parseOnOff('--restore', 'prefault', kv.prefault);
    if (kv.memory_restore_mode !== undefined) {
      if (kv.memory_restore_mode !== 'copy' && kv.memory_restore_mode !== 'ondemand') {
        throw new OptionError('--restore', `memory_restore_mode="${kv.memory_restore_mode}" must be copy or ondemand`);
      }
      r.memory_restore_mode = kv.memory_restore_mode;
    }
    if (kv.net_fds !== undefined) r.netFds = parseIdIntegerLists('--restore', 'net_fds', kv.net_fds).map(({ id, values }) => ({ id, fds: values }));
    a.args.restore = r;
  },
};

const FLAGS: Record<string, (a: Accumulator) => void> = {
  '-v': (a) => a.args.verbosity++,
  '-vv': (a) => (a.args.verbosity += 2),
  '-vvv': (a) => (a.args.verbosity += 3),
  '--version': (a) => (a.args.version = true),
  '-V': (a) => (a.args.version = true),
  '--help': (a) => (a.args.help = true),
  '--no-shutdown': (a) => (a.args.noShutdown = true),
  '-h': (a) => (a.args.help = true),
};

export const TERN_OPTIONS = [...Object.keys(HANDLERS), ...Object.keys(FLAGS)];

/** Options that describe one device each and may repeat. */
const LIST_OPTIONS = new Set(['--disk', '--net', '--fs', '--pmem', '--device', '--user-device', '--vdpa']);

export function parseTernArgs(argv: string[]): TernArgs {
  const acc: Accumulator = {
    vm: { payload: {} },
    vmOptionSeen: false,
    args: { vm: null, verbosity: 0, seccomp: 'trap', version: false, help: false },
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let inline: string | undefined;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      inline = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const flag = FLAGS[arg];
    if (flag && inline === undefined) {
      flag(acc);
      continue;
    }
    const handler = HANDLERS[arg];
    if (!handler) throw new OptionError(arg, arg.startsWith('-') ? 'unknown option' : 'unexpected argument');
    const value = inline ?? argv[++i];
    if (value === undefined) throw new OptionError(arg, 'needs a value');
    handler(value, acc);
    // Like Cloud Hypervisor's, a list option takes several values after one flag:
    // `--disk path=a path=b` is `--disk path=a --disk path=b`.
    if (LIST_OPTIONS.has(arg) && inline === undefined) while (i + 1 < argv.length && !argv[i + 1].startsWith('-')) handler(argv[++i], acc);
  }
  if (acc.args.restore && acc.vmOptionSeen) {
    // Only host ends may be chosen anew (the consoles', the cards' taps); the rest comes from the snapshot.
    const { payload, serial, console, net, ...rest } = acc.vm;
    if ((serial || console || net) && Object.keys(payload).length === 0 && Object.keys(rest).length === 0) {
      if (serial) acc.args.restore.serial = serial;
      if (console) acc.args.restore.console = console;
      if (net) acc.args.restore.net = net.map(restoredTap);
      acc.vmOptionSeen = false;
    }
  }
  if (acc.vmOptionSeen) {
    if (acc.args.restore) throw new OptionError('--restore', 'cannot be combined with boot options (--kernel, --cpus, ...)');
    if (!acc.vm.payload.kernel && !acc.vm.payload.firmware) {
      throw new OptionError('--kernel', 'a VM needs --kernel (or --firmware)');
    }
    const tty = doubleTtyProblem(acc.vm);
    if (tty) throw new OptionError('--serial', `${tty} (add --console off)`);
    acc.args.vm = acc.vm as VmConfig;
  }
  if (acc.args.restore && acc.args.vm) {
    throw new OptionError('--restore', 'cannot be combined with boot options (--kernel, --cpus, ...)');
  }
  return acc.args;
}

/** A --net given with --restore: which card (id=) opens which tap (tap=), nothing else. */
function restoredTap(net: Record<string, unknown>): { id: string; tap: string } {
  const keys = Object.keys(net).sort().join(',');
  if (keys !== 'id,tap' || typeof net.id !== 'string' || typeof net.tap !== 'string') {
    throw new OptionError('--net', 'with --restore, --net takes id=ID,tap=NAME only: the tap a restored card opens');
  }
  return { id: net.id, tap: net.tap };
}

export const TERN_USAGE = `Usage: tern [OPTIONS]
  --kernel PATH            Linux kernel: ELF vmlinux with a PVH note, or bzImage
  --initramfs PATH         initramfs image
  --cmdline STRING         kernel command line
  --cpus boot=N[,max=M][,profile=NAME]
                           vCPUs; profile: the CPU features the guest sees, reduced to a
                           baseline hosts share (x86-64, x86-64-v2, -v3, -v4; default host)
  --memory size=SIZE[,shared=on|off]
  --serial off|null|tty|file=PATH     16550A UART at 0x3f8 (default null)
  --serial-file-max SIZE   cap of the serial file; output beyond it is dropped (default 64M)
  --console off|null|tty|file=PATH    virtio console, the guest's hvc0 (default tty;
                           off with --serial tty: one tty, one device)
  --api-socket path=PATH|fd=N         HTTP API on a UNIX socket
  --event-monitor path=PATH|fd=N      event stream, one JSON object per event
  --no-shutdown            a guest that powers off leaves the VMM running (VM state Shutdown),
                           for an API client to boot it again
  --restore source_url=file:///DIR[,resume=on][,memory_restore_mode=copy|ondemand][,prefault=on]
            [,net_fds=[ID@[FD,...],...]]
                           (--serial, --console and --net id=ID,tap=NAME may be given with it;
                           net_fds: taps tern inherited, a restored card's queues)
  --log-file PATH          pino JSON log (default stderr)
  --seccomp true|false|log vCPU threads' seccomp filter: a forbidden system call ends the
                           process (true, default), is only logged by the kernel (log), or
                           there is no filter (false)
  -v, -vv                  more log detail
  -V, --version            print the version`;
