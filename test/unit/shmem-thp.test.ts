// Whether this host gives guest RAM (a memfd) the transparent huge pages thp=on asks for.
import test from 'ava';

import { selectedShmemThp, shmemThpRefusal } from '../../src/vmm/shmem-thp';

test('shmem_enabled at never or deny refuses huge pages to a memfd, and the reason names the setting and the fix', (t) => {
  t.is(selectedShmemThp('always within_size advise [never] deny force\n'), 'never');
  t.regex(shmemThpRefusal('always within_size advise [never] deny force\n') ?? '', /shmem_enabled is never: .*advise/);
  t.regex(shmemThpRefusal('always within_size advise never [deny] force\n') ?? '', /is deny/);
});

test('advise, always, within_size and force grant them; an unreadable setting says nothing', (t) => {
  for (const mode of ['always', 'within_size', 'advise', 'force']) {
    t.is(shmemThpRefusal(`always within_size advise never deny force`.replace(mode, `[${mode}]`)), undefined, mode);
  }
  t.is(shmemThpRefusal('garbage'), undefined);
});
