// The contract tests themselves: they must be able to fail when a scenario stopped short (the
// endpoints it calls were not all answered), and find the OpenAPI document from a git worktree
// as well as from the main checkout.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';

import { ReplyRecorder, contractCandidates, tempDir, unansweredEndpoints } from './api-harness';

test('a scenario that broke after two replies is reported with every endpoint it never reached', (t) => {
  const recorder = new ReplyRecorder();
  const reply = (method: string, endpoint: string) => recorder.add({ method, endpoint, status: 204, body: Buffer.alloc(0) });
  reply('PUT', 'vm.create');
  reply('PUT', 'vm.boot');
  t.deepEqual(unansweredEndpoints(recorder, ['PUT vm.create', 'PUT vm.boot', 'PUT vm.pause', 'GET vm.info', 'PUT vm.delete']), [
    'PUT vm.pause',
    'GET vm.info',
    'PUT vm.delete',
  ]);
  reply('PUT', 'vm.pause');
  reply('GET', 'vm.info');
  reply('PUT', 'vm.delete');
  t.deepEqual(unansweredEndpoints(recorder, ['PUT vm.create', 'PUT vm.boot', 'PUT vm.pause', 'GET vm.info', 'PUT vm.delete']), []);
});

test('the OpenAPI document is looked for beside a worktree and beside the main checkout it belongs to', (t) => {
  const root = tempDir('tern-contract-');
  const main = path.join(root, 'projects', 'main');
  const worktree = path.join(root, 'elsewhere', 'wt-x');
  fs.mkdirSync(path.join(main, '.git', 'worktrees', 'wt-x'), { recursive: true });
  fs.mkdirSync(worktree, { recursive: true });
  fs.writeFileSync(path.join(worktree, '.git'), `gitdir: ${path.join(main, '.git', 'worktrees', 'wt-x')}\n`);
  const doc = path.join('shared', 'reference', 'cloud-hypervisor-openapi.yaml');
  t.deepEqual(contractCandidates(worktree, {}), [path.join(root, 'elsewhere', doc), path.join(root, 'projects', doc)]);
  t.deepEqual(contractCandidates(main, {}), [path.join(root, 'projects', doc)], 'a main checkout has a .git folder');
  t.deepEqual(contractCandidates(worktree, { TERN_OPENAPI: '/some/api.yaml' }), ['/some/api.yaml']);
});
