// A client for the influence server: ws + vscode-jsonrpc, one message per text frame. Used by
// the tests, the CLI and the VS Code extension (no Node APIs beyond `ws`).
//
//   const client = await RpcClient.connect({ url, token });           // sends initialize
//   const r = await client.request(Explain, params, {      // typed by src/protocol/requests
//     signal,                                  // abort → $/cancelRequest, rejects at once
//     onProgress: (p) => ...,                  // WorkDoneProgress (begin / report / end)
//     onPartial: (v) => ...,                   // e.g. ExplainPartial
//   });
//
// Failures are `RpcError`s with the server's code and message; a refused connection says why
// (the server's 401/403 text), a dropped one gives its close code and reason.
import {
  type CancellationToken,
  CancellationTokenSource,
  createMessageConnection,
  type MessageConnection,
  type RequestType,
  type RequestType0,
  ResponseError,
} from 'vscode-jsonrpc';
import WebSocket from 'ws';
import { Initialize, ProgressNotification, Status } from '../protocol/requests';
import {
  type InitializeParams,
  type InitializeResult,
  PROTOCOL_VERSION,
  type ProgressParams,
  type ProgressToken,
  RpcErrorCode,
  type StatusResult,
  type WorkDoneProgress,
} from '../protocol/rpc';
import { RpcError } from './errors';
import { WebSocketMessageReader, WebSocketMessageWriter } from './websocket';

export interface ConnectOptions {
  /** ws://127.0.0.1:PORT/ (from the discovery file or the server's output) */
  url: string;
  token: string;
  /** send `initialize` right away (default true) */
  initialize?: boolean;
  /** the version to claim in `initialize` (default PROTOCOL_VERSION; tests use others) */
  protocolVersion?: number;
  client?: InitializeParams['client'];
  /** give up connecting + initializing after this long (default 10 s) */
  timeoutMs?: number;
  /** the largest frame accepted from the server (default 256 MiB) */
  maxFrameBytes?: number;
}

export interface RequestOptions {
  /** aborting sends `$/cancelRequest` and rejects the request with RequestCancelled at once */
  signal?: AbortSignal;
  onProgress?: (p: WorkDoneProgress) => void;
  onPartial?: (value: unknown) => void;
}

/** Why the connection ended: the WebSocket close code and reason. */
export interface CloseInfo {
  code: number;
  reason: string;
}

let tokenCounter = 0;
function progressToken(kind: string): string {
  tokenCounter += 1;
  return `${kind}-${tokenCounter}-${Math.random().toString(36).slice(2, 10)}`;
}

export class RpcClient {
  /** what the server said in `initialize` (after `connect` with initialize, or `initialize()`) */
  server: InitializeResult | undefined;
  private readonly progress = new Map<ProgressToken, (value: unknown) => void>();
  private closeInfo: CloseInfo | undefined;
  private readonly closeListeners: Array<(info: CloseInfo) => void> = [];
  private readonly rpc: MessageConnection;
  private readonly pending = new Set<(e: Error) => void>();

  private constructor(private readonly socket: WebSocket) {
    this.rpc = createMessageConnection(new WebSocketMessageReader(socket), new WebSocketMessageWriter(socket));
    this.rpc.onNotification(ProgressNotification, (p: ProgressParams) => {
      if (p && (typeof p.token === 'string' || typeof p.token === 'number')) this.progress.get(p.token)?.(p.value);
    });
    this.rpc.listen();
    socket.on('error', () => {}); // reported through 'close'
    socket.on('close', (code, reason) => {
      this.closeInfo = { code, reason: reason.toString() };
      const err = new RpcError(
        RpcErrorCode.InternalError,
        // 1006: no close frame, so the server's process stopped (killed, crashed) or the network dropped
        code === 1006
          ? 'the connection to the influence server broke off (1006: its process stopped, e.g. killed or out of memory, or the network dropped); the next request starts a local server again or reconnects'
          : `the connection to the influence server closed (${code}${this.closeInfo.reason ? `: ${this.closeInfo.reason}` : ''})`,
        this.closeInfo,
      );
      for (const reject of this.pending) reject(err);
      this.pending.clear();
      for (const l of this.closeListeners) l(this.closeInfo);
      this.rpc.dispose();
    });
  }

  /** Opens the WebSocket (with the token) and, unless told not to, sends `initialize`. */
  static async connect(opts: ConnectOptions): Promise<RpcClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const socket = new WebSocket(opts.url, {
      headers: { Authorization: `Bearer ${opts.token}` },
      maxPayload: opts.maxFrameBytes ?? 256 * 1024 * 1024,
      perMessageDeflate: false,
      handshakeTimeout: timeoutMs,
    });
    socket.on('error', () => {}); // failures are reported below and through 'close'
    await new Promise<void>((resolve, reject) => {
      socket.once('open', () => resolve());
      socket.once('unexpected-response', (_req, res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          if (body.length < 2000) body += c;
        });
        res.on('end', () => {
          socket.terminate();
          reject(
            new Error(
              `the influence server refused the connection (${res.statusCode} ${res.statusMessage}): ${body.trim() || 'no reason given'}`,
            ),
          );
        });
      });
      socket.once('error', (e) =>
        reject(new Error(`could not connect to the influence server at ${opts.url}: ${(e as Error).message}`)),
      );
    });
    const client = new RpcClient(socket);
    if (opts.initialize !== false) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        await Promise.race([
          client.initialize({ protocolVersion: opts.protocolVersion ?? PROTOCOL_VERSION, client: opts.client }),
          new Promise((_, reject) => {
            timer = setTimeout(
              () =>
                reject(
                  new Error(`the influence server at ${opts.url} did not answer "initialize" within ${timeoutMs} ms`),
                ),
              timeoutMs,
            );
          }),
        ]);
      } catch (e) {
        client.close();
        throw e;
      } finally {
        clearTimeout(timer);
      }
    }
    return client;
  }

  async initialize(params: InitializeParams = { protocolVersion: PROTOCOL_VERSION }): Promise<InitializeResult> {
    this.server = await this.request(Initialize, params);
    return this.server;
  }

  status(): Promise<StatusResult> {
    return this.request(Status);
  }

  /**
   * Sends a request; rejects with RpcError on an error response, a cancel, or a closed connection.
   * Pass a declaration from src/protocol/requests (`client.request(Explain, params)`) to have the
   * params and result typed; a bare method name is for tests that send what no declaration allows.
   */
  request<P, R>(type: RequestType<P, R, unknown>, params: P, opts?: RequestOptions): Promise<R>;
  request<R>(type: RequestType0<R, unknown>, params?: undefined, opts?: RequestOptions): Promise<R>;
  request<R = unknown>(method: string, params?: object, opts?: RequestOptions): Promise<R>;
  async request<R>(typeOrMethod: string | { method: string }, params?: unknown, opts: RequestOptions = {}): Promise<R> {
    const method = typeof typeOrMethod === 'string' ? typeOrMethod : typeOrMethod.method;
    if (this.closeInfo)
      throw new RpcError(
        RpcErrorCode.InternalError,
        `the connection to the influence server is closed (${this.closeInfo.code})`,
      );
    if (opts.signal?.aborted) throw new RpcError(RpcErrorCode.RequestCancelled, 'cancelled');
    const tokens: ProgressToken[] = [];
    const sent: Record<string, unknown> = { ...((params as object | undefined) ?? {}) };
    if (opts.onProgress) {
      const t = progressToken('work');
      const cb = opts.onProgress;
      this.progress.set(t, (v) => cb(v as WorkDoneProgress));
      sent.workDoneToken = t;
      tokens.push(t);
    }
    if (opts.onPartial) {
      const t = progressToken('partial');
      this.progress.set(t, opts.onPartial);
      sent.partialResultToken = t;
      tokens.push(t);
    }
    // a frame the server would refuse (closing the connection) is refused here instead
    const limit = this.server?.capabilities.limits.maxFrameBytes;
    if (limit && params !== undefined) {
      const chars = JSON.stringify(sent).length + method.length + 64;
      if (chars > limit)
        throw new RpcError(
          RpcErrorCode.InvalidParams,
          `the ${method} request is about ${chars} bytes, more than the server accepts (maxFrameBytes = ${limit})`,
        );
    }
    const cts = opts.signal ? new CancellationTokenSource() : undefined;
    let reject!: (e: Error) => void;
    const stopped = new Promise<never>((_, r) => {
      reject = r;
    });
    this.pending.add(reject);
    const onAbort = () => {
      cts?.cancel();
      reject(new RpcError(RpcErrorCode.RequestCancelled, 'cancelled'));
    };
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const token: CancellationToken | undefined = cts?.token;
      // (vscode-jsonrpc would send an explicit `undefined` param as [null])
      const p =
        params !== undefined || tokens.length
          ? token
            ? this.rpc.sendRequest<R>(method, sent, token)
            : this.rpc.sendRequest<R>(method, sent)
          : token
            ? this.rpc.sendRequest<R>(method, token)
            : this.rpc.sendRequest<R>(method);
      p.catch(() => {}); // may lose the race below
      return await Promise.race([p, stopped]);
    } catch (e) {
      if (e instanceof ResponseError) throw RpcError.fromResponseError(e);
      throw e;
    } finally {
      this.pending.delete(reject);
      opts.signal?.removeEventListener('abort', onAbort);
      for (const t of tokens) this.progress.delete(t);
      cts?.dispose();
    }
  }

  /** Called once when the connection ends (also after `close()`). */
  onClose(listener: (info: CloseInfo) => void): void {
    if (this.closeInfo) listener(this.closeInfo);
    else this.closeListeners.push(listener);
  }

  get closed(): boolean {
    return this.closeInfo !== undefined;
  }

  /** Closes the connection; resolves when it is closed. */
  close(): Promise<CloseInfo> {
    return new Promise((resolve) => {
      this.onClose(resolve);
      if (this.socket.readyState === WebSocket.CONNECTING || this.socket.readyState === WebSocket.OPEN)
        this.socket.close(1000, 'client closed');
    });
  }
}
