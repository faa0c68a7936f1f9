// A Vmm in a process of its own, for tests that kill one side of a migration with SIGKILL.
//   node migration-child.js receive URL            prints READY once listening
//   node migration-child.js send URL KERNEL SERIAL  boots the tiny kernel, prints STARTED once
//                                                  the migration to URL has started
import { MigrationEvents } from '../../src/state';
import { silentLogger } from '../../src/util/log';
import { Vmm } from '../../src/vmm/vmm';

async function main(): Promise<void> {
  const [mode, url, kernel, serial] = process.argv.slice(2);
  const vmm = new Vmm({ log: silentLogger() });
  if (mode === 'receive') {
    vmm.store.events$.subscribe((e) => {
      if (e.type === MigrationEvents.ReceiveReady) process.stdout.write('READY\n');
    });
    await vmm.receiveMigration({ receiver_url: url });
    process.stdout.write('RECEIVED\n');
    return;
  }
  await vmm.create({
    payload: { kernel, cmdline: 'child' },
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 << 20 },
    serial: { mode: 'File', file: serial },
    console: { mode: 'Off' },
  });
  await vmm.boot();
  await new Promise((r) => setTimeout(r, 500));
  await vmm.sendMigration({ destination_url: url });
  process.stdout.write('STARTED\n');
}

main().catch((e) => {
  process.stderr.write(`${(e as Error).message}\n`);
  process.exit(1);
});
