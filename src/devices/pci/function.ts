// A PCI function as the segment holds it: its configuration space plus whatever its own model
// keeps (an MSI-X table, a virtio device's queues), all plain state. A function model says
// what the function is (its layout, from which the write masks follow) and how it answers
// accesses to its BARs; the segment routes configuration cycles and BAR accesses to it.
import type { TSchema } from '@sinclair/typebox';
import type { IoAccess, TransitionResult } from '../device';
import {
  type PciConfigMasks,
  type PciFunctionLayout,
  pciConfigMasks,
  pciInitialConfig,
  pciReadOnlyMismatch,
} from './config-space';

/** Fields every function state has; a model adds its own next to them. */
export interface PciFunctionState {
  /** the function model, e.g. 'pci-host-bridge' */
  kind: string;
  /** 64 dwords: the 256-byte configuration space */
  config: number[];
}

export interface PciFunctionModel<F extends PciFunctionState = PciFunctionState> {
  kind: F['kind'];
  layout: PciFunctionLayout;
  /** derived from layout once: what guest writes may change */
  masks: PciConfigMasks;
  /** the power-on configuration space */
  initialConfig: readonly number[];
  initialState(): F;
  /** the whole function state's shape (TypeBox), checked on restore */
  stateSchema: TSchema;
  /** what the schema cannot say, as "/field: why", or null */
  checkState?(fn: F): string | null;
  /** a guest access to BAR `bar` at `offset`, while the function decodes it */
  barAccess?(fn: F, bar: number, offset: number, access: IoAccess): TransitionResult<F>;
  /** the guest changed the configuration space (from `before`): MSI-X enable and the like */
  configWritten?(before: F, after: F): TransitionResult<F>;
  /**
   * Host-side inputs by event type (a queue served, a device broken by its driver), each
   * applied to the function whose device id the payload names.
   */
  inputs?: Readonly<Record<string, (fn: F, payload: any) => TransitionResult<F>>>;
}

export interface PciFunctionModelSpec<F extends PciFunctionState> {
  kind: F['kind'];
  layout: PciFunctionLayout;
  /** the model's own power-on fields besides kind and config */
  initialFields: () => Omit<F, 'kind' | 'config'>;
  stateSchema: TSchema;
  checkState?(fn: F): string | null;
  barAccess?: PciFunctionModel<F>['barAccess'];
  configWritten?: PciFunctionModel<F>['configWritten'];
}

/** A function model from its layout: the masks, power-on space and read-only check follow. */
export function definePciFunction<F extends PciFunctionState>(spec: PciFunctionModelSpec<F>): PciFunctionModel<F> {
  const masks = pciConfigMasks(spec.layout);
  const initialConfig = Object.freeze(pciInitialConfig(spec.layout));
  return {
    kind: spec.kind,
    layout: spec.layout,
    masks,
    initialConfig,
    initialState: () => ({ ...spec.initialFields(), kind: spec.kind, config: [...initialConfig] }) as F,
    stateSchema: spec.stateSchema,
    checkState: (fn: F) => pciReadOnlyMismatch(fn.config, initialConfig, masks) ?? spec.checkState?.(fn) ?? null,
    barAccess: spec.barAccess,
    configWritten: spec.configWritten,
  };
}

/** Function models by kind: what a segment's functions may be. */
export type PciFunctionRegistry = Readonly<Record<string, PciFunctionModel<any>>>;
