// The migration stream's framing. Every frame is a 16-byte header and a payload:
//
//   0  magic "TMIG"   4  u16 type   6  u16 checksum kind   8  u32 payload length
//   12 u32 checksum over header bytes 0..11 and then the payload
//
// (little-endian). Checksum kind 0 is CRC-32; kind 1 is the low 32 bits of XXH64 (seed 0),
// three times as fast on a 16 MiB frame and used by a source once the destination's Accept
// says it reads it (a destination reads both; one that predates kind 1 never says so, and gets
// CRC-32). The receiver checks the magic, the type, the checksum kind, the length against that
// type's cap before it waits for the payload, and the checksum before it looks at a byte of the
// payload, so a corrupt, truncated or hostile stream is refused at the first frame it cannot verify.
import zlib from 'node:zlib';
import { native } from '../native/kvm';
import { TernStateError } from '../state/errors';
import type { PayloadBuffers } from './payload-buffers';

export const FRAME_MAGIC = 0x47494d54; // "TMIG"
export const FRAME_HEADER_BYTES = 16;

export enum FrameType {
  /** source → destination: protocol and schema versions, CPU, memory layout (JSON) */
  Hello = 1,
  /** destination → source: the handshake is accepted (JSON) */
  Accept = 2,
  /** source → destination: the VM config (JSON) */
  Config = 3,
  /** source → destination: the whole store state when the migration starts (JSON) */
  State = 4,
  /** source → destination: guest pages (binary, see memory-frames.ts) */
  Memory = 5,
  /** source → destination: a memory round ended; the state patches since the last (JSON) */
  Round = 6,
  /** source → destination: the VM is paused here; the last patches (saved vCPU/KVM state) */
  Final = 7,
  /** source → destination: nothing more follows; build the VM */
  Complete = 8,
  /** destination → source: the VM is built here and waits for Commit */
  Ready = 9,
  /** source → destination: this side has given the VM up; run it */
  Commit = 10,
  /** destination → source: the VM runs (or is paused as it was) here */
  Running = 11,
  /** either way: the sender gives up, with the reason (JSON) */
  Abort = 12,
  /** destination → source: the State frame is checked and the final checks rehearsed; pause when ready */
  Prepared = 13,
  /** source → destination, first on each extra connection: which migration it joins (JSON) */
  Join = 14,
  /** source → destination on an extra connection: its Memory frames of a round are all sent (JSON) */
  RoundEnd = 15,
  /**
   * destination → source, to a source whose Hello asked (roundsApplied): a Round frame's pages
   * are all in RAM and its patches applied (JSON {round})
   */
  RoundApplied = 16,
}

/** a Memory frame's payload cap: 16 MiB of pages and room for their records */
export const MEMORY_PAYLOAD_MAX_BYTES = 17 << 20;

/** Largest payload per type; a header announcing more is refused before its payload is read. */
const MAX_PAYLOAD: Record<FrameType, number> = {
  [FrameType.Hello]: 1 << 20,
  [FrameType.Accept]: 64 << 10,
  [FrameType.Config]: 1 << 20,
  [FrameType.State]: 64 << 20,
  [FrameType.Memory]: MEMORY_PAYLOAD_MAX_BYTES,
  [FrameType.Round]: 64 << 20,
  [FrameType.Final]: 64 << 20,
  [FrameType.Complete]: 0,
  [FrameType.Ready]: 64 << 10,
  [FrameType.Commit]: 0,
  [FrameType.Running]: 64 << 10,
  [FrameType.Abort]: 64 << 10,
  [FrameType.Prepared]: 64 << 10,
  [FrameType.Join]: 64 << 10,
  [FrameType.RoundEnd]: 64 << 10,
  [FrameType.RoundApplied]: 64 << 10,
};

export class MigrationProtocolError extends TernStateError {
  constructor(message: string) {
    super('MigrationProtocol', message);
  }
}

export interface Frame {
  type: FrameType;
  payload: Buffer;
}

/** How a frame's checksum is computed (header bytes 6..7). */
export enum FrameChecksum {
  Crc32 = 0,
  Xxh64Low32 = 1,
}

/** What a destination's Accept lists in `checksums` for each kind beyond CRC-32. */
export const CHECKSUM_NAMES: Partial<Record<FrameChecksum, string>> = { [FrameChecksum.Xxh64Low32]: 'xxh64' };

function frameChecksum(kind: FrameChecksum, header: Buffer, payload: Uint8Array): number {
  if (kind === FrameChecksum.Crc32) return zlib.crc32(payload, zlib.crc32(header.subarray(0, 12)));
  const { xxh64Init, xxh64Update, xxh64Digest } = native();
  const state = xxh64Init();
  xxh64Update(state, header.subarray(0, 12));
  xxh64Update(state, payload);
  return Number.parseInt(xxh64Digest(state).slice(-8), 16);
}

/** The header of a frame carrying `payload`; write it, then the payload itself. */
export function frameHeader(type: FrameType, payload: Uint8Array, checksum = FrameChecksum.Crc32): Buffer {
  if (payload.length > MAX_PAYLOAD[type]) throw new MigrationProtocolError(`${FrameType[type]} frame of ${payload.length} bytes exceeds its cap of ${MAX_PAYLOAD[type]}`);
  const h = Buffer.alloc(FRAME_HEADER_BYTES);
  h.writeUInt32LE(FRAME_MAGIC, 0);
  h.writeUInt16LE(type, 4);
  h.writeUInt16LE(checksum, 6);
  h.writeUInt32LE(payload.length, 8);
  h.writeUInt32LE(frameChecksum(checksum, h, payload), 12);
  return h;
}

/** A whole frame in one buffer (for small frames). */
export function encodeFrame(type: FrameType, payload: Uint8Array = Buffer.alloc(0), checksum = FrameChecksum.Crc32): Buffer {
  return Buffer.concat([frameHeader(type, payload, checksum), payload]);
}

export function encodeJsonFrame(type: FrameType, value: unknown, checksum = FrameChecksum.Crc32): Buffer {
  return encodeFrame(type, Buffer.from(JSON.stringify(value)), checksum);
}

/** Parse a JSON payload; what it must look like is the caller's to check. */
export function frameJson(frame: Frame): unknown {
  try {
    return JSON.parse(frame.payload.toString('utf8'));
  } catch {
    throw new MigrationProtocolError(`${FrameType[frame.type]} frame: payload is not JSON`);
  }
}

/**
 * Splits a byte stream into verified frames. push() takes bytes as they arrive and returns the
 * frames completed so far; it throws MigrationProtocolError at the first bad header or CRC.
 * It copies what it keeps, once, into the frame's own payload buffer (sized from the header,
 * whose length the type's cap bounds), so the caller may reuse the buffer it pushed.
 */
export class FrameDecoder {
  /** `payloads`: where large Memory payloads come from (the receiving side gives them back) */
  constructor(private readonly payloads?: PayloadBuffers) {}

  private readonly head = Buffer.alloc(FRAME_HEADER_BYTES);
  private headUsed = 0;
  private header?: { type: FrameType; length: number; checksumKind: FrameChecksum; checksum: number; raw: Buffer };
  private payload?: Buffer;
  private payloadUsed = 0;
  private failed = false;

  /** bytes held waiting for the rest of a frame */
  get pendingBytes(): number {
    return this.headUsed + this.payloadUsed;
  }

  private parseHeader(): void {
    const raw = Buffer.from(this.head);
    this.headUsed = 0;
    const magic = raw.readUInt32LE(0);
    if (magic !== FRAME_MAGIC) throw new MigrationProtocolError(`bad frame magic 0x${magic.toString(16)}`);
    const type = raw.readUInt16LE(4) as FrameType;
    if (!(type in MAX_PAYLOAD)) throw new MigrationProtocolError(`unknown frame type ${type}`);
    const checksumKind = raw.readUInt16LE(6) as FrameChecksum;
    if (checksumKind !== FrameChecksum.Crc32 && checksumKind !== FrameChecksum.Xxh64Low32) throw new MigrationProtocolError(`${FrameType[type]} frame: unknown checksum kind ${checksumKind}`);
    const length = raw.readUInt32LE(8);
    if (length > MAX_PAYLOAD[type]) throw new MigrationProtocolError(`${FrameType[type]} frame announces ${length} bytes, more than its cap of ${MAX_PAYLOAD[type]}`);
    this.header = { type, length, checksumKind, checksum: raw.readUInt32LE(12), raw };
    this.payload = type === FrameType.Memory && this.payloads ? this.payloads.take(length) : Buffer.allocUnsafe(length);
    this.payloadUsed = 0;
  }

  push(chunk: Uint8Array): Frame[] {
    if (this.failed) throw new MigrationProtocolError('the stream was already refused');
    const out: Frame[] = [];
    try {
      for (let at = 0; at < chunk.length; ) {
        if (!this.header) {
          const n = Math.min(FRAME_HEADER_BYTES - this.headUsed, chunk.length - at);
          this.head.set(chunk.subarray(at, at + n), this.headUsed);
          this.headUsed += n;
          at += n;
          if (this.headUsed < FRAME_HEADER_BYTES) break;
          this.parseHeader();
        }
        const h = this.header!;
        const payload = this.payload!;
        const n = Math.min(h.length - this.payloadUsed, chunk.length - at);
        payload.set(chunk.subarray(at, at + n), this.payloadUsed);
        this.payloadUsed += n;
        at += n;
        if (this.payloadUsed < h.length) break;
        if (frameChecksum(h.checksumKind, h.raw, payload) !== h.checksum) throw new MigrationProtocolError(`${FrameType[h.type]} frame: checksum mismatch`);
        this.header = undefined;
        this.payload = undefined;
        this.payloadUsed = 0;
        out.push({ type: h.type, payload });
      }
    } catch (e) {
      this.failed = true;
      throw e;
    }
    return out;
  }

  /** The stream ended: anything held is a truncated frame. */
  end(): void {
    if (this.header || this.headUsed) throw new MigrationProtocolError('the stream ended inside a frame (truncated)');
  }
}
