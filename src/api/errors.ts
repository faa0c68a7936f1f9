// How failures become HTTP replies. Cloud Hypervisor answers every error with a JSON array of
// messages, outermost first; the status says whose fault it was: 400 the request, 404 nothing
// to act on, 409 an id clash, 500 an action the VM's current state does not allow (or one that
// failed). The store's typed errors carry most of that already.
import { InvalidTransitionError, TernStateError } from '../state/errors';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    /** messages, outermost first */
    readonly chain: string[],
  ) {
    super(chain.join(': '));
    this.name = 'ApiError';
  }

  /** The same error with `outer` in front of its chain. */
  within(outer: string): ApiError {
    return new ApiError(this.status, [outer, ...this.chain]);
  }
}

export const badRequest = (...chain: string[]) => new ApiError(400, ['Bad request', ...chain]);
export const notFound = (...chain: string[]) => new ApiError(404, ['Not found', ...chain]);

/** Translate anything a Vmm call threw into an ApiError under the `outer` message. */
export function toApiError(e: unknown, outer: string): ApiError {
  if (e instanceof ApiError) return e.within(outer);
  if (e instanceof InvalidTransitionError) {
    // The store refuses with from = 'NotCreated' when there is no VM: that is a 404.
    return new ApiError(e.from === 'NotCreated' ? 404 : e.httpStatus, [outer, e.message]);
  }
  if (e instanceof TernStateError) return new ApiError(e.httpStatus, [outer, e.message]);
  const message = e instanceof Error ? e.message : String(e);
  return new ApiError(500, [outer, message]);
}
