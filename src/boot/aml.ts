// An encoder for ACPI Machine Language (ACPI 6.x, chapter 20 "ACPI Machine Language
// Specification"; resource descriptors from chapter 6.4). Builders return AmlCode values that
// nest: a Device holds Names, a Name holds a Package or a ResourceTemplate, and so on. Plain
// numbers and strings are accepted wherever a data object is, and become Integer / String
// encodings; names used as references are built with `path()`.

/** Encoded AML for one term, data object or name string. */
export class AmlCode {
  constructor(readonly bytes: Uint8Array) {}
  get length(): number {
    return this.bytes.length;
  }
}

/** Anything that encodes as a data object or term argument. */
export type AmlValue = AmlCode | number | bigint | string;

export class AmlError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AmlError';
  }
}

// Opcodes (ACPI 6.5, 20.3 "AML Byte Stream Byte Values").
export const Op = {
  Zero: 0x00,
  One: 0x01,
  Alias: 0x06,
  Name: 0x08,
  BytePrefix: 0x0a,
  WordPrefix: 0x0b,
  DWordPrefix: 0x0c,
  StringPrefix: 0x0d,
  QWordPrefix: 0x0e,
  Scope: 0x10,
  Buffer: 0x11,
  Package: 0x12,
  VarPackage: 0x13,
  Method: 0x14,
  DualNamePrefix: 0x2e,
  MultiNamePrefix: 0x2f,
  ExtPrefix: 0x5b,
  RootChar: 0x5c,
  ParentPrefixChar: 0x5e,
  Local0: 0x60,
  Arg0: 0x68,
  Store: 0x70,
  Add: 0x72,
  Subtract: 0x74,
  ShiftLeft: 0x79,
  ShiftRight: 0x7a,
  And: 0x7b,
  Or: 0x7d,
  Notify: 0x86,
  LAnd: 0x90,
  LOr: 0x91,
  LNot: 0x92,
  LEqual: 0x93,
  LGreater: 0x94,
  LLess: 0x95,
  If: 0xa0,
  Else: 0xa1,
  Return: 0xa4,
  Ones: 0xff,
} as const;

/** Opcodes that follow ExtPrefix (0x5b). */
export const ExtOp = {
  Mutex: 0x01,
  OpRegion: 0x80,
  Field: 0x81,
  Device: 0x82,
} as const;

export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const len = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(len);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function code(...parts: (Uint8Array | number[])[]): AmlCode {
  return new AmlCode(concat(parts.map((p) => (p instanceof Uint8Array ? p : Uint8Array.from(p)))));
}

/**
 * PkgLength encoding of `value` as is (FieldElement lengths use this: the value is a bit
 * count and does not include the encoding's own bytes).
 */
export function encodePkgLengthValue(value: number): Uint8Array {
  if (!Number.isInteger(value) || value < 0 || value >= 1 << 28) {
    throw new AmlError(`PkgLength value ${value} out of range (0..2^28-1)`);
  }
  if (value < 0x40) return Uint8Array.of(value);
  const follow = value < 1 << 12 ? 1 : value < 1 << 20 ? 2 : 3;
  const out = new Uint8Array(1 + follow);
  out[0] = (follow << 6) | (value & 0x0f);
  for (let i = 0; i < follow; i++) out[1 + i] = (value >>> (4 + 8 * i)) & 0xff;
  return out;
}

/**
 * PkgLength for a package whose contents after the PkgLength are `contentLength` bytes: the
 * encoded length counts the PkgLength bytes themselves.
 */
export function pkgLength(contentLength: number): Uint8Array {
  for (let n = 1; n <= 4; n++) {
    const total = contentLength + n;
    const limit = n === 1 ? 0x40 : 1 << (4 + 8 * (n - 1));
    if (total < limit) return encodePkgLengthValue(total);
  }
  throw new AmlError(`package of ${contentLength} bytes is too long for a PkgLength`);
}

const SEG_RE = /^[A-Z_][A-Z0-9_]{0,3}$/;

function nameSeg(seg: string): number[] {
  if (!SEG_RE.test(seg)) throw new AmlError(`invalid AML name segment '${seg}'`);
  const padded = seg.padEnd(4, '_');
  return Array.from(padded, (c) => c.charCodeAt(0));
}

/**
 * NameString for an ASL-style path: optional '\' root or '^' parent prefixes, then
 * dot-separated segments of up to four characters ("\_SB.PCI0", "^COM1", "_S5").
 */
export function nameString(p: string): Uint8Array {
  const out: number[] = [];
  let i = 0;
  if (p[0] === '\\') {
    out.push(Op.RootChar);
    i = 1;
  } else {
    while (p[i] === '^') {
      out.push(Op.ParentPrefixChar);
      i++;
    }
  }
  const rest = p.slice(i);
  const segs = rest === '' ? [] : rest.split('.');
  if (segs.length === 0) out.push(0x00);
  else if (segs.length === 1) out.push(...nameSeg(segs[0]));
  else if (segs.length === 2) out.push(Op.DualNamePrefix, ...nameSeg(segs[0]), ...nameSeg(segs[1]));
  else {
    if (segs.length > 255) throw new AmlError(`name '${p}' has too many segments`);
    out.push(Op.MultiNamePrefix, segs.length);
    for (const s of segs) out.push(...nameSeg(s));
  }
  return Uint8Array.from(out);
}

/** A reference to a named object (as a term argument, package element or Notify target). */
export function path(p: string): AmlCode {
  return new AmlCode(nameString(p));
}

const MAX_U64 = (1n << 64n) - 1n;

/** Integer data object in its shortest encoding (Zero, One, Byte/Word/DWord/QWord). */
export function integer(v: number | bigint): AmlCode {
  if (typeof v === 'number' && !Number.isSafeInteger(v)) {
    throw new AmlError(`AML integer ${v} is not a safe integer; pass a bigint`);
  }
  const b = BigInt(v);
  if (b < 0n || b > MAX_U64) throw new AmlError(`AML integer ${v} out of range (0..2^64-1)`);
  if (b === 0n) return code([Op.Zero]);
  if (b === 1n) return code([Op.One]);
  const le = (n: number) => {
    const out = [];
    for (let i = 0; i < n; i++) out.push(Number((b >> BigInt(8 * i)) & 0xffn));
    return out;
  };
  if (b <= 0xffn) return code([Op.BytePrefix, ...le(1)]);
  if (b <= 0xffffn) return code([Op.WordPrefix, ...le(2)]);
  if (b <= 0xffff_ffffn) return code([Op.DWordPrefix, ...le(4)]);
  return code([Op.QWordPrefix, ...le(8)]);
}

/** The Ones constant (all bits set). */
export const ones = (): AmlCode => code([Op.Ones]);

/** String data object: ASCII, NUL-terminated. */
export function string(s: string): AmlCode {
  const bytes = Array.from(s, (c) => c.charCodeAt(0));
  if (bytes.some((c) => c < 1 || c > 0x7f)) throw new AmlError(`AML string '${s}' must be ASCII without NUL`);
  return code([Op.StringPrefix, ...bytes, 0]);
}

/** Encode a value: AmlCode as is, numbers as Integer, strings as String. */
export function value(v: AmlValue): AmlCode {
  if (v instanceof AmlCode) return v;
  if (typeof v === 'string') return string(v);
  return integer(v);
}

function values(vs: readonly AmlValue[]): Uint8Array {
  return concat(vs.map((v) => value(v).bytes));
}

function withPkgLength(prefix: number[], body: Uint8Array): AmlCode {
  return code(prefix, pkgLength(body.length), body);
}

/** Name(path, value) */
export function name(p: string, v: AmlValue): AmlCode {
  return code([Op.Name], nameString(p), value(v).bytes);
}

/** Scope(path) { terms } */
export function scope(p: string, terms: readonly AmlCode[]): AmlCode {
  return withPkgLength([Op.Scope], concat([nameString(p), ...terms.map((t) => t.bytes)]));
}

/** Device(path) { terms } */
export function device(p: string, terms: readonly AmlCode[]): AmlCode {
  return withPkgLength([Op.ExtPrefix, ExtOp.Device], concat([nameString(p), ...terms.map((t) => t.bytes)]));
}

export interface MethodOptions {
  /** number of arguments, 0..7 */
  args?: number;
  serialized?: boolean;
  /** 0..15 */
  syncLevel?: number;
}

/** Method(path, args, Serialized|NotSerialized, syncLevel) { terms } */
export function method(p: string, opts: MethodOptions, terms: readonly AmlCode[]): AmlCode {
  const args = opts.args ?? 0;
  const sync = opts.syncLevel ?? 0;
  if (!Number.isInteger(args) || args < 0 || args > 7) throw new AmlError(`method ${p}: ${args} arguments (0..7)`);
  if (!Number.isInteger(sync) || sync < 0 || sync > 15) throw new AmlError(`method ${p}: sync level ${sync} (0..15)`);
  const flags = args | (opts.serialized ? 0x08 : 0) | (sync << 4);
  return withPkgLength([Op.Method], concat([nameString(p), Uint8Array.of(flags), ...terms.map((t) => t.bytes)]));
}

/** Package(){ elements } (VarPackage beyond 255 elements). */
export function pkg(elements: readonly AmlValue[]): AmlCode {
  const body = values(elements);
  if (elements.length <= 255) return withPkgLength([Op.Package], concat([Uint8Array.of(elements.length), body]));
  return withPkgLength([Op.VarPackage], concat([integer(elements.length).bytes, body]));
}

/** Buffer(){ bytes } */
export function buffer(bytes: Uint8Array | readonly number[]): AmlCode {
  const data = bytes instanceof Uint8Array ? bytes : Uint8Array.from(bytes);
  return withPkgLength([Op.Buffer], concat([integer(data.length).bytes, data]));
}

/** Compressed EISA ID ("PNP0501") as the DWord integer ASL's EisaId() produces. */
export function eisaId(id: string): AmlCode {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new AmlError(`invalid EISA ID '${id}'`);
  const c = (i: number) => (id.charCodeAt(i) - 0x40) & 0x1f;
  const b0 = (c(0) << 2) | (c(1) >> 3);
  const b1 = ((c(1) & 7) << 5) | c(2);
  const b2 = parseInt(id.slice(3, 5), 16);
  const b3 = parseInt(id.slice(5, 7), 16);
  return integer((b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)) >>> 0);
}

export function arg(n: number): AmlCode {
  if (!Number.isInteger(n) || n < 0 || n > 6) throw new AmlError(`Arg${n} does not exist (Arg0..Arg6)`);
  return code([Op.Arg0 + n]);
}

export function local(n: number): AmlCode {
  if (!Number.isInteger(n) || n < 0 || n > 7) throw new AmlError(`Local${n} does not exist (Local0..Local7)`);
  return code([Op.Local0 + n]);
}

/** Return(value) */
export function ret(v: AmlValue): AmlCode {
  return code([Op.Return], value(v).bytes);
}

/** Store(source, destination) */
export function store(src: AmlValue, dst: AmlCode): AmlCode {
  return code([Op.Store], value(src).bytes, dst.bytes);
}

/** Invoke a method: path(args...) */
export function call(p: string, args: readonly AmlValue[] = []): AmlCode {
  return code(nameString(p), values(args));
}

/** Notify(object, value) */
export function notify(target: AmlCode, v: AmlValue): AmlCode {
  return code([Op.Notify], target.bytes, value(v).bytes);
}

function binary(op: number) {
  return (a: AmlValue, b: AmlValue, target?: AmlCode): AmlCode =>
    code([op], value(a).bytes, value(b).bytes, target ? target.bytes : [0x00]);
}

/** Add / Subtract / And / Or / ShiftLeft / ShiftRight (a, b, optional target). */
export const add = binary(Op.Add);
export const subtract = binary(Op.Subtract);
export const and = binary(Op.And);
export const or = binary(Op.Or);
export const shiftLeft = binary(Op.ShiftLeft);
export const shiftRight = binary(Op.ShiftRight);

function logical(op: number) {
  return (a: AmlValue, b: AmlValue): AmlCode => code([op], value(a).bytes, value(b).bytes);
}

export const lEqual = logical(Op.LEqual);
export const lGreater = logical(Op.LGreater);
export const lLess = logical(Op.LLess);
export const lAnd = logical(Op.LAnd);
export const lOr = logical(Op.LOr);
export function lNot(a: AmlValue): AmlCode {
  return code([Op.LNot], value(a).bytes);
}

/** If(predicate) { terms } */
export function ifThen(predicate: AmlValue, terms: readonly AmlCode[]): AmlCode {
  return withPkgLength([Op.If], concat([value(predicate).bytes, ...terms.map((t) => t.bytes)]));
}

/** Else { terms } — place directly after an ifThen. */
export function elseDo(terms: readonly AmlCode[]): AmlCode {
  return withPkgLength([Op.Else], concat(terms.map((t) => t.bytes)));
}

export const RegionSpace = {
  SystemMemory: 0x00,
  SystemIO: 0x01,
  PciConfig: 0x02,
  EmbeddedControl: 0x03,
  SMBus: 0x04,
  SystemCMOS: 0x05,
  PciBarTarget: 0x06,
} as const;

/** OperationRegion(name, space, offset, length) */
export function operationRegion(p: string, space: number, offset: AmlValue, length: AmlValue): AmlCode {
  return code([Op.ExtPrefix, ExtOp.OpRegion], nameString(p), [space], value(offset).bytes, value(length).bytes);
}

export const FieldAccess = { Any: 0, Byte: 1, Word: 2, DWord: 3, QWord: 4, Buffer: 5 } as const;
export const FieldUpdate = { Preserve: 0, WriteAsOnes: 1, WriteAsZeros: 2 } as const;

/** A named field of `bits` bits, or `bits` of padding when name is omitted (Offset/skips). */
export interface FieldUnit {
  name?: string;
  bits: number;
}

export interface FieldOptions {
  access?: number;
  lock?: boolean;
  update?: number;
}

/** Field(region, access, Lock|NoLock, update) { units } */
export function field(region: string, opts: FieldOptions, units: readonly FieldUnit[]): AmlCode {
  const flags = (opts.access ?? FieldAccess.Any) | (opts.lock ? 0x10 : 0) | ((opts.update ?? FieldUpdate.Preserve) << 5);
  const list = units.map((u) =>
    u.name === undefined
      ? concat([Uint8Array.of(0x00), encodePkgLengthValue(u.bits)])
      : concat([Uint8Array.from(nameSeg(u.name)), encodePkgLengthValue(u.bits)]),
  );
  return withPkgLength([Op.ExtPrefix, ExtOp.Field], concat([nameString(region), Uint8Array.of(flags), ...list]));
}

// ---- Resource descriptors (ACPI 6.5, 6.4 "Resource Data Types for ACPI") ----

function u16le(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff];
}
function u32le(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}

function checkRange(what: string, v: number, max: number): void {
  if (!Number.isInteger(v) || v < 0 || v > max) throw new AmlError(`${what} ${v} out of range (0..${max})`);
}

export interface IrqFlags {
  /** edge-triggered (default) rather than level */
  edge?: boolean;
  activeLow?: boolean;
  shared?: boolean;
  wake?: boolean;
}

export const Resource = {
  /** IO(Decode16|Decode10, min, max, alignment, length) — small item 0x08. */
  io(min: number, max: number, alignment: number, length: number, decode16 = true): Uint8Array {
    checkRange('IO minimum', min, 0xffff);
    checkRange('IO maximum', max, 0xffff);
    checkRange('IO alignment', alignment, 0xff);
    checkRange('IO length', length, 0xff);
    return Uint8Array.from([0x47, decode16 ? 1 : 0, ...u16le(min), ...u16le(max), alignment, length]);
  },

  /** IRQNoFlags(){irqs} — small item 0x04, ISA edge/active-high. */
  irqNoFlags(irqs: readonly number[]): Uint8Array {
    let mask = 0;
    for (const i of irqs) {
      checkRange('IRQ', i, 15);
      mask |= 1 << i;
    }
    return Uint8Array.from([0x22, ...u16le(mask)]);
  },

  /** IRQ(Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared){irqs} — small item 0x04 with flags. */
  irq(flags: IrqFlags, irqs: readonly number[]): Uint8Array {
    let mask = 0;
    for (const i of irqs) {
      checkRange('IRQ', i, 15);
      mask |= 1 << i;
    }
    const f =
      ((flags.edge ?? true) ? 0x01 : 0) | (flags.activeLow ? 0x08 : 0) | (flags.shared ? 0x10 : 0) | (flags.wake ? 0x20 : 0);
    return Uint8Array.from([0x23, ...u16le(mask), f]);
  },

  /** Interrupt(ResourceConsumer|Producer, Edge|Level, ActiveHigh|Low, Exclusive|Shared){gsis} — large item 0x09. */
  interrupt(flags: IrqFlags & { consumer?: boolean }, gsis: readonly number[]): Uint8Array {
    if (gsis.length < 1 || gsis.length > 255) throw new AmlError(`Interrupt() needs 1..255 interrupts, got ${gsis.length}`);
    const f =
      ((flags.consumer ?? true) ? 0x01 : 0) |
      ((flags.edge ?? true) ? 0x02 : 0) |
      (flags.activeLow ? 0x04 : 0) |
      (flags.shared ? 0x08 : 0) |
      (flags.wake ? 0x10 : 0);
    const body: number[] = [f, gsis.length];
    for (const g of gsis) {
      checkRange('GSI', g, 0xffff_ffff);
      body.push(...u32le(g));
    }
    return Uint8Array.from([0x89, ...u16le(body.length), ...body]);
  },

  /** Memory32Fixed(ReadWrite|ReadOnly, base, length) — large item 0x06. */
  memory32Fixed(base: number, length: number, readWrite = true): Uint8Array {
    checkRange('Memory32Fixed base', base, 0xffff_ffff);
    checkRange('Memory32Fixed length', length, 0xffff_ffff);
    return Uint8Array.from([0x86, ...u16le(9), readWrite ? 1 : 0, ...u32le(base), ...u32le(length)]);
  },
};

/** Address space descriptor resource types (ACPI 6.5, 6.4.3.5). */
export const AddressSpaceType = { Memory: 0, Io: 1, BusNumber: 2 } as const;

/** Memory caching types of an address space descriptor's _MEM field. */
export const MemoryCaching = { NonCacheable: 0, Cacheable: 1, WriteCombining: 2, Prefetchable: 3 } as const;

/** What an address space descriptor carries beyond its numbers; defaults fit a bridge's window. */
export interface AddressSpaceFlags {
  /** ResourceProducer (a bridge's window, default) or ResourceConsumer */
  consumer?: boolean;
  /** type-specific flags byte (memory: _RW | _MEM << 1; I/O: _RNG) */
  typeFlags?: number;
}

/** Address space fields in order: granularity, minimum, maximum, translation offset, length. */
function addressSpace(
  tag: number,
  bytes: 2 | 4 | 8,
  type: number,
  flags: AddressSpaceFlags,
  min: number | bigint,
  length: number | bigint,
): Uint8Array {
  const lo = BigInt(min);
  const len = BigInt(length);
  const limit = 1n << BigInt(8 * bytes);
  if (len < 1n || lo < 0n || lo + len > limit) {
    throw new AmlError(`address space 0x${lo.toString(16)}+0x${len.toString(16)} does not fit ${bytes}-byte fields`);
  }
  const field = (v: bigint) => Array.from({ length: bytes }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
  // General flags: MinFixed and MaxFixed (the window is exactly this range), positive decode.
  const general = (flags.consumer ? 0x01 : 0) | 0x04 | 0x08;
  const body = [type, general, flags.typeFlags ?? 0, ...field(0n), ...field(lo), ...field(lo + len - 1n), ...field(0n), ...field(len)];
  return Uint8Array.from([tag, ...u16le(body.length), ...body]);
}

export const AddressResource = {
  /** WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, count) */
  wordBusNumber(first: number, count: number, flags: AddressSpaceFlags = {}): Uint8Array {
    return addressSpace(0x88, 2, AddressSpaceType.BusNumber, flags, first, count);
  },
  /** WordIO(..., EntireRange, 0, min, min + length - 1, 0, length) */
  wordIo(min: number, length: number, flags: AddressSpaceFlags = {}): Uint8Array {
    return addressSpace(0x88, 2, AddressSpaceType.Io, { typeFlags: 3, ...flags }, min, length);
  },
  /** DWordMemory(..., NonCacheable, ReadWrite, 0, min, min + length - 1, 0, length) */
  dwordMemory(min: number, length: number, flags: AddressSpaceFlags = {}): Uint8Array {
    return addressSpace(0x87, 4, AddressSpaceType.Memory, { typeFlags: 1, ...flags }, min, length);
  },
  /** QWordMemory(..., NonCacheable, ReadWrite, 0, min, min + length - 1, 0, length) */
  qwordMemory(min: number | bigint, length: number | bigint, flags: AddressSpaceFlags = {}): Uint8Array {
    return addressSpace(0x8a, 8, AddressSpaceType.Memory, { typeFlags: 1, ...flags }, min, length);
  },
};

/** ResourceTemplate(){ descriptors } — a Buffer ending with an End Tag (checksum 0: not checked). */
export function resourceTemplate(descriptors: readonly Uint8Array[]): AmlCode {
  return buffer(concat([...descriptors, Uint8Array.of(0x79, 0x00)]));
}

/** A TermList's bytes, for a definition block body. */
export function termList(terms: readonly AmlCode[]): Uint8Array {
  return concat(terms.map((t) => t.bytes));
}
