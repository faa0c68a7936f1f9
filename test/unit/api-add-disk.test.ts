// vm.add-disk through the real API socket: a cold add joins the VM's config (204), and each
// refusal has the contract's status: 400 for a body that is not a DiskConfig, 404 without a
// VM, 409 for an id already taken (also a default _diskN one). Every reply is checked against
// the OpenAPI document.
import test from 'ava';
import { ReplyRecorder, bodyJson, contractTest, startApi, tempDir, type ApiRig } from './api-harness';

const recorder = new ReplyRecorder();
const dir = tempDir('tern-api-add-disk-');
let rig: ApiRig;

test.before(async () => {
  rig = await startApi(recorder, dir);
});
test.after.always(async () => {
  await rig?.close();
});

test.serial('vm.add-disk adds disks to a created VM; bad bodies, no VM and taken ids are refused', async (t) => {
  t.is((await rig.call('PUT', 'vm.add-disk', { path: '/images/a.img' })).status, 404, 'no VM yet');
  t.is((await rig.call('PUT', 'vm.create', { payload: { kernel: '/boot/vmlinux' }, disks: [{ path: '/images/root.img' }] })).status, 204);

  const added = await rig.call('PUT', 'vm.add-disk', { path: '/images/data.qcow2', readonly: true, image_type: 'Qcow2' });
  t.is(added.status, 204, added.body.toString());
  t.is((await rig.call('PUT', 'vm.add-disk', { path: '/images/named.img', id: 'scratch' })).status, 204);

  const info = bodyJson(await rig.call('GET', 'vm.info')) as { config: { disks: { path: string; id?: string }[] } };
  t.deepEqual(
    info.config.disks.map((d) => [d.path, d.id]),
    [
      ['/images/root.img', undefined],
      ['/images/data.qcow2', undefined],
      ['/images/named.img', 'scratch'],
    ],
  );

  t.is((await rig.call('PUT', 'vm.add-disk', { path: '/images/x.img', id: 'scratch' })).status, 409, 'an explicit id already used');
  t.is((await rig.call('PUT', 'vm.add-disk', { path: '/images/x.img', id: '_disk0' })).status, 409, 'the first disk is _disk0 though it names no id');
  t.is((await rig.call('PUT', 'vm.add-disk', { path: 7 })).status, 400, 'path must be a string');
  t.is((await rig.call('PUT', 'vm.add-disk', { path: '/images/x.img', num_queues: 70000 })).status, 400, 'num_queues is a u16');
  t.is((await rig.call('PUT', 'vm.add-disk', [])).status, 400);
  const after = bodyJson(await rig.call('GET', 'vm.info')) as { config: { disks: unknown[] } };
  t.is(after.config.disks.length, 3, 'refused disks left the config as it was');
});

contractTest(test, recorder, 'api-add-disk', ['PUT vm.add-disk', 'PUT vm.create', 'GET vm.info']);
