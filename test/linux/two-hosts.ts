// Two "hosts" on one machine: network namespaces A and B joined by a veth pair, so a migration
// over TCP leaves one network stack and arrives at another, as between two machines. A VMM
// runs in a namespace through `ip netns exec`, which execs it (the child's pid is the VMM's).
// Needs root, iproute2 and the veth module (the lab loads it at boot).
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';

export interface Host {
  netns: string;
  address: string;
}

export interface TwoHosts {
  a: Host;
  b: Host;
  /** argv prefix that runs a command in a host's namespace */
  exec(h: Host): string[];
  remove(): void;
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] });

export function createTwoHosts(): TwoHosts {
  const tag = randomBytes(3).toString('hex');
  const a: Host = { netns: `tern-a-${tag}`, address: '10.77.0.1' };
  const b: Host = { netns: `tern-b-${tag}`, address: '10.77.0.2' };
  const remove = () => {
    for (const h of [a, b]) {
      try {
        ip('netns', 'del', h.netns); // deleting a namespace deletes its end of the pair
      } catch {
        /* not created */
      }
    }
  };
  try {
    ip('netns', 'add', a.netns);
    ip('netns', 'add', b.netns);
    ip('link', 'add', `va-${tag}`, 'netns', a.netns, 'type', 'veth', 'peer', 'name', `vb-${tag}`, 'netns', b.netns);
    for (const [h, dev] of [[a, `va-${tag}`], [b, `vb-${tag}`]] as const) {
      ip('-n', h.netns, 'link', 'set', 'lo', 'up');
      ip('-n', h.netns, 'addr', 'add', `${h.address}/24`, 'dev', dev);
      ip('-n', h.netns, 'link', 'set', dev, 'up');
    }
  } catch (e) {
    remove();
    const err = e as Error & { stderr?: Buffer };
    throw new Error(`cannot set up two network namespaces: ${err.message}${err.stderr ? `: ${err.stderr.toString()}` : ''}`);
  }
  return { a, b, exec: (h) => ['ip', 'netns', 'exec', h.netns], remove };
}
