// The influence server's transport: JSON-RPC 2.0 over a WebSocket (one message per text frame),
// with the `initialize` handshake, LSP-style progress / partial results / cancellation, a
// concurrency limit for heavy requests, and the upgrade checks of ./security. What the methods
// do is not decided here: the caller passes a method table, e.g.
//
//   const server = await startServer({
//     handlers: Object.fromEntries([
//       on(GetExample, { params: PARAMS_SCHEMA.getExample, handler: (p) => service.getExample(p.dataset, p.line) }),
//       on(Explain, { heavy: true, params: PARAMS_SCHEMA.explain, handler: (p, ctx) => service.explain(p, ctx) }),
//     ]),
//     info: () => service.info(),
//   });
//   console.log(server.url);   // the token is in server.token and the discovery file
//
// Every bad input is answered with a JSON-RPC error and the server keeps serving: invalid JSON
// (ParseError), non-JSON-RPC or binary frames (InvalidRequest), unknown methods
// (MethodNotFound), wrong params (InvalidParams), too many heavy requests (ServerBusy). A frame
// over `maxFrameBytes` closes that connection with 1009 and a reason; a client that leaves
// more than `maxBufferedBytes` unread is dropped with 1008. Lines a client can provoke again
// and again (refused upgrades, its protocol noise) are rate-limited in the log.
//
// The parts: ./connection (one client's socket and frame screening), ./dispatcher (handshake,
// validation, heavy slots, progress, cancellation), ./progress, ./security (upgrade checks),
// ./discovery; this file listens, accepts and closes.
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { RequestType } from 'vscode-jsonrpc';
import type WebSocket from 'ws';
import { WebSocketServer } from 'ws';
import { assertSupportedSchema, type JsonSchema } from '../common/json-schema';
import { Initialize, Status } from '../protocol/requests';
import { CloseCode, PROTOCOL_VERSION, type ServerLimits, type ServiceInfo, type StatusResult } from '../protocol/rpc';
import { type ConnectionLimits, ServerConnection } from './connection';
import { checkToken, defaultDiscoveryFile, removeDiscoveryFile, resolveToken, writeDiscoveryFile } from './discovery';
import { Dispatcher } from './dispatcher';
import { type LogFn, LogLimiter } from './log-limiter';
import { checkUpgrade, isLoopback, urlHost } from './security';

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
  /** JSON schema (draft-07, checked by Ajv) the params must satisfy; failures are InvalidParams naming the field */
  params?: JsonSchema;
  /** title of the work-done progress (default: the method name) */
  title?: string;
}

/** method name → handler (light) or spec. Params reach handlers as an object (never undefined),
 * without `workDoneToken` / `partialResultToken`. */
export type MethodTable = Record<string, Handler | MethodSpec>;

/**
 * One entry of a method table, typed from the request's declaration (src/protocol/requests):
 * the handler must take that request's params and return its result.
 *
 *   Object.fromEntries([on(Explain, { heavy: true, params: PARAMS_SCHEMA.explain, handler: (p, ctx) => … })])
 */
export function on<P, R>(type: RequestType<P, R, unknown>, spec: MethodSpec<P, R>): [string, MethodSpec] {
  return [type.method, spec];
}

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
    /** bytes one connection may leave unread before it is dropped with 1008 (default 64 MiB) */
    maxBufferedBytes?: number;
  };
  /** where to write {url, token, pid}; default ~/.cache/influence-lens/server.json; false: none */
  discoveryFile?: string | false;
  /** reported in `initialize` */
  version?: string;
  /** minimum milliseconds between two progress reports of one request (default 100) */
  progressIntervalMs?: number;
  log?: LogFn;
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

/** Starts listening; resolves once the port is bound and the discovery file written. */
export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const host = opts.host ?? '127.0.0.1';
  const token = opts.token ?? resolveToken();
  checkToken(token);
  const limits = connectionLimits(opts.limits);
  const serverLimits: ServerLimits = {
    maxFrameBytes: limits.maxFrameBytes,
    maxConcurrent: limits.maxConcurrent,
    maxQueued: limits.maxQueued,
  };
  const maxConnections = opts.limits?.maxConnections ?? 32;
  const log = new LogLimiter(opts.log ?? (() => {}));
  const connections = new Set<ServerConnection>();
  const dispatcher = new Dispatcher({
    methods: normalizeTable(opts.handlers),
    limits: serverLimits,
    info: opts.info,
    version: opts.version,
    progressIntervalMs: opts.progressIntervalMs ?? 100,
    log,
    connections: () => connections.size,
  });

  const http = await listen(host, opts.port ?? 0);
  http.on('error', (e) => log.limited('error', 'http', `http server: ${e.message}`));
  const port = (http.address() as AddressInfo).port;
  const url = `ws://${urlHost(host)}:${port}/`;
  if (!isLoopback(host))
    log.always(
      'warn',
      `listening on ${host}, not a loopback address: anyone who can reach port ${port} can try the token`,
    );

  const wss = new WebSocketServer({ noServer: true, maxPayload: limits.maxFrameBytes, perMessageDeflate: false });
  let nextConnectionId = 1;
  const accept = (socket: WebSocket) => {
    const conn = new ServerConnection(
      nextConnectionId++,
      socket,
      limits,
      log,
      (c, method, params, cancel) => dispatcher.handle(c, method, params, cancel),
      (c) => connections.delete(c),
    );
    connections.add(conn);
  };
  const isClosing = () => dispatcher.shutdown.signal.aborted;
  http.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => {});
    const denial = isClosing()
      ? { status: 503, message: 'the server is shutting down' }
      : (checkUpgrade(req, { token, host, port }) ??
        (connections.size >= maxConnections
          ? { status: 503, message: `too many connections (${maxConnections}); close some and retry` }
          : null));
    if (denial) {
      // one line per kind of refusal per window: a client retrying in a loop cannot flood the log
      log.limited(
        'warn',
        `refused:${denial.status}`,
        `refused a connection from ${req.socket.remoteAddress}: ${denial.status} ${denial.message}`,
      );
      refuse(socket, denial.status, denial.message);
      return;
    }
    wss.handleUpgrade(req, socket, head, accept);
  });

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
      dispatcher.shutdown.abort();
      if (discoveryFile) removeDiscoveryFile(discoveryFile, token);
      await closeAll(http, wss, connections);
      log.flush();
    })();
    return closed;
  };

  log.always('info', `listening on ${url}`);
  return { url, token, host, port, discoveryFile, limits: serverLimits, stats: () => dispatcher.stats(), close };
}

function connectionLimits(l: ServerOptions['limits']): ConnectionLimits {
  return {
    maxFrameBytes: l?.maxFrameBytes ?? DEFAULT_LIMITS.maxFrameBytes,
    maxConcurrent: l?.maxConcurrent ?? DEFAULT_LIMITS.maxConcurrent,
    maxQueued: l?.maxQueued ?? DEFAULT_LIMITS.maxQueued,
    maxInFlightPerConnection: l?.maxInFlightPerConnection ?? 64,
    maxBufferedBytes: l?.maxBufferedBytes ?? 64 * 2 ** 20,
  };
}

/** An HTTP server on host:port answering plain requests with 426 (upgrades are handled by the caller). */
async function listen(host: string, port: number): Promise<Server> {
  const http: Server = createServer((_req, res) => {
    res.writeHead(426, { 'Content-Type': 'text/plain; charset=utf-8', Upgrade: 'websocket', Connection: 'close' });
    res.end('influence-lens: this is a WebSocket JSON-RPC server; connect with a WebSocket client\n');
  });
  await new Promise<void>((resolve, reject) => {
    http.once('error', reject);
    http.listen(port, host, () => {
      http.off('error', reject);
      resolve();
    });
  });
  return http;
}

/** Closes every connection (1001), stops listening; sockets that ignore the close handshake are cut after 1 s. */
async function closeAll(http: Server, wss: WebSocketServer, connections: Set<ServerConnection>): Promise<void> {
  for (const c of connections) c.socket.close(CloseCode.GoingAway, 'the server is shutting down');
  const done = new Promise<void>((r) => http.close(() => r()));
  const t = setTimeout(() => {
    for (const c of connections) c.socket.terminate();
    http.closeAllConnections?.();
  }, 1000);
  await done;
  clearTimeout(t);
  wss.close();
}

function normalizeTable(table: MethodTable): Record<string, MethodSpec> {
  const out: Record<string, MethodSpec> = Object.create(null);
  for (const [name, h] of Object.entries(table)) {
    if (name === Initialize.method || name === Status.method || name.startsWith('$/') || name.startsWith('rpc.'))
      throw new Error(`the method name "${name}" is reserved`);
    const spec = typeof h === 'function' ? { handler: h } : h;
    if (typeof spec?.handler !== 'function') throw new Error(`method "${name}" has no handler function`);
    if (spec.params !== undefined)
      try {
        assertSupportedSchema(spec.params);
      } catch (e) {
        throw new Error(`method "${name}": its params schema is not supported: ${(e as Error).message}`);
      }
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
