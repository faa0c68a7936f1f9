// Breaking a snapshot the way a crafted one would be: edit state.json's envelope and, unless
// told otherwise, give it a matching checksum so the edit gets past the checksum.
import fs from 'node:fs';
import path from 'node:path';
import { stateChecksum } from '../../src/migration/snapshot';

export function editState(dir: string, edit: (envelope: Record<string, any>) => void, rehash = true): void {
  const p = path.join(dir, 'state.json');
  const env = JSON.parse(fs.readFileSync(p, 'utf8'));
  edit(env);
  if (rehash) env.checksum = stateChecksum(env.state);
  fs.writeFileSync(p, JSON.stringify(env));
}
