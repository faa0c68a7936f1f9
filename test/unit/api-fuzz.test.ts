// Bad input against a VMM with no VM: the real `tern` process started with only --api-socket
// (it creates no KVM object until a VM boots, so this runs without /dev/kvm) gets the same
// thousands of malformed requests as the host tier's guest-running fuzz. The VMM must not
// crash, every complete request must get a well-formed error reply, and no request may have
// created or changed anything.
import test from 'ava';
import path from 'node:path';

import { TernClient } from '../../src/api/client';
import { GuestProcess } from '../linux/guest-process';
import { readMonitorFile } from '../support/monitor-file';
import { waitForPath } from '../support/processes';
import { FUZZED_ENDPOINTS, FUZZ_PARALLEL, FUZZ_SEED, generate, runFuzz } from './api-fuzz-cases';
import { ReplyRecorder, contractTest, tempDir } from './api-harness';


const recorder = new ReplyRecorder();
const dir = tempDir('tern-api-fuzz-novm-');
const socket = path.join(dir, 'api.sock');
const monitorFile = path.join(dir, 'events.json');
let vmm: GuestProcess;
let client: TernClient;

test.before(async () => {
  vmm = GuestProcess.tern(['--api-socket', `path=${socket}`, '--event-monitor', `path=${monitorFile}`]);
  await waitForPath(socket);
  client = new TernClient({ socketPath: socket, timeoutMs: 20_000 });
});

test.after.always(() => {
  client?.close();
  vmm?.kill();
});

test.serial(`2,000+ malformed requests to a VMM with no VM (seed ${FUZZ_SEED}): no crash, well-formed error replies, nothing created`, async (t) => {
  const cases = generate(FUZZ_SEED);
  t.true(cases.length >= 2000, `${cases.length} cases`);
  const { problems, byKind } = await runFuzz(socket, cases, recorder, FUZZ_PARALLEL, () =>
    vmm.child.exitCode === null ? null : `the VMM exited (code ${vmm.child.exitCode})`,
  );
  t.log([...byKind].map(([k, v]) => `${k}: ${v.n} sent, ${v.replied} answered`).join('\n'));
  t.deepEqual(problems.slice(0, 20), [], `${problems.length} problems`);

  t.is(vmm.child.exitCode, null, `the VMM is still running; stderr: ${vmm.stderr.slice(-2000)}`);
  t.is((await client.ping()).pid, vmm.child.pid);
  const info = await client.request('GET', 'vm.info');
  t.is(info.status, 404, 'no request created a VM');
  // the monitor saw the VMM start and nothing else
  t.deepEqual(readMonitorFile(monitorFile).map((e) => `${e.source}:${e.event}`), ['vmm:starting']);

  await client.shutdownVmm();
  const { code } = await vmm.exit(15_000);
  t.is(code, 0, 'vmm.shutdown ends the VMM with exit code 0');
});

contractTest(test, recorder, 'api-fuzz without a VM', FUZZED_ENDPOINTS);
