#!/usr/bin/env node
// `tern`: parse Cloud Hypervisor-style options, then create and boot the VM through the same
// VMM calls the HTTP API uses.
import { OptionError } from './option-values';
import { parseTernArgs, TERN_USAGE, type TernArgs } from './tern-args';
import { createLogger, type Logger } from '../util/log';
import { Vmm } from '../vmm/vmm';
import { VmEvents } from '../state';
import { TERN_VERSION } from '../version';

function fail(message: string, code: number): never {
  process.stderr.write(`tern: ${message}\n`);
  process.exit(code);
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
  const vmm = new Vmm({ log });
  log.info({ version: TERN_VERSION, argv: process.argv.slice(2) }, 'VMM starting');

  let exiting = false;
  const exit = async (code: number, why: string): Promise<void> => {
    if (exiting) return;
    exiting = true;
    log.info({ code, why }, 'VMM shutting down');
    try {
      await vmm.close();
    } catch (e) {
      log.error({ err: e }, 'error while releasing the VM');
      code = code || 1;
    }
    process.exit(code);
  };

  // Without an API to ask for a new boot, a guest that powers off ends the VMM.
  vmm.store.events$.subscribe((ev) => {
    if (ev.type === VmEvents.Shutdown && ev.source === 'vm' && !args.apiSocket) {
      void exit(vmm.failure ? 1 : 0, vmm.failure ? `VM failed: ${vmm.failure}` : 'guest powered off');
    }
  });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => void exit(0, sig));
  }

  if (args.apiSocket) {
    log.warn('the HTTP API is not available in this build; --api-socket is ignored');
  }
  if (args.vm) {
    try {
      await vmm.create(args.vm);
      await vmm.boot();
    } catch (e) {
      log.error({ err: e }, 'VM failed to start');
      process.stderr.write(`tern: error: ${(e as Error).message}\n`);
      await vmm.close().catch(() => undefined);
      process.exit(1);
    }
  }
}

main().catch((e) => {
  process.stderr.write(`tern: internal error: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
