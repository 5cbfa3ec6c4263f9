// One client's WebSocket on the server: frames screened before vscode-jsonrpc sees them (bad
// ones answered with the right JSON-RPC error), the requests it has in flight, the work it
// started (aborted when it leaves), and a cap on what it may leave unread: a client that stops
// reading is dropped with close code 1008 instead of growing the server's memory.
import { createMessageConnection, type Logger, type Message, type MessageConnection } from 'vscode-jsonrpc';
import WebSocket from 'ws';
import { CancelRequestNotification } from '../protocol/requests';
import { CloseCode, RpcErrorCode, type ServerLimits } from '../protocol/rpc';
import type { LogLimiter } from './log-limiter';
import { frameText, WebSocketMessageReader, WebSocketMessageWriter } from './websocket';

/** How deep request params may nest (objects and arrays); the protocol's params need 4. */
export const MAX_PARAMS_DEPTH = 64;

export interface ConnectionLimits extends ServerLimits {
  /** requests in flight on one connection */
  maxInFlightPerConnection: number;
  /** bytes a connection may leave unread before it is dropped */
  maxBufferedBytes: number;
}

export type RequestHandler = (
  conn: ServerConnection,
  method: string,
  params: unknown,
  cancel: import('vscode-jsonrpc').CancellationToken,
) => Promise<unknown>;

/** Thrown into a connection's running work when it goes away. */
export class ConnectionGoneError extends Error {
  override name = 'ConnectionGoneError';
}

export class ServerConnection {
  readonly rpc: MessageConnection;
  initialized = false;
  /** an `initialize` whose answer is being prepared: requests sent right behind it wait for it */
  initializing: Promise<void> | null = null;
  /** ids of requests received and not answered yet */
  readonly inFlight = new Set<number | string>();
  /** abort controllers of running handlers */
  readonly aborts = new Set<AbortController>();
  private readonly writer: WebSocketMessageWriter;

  constructor(
    readonly id: number,
    readonly socket: WebSocket,
    private readonly limits: ConnectionLimits,
    private readonly log: LogLimiter,
    onRequest: RequestHandler,
    onClose: (conn: ServerConnection) => void,
  ) {
    addCloseReasons(socket, limits);
    this.writer = new WebSocketMessageWriter(socket, {
      onSend: (m) => {
        const r = m as { id?: number | string | null; method?: string };
        if (r.method === undefined && r.id !== undefined && r.id !== null) this.inFlight.delete(r.id);
      },
      maxBufferedBytes: limits.maxBufferedBytes,
      onOverflow: (bytes) => this.drop(bytes),
    });
    const reader = new WebSocketMessageReader(socket, (data, isBinary) => this.screen(data, isBinary));
    this.rpc = createMessageConnection(reader, this.writer, rpcLogger(log, id));
    this.rpc.onRequest((method, params, token) => onRequest(this, method, params, token));
    this.rpc.listen();
    socket.on('error', (e) => log.limited('warn', `conn-error:${id}`, `connection ${id}: ${e.message}`));
    socket.on('close', (code, reason) => {
      onClose(this);
      for (const a of this.aborts) a.abort(new ConnectionGoneError('the connection closed'));
      this.rpc.dispose();
      const lost = this.writer.dropped ? `; ${this.writer.dropped} message(s) to it were dropped` : '';
      log.always('info', `connection ${id} closed (${code}${reason.length ? ` ${reason.toString()}` : ''})${lost}`);
    });
    log.always('info', `connection ${id} opened`);
  }

  /** The client is not reading: say why in the close frame, and cut it if it does not answer. */
  private drop(bytes: number) {
    const mib = (bytes / 2 ** 20).toFixed(1);
    this.log.always(
      'warn',
      `connection ${this.id}: the client left ${mib} MiB unread (limit ${(this.limits.maxBufferedBytes / 2 ** 20).toFixed(1)} MiB): dropping it`,
    );
    this.socket.close(CloseCode.PolicyViolation, 'the client is not reading its responses');
    setTimeout(() => this.socket.terminate(), 1000).unref();
  }

  /** Answers a frame that never reaches vscode-jsonrpc (so it bypasses the in-flight bookkeeping). */
  private reply(id: number | string | null, code: number, message: string) {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    if (this.socket.bufferedAmount > this.limits.maxBufferedBytes) return; // being dropped
    this.socket.send(JSON.stringify({ jsonrpc: '2.0', id, error: { code, message } }), () => {});
  }

  /** Checks a frame before vscode-jsonrpc sees it; answers (and drops) what is not a valid message. */
  private screen(data: WebSocket.RawData, isBinary: boolean): Message | undefined {
    if (isBinary) {
      this.reply(
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
      this.reply(null, RpcErrorCode.ParseError, `the frame is not valid JSON (${clip((e as Error).message, 120)})`);
      return undefined;
    }
    if (Array.isArray(v)) {
      this.reply(null, RpcErrorCode.InvalidRequest, 'batches are not supported: send one JSON-RPC message per frame');
      return undefined;
    }
    if (typeof v !== 'object' || v === null) {
      this.reply(null, RpcErrorCode.InvalidRequest, 'a JSON-RPC message must be a JSON object');
      return undefined;
    }
    const m = v as { jsonrpc?: unknown; id?: unknown; method?: unknown; params?: unknown };
    const id = typeof m.id === 'string' || (typeof m.id === 'number' && Number.isFinite(m.id)) ? m.id : null;
    const isResponse = m.method === undefined && ('result' in m || 'error' in m);
    if (isResponse) return undefined; // the server sends no requests, so no response is expected
    const bad = (message: string) => {
      this.reply(id, RpcErrorCode.InvalidRequest, message);
      return undefined;
    };
    if (m.jsonrpc !== '2.0') return bad('"jsonrpc" must be "2.0"');
    if (typeof m.method !== 'string' || !m.method) return bad('"method" must be a non-empty string');
    if (m.method.length > 200) return bad('"method" is too long');
    if (m.id !== undefined && id === null) return bad('"id" must be a string or a number');
    if (typeof id === 'string' && id.length > 200) return bad('"id" is too long');
    if (m.params !== undefined && (typeof m.params !== 'object' || m.params === null)) {
      if (m.id !== undefined) this.reply(id, RpcErrorCode.InvalidParams, 'params must be an object (or absent)');
      return undefined;
    }
    // every later step (validation, the handler, encoding the answer) may recurse over params
    if (m.params !== undefined && nestedDeeperThan(m.params, MAX_PARAMS_DEPTH)) {
      if (m.id !== undefined)
        this.reply(
          id,
          RpcErrorCode.InvalidParams,
          `params are nested more than ${MAX_PARAMS_DEPTH} levels deep; no request of this server needs that`,
        );
      return undefined;
    }
    if (m.id === undefined) {
      // notifications: only $/cancelRequest means anything to us
      if (m.method !== CancelRequestNotification.method) return undefined;
      const cid = (m.params as { id?: unknown } | undefined)?.id;
      if (typeof cid !== 'string' && typeof cid !== 'number') return undefined;
      return v as Message;
    }
    if (this.inFlight.has(id!)) return bad(`the id ${JSON.stringify(id)} is already used by a request in flight`);
    const max = this.limits.maxInFlightPerConnection;
    if (this.inFlight.size >= max) {
      this.reply(id, RpcErrorCode.ServerBusy, `too many requests in flight on this connection (${max})`);
      return undefined;
    }
    this.inFlight.add(id!);
    return v as Message;
  }
}

/** Whether `v` nests objects/arrays more than `max` levels deep (iterative: no stack to overflow). */
export function nestedDeeperThan(v: unknown, max: number): boolean {
  const stack: Array<[unknown, number]> = [[v, 1]];
  while (stack.length) {
    const [x, depth] = stack.pop()!;
    if (x === null || typeof x !== 'object') continue;
    if (depth > max) return true;
    for (const child of Array.isArray(x) ? x : Object.values(x)) stack.push([child, depth + 1]);
  }
  return false;
}

/** ws closes on a protocol error (oversize frame, bad UTF-8) with a bare code; add the reason. */
function addCloseReasons(socket: WebSocket, limits: ServerLimits) {
  const reasons: Record<number, string> = {
    [CloseCode.MessageTooBig]: `message too big: this server reads frames up to ${limits.maxFrameBytes} bytes (maxFrameBytes)`,
    1007: 'invalid UTF-8 in a text frame',
    1002: 'WebSocket protocol error',
  };
  const close = socket.close.bind(socket);
  socket.close = (code?: number, reason?: string | Buffer) =>
    close(code, reason ?? (code !== undefined ? reasons[code] : undefined));
}

function rpcLogger(log: LogLimiter, id: number): Logger {
  const line = (m: string) => log.limited('warn', `rpc:${id}`, `connection ${id}: ${clip(m, 300)}`);
  return { error: line, warn: line, info: () => {}, log: () => {} };
}

export function clip(s: string, n: number): string {
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}
