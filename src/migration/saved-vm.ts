// The checks a VM's saved config and state pass before a VM is built from them, shared by
// snapshot restore and live migration so both accept exactly the same things: the config
// passes vm.create's checks (its paths are opened by this process) and has no field a config
// does not have; the state is lifted to this build's schema by the same upgraders, passes
// every slice's schema and validator, agrees with the config and holds everything the machine
// will set into KVM.
import { checkVmConfig } from '../api/request-body';
import type { VmConfig } from '../config/vm-config';
import { rootSchemaVersionOf, upgradeState, validateAndFreezeState, vmConfigProblems, type RootState, type VmStatus } from '../state';
import { canonicalJson } from './canonical-json';
import { withoutHeldFds } from '../config/net-config';

export type ErrorFactory = (message: string) => Error;

/** A VM config from outside, as vm.create would accept it. */
export function checkSavedConfig(raw: unknown, where: string, error: ErrorFactory): VmConfig {
  let config: VmConfig;
  try {
    config = checkVmConfig(structuredClone(raw)) as VmConfig;
  } catch (e) {
    const chain = (e as { chain?: string[] }).chain ?? [(e as Error).message];
    throw error(`${where}: not a valid VM config (${chain.slice(1).join('; ')})`);
  }
  const problems = vmConfigProblems(config);
  if (problems.length) throw error(`${where}: not a valid VM config (${problems.join('; ')})`);
  if (canonicalJson(config) !== canonicalJson(raw)) throw error(`${where}: has fields a VM config does not have`);
  return config;
}

export interface CheckedState {
  state: RootState;
  /** the schema version it was saved with (before upgrading) */
  storedSchemaVersion: number;
}

/**
 * A saved store state from outside, upgraded to this build's schema and validated. Its VM must
 * be in one of `statuses`, carry `config` and have the saved vCPU and KVM state.
 */
export function checkSavedState(
  raw: unknown,
  opts: { config: VmConfig; statuses: readonly VmStatus[]; where: string; configWhere: string; stateName?: string; declaredSchema?: unknown },
  error: ErrorFactory,
): CheckedState {
  const { where } = opts;
  let stored: number;
  let state: RootState;
  try {
    stored = rootSchemaVersionOf(raw);
    if (opts.declaredSchema !== undefined && opts.declaredSchema !== stored) {
      throw error(`schema_version ${String(opts.declaredSchema)} differs from the state's ${stored}`);
    }
    // (frozen: the store takes this very state, and need not check it again)
    state = validateAndFreezeState(upgradeState(raw)) as RootState;
  } catch (e) {
    throw error(`${where}: ${(e as Error).message}`);
  }
  if (!opts.statuses.includes(state.vm.status) || state.vm.config === null) {
    throw error(`${where}: the VM in it is ${state.vm.status}, not ${opts.statuses.join(' or ')}`);
  }
  if (canonicalJson(opts.config) !== canonicalJson(state.vm.config)) {
    throw error(`${opts.configWhere}: contradicts the VM config recorded in ${opts.stateName ?? where}`);
  }
  // What the machine will set into KVM must all be there (a schema-1 state never had it).
  if (state.kvm.saved === null) throw error(`${where}: the saved state has no KVM irqchip/PIT/clock state`);
  const vcpus = state.vm.config.cpus?.boot_vcpus ?? 1;
  for (let id = 0; id < vcpus; id++) {
    if (!Object.hasOwn(state.vcpus.saved, String(id))) throw error(`${where}: the saved state has no vCPU ${id}`);
  }
  // The saving process's tap fds are not this one's: its cards open their taps by name.
  const config = withoutHeldFds(state.vm.config as VmConfig);
  if (config !== state.vm.config) state = Object.freeze({ ...state, vm: Object.freeze({ ...state.vm, config: Object.freeze(config) }) }) as RootState;
  return { state, storedSchemaVersion: stored };
}
