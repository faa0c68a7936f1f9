// Owns one native vCPU thread's lifecycle from TypeScript: turns its 'paused' and 'stopped'
// reports into promises, and routes every other exit to the machine's exit handler.
import { NativeVcpu, SeccompMode, VcpuExit } from '../native/kvm';

export type ExitRouter = (vcpu: number, exit: VcpuExit) => number | bigint | 'stop' | void;

export class VcpuRunner {
  private stoppedResolve!: () => void;
  readonly stopped: Promise<void>;
  private pausedResolve?: () => void;
  private running = false;
  private started = false;

  constructor(
    readonly vcpu: NativeVcpu,
    private readonly route: ExitRouter,
    private readonly seccomp: SeccompMode = 'trap',
  ) {
    this.stopped = new Promise((r) => (this.stoppedResolve = r));
  }

  start(): void {
    this.started = true;
    this.running = true;
    this.vcpu.start((exit) => {
      if (exit.kind === 'stopped') {
        this.running = false;
        this.stoppedResolve();
        return;
      }
      if (exit.kind === 'paused') {
        this.pausedResolve?.();
        this.pausedResolve = undefined;
        return;
      }
      return this.route(this.vcpu.id, exit);
    }, { seccomp: this.seccomp });
  }

  /** Kick the thread out of KVM_RUN and wait until it has parked. */
  pause(): Promise<void> {
    if (!this.running) return Promise.resolve();
    const parked = new Promise<void>((r) => (this.pausedResolve = r));
    this.vcpu.requestPause();
    return Promise.race([parked, this.stopped]);
  }

  resume(): void {
    this.vcpu.resume();
  }

  /** End the thread; resolves once it has reported 'stopped'. */
  stop(): Promise<void> {
    if (!this.started) {
      this.started = true;
      this.stoppedResolve();
    }
    if (this.running) this.vcpu.stop();
    return this.stopped;
  }

  get isRunning(): boolean {
    return this.running;
  }
}
