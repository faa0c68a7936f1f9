// A slice: a name, a schema version, an initial state and the handlers for its events, side by
// side (in the spirit of Redux Toolkit's createSlice). Event types are NgRx-style
// "[Source] Event" strings.
//
// Handlers come in two flavours:
//  - a plain function runs under immer: mutate the draft, or return a new state;
//  - pure(fn) gets the frozen state itself (no proxies), for hot paths such as device
//    accesses, and must return a new state (or the same one).
// Either may also hand back effects, Elm-style, as [state, effects] or {state, effects, value}.
// Effects are only returned to the dispatcher; nothing here performs them.
import type { TSchema } from '@sinclair/typebox';
import { Immer, type Draft } from 'immer';
import type { Effect } from '../devices/device';
import type { EventTimestamp } from './clock';
import { SchemaVersionError } from './errors';
import { deepFreeze } from './json';
import { checkSchema } from './state-schema';

/** Who caused an event: the VMM itself, the guest, a vCPU, the bus, or a device id. */
export type EventSource = 'vmm' | 'vm' | 'cpu' | 'bus' | (string & {});

/**
 * An event as dispatched. The payload is kept by reference in the journal and on events$:
 * do not mutate it after dispatching.
 */
export interface EventInput<T extends string = string, P = unknown> {
  type: T;
  payload: P;
  /** defaults to the store's defaultSource ('vmm') */
  source?: EventSource;
}

/** An event as recorded: numbered, timestamped, attributed. */
export interface StoreEvent<T extends string = string, P = unknown> {
  /** 1, 2, 3, ... per store */
  readonly seq: number;
  /** time since VMM start */
  readonly timestamp: EventTimestamp;
  readonly source: EventSource;
  readonly type: T;
  readonly payload: P;
}

export interface SliceStateBase {
  schemaVersion: number;
}

/** What a handler may return besides nothing. */
export interface HandlerResult<S> {
  state: S;
  effects: readonly Effect[];
  /** the value a guest read returns */
  value?: number | bigint;
}

export type HandlerReturn<S> = void | S | readonly [S, readonly Effect[]] | HandlerResult<S>;

export type DraftHandler<S, P> = (
  draft: Draft<S>,
  payload: P,
  event: StoreEvent<string, P>,
) => HandlerReturn<S | Draft<S>>;

export type PureHandlerFn<S, P> = (state: S, payload: P, event: StoreEvent<string, P>) => HandlerReturn<S>;

const PURE = Symbol('tern.pureHandler');

export interface PureHandler<S, P> {
  readonly [PURE]: true;
  readonly fn: PureHandlerFn<S, P>;
}

export type Handler<S, P = any> = DraftHandler<S, P> | PureHandler<S, P>;

/** Mark a handler as pure: it receives the frozen state directly instead of an immer draft. */
export function pure<S, P>(fn: PureHandlerFn<S, P>): PureHandler<S, P> {
  return { [PURE]: true, fn };
}

function isPure(h: Handler<any, any>): h is PureHandler<any, any> {
  return typeof h === 'object' && h !== null && (h as PureHandler<any, any>)[PURE] === true;
}

export type PayloadOf<H> = H extends PureHandler<any, infer P>
  ? P
  : H extends (draft: any, payload: infer P, event: any) => any
    ? P
    : never;

export type EventCreator<T extends string, P> = ((
  ...args: unknown extends P ? [payload?: P, source?: string] : [payload: P, source?: string]
) => EventInput<T, P>) & {
  readonly type: T;
  match(e: { type: string }): e is StoreEvent<T, P>;
};

/** A typed event creator for events not tied to one slice. */
export function eventCreator<P = void, T extends string = string>(type: T): EventCreator<T, P> {
  const create = (payload?: P, source?: string): EventInput<T, P> =>
    source === undefined ? { type, payload: payload as P } : { type, payload: payload as P, source };
  return Object.assign(create, {
    type,
    match: (e: { type: string }): e is StoreEvent<T, P> => e.type === type,
  }) as EventCreator<T, P>;
}

export interface ReduceResult<S> {
  state: S;
  effects: readonly Effect[];
  value?: number | bigint;
}

export interface SliceDefinition<N extends string, S extends SliceStateBase, H extends Record<string, Handler<S, any>>> {
  name: N;
  schemaVersion: number;
  initialState: S | (() => S);
  handlers: H;
  /** the state's shape (TypeBox), checked for a state loaded from outside (restore, migration) */
  schema: TSchema;
  /** checks beyond the schema (ordering, cross-field); throw to reject */
  validate?: (state: S) => void;
}

export interface Slice<N extends string = string, S extends SliceStateBase = any, H extends Record<string, Handler<S, any>> = any> {
  readonly name: N;
  readonly schemaVersion: number;
  readonly handlers: H;
  readonly eventTypes: readonly string[];
  initialState(): S;
  /** Run the handler for `event`; undefined when this slice does not handle its type. */
  reduce(state: S, event: StoreEvent): ReduceResult<S> | undefined;
  validate(state: unknown): void;
  /** the schema validate() checks (the build generates its check: state-schema.ts) */
  readonly schema: TSchema;
  /** typed event creators, one per handled event type */
  readonly events: { readonly [T in keyof H & string]: EventCreator<T, PayloadOf<H[T]>> };
}

export type SliceStateOf<Sl> = Sl extends Slice<any, infer S, any> ? S : never;

const EMPTY_EFFECTS = Object.freeze([]) as readonly Effect[];

const immer = new Immer({ autoFreeze: true });

function isHandlerResult(r: object): r is HandlerResult<unknown> {
  // Slice states always carry schemaVersion, which tells a state from a result wrapper.
  return !('schemaVersion' in r) && 'state' in r && Array.isArray((r as HandlerResult<unknown>).effects);
}

function normalize<S>(r: unknown, current: S): ReduceResult<S> {
  if (r === undefined) return { state: current, effects: EMPTY_EFFECTS };
  if (Array.isArray(r)) {
    if (r.length === 2 && Array.isArray(r[1])) return { state: r[0] as S, effects: r[1] as Effect[] };
    throw new TypeError('a handler returned an array that is not [state, effects]');
  }
  if (typeof r === 'object' && r !== null && isHandlerResult(r)) {
    return r.value === undefined
      ? { state: r.state as S, effects: r.effects }
      : { state: r.state as S, effects: r.effects, value: r.value };
  }
  return { state: r as S, effects: EMPTY_EFFECTS };
}

function checkVersion(name: string, expected: number, state: unknown): void {
  if (typeof state !== 'object' || state === null) throw new TypeError(`slice '${name}' state must be an object`);
  if ((state as SliceStateBase).schemaVersion !== expected) {
    throw new SchemaVersionError(`slice '${name}'`, (state as SliceStateBase).schemaVersion, expected);
  }
}

export function createSlice<N extends string, S extends SliceStateBase, H extends Record<string, Handler<S, any>>>(
  def: SliceDefinition<N, S, H>,
): Slice<N, S, H> {
  const handlers = new Map<string, Handler<S, any>>(Object.entries(def.handlers));
  const init = def.initialState;
  const initialState = (): S => deepFreeze(typeof init === 'function' ? (init as () => S)() : structuredClone(init));
  if (initialState().schemaVersion !== def.schemaVersion) {
    throw new Error(`slice '${def.name}': initial state schemaVersion differs from ${def.schemaVersion}`);
  }

  function reduce(state: S, event: StoreEvent): ReduceResult<S> | undefined {
    const h = handlers.get(event.type);
    if (!h) return undefined;
    if (isPure(h)) {
      const r = normalize<S>(h.fn(state, event.payload, event), state);
      if (r.state !== state) deepFreeze(r.state);
      return r;
    }
    const recipe = h as DraftHandler<S, unknown>;
    let extra: ReduceResult<S> | undefined;
    const next = immer.produce(state, (draft: Draft<S>) => {
      const out = recipe(draft, event.payload, event);
      if (out === undefined) return undefined;
      extra = normalize<S>(out as unknown, draft as S);
      return (extra.state as unknown) === draft ? undefined : (extra.state as Draft<S>);
    }) as S;
    if (!extra) return { state: next, effects: EMPTY_EFFECTS };
    return extra.value === undefined
      ? { state: next, effects: extra.effects }
      : { state: next, effects: extra.effects, value: extra.value };
  }

  const events = {} as Record<string, EventCreator<string, unknown>>;
  for (const type of handlers.keys()) events[type] = eventCreator<unknown>(type);

  return {
    name: def.name,
    schemaVersion: def.schemaVersion,
    handlers: def.handlers,
    eventTypes: Object.freeze([...handlers.keys()]),
    initialState,
    reduce,
    schema: def.schema,
    validate(state: unknown) {
      checkVersion(def.name, def.schemaVersion, state);
      checkSchema(def.schema, state, `slice '${def.name}'`);
      def.validate?.(state as S);
    },
    events: events as unknown as Slice<N, S, H>['events'],
  };
}
