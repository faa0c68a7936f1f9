// ACPI tables for a hardware-reduced x86 platform (ACPI 6.x): RSDP -> XSDT -> FADT (-> DSDT),
// MADT, plus any extra tables a caller adds. Table builders are pure (bytes out);
// writeAcpiTables places them in the 0xe0000..0x100000 window and returns their addresses.

import { GuestAddress, GuestMemory } from '../memory/guest-memory';
import * as aml from './aml';
import { BootError } from './errors';
import {
  ACPI_PM_REGISTER_BIT_WIDTH,
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_STATUS_PORT,
} from '../devices/acpi-pm';
import type { DeviceAcpi } from '../devices/model';
import {
  ACPI_TABLES_END,
  ACPI_TABLES_START,
  IOAPIC_ADDRESS,
  LAPIC_ADDRESS,
  RSDP_ADDRESS,
  alignUp,
  hex,
} from './layout';

export const ACPI_OEM_ID = 'TERN  ';
export const ACPI_OEM_TABLE_ID = 'TERNVMM ';
export const ACPI_OEM_REVISION = 1;
export const ACPI_CREATOR_ID = 'TERN';
export const ACPI_CREATOR_REVISION = 1;

const SDT_HEADER_SIZE = 36;
export const RSDP_SIZE = 36;
export const FADT_SIZE = 276;

/** Sum of bytes mod 256. */
export function byteSum(bytes: Uint8Array): number {
  let s = 0;
  for (const b of bytes) s = (s + b) & 0xff;
  return s;
}

/** The value that makes `bytes` (with the checksum byte at 0) sum to zero. */
function checksumOf(bytes: Uint8Array): number {
  return (0x100 - byteSum(bytes)) & 0xff;
}

function ascii(dst: Uint8Array, off: number, s: string, len: number): void {
  if (s.length !== len || !/^[\x20-\x7e]*$/.test(s)) throw new Error(`ACPI field '${s}' must be ${len} printable ASCII chars`);
  for (let i = 0; i < len; i++) dst[off + i] = s.charCodeAt(i);
}

/** An SDT: 36-byte header + body, checksum at offset 9 fixed up. */
export function buildSdt(signature: string, revision: number, body: Uint8Array, oemTableId = ACPI_OEM_TABLE_ID): Uint8Array {
  const t = new Uint8Array(SDT_HEADER_SIZE + body.length);
  const dv = new DataView(t.buffer);
  ascii(t, 0, signature, 4);
  dv.setUint32(4, t.length, true);
  t[8] = revision;
  ascii(t, 10, ACPI_OEM_ID, 6);
  ascii(t, 16, oemTableId, 8);
  dv.setUint32(24, ACPI_OEM_REVISION, true);
  ascii(t, 28, ACPI_CREATOR_ID, 4);
  dv.setUint32(32, ACPI_CREATOR_REVISION, true);
  t.set(body, SDT_HEADER_SIZE);
  t[9] = checksumOf(t);
  return t;
}

/** RSDP revision 2 (ACPI 2.0+ layout): both checksums, XSDT only (RSDT address 0). */
export function buildRsdp(xsdtAddress: GuestAddress): Uint8Array {
  const t = new Uint8Array(RSDP_SIZE);
  const dv = new DataView(t.buffer);
  ascii(t, 0, 'RSD PTR ', 8);
  ascii(t, 9, ACPI_OEM_ID, 6);
  t[15] = 2;
  dv.setUint32(16, 0, true);
  dv.setUint32(20, RSDP_SIZE, true);
  dv.setBigUint64(24, BigInt(xsdtAddress), true);
  t[8] = checksumOf(t.subarray(0, 20));
  t[32] = checksumOf(t);
  return t;
}

export function buildXsdt(tableAddresses: readonly GuestAddress[]): Uint8Array {
  const body = new Uint8Array(8 * tableAddresses.length);
  const dv = new DataView(body.buffer);
  tableAddresses.forEach((a, i) => dv.setBigUint64(8 * i, BigInt(a), true));
  return buildSdt('XSDT', 1, body);
}

/** Generic Address Structure. */
export interface GenericAddress {
  /** 0 = system memory, 1 = system I/O */
  spaceId: number;
  bitWidth: number;
  bitOffset: number;
  /** 0 undefined, 1 byte, 2 word, 3 dword, 4 qword */
  accessSize: number;
  address: number | bigint;
}

export const AddressSpace = { SystemMemory: 0, SystemIO: 1 } as const;

function writeGas(dv: DataView, off: number, g: GenericAddress): void {
  dv.setUint8(off, g.spaceId);
  dv.setUint8(off + 1, g.bitWidth);
  dv.setUint8(off + 2, g.bitOffset);
  dv.setUint8(off + 3, g.accessSize);
  dv.setBigUint64(off + 4, BigInt(g.address), true);
}

/** One ACPI PM register: byte-wide system I/O. */
function pmRegister(port: number): GenericAddress {
  return { spaceId: AddressSpace.SystemIO, bitWidth: ACPI_PM_REGISTER_BIT_WIDTH, bitOffset: 0, accessSize: 1, address: port };
}

/** FADT Flags bits (ACPI 6.5 table 5.10). */
export const FadtFlags = {
  WBINVD: 1 << 0,
  PWR_BUTTON: 1 << 4,
  SLP_BUTTON: 1 << 5,
  RESET_REG_SUP: 1 << 10,
  HW_REDUCED_ACPI: 1 << 20,
} as const;

/** IA-PC boot architecture flags (FADT offset 109). */
export const IapcBootArch = {
  LEGACY_DEVICES: 1 << 0,
  I8042: 1 << 1,
  VGA_NOT_PRESENT: 1 << 2,
  MSI_NOT_SUPPORTED: 1 << 3,
  PCIE_ASPM_CONTROLS: 1 << 4,
  CMOS_RTC_NOT_PRESENT: 1 << 5,
} as const;

/** FADT field offsets used here (ACPI 6.5 table 5.9). */
export const FadtOffset = {
  FIRMWARE_CTRL: 36,
  DSDT: 40,
  PREFERRED_PM_PROFILE: 45,
  SCI_INT: 46,
  IAPC_BOOT_ARCH: 109,
  FLAGS: 112,
  RESET_REG: 116,
  RESET_VALUE: 128,
  MINOR_VERSION: 131,
  X_FIRMWARE_CTRL: 132,
  X_DSDT: 140,
  SLEEP_CONTROL_REG: 244,
  SLEEP_STATUS_REG: 256,
  HYPERVISOR_VENDOR_ID: 268,
} as const;

export interface FadtOptions {
  dsdtAddress: GuestAddress;
  /** IA-PC boot architecture flags; default: VGA not present. */
  iapcBootArch?: number;
}

/**
 * IAPC_BOOT_ARCH for the legacy devices present. Linux trusts these: without the 8042 flag
 * it does not probe the keyboard controller, with CMOS_RTC_NOT_PRESENT it skips the RTC.
 */
export function iapcBootArchFor(devices: readonly DeviceAcpi[]): number {
  const has = (what: DeviceAcpi['legacy']) => devices.some((d) => d.legacy === what);
  return IapcBootArch.VGA_NOT_PRESENT | (has('i8042') ? IapcBootArch.I8042 : 0) | (has('rtc') ? 0 : IapcBootArch.CMOS_RTC_NOT_PRESENT);
}

/**
 * FADT revision 6.0, hardware-reduced: no PM1/GPE blocks, no SCI, no FACS. Sleep and reset
 * go through the SLEEP_CONTROL/SLEEP_STATUS registers and RESET_REG at the ACPI PM ports.
 */
export function buildFadt(opts: FadtOptions): Uint8Array {
  // Built at full size so offsets match the spec; the header part is replaced by buildSdt.
  const t = new Uint8Array(FADT_SIZE);
  const dv = new DataView(t.buffer);
  if (opts.dsdtAddress > 0xffff_ffff) throw new Error('DSDT must be below 4 GiB for the 32-bit DSDT field');
  // Both DSDT fields carry the address: ACPICA uses X_DSDT and warns only if they differ.
  dv.setUint32(FadtOffset.DSDT, opts.dsdtAddress, true);
  dv.setUint16(FadtOffset.IAPC_BOOT_ARCH, opts.iapcBootArch ?? IapcBootArch.VGA_NOT_PRESENT, true);
  dv.setUint32(
    FadtOffset.FLAGS,
    FadtFlags.HW_REDUCED_ACPI | FadtFlags.RESET_REG_SUP | FadtFlags.PWR_BUTTON | FadtFlags.SLP_BUTTON,
    true,
  );
  writeGas(dv, FadtOffset.RESET_REG, pmRegister(ACPI_RESET_PORT));
  t[FadtOffset.RESET_VALUE] = ACPI_RESET_VALUE;
  t[FadtOffset.MINOR_VERSION] = 0;
  dv.setBigUint64(FadtOffset.X_DSDT, BigInt(opts.dsdtAddress), true);
  writeGas(dv, FadtOffset.SLEEP_CONTROL_REG, pmRegister(ACPI_SLEEP_CONTROL_PORT));
  writeGas(dv, FadtOffset.SLEEP_STATUS_REG, pmRegister(ACPI_SLEEP_STATUS_PORT));
  ascii(t, FadtOffset.HYPERVISOR_VENDOR_ID, 'TERN    ', 8);
  return buildSdt('FACP', 6, t.subarray(SDT_HEADER_SIZE));
}

/** MADT structure types. */
export const MadtType = {
  LOCAL_APIC: 0,
  IO_APIC: 1,
  INTERRUPT_SOURCE_OVERRIDE: 2,
  LOCAL_APIC_NMI: 4,
  LOCAL_X2APIC: 9,
  LOCAL_X2APIC_NMI: 10,
} as const;

export interface MadtOptions {
  vcpuCount: number;
  /** IOAPIC ID; 0 matches the ID register of KVM's in-kernel IOAPIC after reset. */
  ioapicId?: number;
}

/**
 * MADT: local APIC base, PCAT_COMPAT (KVM's in-kernel 8259 pair exists), one enabled local
 * APIC per vCPU (APIC ID = ACPI UID = vCPU index; x2APIC entries for IDs >= 255), the
 * IOAPIC with GSI base 0, ISA IRQ0 -> GSI2 (PIT on IOAPIC pin 2) and LINT1 as NMI.
 */
export function buildMadt(opts: MadtOptions): Uint8Array {
  const { vcpuCount } = opts;
  if (!Number.isInteger(vcpuCount) || vcpuCount < 1) throw new Error(`invalid vCPU count ${vcpuCount}`);
  const parts: number[] = [];
  const u16 = (v: number) => [v & 0xff, (v >> 8) & 0xff];
  const u32 = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
  parts.push(...u32(LAPIC_ADDRESS), ...u32(1 /* PCAT_COMPAT */));
  let x2 = false;
  for (let id = 0; id < vcpuCount; id++) {
    if (id < 255) {
      parts.push(MadtType.LOCAL_APIC, 8, id, id, ...u32(1 /* Enabled */));
    } else {
      x2 = true;
      parts.push(MadtType.LOCAL_X2APIC, 16, 0, 0, ...u32(id), ...u32(1), ...u32(id));
    }
  }
  parts.push(MadtType.IO_APIC, 12, opts.ioapicId ?? 0, 0, ...u32(IOAPIC_ADDRESS), ...u32(0));
  // Bus 0 (ISA), source IRQ 0, GSI 2, flags 0 = conforms to bus (edge, active high).
  parts.push(MadtType.INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0, ...u32(2), ...u16(0));
  // All processors (UID 0xff), flags conform, LINT1.
  parts.push(MadtType.LOCAL_APIC_NMI, 6, 0xff, ...u16(0), 1);
  if (x2) parts.push(MadtType.LOCAL_X2APIC_NMI, 12, ...u16(0), ...u32(0xffff_ffff), 1, 0, 0, 0);
  return buildSdt('APIC', 5, Uint8Array.from(parts));
}

/** One ECAM window of an MCFG table: a segment's buses from startBus to endBus at `base`. */
export interface McfgAllocation {
  base: number;
  segment: number;
  startBus: number;
  endBus: number;
}

/**
 * MCFG (PCI Firmware Specification 3.x, 4.1.2): 8 reserved bytes, then one 16-byte entry per
 * ECAM window. The base is that of bus 0 of the segment even when startBus is not 0.
 */
export function buildMcfg(allocations: readonly McfgAllocation[]): Uint8Array {
  const body = new Uint8Array(8 + 16 * allocations.length);
  const dv = new DataView(body.buffer);
  allocations.forEach((a, i) => {
    if (a.startBus < 0 || a.endBus > 255 || a.startBus > a.endBus || a.base % (1 << 20) !== 0) throw new Error('invalid MCFG allocation');
    const off = 8 + 16 * i;
    dv.setBigUint64(off, BigInt(a.base), true);
    dv.setUint16(off + 8, a.segment, true);
    dv.setUint8(off + 10, a.startBus);
    dv.setUint8(off + 11, a.endBus);
  });
  return buildSdt('MCFG', 1, body);
}

export interface DsdtOptions {
  /**
   * The VM's devices, each described by its own module (devicesAcpi()): the DSDT holds what
   * they say and nothing else, so a device the VM does not have is not described.
   */
  devices?: readonly DeviceAcpi[];
  /** More objects to place in \_SB (devices from other subsystems). */
  sbObjects?: aml.AmlCode[];
  /** More top-level objects. */
  rootObjects?: aml.AmlCode[];
}

/** The DSDT's AML body (without the SDT header): top-level objects first, then \_SB. */
export function buildDsdtAml(opts: DsdtOptions = {}): Uint8Array {
  const devices = opts.devices ?? [];
  const terms: aml.AmlCode[] = devices.flatMap((d) => d.root ?? []);
  terms.push(...(opts.rootObjects ?? []));
  const sb = devices.flatMap((d) => d.sb ?? []);
  terms.push(aml.scope('\\_SB', [...sb, ...(opts.sbObjects ?? [])]));
  return aml.termList(terms);
}

/** DSDT revision 2: 64-bit AML integers. */
export function buildDsdt(opts: DsdtOptions = {}): Uint8Array {
  return buildSdt('DSDT', 2, buildDsdtAml(opts));
}

export interface AcpiConfig extends DsdtOptions {
  vcpuCount: number;
  ioapicId?: number;
  /** Override the IAPC_BOOT_ARCH flags derived from the devices. */
  iapcBootArch?: number;
  /** Complete extra SDTs (checksummed) to list in the XSDT, e.g. MCFG. */
  extraTables?: Uint8Array[];
}

export interface AcpiTableInfo {
  signature: string;
  address: GuestAddress;
  length: number;
}

export interface AcpiTables {
  rsdp: GuestAddress;
  xsdt: GuestAddress;
  fadt: GuestAddress;
  madt: GuestAddress;
  dsdt: GuestAddress;
  /** Every structure written, RSDP first. */
  tables: AcpiTableInfo[];
  /** First byte after the last table. */
  end: GuestAddress;
}

/** Build all tables and write them to guest memory in the ACPI window. */
export function writeAcpiTables(mem: GuestMemory, config: AcpiConfig): AcpiTables {
  const dsdtBytes = buildDsdt(config);
  const madtBytes = buildMadt({ vcpuCount: config.vcpuCount, ioapicId: config.ioapicId });
  // Tables the devices bring (a PCI segment's MCFG) come first, then the caller's.
  const extras = [...(config.devices ?? []).flatMap((d) => d.tables ?? []), ...(config.extraTables ?? [])];
  for (const e of extras) {
    if (e.length < SDT_HEADER_SIZE || byteSum(e) !== 0) throw new Error('extra ACPI table is not a checksummed SDT');
  }

  let next = RSDP_ADDRESS;
  const place = (len: number): GuestAddress => {
    const at = alignUp(next, 16);
    next = at + len;
    if (next > ACPI_TABLES_END) {
      throw new BootError(
        `ACPI tables overflow the ${hex(ACPI_TABLES_START)}..${hex(ACPI_TABLES_END)} window (need up to ${hex(next)})`,
      );
    }
    return at;
  };
  const rsdp = place(RSDP_SIZE);
  const xsdt = place(SDT_HEADER_SIZE + 8 * (2 + extras.length));
  const fadt = place(FADT_SIZE);
  const madt = place(madtBytes.length);
  const dsdt = place(dsdtBytes.length);
  const extraAddrs = extras.map((e) => place(e.length));

  const iapcBootArch = config.iapcBootArch ?? iapcBootArchFor(config.devices ?? []);
  const fadtBytes = buildFadt({ dsdtAddress: dsdt, iapcBootArch });
  const xsdtBytes = buildXsdt([fadt, madt, ...extraAddrs]);
  const rsdpBytes = buildRsdp(xsdt);

  mem.fill(ACPI_TABLES_START, next - ACPI_TABLES_START, 0);
  const tables: AcpiTableInfo[] = [];
  const put = (sig: string, at: GuestAddress, bytes: Uint8Array) => {
    mem.write(at, bytes);
    tables.push({ signature: sig, address: at, length: bytes.length });
  };
  put('RSD PTR ', rsdp, rsdpBytes);
  put('XSDT', xsdt, xsdtBytes);
  put('FACP', fadt, fadtBytes);
  put('APIC', madt, madtBytes);
  put('DSDT', dsdt, dsdtBytes);
  extras.forEach((e, i) => put(String.fromCharCode(...e.subarray(0, 4)), extraAddrs[i], e));
  return { rsdp, xsdt, fadt, madt, dsdt, tables, end: next };
}
