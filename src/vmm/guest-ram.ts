// Guest RAM for a machine, in its three origins: new memfds for a boot, a snapshot's
// memory-ranges file (read in, or mapped copy-on-write on demand), and a migration's (new
// memfds the stream fills, or the source's own memfds handed over). Each slot is registered with
// KVM without dirty logging (a migration turns it on for its rounds: while KVM logs a slot it
// maps it in 4 KiB pages only), advised to use transparent huge pages unless the config says
// thp=off, and gets the VMM-side dirty bitmap its writers mark.
import fs from 'node:fs';
import { GuestMemory, GuestRegion } from '../memory/guest-memory';
import { copyMemoryRange, openMemoryFile, verifyRangeInRam, type MemoryRange } from '../migration/memory-ranges';
import { SnapshotError } from '../migration/snapshot-error';
import { native, type NativeVm } from '../native/kvm';
import type { RamRegionState } from '../state';

export interface GuestRam {
  memory: GuestMemory;
  /** each slot's memfd (owned by the KVM VM, valid until it closes) */
  slotFds: number[];
  /** memfds mapped shared: the RAM can be handed to another process (local migration) */
  shared: boolean;
}

export interface SnapshotRam {
  memoryPath: string;
  ranges: readonly MemoryRange[];
  /** per-range checksums a copy restore verifies (absent for a format-1 snapshot) */
  rangeChecksums?: readonly string[];
  /** copy: read RAM in now; ondemand: map the file copy-on-write, pages load on first touch */
  mode: 'copy' | 'ondemand';
  /** ondemand: touch every page now */
  prefault?: boolean;
  /** the saved config's memory.thp (a copy restore's new memfds) */
  hugePages: boolean;
}

export interface IncomingRam {
  /** the RAM layout the source announced */
  regions: readonly RamRegionState[];
  /** a local migration's memfds, one per region, mapped shared: the source's RAM itself */
  fds?: readonly number[];
}

/**
 * A migration destination's RAM is made before the config arrives, so it takes memory.thp's
 * default (on): a migrated VM whose config says thp=off is still advised huge pages here.
 */
const INCOMING_HUGE_PAGES = true;

/**
 * [start, end, ...]: where the file behind a shared mapping holds data (lseek SEEK_DATA/SEEK_HOLE).
 * A memfd page the guest never touched is a hole and reads as zero.
 */
export function fileDataRanges(fd: number, size: number): number[] {
  const { seekData, seekHole } = native();
  const out: number[] = [];
  for (let at = 0; at < size; ) {
    const data = seekData(fd, at);
    if (data < 0 || data >= size) break;
    const hole = Math.min(seekHole(fd, data), size);
    out.push(data, hole);
    at = hole;
  }
  return out;
}

/** `backingFd`: a file the slot maps shared from its offset 0 (not a snapshot's, which is private) */
function region(vm: NativeVm, slot: number, guestAddress: number, size: number, info: { chunks?: ArrayBuffer[]; chunkSize: number }, backingFd?: number): GuestRegion {
  return new GuestRegion({
    backingFd,
    ...(backingFd !== undefined && { dataRanges: () => fileDataRanges(backingFd, size) }),
    guestAddress,
    size,
    // Deferred chunks: a restore need not touch RAM from JS, and V8 runs a full GC on first sight.
    chunks: info.chunks ?? (() => vm.memoryChunks(slot)),
    chunkSize: info.chunkSize,
    dirtyBitmap: vm.vmmDirtyBitmap(slot),
  });
}

/** How every slot is registered: no dirty log until a migration asks; huge pages as configured. */
const slotDefaults = (hugePages: boolean) => ({ name: 'tern-ram', dirtyLogging: false, hugePages });

/** New, zeroed RAM for a boot; `hugePages`: the config's memory.thp. */
export function createRam(vm: NativeVm, layout: readonly RamRegionState[], hugePages: boolean): GuestRam {
  const slotFds: number[] = [];
  const regions = layout.map((r, slot) => {
    const info = vm.addMemorySlot({ slot, guestAddress: BigInt(r.guestAddress), size: r.size, ...slotDefaults(hugePages) });
    slotFds[slot] = info.fd;
    return region(vm, slot, r.guestAddress, r.size, info, info.fd);
  });
  return { memory: new GuestMemory(regions), slotFds, shared: true };
}

/** Read one byte of every page so the file-backed mapping is populated now. */
function prefault(r: GuestRegion): void {
  let sink = 0;
  for (let off = 0; off < r.size; off += 4096) sink ^= r.view(off, 1)![0];
  void sink;
}

/**
 * RAM of a restored machine: the slots recorded in the saved state, so the guest sees the
 * physical map it was saved with; memory-ranges must hold exactly those.
 */
export function snapshotRam(vm: NativeVm, r: SnapshotRam): GuestRam {
  // readSnapshot checked the table against the state; the file is opened anew, so check
  // again that it is a regular file long enough for every range (a mapping past its end
  // would fault the VMM at the guest's first touch).
  const { fd, size } = openMemoryFile(r.memoryPath);
  try {
    const end = Math.max(...r.ranges.map((x) => x.fileOffset + x.length));
    if (size < end) throw new SnapshotError(`${r.memoryPath}: file is ${size} bytes, shorter than its range table needs (${end})`);
    const ondemand = r.mode === 'ondemand';
    const slotFds: number[] = [];
    const regions = r.ranges.map((range, slot) => {
      const info = vm.addMemorySlot({
        slot,
        guestAddress: BigInt(range.guestAddress),
        size: range.length,
        ...slotDefaults(r.hugePages),
        deferChunks: true,
        ...(ondemand ? { fromFd: fd, fileOffset: range.fileOffset, privateMap: true } : {}),
      });
      slotFds[slot] = info.fd;
      const reg = region(vm, slot, range.guestAddress, range.length, info);
      if (!ondemand) copyMemoryRange(r.memoryPath, fd, range, slot, info.fd, r.rangeChecksums?.[slot]);
      else if (r.prefault) {
        // Every page is touched now anyway: hashing them as they come costs CPU only.
        const sum = r.rangeChecksums?.[slot];
        if (sum === undefined) prefault(reg);
        else verifyRangeInRam(r.memoryPath, range, slot, reg, sum);
      }
      return reg;
    });
    // A private mapping of the snapshot file: its pages are this process's alone.
    return { memory: new GuestMemory(regions), slotFds, shared: !ondemand };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * RAM of a migration destination: new zeroed memfds the stream fills, or (local migration) the
 * source's own memfds mapped shared, so no byte of RAM is copied.
 */
export function incomingRam(vm: NativeVm, inc: IncomingRam): GuestRam {
  if (inc.fds && inc.fds.length !== inc.regions.length) throw new Error(`${inc.fds.length} memory fds for ${inc.regions.length} RAM regions`);
  const slotFds: number[] = [];
  const regions = inc.regions.map((r, slot) => {
    const info = vm.addMemorySlot({
      slot,
      guestAddress: BigInt(r.guestAddress),
      size: r.size,
      ...slotDefaults(INCOMING_HUGE_PAGES),
      deferChunks: true,
      ...(inc.fds ? { fromFd: inc.fds[slot], fileOffset: 0 } : {}),
    });
    slotFds[slot] = info.fd;
    // (the stream's pages are written through the memfd: no page fault for each)
    return region(vm, slot, r.guestAddress, r.size, info, info.fd);
  });
  return { memory: new GuestMemory(regions), slotFds, shared: true };
}
