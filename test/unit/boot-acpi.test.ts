import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_STATUS_PORT,
  SLP_TYP_S5,
} from '../../src/devices/acpi-pm';
import * as aml from '../../src/boot/aml';
import {
  AcpiTables,
  FadtFlags,
  FadtOffset,
  IapcBootArch,
  buildDsdtAml,
  buildMadt,
  buildMcfg,
  buildSdt,
  byteSum,
  writeAcpiTables,
} from '../../src/boot/acpi';
import { ACPI_TABLES_END, ACPI_TABLES_START, IOAPIC_ADDRESS, LAPIC_ADDRESS, PCI_ECAM_START, RSDP_ADDRESS } from '../../src/boot/layout';
import { BootError } from '../../src/boot/errors';
import { GuestMemory } from '../../src/memory/guest-memory';
import { MiB, memoryOf, run, tempDir, which } from './boot-helpers';
import { type DeviceInstance, type AnyDeviceState, devicesAcpi, platformDevices, serialDevice } from '../../src/devices';

/** The devices of a VM with every legacy device (--serial on), as the machine attaches them. */
const platform = (keep: (d: DeviceInstance<AnyDeviceState>) => boolean = () => true) =>
  devicesAcpi(platformDevices({ memorySize: 64 * MiB, serial: true }).filter(keep));
const PLATFORM = platform();

function tablesIn(vcpuCount: number, extra: Partial<Parameters<typeof writeAcpiTables>[1]> = {}) {
  const mem = memoryOf(4 * MiB);
  const tables = writeAcpiTables(mem, { vcpuCount, devices: PLATFORM, ...extra });
  return { mem, tables };
}

function tableBytes(mem: GuestMemory, tables: AcpiTables, sig: string): Buffer {
  const t = tables.tables.find((x) => x.signature === sig);
  if (!t) throw new Error(`no ${sig}`);
  return Buffer.from(mem.read(t.address, t.length));
}

test('RSDP at 0xe0000: signature, revision 2, both checksums, XSDT pointer', (t) => {
  const { mem, tables } = tablesIn(2);
  t.is(tables.rsdp, RSDP_ADDRESS);
  t.is(RSDP_ADDRESS, 0xe0000);
  const r = Buffer.from(mem.read(RSDP_ADDRESS, 36));
  t.is(r.toString('latin1', 0, 8), 'RSD PTR ');
  t.is(r.toString('latin1', 9, 15), 'TERN  ');
  t.is(r[15], 2);
  t.is(r.readUInt32LE(16), 0, 'no RSDT');
  t.is(r.readUInt32LE(20), 36);
  t.is(Number(r.readBigUInt64LE(24)), tables.xsdt);
  t.is(byteSum(r.subarray(0, 20)), 0, 'ACPI 1.0 checksum');
  t.is(byteSum(r), 0, 'extended checksum');
  // 16-byte aligned inside the BIOS area, where a legacy scan looks
  t.is(RSDP_ADDRESS % 16, 0);
  t.true(RSDP_ADDRESS >= 0xe0000 && RSDP_ADDRESS < 0x100000);
});

test('every table checksums to zero and lies inside the ACPI window', (t) => {
  const { mem, tables } = tablesIn(4);
  t.deepEqual(
    tables.tables.map((x) => x.signature),
    ['RSD PTR ', 'XSDT', 'FACP', 'APIC', 'DSDT', 'MCFG'],
  );
  for (const tb of tables.tables) {
    const bytes = mem.read(tb.address, tb.length);
    t.is(byteSum(bytes), 0, tb.signature);
    t.true(tb.address >= ACPI_TABLES_START && tb.address + tb.length <= ACPI_TABLES_END);
    t.is(tb.address % 16, 0);
    if (tb.signature !== 'RSD PTR ') t.is(Buffer.from(bytes).readUInt32LE(4), tb.length, `${tb.signature} length field`);
  }
  t.true(tables.end <= ACPI_TABLES_END);
});

test('XSDT lists FADT, MADT and the PCI segment\'s MCFG', (t) => {
  const { mem, tables } = tablesIn(1);
  const x = tableBytes(mem, tables, 'XSDT');
  t.is(x.toString('latin1', 0, 4), 'XSDT');
  t.is(x[8], 1);
  t.is(x.length, 36 + 24);
  t.is(Number(x.readBigUInt64LE(36)), tables.fadt);
  t.is(Number(x.readBigUInt64LE(44)), tables.madt);
  t.is(Number(x.readBigUInt64LE(52)), tables.tables.find((tb) => tb.signature === 'MCFG')!.address);
});

test('FADT rev 6: hardware-reduced, reset register and sleep registers at the ACPI PM ports', (t) => {
  const { mem, tables } = tablesIn(2);
  const f = tableBytes(mem, tables, 'FACP');
  t.is(f.length, 276);
  t.is(f[8], 6, 'major revision');
  t.is(f[FadtOffset.MINOR_VERSION], 0);
  const flags = f.readUInt32LE(FadtOffset.FLAGS);
  t.truthy(flags & FadtFlags.HW_REDUCED_ACPI);
  t.truthy(flags & FadtFlags.RESET_REG_SUP);
  t.truthy(flags & FadtFlags.PWR_BUTTON, 'no fixed power button');
  t.truthy(flags & FadtFlags.SLP_BUTTON, 'no fixed sleep button');
  t.is(f.readUInt32LE(FadtOffset.DSDT), tables.dsdt);
  t.is(Number(f.readBigUInt64LE(FadtOffset.X_DSDT)), tables.dsdt);
  t.is(f.readUInt16LE(FadtOffset.SCI_INT), 0);
  t.is(f.readUInt32LE(FadtOffset.FIRMWARE_CTRL), 0);
  const gas = (off: number) => ({
    space: f[off],
    width: f[off + 1],
    offset: f[off + 2],
    access: f[off + 3],
    address: Number(f.readBigUInt64LE(off + 4)),
  });
  t.deepEqual(gas(FadtOffset.RESET_REG), { space: 1, width: 8, offset: 0, access: 1, address: ACPI_RESET_PORT });
  t.is(f[FadtOffset.RESET_VALUE], ACPI_RESET_VALUE);
  t.deepEqual(gas(FadtOffset.SLEEP_CONTROL_REG), { space: 1, width: 8, offset: 0, access: 1, address: ACPI_SLEEP_CONTROL_PORT });
  t.deepEqual(gas(FadtOffset.SLEEP_STATUS_REG), { space: 1, width: 8, offset: 0, access: 1, address: ACPI_SLEEP_STATUS_PORT });
  t.deepEqual([ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_RESET_PORT, ACPI_RESET_VALUE], [0x600, 0x601, 0x602, 6]);
  // PM1/GPE blocks absent in hardware-reduced mode
  for (let off = 56; off < 88; off += 4) t.is(f.readUInt32LE(off), 0);
  for (let off = 148; off < 244; off++) t.is(f[off], 0);
  t.is(f.readUInt16LE(FadtOffset.IAPC_BOOT_ARCH), IapcBootArch.VGA_NOT_PRESENT | IapcBootArch.I8042);
});

test('IAPC_BOOT_ARCH follows the legacy devices described', (t) => {
  const { mem, tables } = tablesIn(1, { devices: platform((d) => d.state.kind !== 'i8042' && d.state.kind !== 'cmos-rtc') });
  const f = tableBytes(mem, tables, 'FACP');
  t.is(f.readUInt16LE(FadtOffset.IAPC_BOOT_ARCH), IapcBootArch.VGA_NOT_PRESENT | IapcBootArch.CMOS_RTC_NOT_PRESENT);
  const dsdt = tableBytes(mem, tables, 'DSDT');
  t.false(dsdt.includes(Buffer.from('PS2K')));
  t.false(dsdt.includes(Buffer.from('RTC_')));
  t.true(dsdt.includes(Buffer.from('COM1')));
});

test('MADT: LAPIC address, PCAT_COMPAT, one enabled LAPIC per vCPU, IOAPIC, IRQ0 override, LINT1 NMI', (t) => {
  const n = 3;
  const m = Buffer.from(buildMadt({ vcpuCount: n }));
  t.is(m.toString('latin1', 0, 4), 'APIC');
  t.is(byteSum(m), 0);
  t.is(m.readUInt32LE(36), LAPIC_ADDRESS);
  t.is(m.readUInt32LE(40), 1);
  let off = 44;
  for (let i = 0; i < n; i++) {
    t.deepEqual([...m.subarray(off, off + 4)], [0, 8, i, i], `LAPIC ${i}: type, length, UID, APIC ID`);
    t.is(m.readUInt32LE(off + 4), 1, 'enabled');
    off += 8;
  }
  t.deepEqual([m[off], m[off + 1], m[off + 2]], [1, 12, 0], 'IOAPIC id 0');
  t.is(m.readUInt32LE(off + 4), IOAPIC_ADDRESS);
  t.is(m.readUInt32LE(off + 8), 0, 'GSI base');
  off += 12;
  t.deepEqual([m[off], m[off + 1], m[off + 2], m[off + 3]], [2, 10, 0, 0], 'ISA IRQ 0 override');
  t.is(m.readUInt32LE(off + 4), 2);
  t.is(m.readUInt16LE(off + 8), 0);
  off += 10;
  t.deepEqual([...m.subarray(off, off + 6)], [4, 6, 0xff, 0, 0, 1], 'NMI on LINT1 of all processors');
  off += 6;
  t.is(off, m.length);
  t.is(Buffer.from(buildMadt({ vcpuCount: 1, ioapicId: 1 }))[44 + 8 + 2], 1);
});

test('MADT uses x2APIC entries for APIC IDs from 255', (t) => {
  const m = Buffer.from(buildMadt({ vcpuCount: 257 }));
  t.is(byteSum(m), 0);
  const x2 = 44 + 255 * 8;
  t.deepEqual([m[x2], m[x2 + 1]], [9, 16]);
  t.is(m.readUInt32LE(x2 + 4), 255);
  t.is(m.readUInt32LE(x2 + 8), 1);
  t.is(m.readUInt32LE(x2 + 12), 255);
  t.is(m.readUInt32LE(x2 + 16 + 4), 256);
  const tail = m.subarray(m.length - 12);
  t.deepEqual([tail[0], tail[1]], [10, 12], 'x2APIC NMI');
  t.is(tail.readUInt32LE(4), 0xffffffff);
  t.is(tail[8], 1);
});

test('DSDT: \\_S5 package first, with SLP_TYP matching the ACPI PM device', (t) => {
  const body = Buffer.from(buildDsdtAml({ devices: PLATFORM }));
  t.is(SLP_TYP_S5, 5);
  t.is(body.subarray(0, 14).toString('hex'), '085f53355f1208040a050a050000');
  t.true(body.includes(Buffer.from(aml.device('COM1', []).bytes.subarray(0, 2))));
});

test('DSDT: the power button and the GED can be left out', (t) => {
  const withBoth = Buffer.from(buildDsdtAml({ devices: PLATFORM }));
  t.true(withBoth.includes(Buffer.from('PWRB')));
  t.true(withBoth.includes(Buffer.from('ACPI0013')));
  const without = Buffer.from(buildDsdtAml({ devices: platform((d) => d.state.kind !== 'acpi-ged') }));
  t.false(without.includes(Buffer.from('PWRB')));
  t.false(without.includes(Buffer.from('GED0')));
});

test('DSDT: only the devices the VM has are described; --serial off has no COM1', (t) => {
  const off = Buffer.from(buildDsdtAml({ devices: devicesAcpi(platformDevices({ memorySize: 64 * MiB, serial: false })) }));
  t.false(off.includes(Buffer.from('COM1')), 'no UART without a serial device');
  t.false(off.includes(Buffer.from(aml.eisaId('PNP0501').bytes)), 'no PNP0501 at all');
  t.true(off.includes(Buffer.from('PS2K')) && off.includes(Buffer.from('GED0')), 'the other devices are still there');
  const on = Buffer.from(buildDsdtAml({ devices: PLATFORM }));
  t.true(on.includes(Buffer.from('COM1')));
  t.true(on.includes(Buffer.from(aml.eisaId('PNP0501').bytes)));
  // A UART describes itself from its own ports and interrupt.
  const com2 = Buffer.from(buildDsdtAml({ devices: devicesAcpi([serialDevice({ base: 0x2f8, gsi: 3 })]) }));
  t.true(com2.includes(Buffer.from('COM2')));
  t.true(com2.includes(Buffer.from(aml.Resource.io(0x2f8, 0x2f8, 1, 8))));
  t.true(com2.includes(Buffer.from(aml.Resource.interrupt({ edge: true }, [3]))));
  t.false(com2.includes(Buffer.from('_S5_')), 'no ACPI PM device, no \\_S5');
});

test('extra SDTs are placed and listed; a full window is an error', (t) => {
  const mcfg = buildSdt('MCFG', 1, new Uint8Array(44));
  const { mem, tables } = tablesIn(1, { extraTables: [mcfg] });
  const x = tableBytes(mem, tables, 'XSDT');
  t.is(x.length, 36 + 32);
  // The devices' own tables come first (the PCI segment's MCFG), then the caller's.
  const at = Number(x.readBigUInt64LE(60));
  t.is(Buffer.from(mem.read(at, 4)).toString('latin1'), 'MCFG');
  t.is(at, tables.tables[tables.tables.length - 1].address);
  t.throws(() => tablesIn(1, { extraTables: [buildSdt('HUGE', 1, new Uint8Array(0x20000))] }), { instanceOf: BootError });
  const bad = new Uint8Array(mcfg);
  bad[20] ^= 1;
  t.throws(() => tablesIn(1, { extraTables: [bad] }));
});

const iasl = which('iasl');
const acpiexec = which('acpiexec');
const needIasl = iasl ? '' : ' (skipped: iasl not found; install acpica-tools)';
const needAcpiexec = acpiexec ? '' : ' (skipped: acpiexec not found; install acpica-tools)';

/** Write every SDT from guest memory to <dir>/<sig>.dat. */
function extract(mem: GuestMemory, tables: AcpiTables, dir: string): string[] {
  const files: string[] = [];
  for (const tb of tables.tables) {
    if (tb.signature === 'RSD PTR ') continue; // iasl -d takes SDTs only
    const file = `${tb.signature.toLowerCase()}.dat`;
    fs.writeFileSync(path.join(dir, file), mem.read(tb.address, tb.length));
    files.push(file);
  }
  return files;
}

(iasl ? test : test.skip)(`iasl -d disassembles every table cleanly${needIasl}`, (t) => {
  const dir = tempDir('tern-acpi-');
  try {
    const { mem, tables } = tablesIn(4);
    const files = extract(mem, tables, dir);
    const dsl: Record<string, string> = {};
    for (const f of files) {
      const r = run(iasl!, ['-d', f], dir);
      t.is(r.status, 0, `${f}: ${r.stdout}${r.stderr}`);
      t.notRegex(r.stdout + r.stderr, /Error|Warning|Invalid|mismatch/i, f);
      dsl[f] = fs.readFileSync(path.join(dir, f.replace('.dat', '.dsl')), 'utf8');
    }
    const facp = dsl['facp.dat'];
    t.regex(facp, /Revision : 06/);
    t.regex(facp, /Hardware Reduced \(V5\) : 1/);
    t.regex(facp, /Reset Register Supported \(V2\) : 1/);
    t.regex(facp, /Reset Register : \[Generic Address Structure\]\s+\[[^\]]+\]\s+Space ID : 01 \[SystemIO\]\s+\[[^\]]+\]\s+Bit Width : 08\s+\[[^\]]+\]\s+Bit Offset : 00\s+\[[^\]]+\]\s+Encoded Access Width : 01 \[Byte Access:8\]\s+\[[^\]]+\]\s+Address : 0000000000000602/);
    t.regex(facp, /Value to cause reset : 06/);
    t.regex(facp, /Sleep Control Register : \[Generic Address Structure\][\s\S]*?Space ID : 01 \[SystemIO\][\s\S]*?Address : 0000000000000600/);
    t.regex(facp, /Sleep Status Register : \[Generic Address Structure\][\s\S]*?Space ID : 01 \[SystemIO\][\s\S]*?Address : 0000000000000601/);
    t.regex(facp, new RegExp(`DSDT Address : 0*${tables.dsdt.toString(16).toUpperCase()}`));
    t.regex(facp, /8042 Present on ports 60\/64 \(V2\) : 1/);
    t.regex(facp, /VGA Not Present \(V4\) : 1/);

    const apic = dsl['apic.dat'];
    t.regex(apic, /Local Apic Address : FEE00000/);
    t.regex(apic, /PC-AT Compatibility : 1/);
    t.is((apic.match(/Subtable Type : 00 \[Processor Local APIC\]/g) ?? []).length, 4);
    for (let i = 0; i < 4; i++) t.regex(apic, new RegExp(`Processor ID : 0${i}\\s+\\[[^\\]]+\\]\\s+Local Apic ID : 0${i}`));
    t.is((apic.match(/Processor Enabled : 1/g) ?? []).length, 4);
    t.regex(apic, /Subtable Type : 01 \[I\/O APIC\][\s\S]*?I\/O Apic ID : 00[\s\S]*?Address : FEC00000[\s\S]*?Interrupt : 00000000/);
    t.regex(apic, /Subtable Type : 02 \[Interrupt Source Override\][\s\S]*?Bus : 00[\s\S]*?Source : 00[\s\S]*?Interrupt : 00000002/);
    t.regex(apic, /Subtable Type : 04 \[Local APIC NMI\][\s\S]*?Processor ID : FF[\s\S]*?Interrupt Input LINT : 01/);

    const xsdt = dsl['xsdt.dat'];
    t.regex(xsdt, new RegExp(`ACPI Table Address\\s+0 : 0*${tables.fadt.toString(16).toUpperCase()}`));
    t.regex(xsdt, new RegExp(`ACPI Table Address\\s+1 : 0*${tables.madt.toString(16).toUpperCase()}`));

    const dsdt = dsl['dsdt.dat'];
    t.regex(dsdt, /Name \(_S5, Package \(0x04\)[^{]*\{\s*0x05,\s*0x05,\s*Zero,\s*Zero\s*\}\)/);
    t.regex(dsdt, /Scope \(\\_SB\)/);
    t.regex(dsdt, /Device \(COM1\)[\s\S]*?EisaId \("PNP0501"\)[\s\S]*?IO \(Decode16,\s*0x03F8,\s*\/\/ Range Minimum\s*0x03F8,[\s\S]*?0x08,\s*\/\/ Length[\s\S]*?Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s*\{\s*0x00000004,/);
    t.regex(dsdt, /Device \(PS2K\)[\s\S]*?EisaId \("PNP0303"\)[\s\S]*?0x0060[\s\S]*?0x0064[\s\S]*?0x00000001,/);
    t.regex(dsdt, /Device \(RTC\)[\s\S]*?EisaId \("PNP0B00"\)[\s\S]*?0x0070[\s\S]*?0x02,\s*\/\/ Length/);
    t.regex(dsdt, /Device \(PWRB\)\s*\{\s*Name \(_HID, EisaId \("PNP0C0C"\)/);
    t.regex(dsdt, /Device \(GED0\)\s*\{\s*Name \(_HID, "ACPI0013"/);
    t.regex(dsdt, /Interrupt \(ResourceConsumer, Level, ActiveHigh, Exclusive, ,, \)\s*\{\s*0x00000009,/);
    t.regex(dsdt, /OperationRegion \(GDRG, SystemIO, 0x0610, One\)/);
    t.regex(dsdt, /Field \(GDRG, ByteAcc, NoLock, Preserve\)\s*\{\s*GDST,\s+8/);
    t.regex(dsdt, /Method \(_EVT, 1, Serialized\)[\s\S]*?Arg0 == 0x09[\s\S]*?Local0 = GDST[\s\S]*?GDST = Local0[\s\S]*?Local0 & One[\s\S]*?Notify \(\\_SB\.PWRB, 0x80\)/);
    // PCI segment 0: the root bridge Linux binds (PNP0A08, PCI0 on segment 0 bus 0), its
    // windows, the ECAM reserved as a motherboard resource, and the MCFG pointing at it.
    t.regex(dsdt, /Device \(PCI0\)\s*\{\s*Name \(_HID, EisaId \("PNP0A08"\)[\s\S]*?Name \(_CID, EisaId \("PNP0A03"\)[\s\S]*?Name \(_SEG, Zero\)[\s\S]*?Name \(_BBN, Zero\)/);
    t.regex(dsdt, /WordBusNumber \(ResourceProducer, MinFixed, MaxFixed, PosDecode,\s*0x0000,\s*\/\/ Granularity\s*0x0000,\s*\/\/ Range Minimum\s*0x0000,\s*\/\/ Range Maximum\s*0x0000,\s*\/\/ Translation Offset\s*0x0001,/);
    t.regex(dsdt, /IO \(Decode16,\s*0x0CF8,\s*\/\/ Range Minimum\s*0x0CF8,\s*\/\/ Range Maximum\s*0x01,\s*\/\/ Alignment\s*0x08,/);
    t.regex(dsdt, /WordIO \(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,\s*0x0000,[^\n]*\s*0xC000,[^\n]*\s*0xFFFF,/);
    t.regex(dsdt, /DWordMemory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,\s*0x00000000,[^\n]*\s*0xC0000000,[^\n]*\s*0xE7FFFFFF,/);
    // 64 MiB of RAM ends below 4 GiB: the 64-bit window starts at 4 GiB.
    t.regex(dsdt, /QWordMemory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,\s*0x0000000000000000,[^\n]*\s*0x0000000100000000,[^\n]*\s*0x00000010FFFFFFFF,/);
    t.regex(dsdt, /Device \(MRES\)\s*\{\s*Name \(_HID, EisaId \("PNP0C02"\)[\s\S]*?Memory32Fixed \(ReadOnly,\s*0xE8000000,\s*\/\/ Address Base\s*0x00100000,/);
    const mcfg = dsl['mcfg.dat'];
    t.regex(mcfg, /Signature : "MCFG"/);
    t.regex(mcfg, /Base Address : 00000000E8000000\s+\[[^\]]+\]\s+Segment Group Number : 0000\s+\[[^\]]+\]\s+Start Bus Number : 00\s+\[[^\]]+\]\s+End Bus Number : 00/);
    t.notRegex(dsdt, /External \(/, 'every name resolves');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

(acpiexec ? test : test.skip)(`acpiexec loads the tables and evaluates \\_S5 and _CRS${needAcpiexec}`, (t) => {
  const dir = tempDir('tern-acpiexec-');
  try {
    const { mem, tables } = tablesIn(2);
    const files = extract(mem, tables, dir).filter((f) => f !== 'xsdt.dat');
    const r = run(acpiexec!, ['-b', 'evaluate \\_S5; evaluate \\_SB.COM1._CRS; evaluate \\_SB.PS2K._HID; evaluate \\_SB.PCI0._CRS', ...files], dir);
    const out = r.stdout + r.stderr;
    t.is(r.status, 0, out);
    t.regex(out, /1 ACPI AML tables successfully acquired and loaded/);
    t.regex(out, /\[Package\] Contains 4 Elements:\s+\[Integer\] = 0000000000000005\s+\[Integer\] = 0000000000000005\s+\[Integer\] = 0000000000000000\s+\[Integer\] = 0000000000000000/);
    t.regex(out, /47 01 F8 03 F8 03 01 08 89 06 00 03 01 04 00 00/);
    t.regex(out, /\[Integer\] = 000000000303D041/, "EisaId(PNP0303)");
    // PCI0's resources: WordBusNumber 0..0, then IO(0xcf8, 8).
    t.regex(out, /88 0D 00 02 0C 00 00 00 00 00 00 00 00 00 01 00\s+\/\/[^\n]*\n\s*0010: 47 01 F8 0C F8 0C 01 08/);
    t.notRegex(out, /AE_[A-Z_]+ /, 'no ACPICA exceptions');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

(acpiexec ? test : test.skip)(`acpiexec: the GED's _EVT notifies PWRB only for its GSI with the button bit pending${needAcpiexec}`, (t) => {
  const dir = tempDir('tern-acpiexec-ged-');
  try {
    // acpiexec backs SystemIO regions with plain memory: a store stands in for a press.
    const trigger = (n: string, gsi: number, bits: number) =>
      aml.method(n, {}, [aml.store(bits, aml.path('\\_SB.GED0.GDST')), aml.call('\\_SB.GED0._EVT', [gsi])]);
    const dsdt = buildSdt('DSDT', 2, buildDsdtAml({ devices: PLATFORM, rootObjects: [trigger('TOTH', 5, 1), trigger('TNOB', 9, 2), trigger('TPWR', 9, 1)] }));
    fs.writeFileSync(path.join(dir, 'dsdt.dat'), dsdt);
    const eval1 = (m: string) => {
      const r = run(acpiexec!, ['-b', `evaluate \\${m}`, 'dsdt.dat'], dir);
      t.is(r.status, 0, r.stdout + r.stderr);
      t.notRegex(r.stdout + r.stderr, /AE_[A-Z_]+ /, `${m}: no ACPICA exceptions`);
      return r.stdout + r.stderr;
    };
    t.notRegex(eval1('TOTH'), /Notify/, 'another GSI is not ours');
    t.notRegex(eval1('TNOB'), /Notify/, 'no power-button bit, no notification');
    t.regex(eval1('TPWR'), /Received a Device Notify on \[PWRB\] \S+ Value 0x80/);
    const crs = eval1('_SB.GED0._CRS');
    t.regex(crs, /89 06 00 01 01 09 00 00 00 79 00/, 'Interrupt(ResourceConsumer, Level, ActiveHigh, Exclusive){9}');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('MCFG: the PCI segment\'s ECAM window for segment 0, bus 0 only, checksummed', (t) => {
  const { mem, tables } = tablesIn(1);
  const m = tableBytes(mem, tables, 'MCFG');
  t.is(byteSum(m), 0);
  t.is(m.readUInt32LE(4), 36 + 8 + 16, 'one allocation');
  t.is(m[8], 1, 'revision');
  t.is(m.readBigUInt64LE(36), 0n, 'reserved');
  t.is(Number(m.readBigUInt64LE(44)), PCI_ECAM_START);
  t.is(m.readUInt16LE(52), 0, 'segment 0');
  t.is(m[54], 0, 'start bus');
  t.is(m[55], 0, 'end bus');
  t.is(m.readUInt32LE(56), 0);
  t.throws(() => buildMcfg([{ base: PCI_ECAM_START + 0x1000, segment: 0, startBus: 0, endBus: 0 }]), { message: /invalid MCFG/ });
});

test('address space descriptors: WordBusNumber, WordIO, DWordMemory and QWordMemory encode min, max and length', (t) => {
  t.deepEqual([...aml.AddressResource.wordBusNumber(0, 1)], [0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
  t.deepEqual([...aml.AddressResource.wordIo(0xc000, 0x4000)], [0x88, 13, 0, 1, 0x0c, 3, 0, 0, 0x00, 0xc0, 0xff, 0xff, 0, 0, 0x00, 0x40]);
  const d = Buffer.from(aml.AddressResource.dwordMemory(0xc000_0000, 0x2800_0000));
  t.deepEqual([d[0], d.readUInt16LE(1), d[3], d[4], d[5]], [0x87, 23, 0, 0x0c, 1]);
  t.deepEqual([d.readUInt32LE(10), d.readUInt32LE(14), d.readUInt32LE(22)], [0xc000_0000, 0xe7ff_ffff, 0x2800_0000]);
  const q = Buffer.from(aml.AddressResource.qwordMemory(0x1_0000_0000, 64 * 2 ** 30));
  t.deepEqual([q[0], q.readUInt16LE(1), q.length], [0x8a, 43, 46]);
  t.deepEqual([q.readBigUInt64LE(14), q.readBigUInt64LE(22), q.readBigUInt64LE(38)], [0x1_0000_0000n, 0x10_ffff_ffffn, 0x10_0000_0000n]);
  t.throws(() => aml.AddressResource.wordIo(0xf000, 0x2000), { instanceOf: aml.AmlError });
  t.throws(() => aml.AddressResource.dwordMemory(0xf000_0000, 0x2000_0000), { instanceOf: aml.AmlError });
});
