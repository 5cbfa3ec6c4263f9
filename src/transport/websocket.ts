// vscode-jsonrpc over a `ws` WebSocket: one JSON-RPC message per text frame, no
// Content-Length headers. Used by both the server and the client; no Node APIs beyond `ws`.

import {
  AbstractMessageReader,
  AbstractMessageWriter,
  type DataCallback,
  type Disposable,
  type Message,
  type MessageReader,
  type MessageWriter,
} from 'vscode-jsonrpc';
import type WebSocket from 'ws';
import { RpcErrorCode } from '../protocol/rpc';

/** Turns a frame into a message to dispatch, or undefined to drop it (having answered it, say). */
export type FrameParser = (data: WebSocket.RawData, isBinary: boolean) => Message | undefined;

const decoder = new TextDecoder('utf-8', { fatal: false });

export function frameText(data: WebSocket.RawData): string {
  if (typeof data === 'string') return data;
  if (Array.isArray(data)) return data.map((d) => decoder.decode(d, { stream: true })).join('') + decoder.decode();
  return decoder.decode(data as ArrayBuffer | Uint8Array);
}

/** The client's parser: any JSON object is handed on; anything else is an error event. */
export const parseJsonFrame: FrameParser = (data) => {
  const v = JSON.parse(frameText(data));
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw new Error('received a frame that is not a JSON object');
  return v as Message;
};

export class WebSocketMessageReader extends AbstractMessageReader implements MessageReader {
  private callback: DataCallback | undefined;
  private pending: Message[] = [];

  constructor(
    socket: WebSocket,
    private readonly parse: FrameParser = parseJsonFrame,
  ) {
    super();
    socket.on('message', (data, isBinary) => this.onFrame(data, isBinary));
    socket.on('close', () => this.fireClose());
    socket.on('error', (e) => this.fireError(e));
  }

  private onFrame(data: WebSocket.RawData, isBinary: boolean) {
    let msg: Message | undefined;
    try {
      msg = this.parse(data, isBinary);
    } catch (e) {
      this.fireError(e);
      return;
    }
    if (!msg) return;
    if (!this.callback) {
      this.pending.push(msg);
      return;
    }
    try {
      this.callback(msg);
    } catch (e) {
      // never let a bad message escape into ws's event emitter (that would crash the process)
      this.fireError(e);
    }
  }

  listen(callback: DataCallback): Disposable {
    this.callback = callback;
    const queued = this.pending;
    this.pending = [];
    for (const m of queued) callback(m);
    return { dispose: () => (this.callback = undefined) };
  }
}

export interface WriterOptions {
  /** sees every message just before it is sent */
  onSend?: (m: Message) => void;
  /**
   * The most bytes the socket may hold unsent (the peer not reading); past it `onOverflow` is
   * called once and later messages are dropped. Default: no limit (the client's side).
   */
  maxBufferedBytes?: number;
  onOverflow?: (bufferedBytes: number) => void;
}

export class WebSocketMessageWriter extends AbstractMessageWriter implements MessageWriter {
  /** messages not sent because the socket was closed or over its buffer limit */
  dropped = 0;
  private overflowed = false;

  constructor(
    private readonly socket: WebSocket,
    private readonly opts: WriterOptions = {},
  ) {
    super();
  }

  write(msg: Message): Promise<void> {
    if (this.socket.readyState !== 1 /* OPEN */ || this.overflowed) {
      // the peer is gone (or being dropped): nobody will read this; counting it is enough, and
      // resolving keeps vscode-jsonrpc from logging one line per lost message
      this.dropped++;
      return Promise.resolve();
    }
    let text: string;
    try {
      text = JSON.stringify(msg);
    } catch (e) {
      // a result that cannot be encoded: tell the caller instead of leaving it waiting
      const r = msg as { id?: unknown; result?: unknown; error?: unknown };
      if (r.id === undefined || (r.result === undefined && r.error === undefined)) return Promise.reject(e);
      msg = {
        jsonrpc: '2.0',
        id: r.id,
        error: {
          code: RpcErrorCode.InternalError,
          message: `the result could not be encoded as JSON: ${(e as Error).message}`,
        },
      } as Message;
      text = JSON.stringify(msg);
    }
    this.opts.onSend?.(msg);
    this.socket.send(text, () => {});
    const cap = this.opts.maxBufferedBytes;
    if (cap !== undefined && this.socket.bufferedAmount > cap) {
      this.overflowed = true;
      this.opts.onOverflow?.(this.socket.bufferedAmount);
    }
    return Promise.resolve();
  }

  end(): void {}
}
