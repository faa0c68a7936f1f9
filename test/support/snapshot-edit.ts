// Breaking a snapshot the way a crafted one would be: edit state.json's envelope and, unless
// told otherwise, give it a matching checksum so the edit gets past the checksum.
import fs from 'node:fs';
import path from 'node:path';
import { buildCpuid } from '../../src/boot/cpuid';
import { stateChecksum } from '../../src/migration/snapshot';
import { native } from '../../src/native/kvm';

export function editState(dir: string, edit: (envelope: Record<string, any>) => void, rehash = true): void {
  const p = path.join(dir, 'state.json');
  const env = JSON.parse(fs.readFileSync(p, 'utf8'));
  edit(env);
  if (rehash) env.checksum = stateChecksum(env.state);
  fs.writeFileSync(p, JSON.stringify(env));
}

/**
 * Make the saved vCPUs of a state from another machine (the schema-2 fixture was saved on an
 * AMD host) fit this one: the CPUID Tern gives a guest here and only the MSRs this KVM keeps.
 * Without it a restore on a host with another CPU is refused, rightly: the guest could use
 * features this host lacks. Tests of the schema upgrade path use it; the refusal itself is
 * tested on its own.
 */
export function fitSavedVcpusToHost(state: any): void {
  const kvm = native().openKvm();
  try {
    const supported = kvm.supportedCpuid();
    const msrs = new Set(kvm.msrIndexList());
    const ids = Object.keys(state.vcpus.saved);
    for (const id of ids) {
      const v = state.vcpus.saved[id];
      v.cpuid = buildCpuid(supported, Number(id), ids.length);
      v.msrs = v.msrs.filter((m: { index: number }) => msrs.has(m.index));
    }
  } finally {
    kvm.close();
  }
}
