// Shared by the disk image tests: temporary directories, qemu-img, a seeded random source.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'tern-block-'));
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

export interface CheckResult {
  corruptions: number;
  leaks: number;
  errors: number;
}

/** `qemu-img check` as numbers (it exits non-zero on leaks and corruption alike). */
export function qemuCheck(image: string): CheckResult {
  const r = spawnSync('qemu-img', ['check', '--output=json', '-f', 'qcow2', image], { encoding: 'utf8' });
  const j = JSON.parse(r.stdout) as Record<string, number>;
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, errors: j['check-errors'] ?? 0 };
}

/** The image's guest-visible bytes as qemu-img sees them. */
export function qemuToRaw(image: string): Buffer {
  const out = `${image}.raw-out`;
  qemuImg('convert', '-O', 'raw', image, out);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

/** xorshift32: reproducible test data and operation sequences. */
export function rng(seed: number): (n: number) => number {
  let s = seed >>> 0 || 1;
  return (n: number) => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s % n;
  };
}

export function randomBytes(rand: (n: number) => number, len: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = rand(256);
  return b;
}
