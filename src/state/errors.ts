// Typed errors raised by reducers and the store. A rejected event changes nothing: the store
// keeps its previous state and does not journal the event. `code` is stable for API mapping.

export class TernStateError extends Error {
  readonly code: string;
  /** HTTP status an API layer should answer with */
  readonly httpStatus: number;
  constructor(code: string, message: string, httpStatus = 500) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.httpStatus = httpStatus;
  }
}

/** A lifecycle event that is not allowed in the current VM state (e.g. resume while Running). */
export class InvalidTransitionError extends TernStateError {
  constructor(
    readonly from: string,
    readonly eventType: string,
    detail?: string,
  ) {
    super('InvalidStateTransition', `${eventType} is not allowed while the VM is ${from}${detail ? `: ${detail}` : ''}`);
  }
}

export class InvalidVmConfigError extends TernStateError {
  constructor(readonly problems: string[]) {
    super('InvalidVmConfig', `invalid VM config: ${problems.join('; ')}`, 400);
  }
}

export class UnknownDeviceError extends TernStateError {
  constructor(readonly deviceId: string, detail = 'no such device') {
    super('UnknownDevice', `device '${deviceId}': ${detail}`);
  }
}

export class DeviceConflictError extends TernStateError {
  constructor(message: string) {
    super('DeviceConflict', message);
  }
}

export class SchemaVersionError extends TernStateError {
  constructor(readonly where: string, readonly found: unknown, readonly expected: number) {
    super('SchemaVersionMismatch', `${where}: schemaVersion ${String(found)} is not the supported ${expected}`);
  }
}

/** A value that cannot live in the store: it would not survive JSON round-tripping. */
export class NotJsonSafeError extends TernStateError {
  constructor(readonly path: string, detail: string) {
    super('NotJsonSafe', `state at ${path || '<root>'} is not plain JSON: ${detail}`);
  }
}
