// LSP `$/progress` for one request: work-done progress (begin, throttled reports where the
// latest wins, end) and partial results, both sent to the token the request carried.
import type { MessageConnection } from 'vscode-jsonrpc';
import { ProgressNotification } from '../protocol/requests';
import type { ProgressParams, ProgressToken, WorkDoneProgress } from '../protocol/rpc';

/** LSP work-done progress for one request: begin, throttled reports (latest wins), end. */
export class ProgressSender {
  private last = 0;
  private pending: WorkDoneProgress | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private ended = false;

  constructor(
    private readonly rpc: MessageConnection,
    private readonly token: ProgressToken | undefined,
    private readonly interval: number,
  ) {}

  private send(value: WorkDoneProgress) {
    if (this.token !== undefined) notify(this.rpc, { token: this.token, value });
  }

  begin(title: string) {
    this.send({ kind: 'begin', title, cancellable: true });
  }

  report(message: string, done?: number, total?: number) {
    if (this.token === undefined || this.ended) return;
    const value: WorkDoneProgress = { kind: 'report', message };
    if (typeof done === 'number' && Number.isFinite(done)) value.done = done;
    if (typeof total === 'number' && Number.isFinite(total)) value.total = total;
    if (value.done !== undefined && value.total)
      value.percentage = Math.max(0, Math.min(100, Math.round((100 * value.done) / value.total)));
    const now = Date.now();
    if (now - this.last >= this.interval) {
      this.last = now;
      this.send(value);
      return;
    }
    this.pending = value;
    this.timer ??= setTimeout(() => this.flush(), this.interval - (now - this.last));
  }

  private flush() {
    this.timer = undefined;
    if (this.pending && !this.ended) {
      this.last = Date.now();
      this.send(this.pending);
    }
    this.pending = undefined;
  }

  end(message?: string) {
    if (this.ended) return;
    if (this.timer) clearTimeout(this.timer);
    this.flush();
    this.ended = true;
    this.send(message ? { kind: 'end', message } : { kind: 'end' });
  }
}

/** Sends `$/progress`; a closed connection just drops it (sendNotification throws then). */
export function notify(rpc: MessageConnection, params: ProgressParams) {
  try {
    rpc.sendNotification(ProgressNotification, params).catch(() => {});
  } catch {
    // the connection is gone
  }
}
