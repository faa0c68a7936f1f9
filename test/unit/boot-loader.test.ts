import test from 'ava';
import fs from 'node:fs';
import { BootError, PVH_CMDLINE_MAX, loadKernel } from '../../src/boot/boot';
import { parseBzImage, ZeroPage, SetupHeader } from '../../src/boot/bzimage';
import { XEN_HVM_START_MAGIC_VALUE, parseElfKernel } from '../../src/boot/elf-pvh';
import {
  CMDLINE_ADDRESS,
  E820Type,
  PVH_MEMMAP_ADDRESS,
  PVH_MODLIST_ADDRESS,
  PVH_START_INFO_ADDRESS,
  RSDP_ADDRESS,
  ZERO_PAGE_ADDRESS,
  e820Map,
} from '../../src/boot/layout';
import { BOOT_GDT_ADDRESS, PML4_ADDRESS, PDPT_ADDRESS } from '../../src/boot/x86/long-mode';
import { GuestMemory } from '../../src/memory/guest-memory';
import { INTEL_XEON } from './boot-cpuid-fixtures';
import { FIXTURES_DIR, MiB, buildBzImage, buildElf, fixture, memoryOf, pattern } from './boot-helpers';

const CMDLINE = 'console=ttyS0 reboot=k panic=1';

function cstring(mem: GuestMemory, addr: number, max = 4096): string {
  const b = Buffer.from(mem.read(addr, max));
  return b.toString('latin1', 0, b.indexOf(0));
}

function elfKernel() {
  const text = pattern(0x3000, 1);
  const data = pattern(0x800, 2);
  return {
    text,
    data,
    image: buildElf({
      segments: [
        { paddr: 0x1000000, data: text },
        { paddr: 0x1200000, data, memsz: 0x2000 }, // .bss after the file bytes
      ],
      pvhEntry: 0x1000123,
      otherNotes: [
        { name: 'Xen', type: 6, desc: Buffer.from('linux\0') },
        { name: 'GNU', type: 3, desc: new Uint8Array(20) },
      ],
    }),
  };
}

// ---------------------------------------------------------------- ELF / PVH

test('ELF: segments at p_paddr, .bss zeroed, PVH entry from the Xen note', (t) => {
  const { text, data, image } = elfKernel();
  const mem = memoryOf(64 * MiB);
  mem.fill(0x1200000, 0x2000, 0xee); // stale bytes where .bss goes
  const plan = loadKernel(mem, { kernel: image, cmdline: CMDLINE, vcpuCount: 1, memorySize: 64 * MiB });
  t.is(plan.format, 'elf-pvh');
  t.is(plan.entry, 0x1000123);
  t.deepEqual(Buffer.from(mem.read(0x1000000, text.length)), Buffer.from(text));
  t.deepEqual(Buffer.from(mem.read(0x1200000, data.length)), Buffer.from(data));
  t.true(mem.read(0x1200000 + data.length, 0x2000 - data.length).every((b) => b === 0));
  t.deepEqual(plan.kernel, { start: 0x1000000, end: 0x1202000 });
});

test('ELF: 32-bit PVH entry registers and sregs plan', (t) => {
  const { image } = elfKernel();
  const mem = memoryOf(64 * MiB);
  const plan = loadKernel(mem, { kernel: image, cmdline: CMDLINE, vcpuCount: 2, memorySize: 64 * MiB });
  const r = plan.boot.regs;
  t.is(r.rip, 0x1000123n);
  t.is(r.rbx, BigInt(PVH_START_INFO_ADDRESS));
  t.is(r.rflags, 2n, 'IF and VM clear');
  t.is(r.rsi, 0n);
  t.deepEqual(plan.boot.sregs, { mode: 'pvh32' });
  t.is(plan.bootParams, PVH_START_INFO_ADDRESS);
  t.not(mem.readU64(BOOT_GDT_ADDRESS + 0x18), 0n, 'boot GDT written (CODE32 descriptor)');
});

test('ELF: 4-byte PHYS32_ENTRY descriptors are accepted too', (t) => {
  const image = buildElf({ segments: [{ paddr: 0x200000, data: pattern(64, 3) }], pvhEntry: 0x200010, pvhDescSize: 4 });
  t.is(parseElfKernel(image).pvhEntry, 0x200010);
});

test('PVH start info: magic, version 1, cmdline, modlist with the initramfs, memmap, RSDP', (t) => {
  const { image } = elfKernel();
  const initrd = pattern(300_000, 9);
  const size = 64 * MiB;
  const mem = memoryOf(size);
  const plan = loadKernel(mem, { kernel: image, initramfs: initrd, cmdline: CMDLINE, vcpuCount: 1, memorySize: size });
  const si = PVH_START_INFO_ADDRESS;
  t.is(mem.readU32(si + 0), XEN_HVM_START_MAGIC_VALUE);
  t.is(mem.readU32(si + 0), 0x336ec578);
  t.is(mem.readU32(si + 4), 1, 'version');
  t.is(mem.readU32(si + 8), 0, 'flags');
  t.is(mem.readU32(si + 12), 1, 'nr_modules');
  t.is(mem.readU64(si + 16), BigInt(PVH_MODLIST_ADDRESS));
  t.is(mem.readU64(si + 24), BigInt(CMDLINE_ADDRESS));
  t.is(mem.readU64(si + 32), BigInt(RSDP_ADDRESS));
  t.is(mem.readU64(si + 40), BigInt(PVH_MEMMAP_ADDRESS));
  const map = e820Map(size);
  t.is(mem.readU32(si + 48), map.length);
  t.is(mem.readU32(si + 52), 0);

  t.is(cstring(mem, CMDLINE_ADDRESS), CMDLINE);
  t.is(plan.cmdline.length, CMDLINE.length);

  const ird = plan.initramfs!;
  t.is(mem.readU64(PVH_MODLIST_ADDRESS), BigInt(ird.address));
  t.is(mem.readU64(PVH_MODLIST_ADDRESS + 8), BigInt(initrd.length));
  t.is(mem.readU64(PVH_MODLIST_ADDRESS + 16), 0n, 'no module cmdline');
  t.is(mem.readU64(PVH_MODLIST_ADDRESS + 24), 0n);
  t.deepEqual(Buffer.from(mem.read(ird.address, initrd.length)), Buffer.from(initrd));
  t.is(ird.address % 4096, 0);
  t.true(ird.address + ird.size <= size, 'below the top of RAM');
  t.true(size - (ird.address + ird.size) < 4096, 'as high as possible');
  t.true(ird.address >= plan.kernel.end);

  map.forEach((e, i) => {
    const o = PVH_MEMMAP_ADDRESS + 24 * i;
    t.is(mem.readU64(o), BigInt(e.addr));
    t.is(mem.readU64(o + 8), BigInt(e.size));
    t.is(mem.readU32(o + 16), e.type);
    t.is(mem.readU32(o + 20), 0);
  });
  t.is(map[0].type, E820Type.RAM);
  t.is(Buffer.from(mem.read(RSDP_ADDRESS, 8)).toString('latin1'), 'RSD PTR ');
});

test('PVH without initramfs: no modules, null modlist', (t) => {
  const { image } = elfKernel();
  const mem = memoryOf(64 * MiB);
  const plan = loadKernel(mem, { kernel: image, cmdline: '', vcpuCount: 1, memorySize: 64 * MiB });
  t.is(plan.initramfs, undefined);
  t.is(mem.readU32(PVH_START_INFO_ADDRESS + 12), 0);
  t.is(mem.readU64(PVH_START_INFO_ADDRESS + 16), 0n);
  t.is(mem.readU8(CMDLINE_ADDRESS), 0);
});

// ---------------------------------------------------------------- bzImage

function bzKernel(spec: Partial<Parameters<typeof buildBzImage>[0]> = {}) {
  const payload = pattern(0x5000, 4);
  return { payload, image: buildBzImage({ payload, ...spec }) };
}

test('bzImage: protected-mode kernel at 0x100000, 64-bit entry at +0x200', (t) => {
  const { payload, image } = bzKernel();
  const mem = memoryOf(64 * MiB);
  const plan = loadKernel(mem, { kernel: image, cmdline: CMDLINE, vcpuCount: 1, memorySize: 64 * MiB });
  t.is(plan.format, 'bzimage');
  t.is(plan.bootProtocol, 0x20f);
  t.deepEqual(Buffer.from(mem.read(0x100000, payload.length)), Buffer.from(payload));
  t.is(plan.entry, 0x100200);
  const r = plan.boot.regs;
  t.is(r.rip, 0x100200n);
  t.is(r.rsi, BigInt(ZERO_PAGE_ADDRESS));
  t.is(r.rsp, 0x8ff0n);
  t.is(r.rbp, 0x8ff0n);
  t.is(r.rflags, 2n);
  t.is(r.rbx, 0n);
  t.deepEqual(plan.boot.sregs, { mode: 'long64', cr3: PML4_ADDRESS });
  t.is(mem.readU64(PML4_ADDRESS) & ~0xfffn, BigInt(PDPT_ADDRESS), 'identity page tables written');
  t.not(mem.readU64(BOOT_GDT_ADDRESS + 8), 0n, 'boot GDT written');
  // relocatable: runs from max(align_up(0x100000, 2M), pref_address) = 16 MiB, needs init_size
  t.deepEqual(plan.kernel, { start: 0x100000, end: 0x1000000 + 0x400000 });
});

test('zero page: setup header copied, loader fields set, e820 and RSDP at their offsets', (t) => {
  const { image } = bzKernel();
  const initrd = pattern(123_457, 5);
  const size = 96 * MiB;
  const mem = memoryOf(size);
  mem.fill(ZERO_PAGE_ADDRESS, 4096, 0xcc); // the zero page must be rebuilt from scratch
  const plan = loadKernel(mem, { kernel: image, initramfs: initrd, cmdline: CMDLINE, vcpuCount: 1, memorySize: size });
  t.is(plan.bootParams, ZERO_PAGE_ADDRESS);
  const zp = Buffer.from(mem.read(ZERO_PAGE_ADDRESS, 4096));

  // setup header: bytes 0x1f1 .. 0x202 + image[0x201] come from the image, except loader fields
  const headerEnd = 0x202 + image[0x201];
  t.is(headerEnd, 0x26c);
  const changed = new Set<number>();
  for (const [off, len] of [
    [0x210, 1],
    [0x218, 8],
    [0x228, 4],
  ]) {
    for (let i = 0; i < len; i++) changed.add(off + i);
  }
  for (let i = 0x1f1; i < headerEnd; i++) {
    if (!changed.has(i) && zp[i] !== image[i]) t.fail(`header byte 0x${i.toString(16)} not copied`);
  }
  t.is(zp.toString('latin1', 0x202, 0x206), 'HdrS');
  t.is(zp.readUInt16LE(0x206), 0x20f);
  t.is(zp[0x210], 0xff, 'type_of_loader');
  t.is(zp.readUInt32LE(0x228), CMDLINE_ADDRESS, 'cmd_line_ptr');
  t.is(zp.readUInt32LE(0x0c8), 0, 'ext_cmd_line_ptr');
  t.is(zp.readUInt32LE(0x238), 0x7ff, 'cmdline_size kept');
  t.is(cstring(mem, CMDLINE_ADDRESS), CMDLINE);

  const ird = plan.initramfs!;
  t.is(zp.readUInt32LE(0x218), ird.address, 'ramdisk_image');
  t.is(zp.readUInt32LE(0x21c), initrd.length, 'ramdisk_size');
  t.is(zp.readUInt32LE(0x0c0), 0, 'ext_ramdisk_image');
  t.is(zp.readUInt32LE(0x0c4), 0, 'ext_ramdisk_size');
  t.is(ird.address % 4096, 0);
  t.true(ird.address + initrd.length <= size && size - (ird.address + initrd.length) < 4096);
  t.deepEqual(Buffer.from(mem.read(ird.address, initrd.length)), Buffer.from(initrd));

  t.is(Number(zp.readBigUInt64LE(0x070)), RSDP_ADDRESS, 'acpi_rsdp_addr');
  const map = e820Map(size);
  t.is(zp[0x1e8], map.length, 'e820_entries');
  map.forEach((e, i) => {
    const o = 0x2d0 + 20 * i;
    t.is(Number(zp.readBigUInt64LE(o)), e.addr);
    t.is(Number(zp.readBigUInt64LE(o + 8)), e.size);
    t.is(zp.readUInt32LE(o + 16), e.type);
  });
  // everything outside the fields we own stays zero
  const owned = new Set<number>();
  const own = (off: number, len: number) => {
    for (let i = 0; i < len; i++) owned.add(off + i);
  };
  own(0x1f1, headerEnd - 0x1f1);
  own(0x070, 8);
  own(0x0c0, 12);
  own(0x1e8, 1);
  own(0x2d0, 20 * map.length);
  for (let i = 0; i < 4096; i++) if (!owned.has(i) && zp[i] !== 0) t.fail(`zero page byte 0x${i.toString(16)} = ${zp[i]}`);
  t.is(ZeroPage.E820_TABLE, 0x2d0);
  t.is(SetupHeader.CMD_LINE_PTR, 0x228);
});

test('zero page: acpi_rsdp_addr is left alone for protocol 2.12/2.13', (t) => {
  const { image } = bzKernel({ version: 0x020d });
  const mem = memoryOf(64 * MiB);
  loadKernel(mem, { kernel: image, cmdline: CMDLINE, vcpuCount: 1, memorySize: 64 * MiB });
  t.is(mem.readU64(ZERO_PAGE_ADDRESS + 0x070), 0n);
});

test('bzImage: initramfs stays below initrd_addr_max', (t) => {
  const { image } = bzKernel({ initrdAddrMax: 0x2ffffff });
  const mem = memoryOf(128 * MiB);
  const plan = loadKernel(mem, { kernel: image, initramfs: pattern(0x10000, 6), cmdline: '', vcpuCount: 1, memorySize: 128 * MiB });
  t.is(plan.initramfs!.address + 0x10000, 0x3000000);
  t.is(mem.readU32(ZERO_PAGE_ADDRESS + 0x218), 0x3000000 - 0x10000);
});

test('bzImage: setup_sects 0 means 4', (t) => {
  const image = buildBzImage({ payload: pattern(0x1000, 8), setupSects: 4 });
  image[0x1f1] = 0;
  t.is(parseBzImage(image).kernelOffset, 5 * 512);
});

test('bzImage: non-relocatable kernels need RAM from the load address only', (t) => {
  const { image } = bzKernel({ relocatable: false, initSize: 0x800000 });
  const mem = memoryOf(64 * MiB);
  const plan = loadKernel(mem, { kernel: image, cmdline: '', vcpuCount: 1, memorySize: 64 * MiB });
  t.deepEqual(plan.kernel, { start: 0x100000, end: 0x900000 });
});

// ---------------------------------------------------------------- per-vCPU inputs

test('per-vCPU inputs: CPUID with each APIC ID, MSRs, FPU, LINT modes, AP wait-for-SIPI', (t) => {
  const { image } = elfKernel();
  const mem = memoryOf(64 * MiB);
  const plan = loadKernel(mem, {
    kernel: image,
    cmdline: '',
    vcpuCount: 3,
    memorySize: 64 * MiB,
    supportedCpuid: INTEL_XEON,
    cpuidOptions: { tscDeadline: true },
  });
  t.is(plan.vcpus.length, 3);
  plan.vcpus.forEach((v, i) => {
    t.is(v.id, i);
    t.is(v.apicId, i);
    t.is(v.mpState, i === 0 ? 'runnable' : 'wait-for-sipi');
    const l1 = v.cpuid!.find((e) => e.function === 1)!;
    t.is(l1.ebx >>> 24, i);
    t.truthy(l1.ecx & (1 << 24));
    t.deepEqual(v.lapic, { lint0: 'extint', lint1: 'nmi' });
    t.is(v.fpu.fcw, 0x37f);
    t.true(v.msrs.some((m) => m.index === 0x2ff && m.data === 0x806n));
  });
  // MADT agrees on the vCPU count
  const madt = plan.acpi.tables.find((x) => x.signature === 'APIC')!;
  t.is(madt.length, 44 + 3 * 8 + 12 + 10 + 6);
  // plain data: survives structured cloning
  t.deepEqual(structuredClone(plan), plan);
  const noCpuid = loadKernel(memoryOf(64 * MiB), { kernel: image, cmdline: '', vcpuCount: 1, memorySize: 64 * MiB });
  t.is(noCpuid.vcpus[0].cpuid, undefined);
});

// ---------------------------------------------------------------- errors

function bootError(t: import('ava').ExecutionContext, fn: () => unknown, re: RegExp): void {
  const e = t.throws(fn, { instanceOf: BootError });
  t.regex(e!.message, re);
}

test('unknown kernel format names the file', (t) => {
  bootError(
    t,
    () => loadKernel(memoryOf(16 * MiB), { kernel: Buffer.alloc(4096, 0x90), kernelName: '/images/vmlinux.gz', cmdline: '', vcpuCount: 1, memorySize: 16 * MiB }),
    /^\/images\/vmlinux\.gz: unknown kernel format/,
  );
});

test('truncated ELF: program headers or segment data past the end', (t) => {
  const { image } = elfKernel();
  const mem = memoryOf(64 * MiB);
  const opts = { cmdline: '', vcpuCount: 1, memorySize: 64 * MiB, kernelName: 'vmlinux' };
  bootError(t, () => loadKernel(mem, { ...opts, kernel: image.subarray(0, 40) }), /^vmlinux: truncated ELF/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: image.subarray(0, 100) }), /^vmlinux: truncated ELF: program headers/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: image.subarray(0, image.length - 10) }), /^vmlinux: truncated ELF: program header \d needs file bytes/);
});

test('ELF without a PVH note, 32-bit ELF, wrong machine', (t) => {
  const mem = memoryOf(64 * MiB);
  const opts = { cmdline: '', vcpuCount: 1, memorySize: 64 * MiB, kernelName: 'k' };
  bootError(t, () => loadKernel(mem, { ...opts, kernel: buildElf({ segments: [{ paddr: 0x1000000, data: pattern(16, 1) }] }) }), /CONFIG_PVH/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: buildElf({ segments: [], pvhEntry: 1, elfClass: 1 }) }), /ELFCLASS64/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: buildElf({ segments: [], pvhEntry: 1, machine: 183 }) }), /not x86-64/);
  bootError(
    t,
    () => loadKernel(mem, { ...opts, kernel: buildElf({ segments: [{ paddr: 0x80000, data: pattern(16, 1) }], pvhEntry: 0x80000 }) }),
    /overlaps the boot data below 1 MiB/,
  );
});

test('truncated or unusable bzImage', (t) => {
  const { image } = bzKernel();
  const mem = memoryOf(64 * MiB);
  const opts = { cmdline: '', vcpuCount: 1, memorySize: 64 * MiB, kernelName: 'bzImage' };
  bootError(t, () => loadKernel(mem, { ...opts, kernel: image.subarray(0, 0x100) }), /^bzImage: truncated bzImage/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: image.subarray(0, 0x400) }), /^bzImage: truncated bzImage: 4 setup sectors/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: image.subarray(0, image.length - 32) }), /^bzImage: truncated bzImage: header says/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: bzKernel({ version: 0x020b }).image }), /boot protocol 2\.11 is too old/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: bzKernel({ xloadflags: 0 }).image }), /XLF_KERNEL_64/);
  bootError(t, () => loadKernel(mem, { ...opts, kernel: bzKernel({ loadflags: 0 }).image }), /zImage/);
});

test('an initramfs that does not fit', (t) => {
  const { image } = bzKernel();
  bootError(
    t,
    () =>
      loadKernel(memoryOf(32 * MiB), {
        kernel: image,
        initramfs: new Uint8Array(16 * MiB),
        initramfsName: '/boot/initrd.img',
        cmdline: '',
        vcpuCount: 1,
        memorySize: 32 * MiB,
      }),
    /^\/boot\/initrd\.img: initramfs of 16777216 bytes does not fit/,
  );
  const elf = elfKernel().image;
  bootError(
    t,
    () => loadKernel(memoryOf(32 * MiB), { kernel: elf, initramfs: new Uint8Array(31 * MiB), cmdline: '', vcpuCount: 1, memorySize: 32 * MiB }),
    /^initramfs: initramfs of \d+ bytes does not fit/,
  );
});

test('a command line that is too long', (t) => {
  const { image } = bzKernel({ cmdlineSize: 16 });
  const opts = { vcpuCount: 1, memorySize: 64 * MiB, kernelName: 'bzImage' };
  t.notThrows(() => loadKernel(memoryOf(64 * MiB), { ...opts, kernel: image, cmdline: 'x'.repeat(16) }));
  bootError(t, () => loadKernel(memoryOf(64 * MiB), { ...opts, kernel: image, cmdline: 'x'.repeat(17) }), /^bzImage: kernel command line is 17 bytes; this kernel accepts at most 16/);
  const elf = elfKernel().image;
  t.notThrows(() => loadKernel(memoryOf(64 * MiB), { ...opts, kernel: elf, cmdline: 'y'.repeat(PVH_CMDLINE_MAX) }));
  bootError(t, () => loadKernel(memoryOf(64 * MiB), { ...opts, kernel: elf, cmdline: 'y'.repeat(2048) }), /at most 2047/);
  bootError(t, () => loadKernel(memoryOf(64 * MiB), { ...opts, kernel: elf, cmdline: 'a\0b' }), /NUL/);
});

test('memory too small for the kernel', (t) => {
  const elf = elfKernel().image; // needs RAM up to 0x1202000
  bootError(
    t,
    () => loadKernel(memoryOf(16 * MiB), { kernel: elf, kernelName: 'vmlinux', cmdline: '', vcpuCount: 1, memorySize: 16 * MiB }),
    /^vmlinux: memory too small for the kernel: it needs RAM up to 0x1202000/,
  );
  const { image } = bzKernel({ initSize: 0x3000000 }); // 16 MiB + 48 MiB
  bootError(
    t,
    () => loadKernel(memoryOf(48 * MiB), { kernel: image, cmdline: '', vcpuCount: 1, memorySize: 48 * MiB }),
    /memory too small for the kernel: it needs RAM up to 0x4000000 \(64 MiB\)/,
  );
  t.notThrows(() => loadKernel(memoryOf(64 * MiB), { kernel: image, cmdline: '', vcpuCount: 1, memorySize: 64 * MiB }));
});

test('configuration errors: vCPU count, memory size, memory that does not match', (t) => {
  const elf = elfKernel().image;
  const base = { kernel: elf, cmdline: '', memorySize: 64 * MiB };
  bootError(t, () => loadKernel(memoryOf(64 * MiB), { ...base, vcpuCount: 0 }), /vCPU count 0/);
  bootError(t, () => loadKernel(memoryOf(64 * MiB), { ...base, vcpuCount: 1, memorySize: 64 * MiB + 1 }), /page size/);
  bootError(t, () => loadKernel(memoryOf(32 * MiB), { ...base, vcpuCount: 1 }), /guest memory does not cover/);
});

test('nothing is written when a check fails', (t) => {
  const { image } = bzKernel();
  const mem = memoryOf(32 * MiB);
  t.throws(() => loadKernel(mem, { kernel: image, initramfs: new Uint8Array(30 * MiB), cmdline: 'x', vcpuCount: 1, memorySize: 32 * MiB }));
  t.is(mem.readU8(CMDLINE_ADDRESS), 0);
  t.is(mem.readU32(RSDP_ADDRESS), 0);
  t.is(mem.readU32(0x100000), 0);
});

// ---------------------------------------------------------------- real Debian kernels

for (const name of ['vmlinux', 'bzImage'] as const) {
  const file = fixture(name);
  const title = `real Debian ${name} loads${file ? '' : ` (skipped: no ${FIXTURES_DIR}/${name}; run scripts/guest-fixtures.sh or set TERN_FIXTURES)`}`;
  (file ? test : test.skip)(title, (t) => {
    const kernel = fs.readFileSync(file!);
    const initrdFile = fixture('initramfs.img');
    const initramfs = initrdFile ? fs.readFileSync(initrdFile) : undefined;
    const size = 512 * MiB;
    const mem = memoryOf(size);
    const plan = loadKernel(mem, { kernel, initramfs, cmdline: 'console=ttyS0 panic=-1', vcpuCount: 2, memorySize: size, kernelName: file });
    if (name === 'vmlinux') {
      const elf = parseElfKernel(kernel, file);
      t.is(plan.format, 'elf-pvh');
      t.true(elf.segments.some((s) => elf.pvhEntry >= s.paddr && elf.pvhEntry < s.paddr + s.memSize), 'entry inside a segment');
      t.is(elf.start, 0x1000000);
      for (const s of elf.segments) {
        t.deepEqual(Buffer.from(mem.read(s.paddr, Math.min(s.fileSize, 4096))), kernel.subarray(s.fileOffset, s.fileOffset + Math.min(s.fileSize, 4096)));
      }
      t.is(mem.readU32(PVH_START_INFO_ADDRESS), 0x336ec578);
      t.deepEqual(plan.boot.sregs, { mode: 'pvh32' });
    } else {
      const bz = parseBzImage(kernel, file);
      t.is(plan.format, 'bzimage');
      t.true(bz.version >= 0x20c);
      t.truthy(bz.xloadflags & 1);
      t.true(bz.relocatable);
      t.is(bz.cmdlineSize, 2047);
      t.deepEqual(Buffer.from(mem.read(0x100000, 4096)), kernel.subarray(bz.kernelOffset, bz.kernelOffset + 4096));
      const zp = Buffer.from(mem.read(ZERO_PAGE_ADDRESS, 0x270));
      t.is(zp.toString('latin1', 0x202, 0x206), 'HdrS');
      t.deepEqual(zp.subarray(0x1f1, 0x210), kernel.subarray(0x1f1, 0x210));
      t.is(Number(zp.readBigUInt64LE(0x070)), RSDP_ADDRESS);
      t.true(plan.kernel.end <= 0x1000000 + bz.initSize);
    }
    if (initramfs) {
      t.deepEqual(Buffer.from(mem.read(plan.initramfs!.address, 4096)), initramfs.subarray(0, 4096));
      t.true(plan.initramfs!.address >= plan.kernel.end);
    }
  });
}
