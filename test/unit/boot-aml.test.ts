import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import * as aml from '../../src/boot/aml';
import { buildSdt } from '../../src/boot/acpi';
import { run, tempDir, which } from './boot-helpers';

const hex = (c: aml.AmlCode | Uint8Array) => Buffer.from(c instanceof Uint8Array ? c : c.bytes).toString('hex');

test('PkgLength: one byte below 0x40, then 2..4 bytes, counting itself', (t) => {
  t.is(hex(aml.pkgLength(0)), '01');
  t.is(hex(aml.pkgLength(0x3e)), '3f');
  // 0x3f content + 2 length bytes = 0x41: lead 0x40|1, then 0x41 >> 4
  t.is(hex(aml.pkgLength(0x3f)), '4104');
  t.is(hex(aml.pkgLength(0xffd)), '4fff'); // 0xfff total
  t.is(hex(aml.pkgLength(0xffe)), '810001'); // 0x1001 total, 3 bytes
  t.is(hex(aml.pkgLength(0xffffc)), '8fffff');
  t.is(hex(aml.pkgLength(0xffffd)), 'c1000001'); // 0x100001
  t.throws(() => aml.pkgLength(0x0ffffffd), { instanceOf: aml.AmlError });
});

test('raw PkgLength values (field widths) are not self-counting', (t) => {
  t.is(hex(aml.encodePkgLengthValue(8)), '08');
  t.is(hex(aml.encodePkgLengthValue(0x40)), '4004');
  t.is(hex(aml.encodePkgLengthValue(0x123)), '4312');
});

test('integers use the shortest encoding', (t) => {
  t.is(hex(aml.integer(0)), '00');
  t.is(hex(aml.integer(1)), '01');
  t.is(hex(aml.integer(2)), '0a02');
  t.is(hex(aml.integer(0xff)), '0aff');
  t.is(hex(aml.integer(0x100)), '0b0001');
  t.is(hex(aml.integer(0x3f8)), '0bf803');
  t.is(hex(aml.integer(0x10000)), '0c00000100');
  t.is(hex(aml.integer(0xfec00000)), '0c0000c0fe');
  t.is(hex(aml.integer(0x1_0000_0000)), '0e0000000001000000');
  t.is(hex(aml.integer(0xffff_ffff_ffff_ffffn)), '0effffffffffffffff');
  t.is(hex(aml.ones()), 'ff');
  t.throws(() => aml.integer(-1));
  t.throws(() => aml.integer(2 ** 60));
  t.throws(() => aml.integer(1n << 64n));
});

test('strings and name strings', (t) => {
  t.is(hex(aml.string('COM1')), '0d434f4d3100');
  t.throws(() => aml.string('é'));
  t.is(hex(aml.nameString('_S5')), '5f53355f');
  t.is(hex(aml.nameString('_S5_')), '5f53355f');
  t.is(hex(aml.nameString('\\_SB')), '5c5f53425f');
  t.is(hex(aml.nameString('\\_SB.COM1')), '5c2e5f53425f434f4d31');
  t.is(hex(aml.nameString('\\_SB.PCI0.ISA')), '5c2f035f53425f50434930495341' + '5f');
  t.is(hex(aml.nameString('^^FOO')), '5e5e464f4f5f');
  t.is(hex(aml.nameString('\\')), '5c00');
  t.throws(() => aml.nameString('toolong'));
  t.throws(() => aml.nameString('1ABC'));
  t.throws(() => aml.nameString('a'));
});

test('EisaId compresses like ASL', (t) => {
  t.is(hex(aml.eisaId('PNP0501')), '0c41d00501'); // 0x0105D041
  t.is(hex(aml.eisaId('PNP0A03')), '0c41d00a03'); // 0x030AD041
  t.is(hex(aml.eisaId('PNP0C0C')), '0c41d00c0c');
  t.throws(() => aml.eisaId('pnp0501'));
});

test('Name(_S5_, Package(){5, 5, 0, 0}) encodes byte for byte', (t) => {
  t.is(hex(aml.name('_S5', aml.pkg([5, 5, 0, 0]))), '085f53355f' + '1208' + '04' + '0a05' + '0a05' + '00' + '00');
});

test('Scope, Device, Method and resource templates', (t) => {
  const dev = aml.device('COM1', [aml.name('_UID', 1)]);
  t.is(hex(dev), '5b82' + '0b' + '434f4d31' + '085f554944' + '01');
  const sc = aml.scope('\\_SB', [dev]);
  t.is(hex(sc), '10' + '13' + '5c5f53425f' + hex(dev));
  t.is(hex(aml.method('_STA', {}, [aml.ret(0x0f)])), '14' + '09' + '5f535441' + '00' + 'a40a0f');
  t.is(hex(aml.method('_EVT', { args: 1, serialized: true }, [])), '14065f45565409');
  t.is(hex(aml.Resource.io(0x3f8, 0x3f8, 1, 8)), '4701f803f8030108');
  t.is(hex(aml.Resource.irqNoFlags([4])), '221000');
  t.is(hex(aml.Resource.irq({ edge: false, activeLow: true, shared: true }, [9])), '23000218');
  t.is(hex(aml.Resource.interrupt({ edge: true }, [4])), '8906000301' + '04000000');
  t.is(hex(aml.Resource.memory32Fixed(0xfec00000, 0x1000)), '860900010000c0fe00100000');
  t.is(hex(aml.resourceTemplate([aml.Resource.irqNoFlags([1])])), '11' + '08' + '0a05' + '220200' + '7900');
});

// A definition block that uses every construct, for the iasl round trip.
function everything(): Uint8Array {
  const big = new Uint8Array(5000).map((_, i) => (i * 13) & 0xff);
  return aml.termList([
    aml.name('_S5', aml.pkg([5, 5, 0, 0])),
    aml.name('BIGB', aml.buffer(big)), // 3-byte PkgLength
    aml.name('MIDB', aml.buffer(new Uint8Array(100).fill(0xa5))), // 2-byte PkgLength
    aml.name('STR0', 'Tern VMM'),
    aml.name('INT8', 0x1234_5678_9abcn),
    aml.name('VPKG', aml.pkg(Array.from({ length: 300 }, (_, i) => i))),
    aml.name('REFS', aml.pkg([aml.path('\\_SB.COM1'), 'x', aml.pkg([1, 2])])),
    aml.scope('\\_SB', [
      aml.device('COM1', [
        aml.name('_HID', aml.eisaId('PNP0501')),
        aml.name('_UID', 1),
        aml.name(
          '_CRS',
          aml.resourceTemplate([
            aml.Resource.io(0x3f8, 0x3f8, 1, 8),
            aml.Resource.interrupt({ edge: true }, [4]),
            aml.Resource.irqNoFlags([3]),
            aml.Resource.irq({ edge: false, activeLow: true, shared: true }, [5, 7]),
            aml.Resource.memory32Fixed(0xfed00000, 0x400, false),
          ]),
        ),
        aml.method('_STA', {}, [aml.ret(0x0f)]),
      ]),
      aml.device('PWRB', [aml.name('_HID', aml.eisaId('PNP0C0C')), aml.name('_UID', 0)]),
      aml.device('GED0', [
        aml.name('_HID', 'ACPI0013'),
        aml.operationRegion('GDST', aml.RegionSpace.SystemMemory, 0xfef00000, 4),
        aml.field('GDST', { access: aml.FieldAccess.DWord, lock: false, update: aml.FieldUpdate.WriteAsZeros }, [
          { name: 'GDAT', bits: 8 },
          { bits: 8 },
          { name: 'GDEX', bits: 16 },
        ]),
        aml.operationRegion('PIOR', aml.RegionSpace.SystemIO, 0x510, 1),
        aml.field('PIOR', { access: aml.FieldAccess.Byte, lock: true }, [{ name: 'PSTA', bits: 8 }]),
        aml.method('_EVT', { args: 1, serialized: true }, [
          aml.store(aml.path('GDAT'), aml.local(0)),
          aml.ifThen(aml.lEqual(aml.and(aml.local(0), 1), 1), [aml.notify(aml.path('\\_SB.PWRB'), 0x80)]),
          aml.elseDo([aml.store(aml.add(aml.local(0), aml.arg(0)), aml.local(1))]),
          aml.ifThen(aml.lAnd(aml.lGreater(aml.local(1), 2), aml.lNot(aml.lLess(aml.local(1), 1))), [
            aml.store(aml.shiftLeft(aml.local(1), 4), aml.local(2)),
            aml.store(aml.or(aml.local(2), aml.shiftRight(aml.local(1), 1)), aml.local(3)),
            aml.store(aml.subtract(aml.local(3), 1), aml.path('PSTA')),
          ]),
          aml.call('HELP', [aml.local(3), 7]),
          aml.ret(aml.ones()),
        ]),
        aml.method('HELP', { args: 2 }, [aml.ret(aml.lOr(aml.arg(0), aml.arg(1)))]),
      ]),
    ]),
  ]);
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

const iasl = which('iasl');
const skipNote = iasl ? '' : ' (skipped: iasl not found; install acpica-tools)';

(iasl ? test : test.skip)(`iasl round trip: disassemble and recompile to identical AML${skipNote}`, (t) => {
  const dir = tempDir('tern-aml-');
  try {
    const body = everything();
    fs.writeFileSync(path.join(dir, 'dsdt.dat'), buildSdt('DSDT', 2, body));
    // -dl: legacy ASL (no C-style operators), so Store(Add(..)) is not folded into Add(.., target).
    const dis = run(iasl!, ['-dl', '-d', 'dsdt.dat'], dir);
    t.is(dis.status, 0, dis.stdout + dis.stderr);
    const dsl = fs.readFileSync(path.join(dir, 'dsdt.dsl'), 'utf8');
    t.regex(dsl, /Name \(_S5, Package \(0x04\)/);
    t.regex(dsl, /Device \(COM1\)/);
    t.regex(dsl, /EisaId \("PNP0501"\)/);
    t.regex(dsl, /Field \(GDST, DWordAcc, NoLock, WriteAsZeros\)/);
    t.regex(dsl, /Method \(_EVT, 1, Serialized\)/);
    t.regex(dsl, /Notify \(\\_SB\.PWRB, 0x80\)/);
    t.regex(dsl, /Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)/);
    t.notRegex(dsl, /External \(/, 'every name resolves');
    // -oa: no optimizations, so the compiler keeps our encodings (e.g. \_SB rather than _SB_).
    const re = run(iasl!, ['-oa', '-p', 'recompiled', 'dsdt.dsl'], dir);
    t.is(re.status, 0, re.stdout + re.stderr);
    const recompiled = fs.readFileSync(path.join(dir, 'recompiled.aml'));
    const same = Buffer.compare(recompiled.subarray(36), Buffer.from(body)) === 0;
    t.true(same, same ? '' : `first difference at body offset ${firstDifference(recompiled.subarray(36), body)}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the GED shape: level-triggered Interrupt, SystemIO field, _EVT with If/LEqual/And/Notify', (t) => {
  t.is(hex(aml.Resource.interrupt({ edge: false }, [9])), '8906000101' + '09000000');
  t.is(hex(aml.Resource.interrupt({ edge: true, activeLow: true, shared: true, wake: true, consumer: false }, [0x20])), '890600' + '1e' + '01' + '20000000');
  t.is(hex(aml.operationRegion('GDRG', aml.RegionSpace.SystemIO, 0x610, 1)), '5b80' + '47445247' + '01' + '0b1006' + '01');
  t.is(hex(aml.field('GDRG', { access: aml.FieldAccess.Byte }, [{ name: 'GDST', bits: 8 }])), '5b81' + '0b' + '47445247' + '01' + '4744535408');
  t.is(hex(aml.lEqual(aml.arg(0), 9)), '93' + '68' + '0a09');
  t.is(hex(aml.and(aml.local(0), 1)), '7b' + '60' + '01' + '00', 'no target: NullName');
  t.is(hex(aml.notify(aml.path('\\_SB.PWRB'), 0x80)), '86' + '5c2e5f53425f50575242' + '0a80');
  const evt = aml.method('_EVT', { args: 1, serialized: true }, [
    aml.ifThen(aml.lEqual(aml.arg(0), 9), [aml.notify(aml.path('\\_SB.PWRB'), 0x80)]),
  ]);
  // If: 0xa0, PkgLength (counting itself), predicate (4 bytes), Notify (13 bytes)
  t.is(hex(evt), '14' + '19' + '5f455654' + '09' + 'a0' + '12' + '93680a09' + '865c2e5f53425f505752420a80');
  t.throws(() => aml.Resource.interrupt({}, []), { instanceOf: aml.AmlError });
});
