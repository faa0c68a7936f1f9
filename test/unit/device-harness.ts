// Drives a pure device transition like a guest would, one port access at a time. The state is
// deep-frozen before every step, so a transition that mutates its input fails loudly.
import type { DeviceTransition, Effect, IoAccess, NarrowIoAccess } from '../../src/devices/device';
import { deepFreeze } from '../../src/state/json';

export class DeviceHarness<S> {
  effects: Effect[] = [];
  nowNs = 0;

  constructor(
    public state: S,
    private readonly transition: DeviceTransition<S>,
  ) {}

  access(a: Omit<NarrowIoAccess, 'nowNs' | 'space'> & { space?: IoAccess['space'] }): number | undefined {
    deepFreeze(this.state);
    const r = this.transition(this.state, { space: 'pio', nowNs: this.nowNs, ...a });
    this.state = r.state;
    this.effects.push(...r.effects);
    if (typeof r.value === 'bigint') throw new Error(`a ${a.size}-byte access returned a bigint`);
    return r.value;
  }

  in(offset: number, size: 1 | 2 | 4 = 1): number {
    const v = this.access({ direction: 'read', offset, size, data: 0 });
    if (v === undefined) throw new Error(`read of offset ${offset} returned no value`);
    return v;
  }

  out(offset: number, data: number, size: 1 | 2 | 4 = 1): void {
    const v = this.access({ direction: 'write', offset, size, data });
    if (v !== undefined) throw new Error('a write returned a value');
  }

  /** effects since the last take() */
  take(): Effect[] {
    const e = this.effects;
    this.effects = [];
    return e;
  }
}
