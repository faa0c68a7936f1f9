// A VMM killed while it writes a qcow2 image: SIGKILL at random moments, several times over,
// must leave an image qemu-img finds no corruption in (leaked clusters are allowed) and that
// opens and reads again.
import test from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { openDiskImage } from '../../src/block/open-image';
import { qemuCheck, qemuImg, rng, tmpDir } from './block-helpers';

const writerScript = `
const { openDiskImage } = require(${JSON.stringify(path.join(__dirname, '../../src/block/open-image.js'))});
(async () => {
  const img = await openDiskImage(process.argv[2]);
  let s = Number(process.argv[3]) >>> 0 || 1;
  const rand = (n) => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s % n; };
  process.stdout.write('ready\\n');
  for (let i = 0;; i++) {
    const offset = rand(img.size - 65536), length = 1 + rand(65536);
    const k = rand(10);
    if (k < 7) await img.write(offset, Buffer.alloc(length, i & 255));
    else if (k < 9) await img.writeZeroes(offset, length);
    else await img.discard(offset, length);
    if (i % 50 === 0) await img.flush();
  }
})();
`;

test('qcow2: SIGKILL while writing leaves no corruption, only leaks at worst', async (t) => {
  const dir = tmpDir();
  const image = path.join(dir, 'crash.qcow2');
  const script = path.join(dir, 'writer.js');
  fs.writeFileSync(script, writerScript);
  fs.writeFileSync(path.join(dir, 'base.raw'), Buffer.alloc(8 << 20, 0x33));
  // 512-byte clusters: metadata on almost every write, and the refcount table moves past 8 MiB.
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.raw', '-F', 'raw', image, '32M');
  const rand = rng(42);
  for (let round = 0; round < 6; round++) {
    const child = spawn(process.execPath, [script, image, String(round + 1)], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child.stdout.once('data', () => resolve());
      child.once('exit', (code) => reject(new Error(`writer exited early (${code})`)));
    });
    await new Promise((r) => setTimeout(r, 100 + rand(600)));
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
    const c = qemuCheck(image);
    t.is(c.corruptions, 0, `round ${round}: corruption`);
    t.is(c.errors, 0, `round ${round}: check errors`);
    const img = await openDiskImage(image, { readonly: true });
    await img.read(0, Buffer.alloc(img.size));
    await img.close();
  }
  t.true(fs.statSync(image).size > 1 << 20, 'the writer wrote little: the test did not exercise allocation');
  fs.rmSync(dir, { recursive: true });
});
