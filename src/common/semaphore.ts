// A counting semaphore with a bounded FIFO queue: at most `limit` holders at once, at most
// `maxQueued` waiters; a waiter whose signal aborts leaves the queue.

export class QueueFullError extends Error {}

interface Waiter {
  resolve: (release: () => void) => void;
  reject: (e: unknown) => void;
  detach: () => void;
}

export class Semaphore {
  private held = 0;
  private waiters: Waiter[] = [];

  constructor(
    readonly limit: number,
    readonly maxQueued: number,
  ) {
    if (!(Number.isInteger(limit) && limit >= 1)) throw new RangeError(`semaphore limit must be ≥ 1, got ${limit}`);
    if (!(Number.isInteger(maxQueued) && maxQueued >= 0))
      throw new RangeError(`semaphore maxQueued must be ≥ 0, got ${maxQueued}`);
  }

  get running(): number {
    return this.held;
  }

  get queued(): number {
    return this.waiters.length;
  }

  /** Whether `acquire` would have to wait. */
  get saturated(): boolean {
    return this.held >= this.limit;
  }

  /**
   * Resolves with a release function (call it once, in `finally`) when a slot is free.
   * Rejects with `QueueFullError` when the queue is full, or with the signal's reason when it aborts
   * while waiting.
   */
  acquire(signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.held < this.limit && this.waiters.length === 0) {
      this.held++;
      return Promise.resolve(this.releaser());
    }
    if (this.waiters.length >= this.maxQueued)
      return Promise.reject(
        new QueueFullError(
          `${this.held} running and ${this.waiters.length} queued (limits: ${this.limit} / ${this.maxQueued})`,
        ),
      );
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(signal!.reason);
      };
      const waiter: Waiter = { resolve, reject, detach: () => signal?.removeEventListener('abort', onAbort) };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.push(waiter);
    });
  }

  private releaser(): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.waiters.shift();
      if (next) {
        next.detach();
        next.resolve(this.releaser());
      } else {
        this.held--;
      }
    };
  }
}
