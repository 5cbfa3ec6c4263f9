// One error type for both ends of the wire. Handlers throw `RpcError` (or any error: see
// `toRpcError` for how others map); clients get an `RpcError` when a request fails.
// (vscode-jsonrpc's ResponseError resets its prototype in its constructor, so it cannot be
// subclassed; we convert at the edges instead.) No Node APIs here: the client imports it.
import { ResponseError } from 'vscode-jsonrpc';
import { RpcErrorCode } from '../protocol/rpc';

export class RpcError<D = unknown> extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data?: D,
  ) {
    super(message);
    this.name = 'RpcError';
  }

  toResponseError(): ResponseError<D> {
    return new ResponseError(this.code, this.message, this.data);
  }

  static fromResponseError(e: ResponseError<unknown>): RpcError {
    return new RpcError(e.code, e.message, e.data);
  }
}

export function invalidParams(message: string): RpcError {
  return new RpcError(RpcErrorCode.InvalidParams, message);
}

/** The string codes the influence service puts on its errors (ServiceError.code). */
const SERVICE_CODES: Record<string, number> = {
  invalid_params: RpcErrorCode.InvalidParams,
  not_ready: RpcErrorCode.NotReady,
  data_changed: RpcErrorCode.ContentModified,
  cancelled: RpcErrorCode.RequestCancelled,
  data_invalid: RpcErrorCode.InvalidData,
  factors_broken: RpcErrorCode.BrokenFactors,
};

/**
 * Maps whatever a handler threw to a JSON-RPC error:
 * - `RpcError` as it is;
 * - an error with a string `code` the service uses (`invalid_params`, `not_ready`,
 *   `data_changed`, `cancelled`, `data_invalid` (DataError), `factors_broken`) to the matching
 *   code, keeping its message (meant for people);
 * - anything else to InternalError "<method> failed: <message>" (the stack is for the log only).
 */
export function toRpcError(e: unknown, method: string): RpcError {
  if (e instanceof RpcError) return e;
  if (e instanceof ResponseError) return RpcError.fromResponseError(e);
  const err = e as { code?: unknown; message?: unknown } | null | undefined;
  const message = typeof err?.message === 'string' && err.message ? err.message : String(e);
  if (typeof err?.code === 'string' && err.code in SERVICE_CODES) return new RpcError(SERVICE_CODES[err.code], message);
  return new RpcError(RpcErrorCode.InternalError, `${method} failed: ${message}`);
}
