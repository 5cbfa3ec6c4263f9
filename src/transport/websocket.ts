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

export class WebSocketMessageWriter extends AbstractMessageWriter implements MessageWriter {
  constructor(
    private readonly socket: WebSocket,
    /** sees every message just before it is sent */
    private readonly onSend?: (m: Message) => void,
  ) {
    super();
  }

  write(msg: Message): Promise<void> {
    if (this.socket.readyState !== 1 /* OPEN */) return Promise.reject(new Error('the connection is closed'));
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
    this.onSend?.(msg);
    return new Promise((resolve, reject) =>
      this.socket.send(text, (err) => {
        if (err) {
          reject(err);
        } else resolve();
      }),
    );
  }

  end(): void {}
}
