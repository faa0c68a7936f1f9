// What the two sides say before any state moves: the source's Hello (who it is, what its guest
// needs) and the checks the destination makes of it before it accepts.
import os from 'node:os';
import type { CpuidEntry } from '../native/kvm';
import { ROOT_SCHEMA_VERSION, STATE_UPGRADES, type RamRegionState } from '../state';
import { MigrationProtocolError } from './frames';
import { MAX_MIGRATION_CONNECTIONS } from './migration-options';

/** 1: this framing and these frames; 2: the destination answers the State frame with Prepared */
export const MIGRATION_PROTOCOL_VERSION = 2;

export interface Hello {
  protocol: number;
  /** root schema version of the state the source sends */
  schemaVersion: number;
  /** the source's Tern version, for the logs */
  tern: string;
  local: boolean;
  /** guest RAM layout */
  regions: RamRegionState[];
  /** what the guest's vCPUs were given, and the MSRs the source's KVM saves */
  cpuid: CpuidEntry[];
  msrIndices: number[];
  /** TCP connections the source would use, this one included (absent: 1); memory frames spread over them */
  connections?: number;
  /**
   * The source reads RoundApplied frames: it pauses the guest only once the destination has
   * every round in RAM, so that none of that writing falls inside the pause. (Absent: an older
   * source, which is sent none.)
   */
  roundsApplied?: boolean;
}

/** The oldest root schema the upgraders lift to this build's. */
export function oldestReadableSchema(): number {
  let v = ROOT_SCHEMA_VERSION;
  while (STATE_UPGRADES[v - 1]) v--;
  return v;
}

const isUint32 = (v: unknown): v is number => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 0xffffffff;

/** A Hello from outside: its shape, then whether this build can take it at all. */
export function checkHello(raw: unknown, transport: { fds: number }): Hello {
  const h = raw as Hello;
  if (typeof h !== 'object' || h === null || Array.isArray(h)) throw new MigrationProtocolError('Hello: not an object');
  if (h.protocol !== MIGRATION_PROTOCOL_VERSION) {
    throw new MigrationProtocolError(`protocol version ${String(h.protocol)} is not supported (this VMM speaks ${MIGRATION_PROTOCOL_VERSION})`);
  }
  const oldest = oldestReadableSchema();
  if (!Number.isInteger(h.schemaVersion) || h.schemaVersion < oldest || h.schemaVersion > ROOT_SCHEMA_VERSION) {
    throw new MigrationProtocolError(`state schema ${String(h.schemaVersion)} cannot be received (this VMM reads ${oldest}..${ROOT_SCHEMA_VERSION})`);
  }
  if (typeof h.local !== 'boolean') throw new MigrationProtocolError('Hello: local must be a boolean');
  if (!Array.isArray(h.regions) || h.regions.length === 0 || h.regions.length > 64) throw new MigrationProtocolError('Hello: regions must list 1..64 RAM regions');
  let end = 0;
  let total = 0;
  for (const r of h.regions) {
    const ok = typeof r === 'object' && r !== null && Number.isSafeInteger(r.guestAddress) && Number.isSafeInteger(r.size) &&
      r.size > 0 && r.guestAddress % 4096 === 0 && r.size % 4096 === 0 && r.guestAddress >= end;
    if (!ok) throw new MigrationProtocolError('Hello: RAM regions must be page-aligned and in address order');
    end = r.guestAddress + r.size;
    total += r.size;
  }
  if (total > os.totalmem()) throw new MigrationProtocolError(`the guest has ${total} bytes of RAM, more than this host's ${os.totalmem()}`);
  if (h.local && transport.fds !== h.regions.length) {
    throw new MigrationProtocolError(`a local migration needs one memory fd per RAM region (${h.regions.length}); ${transport.fds} arrived`);
  }
  if (!h.local && transport.fds !== 0) throw new MigrationProtocolError('memory fds arrived for a migration that is not local');
  if (!Array.isArray(h.cpuid) || h.cpuid.length > 512) throw new MigrationProtocolError('Hello: cpuid must be a list of CPUID entries');
  for (const e of h.cpuid) {
    if (typeof e !== 'object' || e === null || ![e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx].every(isUint32)) {
      throw new MigrationProtocolError('Hello: malformed CPUID entry');
    }
  }
  if (!Array.isArray(h.msrIndices) || h.msrIndices.length > 4096 || !h.msrIndices.every(isUint32)) {
    throw new MigrationProtocolError('Hello: msrIndices must be a list of MSR numbers');
  }
  if (h.connections !== undefined) {
    if (!Number.isInteger(h.connections) || h.connections < 1 || h.connections > MAX_MIGRATION_CONNECTIONS) {
      throw new MigrationProtocolError(`Hello: connections must be 1..${MAX_MIGRATION_CONNECTIONS}`);
    }
    if (h.connections > 1 && (h.local || transport.fds > 0)) throw new MigrationProtocolError('Hello: a local migration takes one connection');
  }
  if (h.roundsApplied !== undefined && typeof h.roundsApplied !== 'boolean') throw new MigrationProtocolError('Hello: roundsApplied must be a boolean');
  return { ...h, tern: typeof h.tern === 'string' ? h.tern.slice(0, 64) : 'unknown' };
}
