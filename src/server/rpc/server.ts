// The influence server's transport: JSON-RPC 2.0 over a WebSocket (one message per text frame),
// with the `initialize` handshake, LSP-style progress / partial results / cancellation, a
// concurrency limit for heavy requests, and the upgrade checks of ./security. What the methods
// do is not decided here: the caller passes a method table, e.g.
//
//   const server = await startServer({
//     handlers: {
//       getExample: (p, ctx) => service.getExample(p.dataset, p.line, p.hash),
//       explain: { heavy: true, params: explainSchema,
//                  handler: (p, ctx) => service.explain(p, { signal: ctx.signal, progress: ctx.progress, partial: ctx.partial }) },
//     },
//     info: () => service.info(),
//   });
//   console.log(server.url);   // the token is in server.token and the discovery file
//
// Every bad input is answered with a JSON-RPC error and the server keeps serving: invalid JSON
// (ParseError), non-JSON-RPC or binary frames (InvalidRequest), unknown methods
// (MethodNotFound), wrong params (InvalidParams), too many heavy requests (ServerBusy). A frame
// over `maxFrameBytes` closes that connection with 1009 and a reason.
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import {
  type CancellationToken,
  createMessageConnection,
  type Logger,
  type Message,
  type MessageConnection,
} from 'vscode-jsonrpc';
import WebSocket, { WebSocketServer } from 'ws';
import {
  type Capabilities,
  CloseCode,
  INITIALIZE,
  type InitializeResult,
  PROGRESS,
  PROTOCOL_VERSION,
  type ProgressParams,
  type ProgressToken,
  RpcErrorCode,
  type ServerLimits,
  type ServiceInfo,
  STATUS,
  type StatusResult,
  type WorkDoneProgress,
} from '../../protocol/rpc';
import { checkToken, defaultDiscoveryFile, removeDiscoveryFile, resolveToken, writeDiscoveryFile } from './discovery';
import { RpcError, toRpcError } from './errors';
import { assertSupportedSchema, formatIssue, type JsonSchema, validateSchema } from './schema';
import { checkUpgrade, isLoopback, urlHost } from './security';
import { QueueFullError, Semaphore } from './semaphore';
import { frameText, WebSocketMessageReader, WebSocketMessageWriter } from './transport';

/** What a handler gets besides its params. */
export interface MethodContext {
  method: string;
  /**
   * Aborted when the client sends `$/cancelRequest`, its connection closes, or the server stops.
   * Check it between steps (or pass it on); the request is answered RequestCancelled at once,
   * and a heavy request's slot is freed when the handler returns.
   */
  signal: AbortSignal;
  /**
   * Work-done progress (`$/progress` with the request's `workDoneToken`; a no-op without one).
   * Reports are throttled to one per `progressIntervalMs`; the last one is never lost.
   */
  progress: (message: string, done?: number, total?: number) => void;
  /** A partial result (`$/progress` with the request's `partialResultToken`; a no-op without one). */
  partial: (value: unknown) => void;
  /** identifies the connection in logs */
  connectionId: number;
}

// biome-ignore lint/suspicious/noExplicitAny: each handler declares its own params type; `any` lets a table hold them all
export type Handler<P = any, R = unknown> = (params: P, ctx: MethodContext) => Promise<R> | R;

// biome-ignore lint/suspicious/noExplicitAny: as for Handler
export interface MethodSpec<P = any, R = unknown> {
  handler: Handler<P, R>;
  /** heavy requests share the `maxConcurrent` slots (and queue for them); a function decides per request */
  heavy?: boolean | ((params: P) => boolean);
  /** JSON schema (./schema subset) the params must satisfy; failures are InvalidParams naming the field */
  params?: JsonSchema;
  /** title of the work-done progress (default: the method name) */
  title?: string;
}

/** method name → handler (light) or spec. Params reach handlers as an object (never undefined),
 * without `workDoneToken` / `partialResultToken`. */
export type MethodTable = Record<string, Handler | MethodSpec>;

export interface ServerOptions {
  handlers: MethodTable;
  /** the service's description for `initialize` and `status` (models, datasets, methods) */
  info?: () => ServiceInfo | Promise<ServiceInfo>;
  /** default 127.0.0.1 */
  host?: string;
  /** default 0: a free port */
  port?: number;
  /** default: INFLUENCE_LENS_TOKEN, else 32 random bytes */
  token?: string;
  limits?: Partial<ServerLimits> & {
    /** open WebSocket connections at once (default 32) */
    maxConnections?: number;
    /** requests in flight on one connection (default 64) */
    maxInFlightPerConnection?: number;
  };
  /** where to write {url, token, pid}; default ~/.cache/influence-lens/server.json; false: none */
  discoveryFile?: string | false;
  /** reported in `initialize` */
  version?: string;
  /** minimum milliseconds between two progress reports of one request (default 100) */
  progressIntervalMs?: number;
  log?: (level: 'info' | 'warn' | 'error', message: string) => void;
}

export interface RunningServer {
  url: string;
  token: string;
  host: string;
  port: number;
  /** the discovery file written, if any */
  discoveryFile?: string;
  limits: ServerLimits;
  /** what `status` reports (without the service part) */
  stats(): Omit<StatusResult, 'service'>;
  /** Aborts in-flight requests, closes every connection (1001), stops listening, removes the discovery file. */
  close(): Promise<void>;
}

export const DEFAULT_LIMITS: ServerLimits = { maxFrameBytes: 4 * 1024 * 1024, maxConcurrent: 2, maxQueued: 16 };

class CancelledError extends Error {}

interface Connection {
  id: number;
  socket: WebSocket;
  rpc: MessageConnection;
  initialized: boolean;
  /** ids of requests received and not answered yet */
  inFlight: Set<number | string>;
  /** abort controllers of running handlers */
  aborts: Set<AbortController>;
}

interface Tracked {
  method: string;
  state: 'queued' | 'running';
  since: number;
}

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const host = opts.host ?? '127.0.0.1';
  const token = opts.token ?? resolveToken();
  checkToken(token);
  const limits: ServerLimits = {
    maxFrameBytes: opts.limits?.maxFrameBytes ?? DEFAULT_LIMITS.maxFrameBytes,
    maxConcurrent: opts.limits?.maxConcurrent ?? DEFAULT_LIMITS.maxConcurrent,
    maxQueued: opts.limits?.maxQueued ?? DEFAULT_LIMITS.maxQueued,
  };
  const maxConnections = opts.limits?.maxConnections ?? 32;
  const maxInFlight = opts.limits?.maxInFlightPerConnection ?? 64;
  const progressInterval = opts.progressIntervalMs ?? 100;
  const log = opts.log ?? (() => {});
  const methods = normalizeTable(opts.handlers);
  const semaphore = new Semaphore(limits.maxConcurrent, limits.maxQueued);
  const started = Date.now();
  const connections = new Set<Connection>();
  const tracked = new Set<Tracked>();
  let nextConnectionId = 1;
  let closing = false;
  const serverAbort = new AbortController();

  const http: Server = createServer((_req, res) => {
    res.writeHead(426, { 'Content-Type': 'text/plain; charset=utf-8', Upgrade: 'websocket', Connection: 'close' });
    res.end('influence-lens: this is a WebSocket JSON-RPC server; connect with a WebSocket client\n');
  });
  const wss = new WebSocketServer({ noServer: true, maxPayload: limits.maxFrameBytes, perMessageDeflate: false });

  await new Promise<void>((resolve, reject) => {
    http.once('error', reject);
    http.listen(opts.port ?? 0, host, () => {
      http.off('error', reject);
      resolve();
    });
  });
  http.on('error', (e) => log('error', `http server: ${e.message}`));
  const port = (http.address() as AddressInfo).port;
  const url = `ws://${urlHost(host)}:${port}/`;
  if (!isLoopback(host))
    log('warn', `listening on ${host}, not a loopback address: anyone who can reach port ${port} can try the token`);

  http.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => {});
    const denial = closing
      ? { status: 503, message: 'the server is shutting down' }
      : (checkUpgrade(req, { token, host, port }) ??
        (connections.size >= maxConnections
          ? { status: 503, message: `too many connections (${maxConnections}); close some and retry` }
          : null));
    if (denial) {
      log('warn', `refused a connection from ${req.socket.remoteAddress}: ${denial.status} ${denial.message}`);
      refuse(socket, denial.status, denial.message);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => accept(ws));
  });

  function accept(socket: WebSocket) {
    // ws closes on a protocol error (oversize frame, bad UTF-8) with a bare code; add the reason
    const close = socket.close.bind(socket);
    const reasons = closeReasons(limits);
    socket.close = (code?: number, reason?: string | Buffer) =>
      close(code, reason ?? (code !== undefined ? reasons[code] : undefined));

    const id = nextConnectionId++;
    const inFlight = new Set<number | string>();
    const writer = new WebSocketMessageWriter(socket, (m) => {
      const r = m as { id?: number | string | null; method?: string };
      if (r.method === undefined && r.id !== undefined && r.id !== null) inFlight.delete(r.id);
    });
    // answers to frames that never reach vscode-jsonrpc (they bypass the in-flight bookkeeping)
    const reply = (rid: number | string | null, code: number, message: string) => {
      if (socket.readyState === WebSocket.OPEN)
        socket.send(JSON.stringify({ jsonrpc: '2.0', id: rid, error: { code, message } }), () => {});
    };
    const reader = new WebSocketMessageReader(socket, (data, isBinary) => screen(conn, data, isBinary, reply));
    const conn: Connection = {
      id,
      socket,
      rpc: createMessageConnection(reader, writer, rpcLogger(log, id)),
      initialized: false,
      inFlight,
      aborts: new Set(),
    };
    conn.rpc.onRequest((method, params, token) => handle(conn, method, params, token));
    conn.rpc.listen();
    connections.add(conn);
    socket.on('error', (e) => log('warn', `connection ${id}: ${e.message}`));
    socket.on('close', (code, reason) => {
      connections.delete(conn);
      for (const a of conn.aborts) a.abort(new CancelledError('the connection closed'));
      conn.rpc.dispose();
      log('info', `connection ${id} closed (${code}${reason.length ? ` ${reason.toString()}` : ''})`);
    });
    log('info', `connection ${id} opened`);
  }

  /** Checks a frame before vscode-jsonrpc sees it; answers (and drops) what is not a valid message. */
  function screen(
    conn: Connection,
    data: WebSocket.RawData,
    isBinary: boolean,
    reply: (id: number | string | null, code: number, message: string) => void,
  ): Message | undefined {
    if (isBinary) {
      reply(
        null,
        RpcErrorCode.InvalidRequest,
        'binary frames are not accepted: send each JSON-RPC message as a text frame',
      );
      return undefined;
    }
    let v: unknown;
    try {
      v = JSON.parse(frameText(data));
    } catch (e) {
      reply(null, RpcErrorCode.ParseError, `the frame is not valid JSON (${clip((e as Error).message, 120)})`);
      return undefined;
    }
    if (Array.isArray(v)) {
      reply(null, RpcErrorCode.InvalidRequest, 'batches are not supported: send one JSON-RPC message per frame');
      return undefined;
    }
    if (typeof v !== 'object' || v === null) {
      reply(null, RpcErrorCode.InvalidRequest, 'a JSON-RPC message must be a JSON object');
      return undefined;
    }
    const m = v as { jsonrpc?: unknown; id?: unknown; method?: unknown; params?: unknown };
    const id = typeof m.id === 'string' || (typeof m.id === 'number' && Number.isFinite(m.id)) ? m.id : null;
    const isResponse = m.method === undefined && ('result' in m || 'error' in m);
    if (isResponse) return undefined; // the server sends no requests, so no response is expected
    const bad = (message: string) => {
      reply(id, RpcErrorCode.InvalidRequest, message);
      return undefined;
    };
    if (m.jsonrpc !== '2.0') return bad('"jsonrpc" must be "2.0"');
    if (typeof m.method !== 'string' || !m.method) return bad('"method" must be a non-empty string');
    if (m.method.length > 200) return bad('"method" is too long');
    if (m.id !== undefined && id === null) return bad('"id" must be a string or a number');
    if (typeof id === 'string' && id.length > 200) return bad('"id" is too long');
    if (m.params !== undefined && (typeof m.params !== 'object' || m.params === null)) {
      if (m.id !== undefined) reply(id, RpcErrorCode.InvalidParams, 'params must be an object (or absent)');
      return undefined;
    }
    if (m.id === undefined) {
      // notifications: only $/cancelRequest means anything to us
      if (m.method !== '$/cancelRequest') return undefined;
      const cid = (m.params as { id?: unknown } | undefined)?.id;
      if (typeof cid !== 'string' && typeof cid !== 'number') return undefined;
      return v as Message;
    }
    if (conn.inFlight.has(id!)) return bad(`the id ${JSON.stringify(id)} is already used by a request in flight`);
    if (conn.inFlight.size >= maxInFlight) {
      reply(id, RpcErrorCode.ServerBusy, `too many requests in flight on this connection (${maxInFlight})`);
      return undefined;
    }
    conn.inFlight.add(id!);
    return v as Message;
  }

  async function handle(
    conn: Connection,
    method: string,
    rawParams: unknown,
    cancel: CancellationToken,
  ): Promise<unknown> {
    try {
      return await dispatch(conn, method, rawParams, cancel);
    } catch (e) {
      const err = toRpcError(e, method);
      if (err.code === RpcErrorCode.InternalError)
        log('error', `connection ${conn.id} ${method}: ${(e as Error)?.stack ?? String(e)}`);
      return err.toResponseError();
    }
  }

  async function dispatch(
    conn: Connection,
    method: string,
    rawParams: unknown,
    cancel: CancellationToken,
  ): Promise<unknown> {
    if (method === INITIALIZE) return initialize(conn, rawParams);
    if (!conn.initialized)
      throw new RpcError(
        RpcErrorCode.ServerNotInitialized,
        `send "initialize" with {"protocolVersion": ${PROTOCOL_VERSION}} before "${clip(method, 60)}"`,
      );
    if (method === STATUS) return status();
    const spec = Object.hasOwn(methods, method) ? methods[method] : undefined;
    if (!spec)
      throw new RpcError(
        RpcErrorCode.MethodNotFound,
        `unknown method "${clip(method, 60)}"; this server answers: ${[INITIALIZE, STATUS, ...Object.keys(methods)].join(', ')}`,
      );
    if (Array.isArray(rawParams))
      throw new RpcError(RpcErrorCode.InvalidParams, `params of "${method}" must be an object, not an array`);
    const { workDoneToken, partialResultToken, ...params } = (rawParams ?? {}) as Record<string, unknown>;
    for (const [name, t] of [
      ['workDoneToken', workDoneToken],
      ['partialResultToken', partialResultToken],
    ] as const)
      if (t !== undefined && typeof t !== 'string' && typeof t !== 'number')
        throw new RpcError(RpcErrorCode.InvalidParams, `${name} must be a string or a number`);
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

    const abort = new AbortController();
    const onAbort = () => abort.abort(new CancelledError('cancelled by the client'));
    cancel.onCancellationRequested(onAbort);
    if (cancel.isCancellationRequested) onAbort();
    const onServerAbort = () => abort.abort(new CancelledError('the server is shutting down'));
    serverAbort.signal.addEventListener('abort', onServerAbort, { once: true });
    conn.aborts.add(abort);

    const heavy = typeof spec.heavy === 'function' ? spec.heavy(params) : !!spec.heavy;
    const progress = new ProgressSender(conn.rpc, workDoneToken as ProgressToken | undefined, progressInterval);
    const item: Tracked = { method, state: heavy ? 'queued' : 'running', since: Date.now() };
    tracked.add(item);
    let release: (() => void) | undefined;
    let answered = false;
    let work: Promise<unknown> | undefined;
    try {
      progress.begin(spec.title ?? method);
      if (heavy) {
        if (semaphore.saturated)
          progress.report(`waiting for a free slot (${semaphore.running} running, ${semaphore.queued} queued)`);
        try {
          release = await semaphore.acquire(abort.signal);
        } catch (e) {
          if (e instanceof QueueFullError)
            throw new RpcError(
              RpcErrorCode.ServerBusy,
              `the server is busy: ${e.message}; try again when a request finishes`,
            );
          throw e;
        }
        item.state = 'running';
        item.since = Date.now();
      }
      const ctx: MethodContext = {
        method,
        signal: abort.signal,
        connectionId: conn.id,
        progress: (message, done, total) => {
          if (!answered) progress.report(message, done, total);
        },
        partial: (value) => {
          if (!answered && partialResultToken !== undefined)
            notify(conn.rpc, { token: partialResultToken as ProgressToken, value });
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
      const untrack = () => tracked.delete(item);
      if (work) work.then(untrack, untrack);
      else untrack();
      conn.aborts.delete(abort);
      serverAbort.signal.removeEventListener('abort', onServerAbort);
    }
  }

  async function initialize(conn: Connection, raw: unknown): Promise<InitializeResult> {
    if (conn.initialized)
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
    const info = opts.info ? await opts.info() : EMPTY_INFO;
    conn.initialized = true;
    const capabilities: Capabilities = {
      methods: [STATUS, ...Object.keys(methods)],
      workDoneProgress: true,
      partialResults: true,
      cancellation: true,
      limits,
    };
    return {
      ...info,
      protocolVersion: PROTOCOL_VERSION,
      server: { name: 'influence-lens', version: opts.version ?? '0.0.0', pid: process.pid },
      capabilities,
    };
  }

  function stats(): Omit<StatusResult, 'service'> {
    const now = Date.now();
    return {
      protocolVersion: PROTOCOL_VERSION,
      pid: process.pid,
      uptimeMs: now - started,
      connections: connections.size,
      heavy: { running: semaphore.running, queued: semaphore.queued, ...limits },
      requests: [...tracked].map((t) => ({ method: t.method, state: t.state, elapsedMs: now - t.since })),
    };
  }

  async function status(): Promise<StatusResult> {
    let service: ServiceInfo | undefined;
    try {
      service = opts.info ? await opts.info() : undefined;
    } catch (e) {
      log('warn', `status: info() failed: ${(e as Error).message}`);
    }
    return { ...stats(), ...(service ? { service } : {}) };
  }

  let discoveryFile: string | undefined;
  if (opts.discoveryFile !== false) {
    discoveryFile = opts.discoveryFile ?? defaultDiscoveryFile();
    try {
      writeDiscoveryFile(discoveryFile, { url, token, pid: process.pid, protocolVersion: PROTOCOL_VERSION });
    } catch (e) {
      await new Promise<void>((r) => http.close(() => r()));
      throw new Error(`could not write the discovery file ${discoveryFile}: ${(e as Error).message}`);
    }
  }

  let closed: Promise<void> | undefined;
  const close = () => {
    closed ??= (async () => {
      closing = true;
      serverAbort.abort();
      if (discoveryFile) removeDiscoveryFile(discoveryFile, token);
      for (const c of connections) c.socket.close(CloseCode.GoingAway, 'the server is shutting down');
      const done = new Promise<void>((r) => http.close(() => r()));
      // sockets that do not answer the close handshake are cut after a moment
      const t = setTimeout(() => {
        for (const c of connections) c.socket.terminate();
        http.closeAllConnections?.();
      }, 1000);
      await done;
      clearTimeout(t);
      wss.close();
    })();
    return closed;
  };

  log('info', `listening on ${url}`);
  return { url, token, host, port, discoveryFile, limits, stats, close };
}

const EMPTY_INFO: ServiceInfo = {
  model: '',
  stages: [],
  datasets: [],
  datasetPaths: {},
  device: 'cpu',
  methods: [],
  unavailable: {},
  modules: [],
  warnings: [],
};

function closeReasons(limits: ServerLimits): Record<number, string> {
  return {
    [CloseCode.MessageTooBig]: `message too big: this server reads frames up to ${limits.maxFrameBytes} bytes (maxFrameBytes)`,
    1007: 'invalid UTF-8 in a text frame',
    1002: 'WebSocket protocol error',
  };
}

function normalizeTable(table: MethodTable): Record<string, MethodSpec> {
  const out: Record<string, MethodSpec> = Object.create(null);
  for (const [name, h] of Object.entries(table)) {
    if (name === INITIALIZE || name === STATUS || name.startsWith('$/') || name.startsWith('rpc.'))
      throw new Error(`the method name "${name}" is reserved`);
    const spec = typeof h === 'function' ? { handler: h } : h;
    if (typeof spec?.handler !== 'function') throw new Error(`method "${name}" has no handler function`);
    if (spec.params !== undefined) assertSupportedSchema(spec.params);
    out[name] = spec;
  }
  return out;
}

function refuse(socket: Duplex, status: number, message: string) {
  const reason = { 401: 'Unauthorized', 403: 'Forbidden', 503: 'Service Unavailable' }[status] ?? 'Error';
  const body = `${message}\n`;
  const head = [
    `HTTP/1.1 ${status} ${reason}`,
    'Connection: close',
    'Content-Type: text/plain; charset=utf-8',
    `Content-Length: ${Buffer.byteLength(body)}`,
    ...(status === 401 ? ['WWW-Authenticate: Bearer realm="influence-lens"'] : []),
  ];
  socket.end(`${head.join('\r\n')}\r\n\r\n${body}`);
  setTimeout(() => socket.destroy(), 1000).unref();
}

/** Rejects with the signal's reason as soon as it aborts, without waiting for `p`. */
function raceAbort<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    p.catch(() => {});
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => {
      p.catch(() => {});
      reject(signal.reason);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

/** LSP work-done progress for one request: begin, throttled reports (latest wins), end. */
class ProgressSender {
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
function notify(rpc: MessageConnection, params: ProgressParams) {
  try {
    rpc.sendNotification(PROGRESS, params).catch(() => {});
  } catch {
    // the connection is gone
  }
}

function rpcLogger(log: NonNullable<ServerOptions['log']>, id: number): Logger {
  return {
    error: (m) => log('warn', `connection ${id}: ${clip(m, 300)}`),
    warn: (m) => log('warn', `connection ${id}: ${clip(m, 300)}`),
    info: () => {},
    log: () => {},
  };
}

function clip(s: string, n: number): string {
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

/**
 * Closes the server cleanly (aborting work, removing the discovery file) on SIGINT / SIGTERM,
 * then exits. For `influence-lens serve`; returns a function that removes the handlers.
 */
export function closeOnSignals(
  server: Pick<RunningServer, 'close'>,
  signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM'],
): () => void {
  const onSignal = (sig: NodeJS.Signals) => {
    remove();
    server.close().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
  };
  const remove = () => {
    for (const s of signals) process.off(s, onSignal);
  };
  for (const s of signals) process.on(s, onSignal);
  return remove;
}
