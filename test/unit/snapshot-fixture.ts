// Snapshot inputs built without KVM: the paused state of the schema-2 fixture (a real saved
// VM), upgraded and shrunk to a small RAM, and guest memory held in plain ArrayBuffers.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import type { VmConfig } from '../../src/config/vm-config';
import { GuestMemory, GuestRegion } from '../../src/memory/guest-memory';
import type { WriteSnapshotInput } from '../../src/migration/snapshot';
import { upgradeState, validateState, type RootState } from '../../src/state';

export const REPO = path.resolve(__dirname, '..', '..', '..');
export const SCHEMA2_FIXTURE = path.join(REPO, 'test', 'fixtures', 'snapshot-schema2');
/** a snapshot of snapshotInput()'s VM written by a build of snapshot format 2 (SHA-256 range checksums) */
export const FORMAT2_FIXTURE = path.join(REPO, 'test', 'fixtures', 'snapshot-format2');
export const RAM = 2 << 20;
const PAGE = 4096;

export function tempDir(prefix = 'tern-snapfile-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** A valid paused state with `RAM` bytes of RAM in one region. */
export function pausedState(): RootState {
  const env = JSON.parse(fs.readFileSync(path.join(SCHEMA2_FIXTURE, 'state.json'), 'utf8'));
  const s = structuredClone(upgradeState(env.state)) as any;
  s.vm.config.memory.size = RAM;
  s.memory.regions = [{ guestAddress: 0, size: RAM }];
  validateState(s);
  return s as RootState;
}

/** Guest RAM with data in a few pages (first, scattered, a run across the 1 MiB block edge); the rest zero. */
export function guestMemory(size = RAM): GuestMemory {
  const buf = new ArrayBuffer(size);
  const bytes = new Uint8Array(buf);
  const fill = (page: number, seed: number) => {
    for (let i = 0; i < PAGE; i++) bytes[page * PAGE + i] = (i * 31 + seed) & 0xff || 1;
  };
  fill(0, 1);
  fill(7, 2);
  for (let p = 250; p < 260; p++) fill(p, p);
  fill(size / PAGE - 1, 9);
  return new GuestMemory([new GuestRegion({ guestAddress: 0, size, chunks: [buf], chunkSize: size })]);
}

export function snapshotInput(dir: string, extra: Partial<WriteSnapshotInput> = {}): WriteSnapshotInput {
  const state = pausedState();
  return { dir, config: state.vm.config as VmConfig, state, memory: guestMemory(), ...extra };
}

/** A fresh, zeroed region to restore one range into. */
export function emptyRegion(size = RAM): GuestRegion {
  return new GuestRegion({ guestAddress: 0, size, chunks: [new ArrayBuffer(size)], chunkSize: size });
}

/** A fixture snapshot unpacked into `dir` (its memory is kept gzipped in the repository). */
export function unpackFixture(fixture: string, dir: string): void {
  fs.mkdirSync(dir, { recursive: true });
  for (const f of ['config.json', 'state.json']) fs.copyFileSync(path.join(fixture, f), path.join(dir, f));
  fs.writeFileSync(path.join(dir, 'memory-ranges'), zlib.gunzipSync(fs.readFileSync(path.join(fixture, 'memory-ranges.gz'))));
}

/** The schema-2 fixture unpacked into `dir`. */
export function unpackSchema2(dir: string): void {
  unpackFixture(SCHEMA2_FIXTURE, dir);
}
