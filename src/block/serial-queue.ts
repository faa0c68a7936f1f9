// Runs async tasks one at a time, in the order they were queued: the qcow2 metadata (L2 tables,
// refcounts, the end of the file) is read and changed by one task at a time.
export class SerialQueue {
  private tail: Promise<void> = Promise.resolve();

  run<T>(task: () => Promise<T>): Promise<T> {
    const result = this.tail.then(task);
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}
