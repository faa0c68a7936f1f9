// vm.add-net through the real API socket: a cold add joins the VM's config (204); 400 for a
// body that is not a NetConfig or a card Tern cannot give (bad MAC, IPv6 host address, more
// queue pairs than it has), 404 without a VM, 409 for an id already taken (also a default
// _netN one). vm.create refuses such cards the same way. Every reply is checked against the
// OpenAPI document.
import test from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { ApiError } from '../../src/api/errors';
import { requestWithFds } from '../../src/api/fd-request';
import { VmmApi } from '../../src/api/vmm-api';
import { native } from '../../src/native/kvm';
import { TERN_REMOTE } from '../support/processes';
import { ReplyRecorder, bodyJson, contractTest, startApi, tempDir, type ApiRig } from './api-harness';

const recorder = new ReplyRecorder();
const dir = tempDir('tern-api-add-net-');
let rig: ApiRig;

test.before(async () => {
  rig = await startApi(recorder, dir);
});
test.after.always(async () => {
  await rig?.close();
});

test.serial('vm.add-net adds net devices to a created VM; bad bodies, impossible cards, no VM and taken ids are refused', async (t) => {
  t.is((await rig.call('PUT', 'vm.add-net', { tap: 'tap0' })).status, 404, 'no VM yet');
  const badCreate = await rig.call('PUT', 'vm.create', { payload: { kernel: '/boot/vmlinux' }, net: [{ tap: 'tap0', mac: '01:00:5e:00:00:01' }] });
  t.is(badCreate.status, 400, 'vm.create refuses a multicast MAC');
  t.regex(badCreate.body.toString(), /multicast/);
  t.is((await rig.call('PUT', 'vm.create', { payload: { kernel: '/boot/vmlinux' }, net: [{ tap: 'tap0' }] })).status, 204);

  const added = await rig.call('PUT', 'vm.add-net', { tap: 'tap1', ip: '192.168.250.1', mask: '255.255.255.0', mac: '52:54:00:00:00:02' });
  t.is(added.status, 204, added.body.toString());
  t.is((await rig.call('PUT', 'vm.add-net', { tap: 'tap2', id: 'uplink' })).status, 204);
  const info = bodyJson(await rig.call('GET', 'vm.info')) as { config: { net: { tap: string; id?: string; mac?: string }[] } };
  t.deepEqual(
    info.config.net.map((n) => [n.tap, n.id, n.mac]),
    [
      ['tap0', undefined, undefined],
      ['tap1', undefined, '52:54:00:00:00:02'],
      ['tap2', 'uplink', undefined],
    ],
  );

  t.is((await rig.call('PUT', 'vm.add-net', { tap: 'x', id: 'uplink' })).status, 409, 'an explicit id already used');
  t.is((await rig.call('PUT', 'vm.add-net', { tap: 'x', id: '_net0' })).status, 409, 'the first card is _net0 though it names no id');
  for (const [body, why] of [
    [{ tap: 7 }, 'tap must be a string'],
    [{ tap: 'x', mac: 'not-a-mac' }, 'a MAC that is not one'],
    [{ tap: 'x', ip: 'fd00::1', mask: '255.255.255.0' }, 'an IPv6 host address with an IPv4 mask'],
    [{ tap: 'x', ip: '192.168.1.1', mask: '255.0.255.0' }, 'a mask that is no netmask'],
    [{ tap: 'x', num_queues: 3 }, 'an odd number of queues'],
    [{ tap: 'x', num_queues: 18 }, 'more queue pairs than a card has'],
    [{ tap: 'x', queue_size: 100 }, 'a queue size that is no power of two'],
    [{ tap: 'x', vhost_user: true }, 'vhost-user'],
  ] as const) {
    t.is((await rig.call('PUT', 'vm.add-net', body)).status, 400, why);
  }
  const after = bodyJson(await rig.call('GET', 'vm.info')) as { config: { net: unknown[] } };
  t.is(after.config.net.length, 3, 'refused cards left the config as it was');
});

contractTest(test, recorder, 'api-add-net', ['PUT vm.add-net', 'PUT vm.create', 'GET vm.info']);

/** How many of this process's descriptors are tap queues. */
function tunFds(): number {
  return fs.readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return fs.readlinkSync(`/proc/self/fd/${fd}`) === '/dev/net/tun';
    } catch {
      return false;
    }
  }).length;
}

test.serial('tap fds: taken from the command line (the card is named after its tap), dropped from API bodies, refused when they are no tap', async (t) => {
  await rig.call('PUT', 'vm.delete');
  const { name, fds } = native().openTap(`tfd${process.pid % 100000}`, 1);
  t.teardown(() => native().closeFd(fds[0]));
  const kernel = { payload: { kernel: '/boot/vmlinux' } };

  t.is((await rig.call('PUT', 'vm.create', { ...kernel, net: [{ fds: [0] }] })).status, 204, 'an API body\'s fds are ignored');
  const fromApi = bodyJson(await rig.call('GET', 'vm.info')) as { config: { net: { fds?: number[]; tap?: string }[] } };
  t.deepEqual(fromApi.config.net, [{}]);
  t.is((await rig.call('PUT', 'vm.add-net', { fds: [1], id: 'other' })).status, 204);
  t.deepEqual((bodyJson(await rig.call('GET', 'vm.info')) as typeof fromApi).config.net[1], { id: 'other' });
  await rig.call('PUT', 'vm.delete');

  const api = new VmmApi(rig.vmm);
  // (as tern is given its taps: a descriptor of its own, which the VM's deletion closes)
  const inherited = native().adoptTap(fds[0]).fd;
  await api.create({ ...kernel, net: [{ fds: [inherited] }] }, { heldFds: true });
  const held = bodyJson(await rig.call('GET', 'vm.info')) as typeof fromApi;
  t.deepEqual(held.config.net, [{ fds: [inherited], tap: name }]);
  const taps = tunFds();
  await rig.call('PUT', 'vm.delete');
  t.is(tunFds(), taps - 1, 'deleting the VM closed the tap it was given');

  const efd = native().eventfd(0);
  t.teardown(() => native().closeFd(efd));
  const notTap = await t.throwsAsync(api.create({ ...kernel, net: [{ fds: [efd] }] }, { heldFds: true }));
  t.like(notTap, { status: 400 });
  t.regex((notTap as ApiError).chain.join(' '), new RegExp(`fd ${efd} cannot be used: .*not a tap`));
  await t.throwsAsync(api.create({ ...kernel, net: [{ fds: [fds[0]], num_queues: 4 }] }, { heldFds: true }), { message: /1 fds for 4 queues/ });
  t.is(rig.vmm.state.vm.status, 'NotCreated');
});

const openFds = () => fs.readdirSync('/proc/self/fd').length;

test.serial('taps handed over with vm.add-net (SCM_RIGHTS, as ch-remote sends fd=): the card is named after the tap; descriptors no endpoint takes are closed', async (t) => {
  await rig.call('PUT', 'vm.delete');
  const { name, fds } = native().openTap(`tsc${process.pid % 100000}`, 1);
  t.teardown(() => native().closeFd(fds[0]));
  t.is((await rig.call('PUT', 'vm.create', { payload: { kernel: '/boot/vmlinux' } })).status, 204);

  await rig.client.addNet({ id: 'handed' }, [fds[0]]);
  const info = bodyJson(await rig.call('GET', 'vm.info')) as { config: { net: { id?: string; tap?: string; fds?: number[] }[] } };
  t.like(info.config.net[0], { id: 'handed', tap: name });
  t.is(info.config.net[0].fds?.length, 1, 'the VMM holds its own copy of the tap');
  t.not(info.config.net[0].fds![0], fds[0]);

  // ch-remote's way: tern-remote sends the tap it inherited as fd 3.
  const child = spawn(process.execPath, [TERN_REMOTE, '--api-socket', rig.socket, 'add-net', 'fd=3,id=scripted'], { stdio: ['ignore', 'pipe', 'pipe', fds[0]] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  t.is(await new Promise<number | null>((r) => child.on('exit', r)), 0, stderr);
  const after = bodyJson(await rig.call('GET', 'vm.info')) as typeof info;
  t.like(after.config.net[1], { id: 'scripted', tap: name });

  const efd = native().eventfd(0);
  t.teardown(() => native().closeFd(efd));
  const before = openFds();
  const refused = await t.throwsAsync(rig.client.addNet({ id: 'notap' }, [efd]));
  t.like(refused, { status: 400 });
  t.regex((refused as Error).message, /not a tap/);
  const pinged = await requestWithFds(rig.socket, 'GET', 'vmm.ping', undefined, [efd, efd], 10_000);
  t.is(pinged.status, 200, 'an endpoint that takes no descriptors answers as ever');
  // (the server runs in this process: what it received and did not keep is closed again)
  await new Promise((r) => setTimeout(r, 100));
  t.is(openFds(), before, 'every descriptor the VMM was sent and did not keep is closed');
  t.is((bodyJson(await rig.call('GET', 'vm.info')) as typeof info).config.net.length, 2);
  const withCards = tunFds();
  await rig.call('PUT', 'vm.delete');
  t.is(tunFds(), withCards - 2, 'deleting the VM closed the two taps handed over for its cards');
});

test.serial('vm.restore net_fds: the descriptors sent must be as many as it names, and taps; refused ones are closed', async (t) => {
  await rig.call('PUT', 'vm.delete');
  const { fds } = native().openTap(`trf${process.pid % 100000}`, 1);
  t.teardown(() => native().closeFd(fds[0]));
  const efd = native().eventfd(0);
  t.teardown(() => native().closeFd(efd));
  const source_url = `file://${dir}/no-snapshot`;
  const before = openFds();
  for (const [body, sent, why] of [
    [{ source_url, net_fds: [{ id: 'net0', num_fds: 2 }] }, [fds[0]], /net_fds names 2 descriptors, the request came with 1/],
    [{ source_url, net_fds: [{ id: 'net0', num_fds: 1 }] }, [], /net_fds names 1 descriptors, the request came with 0/],
    [{ source_url, net_fds: [{ id: 'net0', num_fds: 1 }, { id: 'net0', num_fds: 1 }] }, [fds[0], fds[0]], /distinct ids/],
    [{ source_url, net_fds: [{ id: 'net0', num_fds: -1 }] }, [], /net_fds must be a list/],
    [{ source_url, net_fds: 'net0@[3]' }, [fds[0]], /net_fds must be a list/],
    [{ source_url, net_fds: [{ id: 'net0', num_fds: 1 }] }, [efd], /not a tap/],
    [{ source_url, net: [{ id: 'net0', tap: 'tapx' }], net_fds: [{ id: 'net0', num_fds: 1 }] }, [fds[0]], /given both in net and in net_fds/],
  ] as const) {
    const r = await requestWithFds(rig.socket, 'PUT', 'vm.restore', body, sent, 10_000);
    t.is(r.status, 400, JSON.stringify(body));
    t.regex(r.body.toString(), why);
  }
  // A good list, for a snapshot that is not there: the restore fails, and the tap goes with it.
  const r = await requestWithFds(rig.socket, 'PUT', 'vm.restore', { source_url, net_fds: [{ id: 'net0', num_fds: 1, fds: [99] }] }, [fds[0]], 10_000);
  t.is(r.status, 500, r.body.toString());
  // (the server runs in this process: what it received and did not keep is closed again)
  await new Promise((res) => setTimeout(res, 100));
  t.is(openFds(), before, 'every descriptor sent with a refused or failed restore is closed');
  t.is(rig.vmm.state.vm.status, 'NotCreated');
});
