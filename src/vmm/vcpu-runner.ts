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
  /**
   * The thread reported 'paused' and has not been resumed. A pause the machine asked for by
   * itself (a guest stop request) parks the thread with nobody waiting; a later pause() must
   * then resolve at once, since the thread will not report 'paused' again.
   */
  private parked = false;
  /** 'paused' reports still to come of parks a resume() ended before they arrived */
  private staleParkReports = 0;

  constructor(
    readonly vcpu: NativeVcpu,
    private readonly route: ExitRouter,
    private readonly seccomp: SeccompMode = 'trap',
  ) {
    this.stopped = new Promise((r) => (this.stoppedResolve = r));
  }

  start(): void {
    this.startThread(false);
  }

  /** Start the thread parked before its first KVM_RUN; resolves once it has parked. resume() runs it. */
  startParked(): Promise<void> {
    const parked = new Promise<void>((r) => (this.pausedResolve = r));
    this.startThread(true);
    return Promise.race([parked, this.stopped]);
  }

  private startThread(parked: boolean): void {
    this.started = true;
    this.running = true;
    this.vcpu.start((exit) => {
      if (exit.kind === 'stopped') {
        this.running = false;
        this.stoppedResolve();
        return;
      }
      if (exit.kind === 'paused') {
        if (this.staleParkReports > 0) {
          // The report of a park that a resume() has already ended: the thread runs. A pause
          // waiting meanwhile asks again, and resolves on the report of the park it gets.
          this.staleParkReports--;
          if (this.pausedResolve) this.vcpu.requestPause();
          return;
        }
        this.parked = true;
        this.pausedResolve?.();
        this.pausedResolve = undefined;
        return;
      }
      return this.route(this.vcpu.id, exit);
    }, { seccomp: this.seccomp, parked });
  }

  /** Kick the thread out of KVM_RUN and wait until it has parked. */
  pause(): Promise<void> {
    if (!this.running || this.parked) return Promise.resolve();
    const parked = new Promise<void>((r) => (this.pausedResolve = r));
    this.vcpu.requestPause();
    return Promise.race([parked, this.stopped]);
  }

  resume(): void {
    // A thread that parked without this side having taken its report yet (the throttle parks
    // and resumes on timers, the JavaScript thread may be busy in between): that report, when
    // it comes, is of a park already over, and must not mark the thread parked.
    const woke = this.vcpu.resume();
    if (woke && !this.parked) this.staleParkReports++;
    // A thread that had not parked yet has had its pause request withdrawn; one that a pause()
    // still waits for is asked again, as before the resume.
    if (!woke && !this.parked && this.pausedResolve) this.vcpu.requestPause();
    this.parked = false;
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

  /** its thread was started (and may have ended since) */
  get hasStarted(): boolean {
    return this.started;
  }

  get isRunning(): boolean {
    return this.running;
  }

  /** For a health report: what the thread is doing, as far as this side knows. */
  get threadState(): 'not started' | 'running' | 'parked' | 'stopped' {
    if (!this.started) return 'not started';
    if (!this.running) return 'stopped';
    return this.parked ? 'parked' : 'running';
  }
}
