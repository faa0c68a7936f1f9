// The operations an image has started and not finished, so that close() waits for them: closing
// the fd under a pending pread/pwrite could let the kernel hand the number to another file
// before the thread pool uses it.
export class InFlight {
  private readonly pending = new Set<Promise<unknown>>();

  track<T>(op: Promise<T>): Promise<T> {
    this.pending.add(op);
    const done = () => this.pending.delete(op);
    op.then(done, done);
    return op;
  }

  async settled(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }
}
