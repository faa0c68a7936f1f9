// Locations of the guest material built by scripts/guest-fixtures.sh and
// scripts/lab-initramfs.sh, and the calls that (re)build it on demand.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as path from 'node:path';

export const DEFAULT_FIXTURES_DIR = '/var/cache/tern/fixtures';

/** The fixtures cache: $TERN_FIXTURES or /var/cache/tern/fixtures (never /tmp: the lab cannot see a tmpfs /tmp). */
export function fixturesDir(): string {
  return path.resolve(process.env.TERN_FIXTURES || DEFAULT_FIXTURES_DIR);
}

export interface GuestFixtures {
  dir: string;
  /** Debian bzImage (boot/vmlinuz-*). */
  bzImage: string;
  /** ELF kernel with the PVH entry note. */
  vmlinux: string;
  /** busybox initramfs whose /init follows the TERN-GUEST-* contract. */
  initramfs: string;
  /** The kernel's lib/modules/<release> tree. */
  modules: string;
  /** Kernel config of the package. */
  config: string;
}

export function guestFixtures(dir = fixturesDir()): GuestFixtures {
  return {
    dir,
    bzImage: path.join(dir, 'bzImage'),
    vmlinux: path.join(dir, 'vmlinux'),
    initramfs: path.join(dir, 'initramfs.img'),
    modules: path.join(dir, 'modules'),
    config: path.join(dir, 'config'),
  };
}

export interface LabFixtures {
  kernel: string;
  initramfs: string;
  /** Job files go here: inside the fixtures dir, so the lab sees them through 9p. */
  jobsDir: string;
}

export function labFixtures(dir = fixturesDir()): LabFixtures {
  return {
    kernel: path.join(dir, 'bzImage'),
    initramfs: path.join(dir, 'lab', 'initramfs.img'),
    jobsDir: path.join(dir, 'lab', 'jobs'),
  };
}

/** The project's scripts/ folder, found upwards from this file (works from test/ and dist/test/, in any clone). */
export function scriptsDir(): string {
  let d = __dirname;
  for (;;) {
    const candidate = path.join(d, 'scripts');
    if (existsSync(path.join(candidate, 'guest-fixtures.sh'))) return candidate;
    const up = path.dirname(d);
    if (up === d) throw new Error(`scripts/guest-fixtures.sh not found above ${__dirname}`);
    d = up;
  }
}

function runScript(name: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('bash', [path.join(scriptsDir(), name)], { maxBuffer: 16 << 20 }, (err, _stdout, stderr) => {
      if (err) reject(new Error(`${name} failed: ${err.message}\n${stderr}`));
      else resolve();
    });
  });
}

let guestBuild: Promise<void> | undefined;
let labBuild: Promise<void> | undefined;

/** Builds the guest fixtures if needed (fast when up to date); once per process. */
export function ensureGuestFixtures(): Promise<GuestFixtures> {
  guestBuild ??= runScript('guest-fixtures.sh').catch((e) => {
    guestBuild = undefined;
    throw e;
  });
  return guestBuild.then(() => guestFixtures());
}

/** Builds the guest fixtures and the lab initramfs if needed; once per process. */
export function ensureLabFixtures(): Promise<LabFixtures> {
  labBuild ??= runScript('lab-initramfs.sh').catch((e) => {
    labBuild = undefined;
    throw e;
  });
  return labBuild.then(() => labFixtures());
}
