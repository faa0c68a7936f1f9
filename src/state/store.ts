// The single source of truth. dispatch(event) runs every slice handler for the event type
// against the current state; if any throws, nothing changes and the event is not recorded.
// Otherwise the new frozen state is committed, the event gets the next seq and a timestamp,
// it is journaled, and events$/state$ (and patches$) are notified - always in seq order, even
// when a subscriber dispatches from inside a notification.
import { BehaviorSubject, Observable, Subject, distinctUntilChanged } from 'rxjs';
import type { Effect } from '../devices/device';
import { type EventClock, vmmClock } from './clock';
import { recordCopier } from './copy';
import { assertJsonSafe, deepFreeze } from './json';
import { type StatePatchSet, diffState } from './patches';
import {
  ROOT_SCHEMA_VERSION,
  type RootSlices,
  type RootState,
  type SliceMap,
  type StateOf,
  initialStateOf,
  rootSlices,
} from './root';
import { validateAndFreezeState } from './serialize';
import { eventCreator, type EventInput, type Slice, type StoreEvent } from './slice';

export const StoreEvents = {
  /** the whole state was replaced (restore from a snapshot, incoming migration) */
  StateReplaced: '[Store] State Replaced',
} as const;

export interface StateReplacedPayload<S = unknown> {
  state: S;
}

const stateReplaced = eventCreator<StateReplacedPayload>(StoreEvents.StateReplaced);

export interface DispatchResult {
  /** effects for the VMM to carry out, in slice order */
  effects: readonly Effect[];
  /** the value a guest read returns, when the event was a device read */
  value?: number | bigint;
  /** seq given to the event */
  seq: number;
}

export interface StoreOptions<M extends SliceMap> {
  slices?: M;
  /** start from this state (e.g. deserializeState output) instead of the initial one */
  preloadedState?: StateOf<M>;
  /**
   * preloadedState is another store's state, every slice made by its reducers or checked
   * there: it is frozen, not checked again (checking compiles every slice's validator, work a
   * scratch copy of a live store must not cost).
   */
  preloadedFromStore?: boolean;
  /** how many recent events the journal keeps (default 1024; 0 disables it) */
  journalSize?: number;
  clock?: EventClock;
  rootSchemaVersion?: number;
  /** emit the immer patches of every state change on patches$ */
  recordPatches?: boolean;
  /** check every new state is plain JSON (slow; for tests and debugging) */
  checkJson?: boolean;
  /** source for events dispatched without one (default 'vmm') */
  defaultSource?: string;
}

export interface Store<S> {
  getState(): S;
  dispatch(event: EventInput): DispatchResult;
  /** Replace the whole state (validated, then recorded as a "[Store] State Replaced" event). */
  replaceState(state: S, source?: string): DispatchResult;
  /** the current state on subscribe, then every new state */
  readonly state$: Observable<S>;
  /** every event, in seq order, after its state is committed */
  readonly events$: Observable<StoreEvent>;
  /** patches per event, when recordPatches is on */
  readonly patches$: Observable<StatePatchSet>;
  /** the last journalSize events, oldest first */
  journal(): StoreEvent[];
  /** seq of the last event (0 before the first) */
  readonly seq: number;
}

interface Note<S> {
  event: StoreEvent;
  state: S;
  patches?: StatePatchSet;
}

const NO_EFFECTS = Object.freeze([]) as readonly Effect[];

/** A store over Tern's slices (vm, vcpus, devices, bus). */
export function createStore(options?: Omit<StoreOptions<RootSlices>, 'slices'>): Store<RootState>;
/** A store over any set of slices. */
export function createStore<M extends SliceMap>(options: StoreOptions<M> & { slices: M }): Store<StateOf<M>>;
export function createStore(options: any = {}): Store<any> {
  return buildStore(options as StoreOptions<SliceMap>);
}

function buildStore<M extends SliceMap>(options: StoreOptions<M>): Store<StateOf<M>> {
  type S = StateOf<M>;
  const slices = (options.slices ?? rootSlices) as unknown as M;
  const rootVersion = options.rootSchemaVersion ?? ROOT_SCHEMA_VERSION;
  const clock = options.clock ?? vmmClock;
  const journalSize = Math.max(0, options.journalSize ?? 1024);
  const defaultSource = options.defaultSource ?? 'vmm';
  const recordPatches = options.recordPatches ?? false;
  const checkJson = options.checkJson ?? false;

  for (const [key, slice] of Object.entries(slices)) {
    if (key !== slice.name) throw new Error(`slice '${slice.name}' is registered under key '${key}'`);
    if (key === 'schemaVersion') throw new Error("'schemaVersion' cannot be a slice name");
  }

  const copyRoot = recordCopier<Record<string, unknown>>(['schemaVersion', ...Object.keys(slices)]);

  // event type -> the slices that handle it, in registration order
  const routes = new Map<string, { key: string; slice: Slice }[]>();
  for (const [key, slice] of Object.entries(slices)) {
    for (const type of slice.eventTypes) {
      let list = routes.get(type);
      if (!list) routes.set(type, (list = []));
      list.push({ key, slice });
    }
  }

  let state: S;
  if (options.preloadedState !== undefined) {
    state = (options.preloadedFromStore ? deepFreeze(options.preloadedState) : validateAndFreezeState(options.preloadedState, slices, rootVersion)) as S;
  } else {
    state = initialStateOf(slices, rootVersion);
  }

  let seq = 0;
  const ring: (StoreEvent | undefined)[] = new Array(journalSize);
  let ringNext = 0;
  let ringCount = 0;

  const stateSubject = new BehaviorSubject<S>(state);
  const eventSubject = new Subject<StoreEvent>();
  const patchSubject = new Subject<StatePatchSet>();
  const queue: Note<S>[] = [];
  let notifying = false;
  let reducing = false;

  function flush(): void {
    if (notifying) return;
    notifying = true;
    try {
      while (queue.length) {
        const n = queue.shift()!;
        eventSubject.next(n.event);
        if (n.patches) patchSubject.next(n.patches);
        if (stateSubject.getValue() !== n.state) stateSubject.next(n.state);
      }
    } finally {
      notifying = false;
    }
  }

  function commit(event: StoreEvent, prev: S, next: S): void {
    state = next;
    seq = event.seq;
    if (journalSize > 0) {
      ring[ringNext] = event;
      ringNext = (ringNext + 1) % journalSize;
      if (ringCount < journalSize) ringCount++;
    }
    const note: Note<S> = { event, state: next };
    if (recordPatches) note.patches = { seq: event.seq, type: event.type, patches: prev === next ? [] : diffState(prev, next) };
    queue.push(note);
    flush();
  }

  function makeEvent(input: EventInput): StoreEvent {
    if (typeof input?.type !== 'string' || input.type === '') throw new TypeError('an event needs a type string');
    return Object.freeze({
      seq: seq + 1,
      timestamp: clock(),
      source: input.source ?? defaultSource,
      type: input.type,
      payload: input.payload,
    });
  }

  function dispatch(input: EventInput): DispatchResult {
    if (reducing) throw new Error(`dispatch of ${input?.type} from inside a reducer`);
    const event = makeEvent(input);
    if (event.type === StoreEvents.StateReplaced) {
      const replacement = (event.payload as StateReplacedPayload)?.state;
      const next = validateAndFreezeState(replacement, slices, rootVersion) as S;
      const prev = state;
      commit(event, prev, next);
      return { effects: NO_EFFECTS, seq: event.seq };
    }
    const prev = state;
    let next = prev;
    let effects: readonly Effect[] = NO_EFFECTS;
    let value: number | bigint | undefined;
    const handlers = routes.get(event.type);
    if (handlers) {
      let draft: Record<string, unknown> | undefined;
      reducing = true;
      try {
        for (const { key, slice } of handlers) {
          const before = (prev as Record<string, unknown>)[key];
          const r = slice.reduce(before, event)!;
          if (r.state !== before) (draft ??= copyRoot(prev as Record<string, unknown>))[key] = r.state;
          if (r.effects.length) effects = effects.length ? effects.concat(r.effects) : r.effects;
          if (value === undefined && r.value !== undefined) value = r.value;
        }
      } finally {
        reducing = false;
      }
      if (draft) next = Object.freeze(draft) as S;
    }
    if (checkJson && next !== prev) assertJsonSafe(next);
    commit(event, prev, next);
    return value === undefined ? { effects, seq: event.seq } : { effects, value, seq: event.seq };
  }

  return {
    getState: () => state,
    dispatch,
    replaceState: (s: S, source?: string) =>
      dispatch(stateReplaced({ state: s }, source ?? defaultSource)),
    state$: stateSubject.asObservable().pipe(distinctUntilChanged()),
    events$: eventSubject.asObservable(),
    patches$: patchSubject.asObservable(),
    journal() {
      const out: StoreEvent[] = [];
      const start = (ringNext - ringCount + journalSize) % Math.max(journalSize, 1);
      for (let i = 0; i < ringCount; i++) out.push(ring[(start + i) % journalSize]!);
      return out;
    },
    get seq() {
      return seq;
    },
  };
}
