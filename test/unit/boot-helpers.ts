// Synthetic kernel images and shared helpers for the boot tests.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { GuestMemory, anonymousGuestMemory } from '../../src/memory/guest-memory';
import { ramRegions } from '../../src/boot/layout';

export const MiB = 1024 * 1024;

export function memoryOf(size: number): GuestMemory {
  return anonymousGuestMemory(ramRegions(size));
}

export interface ElfSegmentSpec {
  paddr: number;
  vaddr?: bigint;
  data: Uint8Array;
  memsz?: number;
}

export interface ElfSpec {
  segments: ElfSegmentSpec[];
  /** PVH entry; omit for no note */
  pvhEntry?: number;
  /** size of the PHYS32_ENTRY descriptor: Linux uses 8 (_ASM_PTR), some kernels 4 */
  pvhDescSize?: 4 | 8;
  /** extra notes placed before the PVH one */
  otherNotes?: { name: string; type: number; desc: Uint8Array }[];
  machine?: number;
  elfClass?: number;
}

function note(name: string, type: number, desc: Uint8Array): Uint8Array {
  const nameBytes = Buffer.from(name + '\0', 'latin1');
  const pad = (n: number) => (n + 3) & ~3;
  const out = new Uint8Array(12 + pad(nameBytes.length) + pad(desc.length));
  const dv = new DataView(out.buffer);
  dv.setUint32(0, nameBytes.length, true);
  dv.setUint32(4, desc.length, true);
  dv.setUint32(8, type, true);
  out.set(nameBytes, 12);
  out.set(desc, 12 + pad(nameBytes.length));
  return out;
}

/** A minimal ELF64 x86-64 executable: PT_LOAD segments and a PT_NOTE with Xen notes. */
export function buildElf(spec: ElfSpec): Buffer {
  const notes: Uint8Array[] = [];
  for (const n of spec.otherNotes ?? []) notes.push(note(n.name, n.type, n.desc));
  if (spec.pvhEntry !== undefined) {
    const size = spec.pvhDescSize ?? 8;
    const desc = new Uint8Array(size);
    const dv = new DataView(desc.buffer);
    if (size === 8) dv.setBigUint64(0, BigInt(spec.pvhEntry), true);
    else dv.setUint32(0, spec.pvhEntry, true);
    notes.push(note('Xen', 18, desc));
  }
  const noteBytes = Buffer.concat(notes);
  const phnum = spec.segments.length + (noteBytes.length ? 1 : 0);
  const phoff = 64;
  let off = phoff + phnum * 56;
  const noteOff = off;
  off += noteBytes.length;
  const segOffs: number[] = [];
  for (const s of spec.segments) {
    off = (off + 15) & ~15;
    segOffs.push(off);
    off += s.data.length;
  }
  const file = Buffer.alloc(off);
  file.set([0x7f, 0x45, 0x4c, 0x46, spec.elfClass ?? 2, 1, 1, 0], 0);
  file.writeUInt16LE(2, 16); // ET_EXEC
  file.writeUInt16LE(spec.machine ?? 62, 18);
  file.writeUInt32LE(1, 20);
  file.writeBigUInt64LE(0xffffffff81000000n, 24); // e_entry (virtual; unused for PVH)
  file.writeBigUInt64LE(BigInt(phoff), 32);
  file.writeUInt16LE(64, 52);
  file.writeUInt16LE(56, 54);
  file.writeUInt16LE(phnum, 56);
  let ph = phoff;
  spec.segments.forEach((s, i) => {
    file.writeUInt32LE(1, ph); // PT_LOAD
    file.writeUInt32LE(5, ph + 4);
    file.writeBigUInt64LE(BigInt(segOffs[i]), ph + 8);
    file.writeBigUInt64LE(s.vaddr ?? 0xffffffff80000000n + BigInt(s.paddr), ph + 16);
    file.writeBigUInt64LE(BigInt(s.paddr), ph + 24);
    file.writeBigUInt64LE(BigInt(s.data.length), ph + 32);
    file.writeBigUInt64LE(BigInt(s.memsz ?? s.data.length), ph + 40);
    file.writeBigUInt64LE(0x200000n, ph + 48);
    file.set(s.data, segOffs[i]);
    ph += 56;
  });
  if (noteBytes.length) {
    file.writeUInt32LE(4, ph); // PT_NOTE
    file.writeBigUInt64LE(BigInt(noteOff), ph + 8);
    file.writeBigUInt64LE(BigInt(noteBytes.length), ph + 32);
    file.writeBigUInt64LE(BigInt(noteBytes.length), ph + 40);
    file.writeBigUInt64LE(4n, ph + 48);
    file.set(noteBytes, noteOff);
  }
  return file;
}

export interface BzSpec {
  setupSects?: number;
  version?: number;
  loadflags?: number;
  xloadflags?: number;
  initrdAddrMax?: number;
  kernelAlignment?: number;
  relocatable?: boolean;
  cmdlineSize?: number;
  prefAddress?: number;
  initSize?: number;
  /** the protected-mode kernel; padded to 16 bytes */
  payload: Uint8Array;
  /** header end = 0x202 + jumpByte */
  jumpByte?: number;
}

/** A bzImage-shaped file: real-mode setup sectors with a setup header, then the payload. */
export function buildBzImage(spec: BzSpec): Buffer {
  const setupSects = spec.setupSects ?? 4;
  const setupSize = (setupSects + 1) * 512;
  const payloadLen = (spec.payload.length + 15) & ~15;
  const f = Buffer.alloc(setupSize + payloadLen);
  // Recognisable filler in the setup code area so header copying can be checked.
  for (let i = 0x1f1; i < setupSize; i++) f[i] = (i * 7) & 0xff;
  f[0] = 0x4d;
  f[1] = 0x5a; // "MZ": the PE header that EFI-bootable kernels carry
  f[0x1f1] = spec.setupSects ?? 4;
  f.writeUInt16LE(0, 0x1f2);
  f.writeUInt32LE(payloadLen / 16, 0x1f4);
  f.writeUInt16LE(0xffff, 0x1fa);
  f.writeUInt16LE(0xaa55, 0x1fe);
  f[0x200] = 0xeb;
  f[0x201] = spec.jumpByte ?? 0x6a;
  f.write('HdrS', 0x202, 'latin1');
  f.writeUInt16LE(spec.version ?? 0x020f, 0x206);
  f[0x210] = 0;
  f[0x211] = spec.loadflags ?? 0x01;
  f.writeUInt32LE(0x100000, 0x214);
  f.writeUInt32LE(0, 0x218);
  f.writeUInt32LE(0, 0x21c);
  f.writeUInt32LE(0, 0x228);
  f.writeUInt32LE(spec.initrdAddrMax ?? 0x7fffffff, 0x22c);
  f.writeUInt32LE(spec.kernelAlignment ?? 0x200000, 0x230);
  f[0x234] = (spec.relocatable ?? true) ? 1 : 0;
  f[0x235] = 0x15;
  f.writeUInt16LE(spec.xloadflags ?? 0x7f, 0x236);
  f.writeUInt32LE(spec.cmdlineSize ?? 0x7ff, 0x238);
  f.writeUInt32LE(0, 0x23c);
  f.writeBigUInt64LE(0n, 0x240);
  f.writeUInt32LE(0x2cc, 0x248);
  f.writeUInt32LE(payloadLen, 0x24c);
  f.writeBigUInt64LE(0n, 0x250);
  f.writeBigUInt64LE(BigInt(spec.prefAddress ?? 0x1000000), 0x258);
  f.writeUInt32LE(spec.initSize ?? 0x400000, 0x260);
  f.writeUInt32LE(0x190, 0x264);
  f.writeUInt32LE(0, 0x268);
  f.set(spec.payload, setupSize);
  return f;
}

export function pattern(len: number, seed: number): Uint8Array {
  const out = new Uint8Array(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

export function which(cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* keep looking */
    }
  }
  return undefined;
}

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function run(cmd: string, args: string[], cwd: string): { stdout: string; stderr: string; status: number } {
  try {
    const stdout = execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    return { stdout, stderr: '', status: 0 };
  } catch (e) {
    const err = e as { stdout?: string; stderr?: string; status?: number };
    return { stdout: err.stdout ?? '', stderr: err.stderr ?? '', status: err.status ?? -1 };
  }
}

export const FIXTURES_DIR = process.env.TERN_FIXTURES ?? '/var/cache/tern/fixtures';

export function fixture(name: string): string | undefined {
  const p = path.join(FIXTURES_DIR, name);
  return fs.existsSync(p) ? p : undefined;
}
