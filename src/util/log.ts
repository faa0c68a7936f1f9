// pino JSON logs on stderr or --log-file. Verbosity follows Cloud Hypervisor: errors and
// warnings by default, -v info, -vv debug, -vvv trace.
import pino, { Logger } from 'pino';

export type { Logger };

const LEVELS = ['warn', 'info', 'debug', 'trace'] as const;

export function createLogger(opts: { verbosity: number; logFile?: string }): Logger {
  const level = LEVELS[Math.min(opts.verbosity, LEVELS.length - 1)];
  // Synchronous destination: a VMM that exits on guest poweroff must not lose its last lines.
  const dest = opts.logFile
    ? pino.destination({ dest: opts.logFile, sync: true, append: true, mkdir: true })
    : pino.destination({ fd: 2, sync: true });
  return pino({ level, base: { pid: process.pid }, name: 'tern' }, dest);
}

/** A logger that writes nothing, for library use and tests. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
