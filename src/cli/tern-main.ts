// `tern`: parse Cloud Hypervisor-style options, then create and boot the VM through the same
// operations the HTTP API runs (VmmApi), so both paths check and record things identically.
// Loading this module only defines the CLI; runTern() runs it (from the plain bundle, or from a
// V8 startup snapshot that holds every module already loaded: see tern-snapshot.ts).
import os from 'node:os';
import { PerformanceObserver } from 'node:perf_hooks';
import { ApiError } from '../api/errors';
import { EventMonitor } from '../api/event-monitor';
import { ApiServer } from '../api/server';
import { VmmApi } from '../api/vmm-api';
import { OptionError } from './option-values';
import { parseTernArgs, TERN_USAGE, type TernArgs } from './tern-args';
import { createLogger, type Logger } from '../util/log';
import { Vmm } from '../vmm/vmm';
import { restoredCardsOnTaps } from '../vmm/net-backend';
import { GuestEvents, MigrationEvents, VmEvents, VmmEvents, type GuestPanicPayload, type VmFailedPayload, type VmOperationFailedPayload } from '../state';
import { TERN_VERSION } from '../version';

function fail(message: string, code: number): never {
  process.stderr.write(`tern: ${message}\n`);
  process.exit(code);
}

function describeError(e: unknown): string {
  if (e instanceof ApiError) return e.chain.join(': ');
  return (e as Error).message;
}

async function main(): Promise<void> {
  let args: TernArgs;
  try {
    args = parseTernArgs(process.argv.slice(2));
  } catch (e) {
    if (e instanceof OptionError) fail(`error: ${e.message}`, 2);
    throw e;
  }
  if (args.help) {
    process.stdout.write(`${TERN_USAGE}\n`);
    return;
  }
  if (args.version) {
    process.stdout.write(`tern v${TERN_VERSION}\n`);
    return;
  }
  if (!args.vm && !args.apiSocket && !args.restore) {
    fail('error: nothing to run: give --kernel (and friends) or --api-socket', 2);
  }
  const log: Logger = createLogger({ verbosity: args.verbosity, logFile: args.logFile });
  if (log.isLevelEnabled('debug')) logLongGcPauses(log);
  const vmm = new Vmm({ log, seccomp: args.seccomp, serialFileMaxBytes: args.serialFileMaxBytes });
  const api = new VmmApi(vmm);

  // The monitor subscribes before the first event so it sees "vmm starting".
  let monitor: EventMonitor | undefined;
  if (args.eventMonitor) {
    try {
      monitor = EventMonitor.open(vmm.store, args.eventMonitor, log);
    } catch (e) {
      fail(`error: --event-monitor: ${(e as Error).message}`, 1);
    }
  }

  let server: ApiServer | undefined;
  let exiting = false;
  const exit = async (code: number, why: string): Promise<void> => {
    if (exiting) return;
    exiting = true;
    log.info({ code, why }, 'VMM shutting down');
    try {
      await vmm.shutdownVmm();
    } catch (e) {
      log.error({ err: e }, 'error while releasing the VM');
      code = code || 1;
    }
    await server?.close().catch((e) => log.error({ err: e }, 'error while closing the API socket'));
    monitor?.close();
    process.exit(code);
  };

  // A guest that powers off ends the VMM, as in Cloud Hypervisor; with --no-shutdown the VM
  // just reports Shutdown and the VMM waits for an API call to boot it again.
  // A panic or a fatal VM error recorded before that shutdown makes the exit code 1.
  let failure: string | undefined;
  vmm.store.events$.subscribe((ev) => {
    if (ev.type === GuestEvents.Panic) failure = `guest panic (${(ev.payload as GuestPanicPayload).detail ?? 'panic'})`;
    else if (ev.type === VmmEvents.VmFailed) failure = (ev.payload as VmFailedPayload).message;
    // The VM runs at the migration's destination now: this VMM's work is done, as in Cloud Hypervisor.
    else if (ev.type === MigrationEvents.Finished) {
      // Releasing the VM (its RAM, its KVM objects) is work for the kernel that a destination
      // on this host (a local migration, an upgrade in place) must not wait behind: its guest
      // runs now. (Linux sets this on the calling thread only: the JavaScript thread, which
      // releases the VM and ends the process; the vCPU threads have stopped by then.)
      try {
        os.setPriority(19);
      } catch {
        /* not allowed: tear down at the usual priority */
      }
      void exit(0, 'VM migrated');
    }
    else if (ev.type === VmEvents.Shutdown && ev.source === 'vm' && !args.noShutdown) {
      void exit(failure ? 1 : 0, failure ? `VM failed: ${failure}` : 'guest powered off');
    } else if (ev.type === VmEvents.OperationFailed && (ev.payload as VmOperationFailedPayload).status === 'Shutdown' && !args.apiSocket) {
      // A reboot (or resume) that failed left no guest running, and nothing can boot one again.
      void exit(1, `VM failed: ${(ev.payload as VmOperationFailedPayload).message}`);
    }
  });
  // SIGUSR2 logs a picture of the machine (vCPU threads, console UART, virtio queues from the
  // device's and the driver's side), for a guest that seems stuck; the VM runs on.
  // With it go a few samples of where each vCPU is in the guest (each vCPU parked for a moment).
  process.on('SIGUSR2', () => {
    let health;
    try {
      health = vmm.health();
    } catch (e) {
      log.error({ err: e }, 'the health report failed');
      return;
    }
    vmm.sampleVcpus().then(
      (vcpuSamples) => log.warn({ health, vcpuSamples }, 'health report'),
      (e: unknown) => log.warn({ health, vcpuSamples: { notSampled: (e as Error).message } }, 'health report'),
    );
  });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => void exit(0, sig));
  }

  vmm.announceStart();
  log.info({ version: TERN_VERSION, argv: process.argv.slice(2) }, 'VMM starting');

  if (args.apiSocket) {
    try {
      server = await ApiServer.listen(args.apiSocket, { api, log, onVmmShutdown: () => void exit(0, 'vmm.shutdown') });
    } catch (e) {
      process.stderr.write(`tern: error: --api-socket: ${(e as Error).message}\n`);
      await exit(1, 'API socket unavailable');
      return;
    }
    log.info({ socket: args.apiSocket }, 'HTTP API listening');
  }
  if (args.restore) {
    try {
      const { netFds, ...restore } = args.restore;
      // (taps this process was given: the restored VM holds them; a restore that fails exits)
      if (netFds) restore.net = [...(restore.net ?? []), ...restoredCardsOnTaps(netFds, restore.net)];
      await vmm.restore(restore);
    } catch (e) {
      log.error({ err: e }, 'VM failed to restore');
      process.stderr.write(`tern: error: restore: ${describeError(e)}\n`);
      await exit(1, 'VM failed to restore');
    }
  }
  if (args.vm) {
    try {
      await api.create(args.vm, { heldFds: true });
      await api.boot();
    } catch (e) {
      log.error({ err: e }, 'VM failed to start');
      process.stderr.write(`tern: error: ${describeError(e)}\n`);
      await exit(1, 'VM failed to start');
    }
  }
}

/** Run the CLI on this process's arguments. */
export function runTern(): void {
  main().catch((e) => {
    process.stderr.write(`tern: internal error: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

/**
 * Debug: every garbage-collection pause of 5 ms or more, as a line of its own. The VMM's work
 * (device exits, a migration's pause) runs on this one thread, so a long collection is a stall
 * that the other lines cannot explain.
 */
function logLongGcPauses(log: Logger): void {
  const observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      if (e.duration >= 5) log.debug({ gc_ms: Math.round(e.duration), gc_kind: (e as unknown as { detail?: { kind?: number } }).detail?.kind }, 'garbage collection');
    }
  });
  observer.observe({ entryTypes: ['gc'] });
}
