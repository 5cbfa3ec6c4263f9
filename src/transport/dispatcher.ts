// What happens to one request once its frame passed the connection's screening: the
// `initialize` handshake, `status`, then for the method table's entries: params validated
// against their schema, a heavy slot taken (or ServerBusy), progress and partial results wired
// to the request's tokens, cancellation turned into an AbortSignal, and whatever the handler
// throws turned into a JSON-RPC error (./errors).
import { setMaxListeners } from 'node:events';
import type { CancellationToken } from 'vscode-jsonrpc';
import { formatIssue, validateSchema } from '../common/json-schema';
import { raceAbort } from '../common/race-abort';
import { QueueFullError, Semaphore } from '../common/semaphore';
import { Initialize, Status } from '../protocol/requests';
import {
  type Capabilities,
  type InitializeResult,
  PROTOCOL_VERSION,
  type ProgressToken,
  RpcErrorCode,
  type ServerLimits,
  type ServiceInfo,
  type StatusResult,
} from '../protocol/rpc';
import { clip, type ServerConnection } from './connection';
import { RpcError, toRpcError } from './errors';
import type { LogLimiter } from './log-limiter';
import { notify, ProgressSender } from './progress';
import type { MethodContext, MethodSpec } from './server';

/** The reason a handler's signal aborts with (cancel, disconnect, shutdown). */
export class RequestAbortedError extends Error {
  override name = 'RequestAbortedError';
}

interface Tracked {
  method: string;
  state: 'queued' | 'running';
  since: number;
}

export interface DispatcherOptions {
  methods: Record<string, MethodSpec>;
  limits: ServerLimits;
  info?: () => ServiceInfo | Promise<ServiceInfo>;
  version?: string;
  progressIntervalMs: number;
  log: LogLimiter;
  /** open connections now (for `status`) */
  connections: () => number;
}

export class Dispatcher {
  private readonly semaphore: Semaphore;
  private readonly tracked = new Set<Tracked>();
  private readonly started = Date.now();
  /** aborted when the server stops: every handler's signal follows it */
  readonly shutdown = new AbortController();

  constructor(private readonly o: DispatcherOptions) {
    this.semaphore = new Semaphore(o.limits.maxConcurrent, o.limits.maxQueued);
    // every request in flight listens on it (removed when it ends): more than 10 at once is
    // normal, not the leak Node's MaxListenersExceededWarning suspects
    setMaxListeners(0, this.shutdown.signal);
  }

  /** vscode-jsonrpc's request handler: the result, or a ResponseError it sends as is. */
  async handle(
    conn: ServerConnection,
    method: string,
    rawParams: unknown,
    cancel: CancellationToken,
  ): Promise<unknown> {
    try {
      return await this.dispatch(conn, method, rawParams, cancel);
    } catch (e) {
      const err = toRpcError(e, method);
      if (err.code === RpcErrorCode.InternalError)
        this.o.log.limited(
          'error',
          `internal:${method}`,
          `connection ${conn.id} ${method}: ${(e as Error)?.stack ?? String(e)}`,
        );
      return err.toResponseError();
    }
  }

  private async dispatch(
    conn: ServerConnection,
    method: string,
    rawParams: unknown,
    cancel: CancellationToken,
  ): Promise<unknown> {
    if (method === Initialize.method) return this.initialize(conn, rawParams);
    // a request sent right behind "initialize", without waiting for its answer (JSON-RPC lets a
    // client pipeline): wait for the handshake instead of refusing it as sent before it
    if (!conn.initialized && conn.initializing) await conn.initializing;
    if (!conn.initialized)
      throw new RpcError(
        RpcErrorCode.ServerNotInitialized,
        `send "initialize" with {"protocolVersion": ${PROTOCOL_VERSION}} before "${clip(method, 60)}"`,
      );
    if (method === Status.method) return this.status();
    const spec = Object.hasOwn(this.o.methods, method) ? this.o.methods[method] : undefined;
    if (!spec)
      throw new RpcError(
        RpcErrorCode.MethodNotFound,
        `unknown method "${clip(method, 60)}"; this server answers: ${[Initialize.method, Status.method, ...Object.keys(this.o.methods)].join(', ')}`,
      );
    const { params, workDoneToken, partialResultToken } = splitParams(method, rawParams);
    if (spec.params) {
      const issues = validateSchema(params, spec.params);
      if (issues.length)
        throw new RpcError(
          RpcErrorCode.InvalidParams,
          `invalid params for "${method}": ${issues
            .slice(0, 5)
            .map((i) => formatIssue({ ...i, path: ['params', ...i.path] }))
            .join('; ')}`,
        );
    }
    return this.run(conn, method, spec, params, cancel, workDoneToken, partialResultToken);
  }

  /** Runs a validated request: its abort signal, its progress, a heavy slot, its tracking for `status`. */
  private async run(
    conn: ServerConnection,
    method: string,
    spec: MethodSpec,
    params: Record<string, unknown>,
    cancel: CancellationToken,
    workDoneToken: ProgressToken | undefined,
    partialResultToken: ProgressToken | undefined,
  ): Promise<unknown> {
    const abort = new AbortController();
    const onAbort = () => abort.abort(new RequestAbortedError('cancelled by the client'));
    cancel.onCancellationRequested(onAbort);
    if (cancel.isCancellationRequested) onAbort();
    const onShutdown = () => abort.abort(new RequestAbortedError('the server is shutting down'));
    this.shutdown.signal.addEventListener('abort', onShutdown, { once: true });
    conn.aborts.add(abort);

    const progress = new ProgressSender(conn.rpc, workDoneToken, this.o.progressIntervalMs);
    const heavy = typeof spec.heavy === 'function' ? spec.heavy(params) : !!spec.heavy;
    const item: Tracked = { method, state: heavy ? 'queued' : 'running', since: Date.now() };
    this.tracked.add(item);
    let answered = false;
    let work: Promise<unknown> | undefined;
    try {
      progress.begin(spec.title ?? method);
      const release = heavy ? await this.acquireSlot(abort.signal, progress, item) : undefined;
      const ctx: MethodContext = {
        method,
        signal: abort.signal,
        connectionId: conn.id,
        progress: (message, done, total) => {
          if (!answered) progress.report(message, done, total);
        },
        partial: (value) => {
          if (!answered && partialResultToken !== undefined) notify(conn.rpc, { token: partialResultToken, value });
        },
      };
      work = Promise.resolve().then(() => spec.handler(params, ctx));
      // a heavy slot is held until the handler really returns, even when the reply went out on abort
      if (release) work.then(release, release);
      const result = await raceAbort(work, abort.signal);
      progress.end();
      return result;
    } catch (e) {
      progress.end(abort.signal.aborted ? 'cancelled' : 'failed');
      if (abort.signal.aborted)
        throw new RpcError(
          RpcErrorCode.RequestCancelled,
          abort.signal.reason instanceof Error ? abort.signal.reason.message : 'cancelled',
        );
      throw e;
    } finally {
      answered = true;
      // a cancelled request is answered at once but stays in `status` until its handler returns
      const untrack = () => this.tracked.delete(item);
      if (work) work.then(untrack, untrack);
      else untrack();
      conn.aborts.delete(abort);
      this.shutdown.signal.removeEventListener('abort', onShutdown);
    }
  }

  /** Waits for a heavy slot (saying so in the progress); ServerBusy when the queue is full. */
  private async acquireSlot(signal: AbortSignal, progress: ProgressSender, item: Tracked): Promise<() => void> {
    const s = this.semaphore;
    if (s.saturated) progress.report(`waiting for a free slot (${s.running} running, ${s.queued} queued)`);
    try {
      const release = await s.acquire(signal);
      item.state = 'running';
      item.since = Date.now();
      return release;
    } catch (e) {
      if (e instanceof QueueFullError)
        throw new RpcError(
          RpcErrorCode.ServerBusy,
          `the server is busy: ${e.message}; try again when a request finishes`,
        );
      throw e;
    }
  }

  private async initialize(conn: ServerConnection, raw: unknown): Promise<InitializeResult> {
    if (conn.initialized || conn.initializing)
      throw new RpcError(RpcErrorCode.InvalidRequest, 'initialize was already sent on this connection');
    const p = raw as { protocolVersion?: unknown } | undefined;
    if (typeof p !== 'object' || p === null || Array.isArray(p) || p.protocolVersion === undefined)
      throw new RpcError(
        RpcErrorCode.InvalidParams,
        `initialize needs params {"protocolVersion": ${PROTOCOL_VERSION}} (the version the client speaks)`,
      );
    const v = p.protocolVersion;
    if (typeof v !== 'number' || !Number.isInteger(v))
      throw new RpcError(
        RpcErrorCode.InvalidParams,
        `protocolVersion must be an integer (got ${clip(JSON.stringify(v), 40)})`,
      );
    if (v !== PROTOCOL_VERSION)
      throw new RpcError(
        RpcErrorCode.ProtocolVersionMismatch,
        `protocol version mismatch: the client speaks version ${v}, this server speaks ${PROTOCOL_VERSION}; ` +
          `update the ${v < PROTOCOL_VERSION ? 'extension (client)' : 'server'} so both match`,
        { server: PROTOCOL_VERSION, client: v },
      );
    const pending = Promise.resolve(this.o.info ? this.o.info() : EMPTY_INFO);
    conn.initializing = pending.then(
      () => undefined,
      () => undefined,
    );
    let info: Awaited<typeof pending>;
    try {
      info = await pending;
      conn.initialized = true;
    } finally {
      // failed: the client may send "initialize" again
      conn.initializing = null;
    }
    const capabilities: Capabilities = {
      methods: [Status.method, ...Object.keys(this.o.methods)],
      workDoneProgress: true,
      partialResults: true,
      cancellation: true,
      limits: this.o.limits,
    };
    return {
      ...info,
      protocolVersion: PROTOCOL_VERSION,
      server: { name: 'influence-lens', version: this.o.version ?? '0.0.0', pid: process.pid },
      capabilities,
    };
  }

  stats(): Omit<StatusResult, 'service'> {
    const now = Date.now();
    return {
      protocolVersion: PROTOCOL_VERSION,
      pid: process.pid,
      uptimeMs: now - this.started,
      connections: this.o.connections(),
      heavy: { running: this.semaphore.running, queued: this.semaphore.queued, ...this.o.limits },
      requests: [...this.tracked].map((t) => ({ method: t.method, state: t.state, elapsedMs: now - t.since })),
    };
  }

  private async status(): Promise<StatusResult> {
    let service: ServiceInfo | undefined;
    try {
      service = this.o.info ? await this.o.info() : undefined;
    } catch (e) {
      this.o.log.limited('warn', 'status-info', `status: info() failed: ${(e as Error).message}`);
    }
    return { ...this.stats(), ...(service ? { service } : {}) };
  }
}

/** Params as the handler sees them (an object, never undefined), apart from the LSP tokens. */
function splitParams(
  method: string,
  raw: unknown,
): { params: Record<string, unknown>; workDoneToken?: ProgressToken; partialResultToken?: ProgressToken } {
  if (Array.isArray(raw))
    throw new RpcError(RpcErrorCode.InvalidParams, `params of "${method}" must be an object, not an array`);
  const { workDoneToken, partialResultToken, ...params } = (raw ?? {}) as Record<string, unknown>;
  for (const [name, t] of [
    ['workDoneToken', workDoneToken],
    ['partialResultToken', partialResultToken],
  ] as const)
    if (t !== undefined && typeof t !== 'string' && typeof t !== 'number')
      throw new RpcError(RpcErrorCode.InvalidParams, `${name} must be a string or a number`);
  return {
    params,
    workDoneToken: workDoneToken as ProgressToken | undefined,
    partialResultToken: partialResultToken as ProgressToken | undefined,
  };
}

const EMPTY_INFO: ServiceInfo = {
  model: '',
  revision: '',
  stages: [],
  datasets: [],
  datasetPaths: {},
  device: 'cpu',
  methods: [],
  unavailable: {},
  modules: [],
  warnings: [],
};
