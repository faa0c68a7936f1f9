// The error of every snapshot and restore fault: it names the file and what is wrong with it.
import { TernStateError } from '../state';

export class SnapshotError extends TernStateError {
  constructor(message: string) {
    super('SnapshotFailed', message);
  }
}
