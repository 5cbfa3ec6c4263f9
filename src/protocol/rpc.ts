// The JSON-RPC envelope shared by the server and its clients (extension, CLI, tests): the
// `initialize` handshake, `status`, LSP-style progress and partial results, and error codes.
// The influence methods' own params/results live in `./types`. Plain data only (no classes,
// no Node or VS Code imports), so every side can import it.
//
// Transport: JSON-RPC 2.0 over a WebSocket, one JSON message per text frame (no
// Content-Length headers, no batches). The upgrade request must carry
// `Authorization: Bearer <token>` and no `Origin` header.
import type { Method } from './types';

export { PROTOCOL_VERSION } from './types';

// The requests and notifications themselves (`initialize`, `status`, `$/progress`,
// `$/cancelRequest`, and the service's) are declared once in ./requests.

export interface InitializeParams {
  /** the client's `PROTOCOL_VERSION`; must equal the server's */
  protocolVersion: number;
  client?: { name: string; version?: string };
}

/** One model in a (possibly two-stage) setup. */
export interface StageInfo {
  /** 'finetuned' (the model whose completions are explained) or 'pretrained' */
  name: string;
  /** the checkpoint directory */
  model: string;
  /** whether EK-FAC factors are loaded for it */
  factors: boolean;
  /**
   * Set when its factors folder holds factors that cannot be used and that "fit" does not replace
   * (another model's or data's, in a folder the person named): why, and what to do. Fitting does
   * not help then, so the editor says this instead of offering to fit.
   */
  factorsUnusable?: string;
}

/** What the influence service reports about itself (models, data, which methods can run). */
export interface ServiceInfo {
  /** the checkpoint directory of the model whose completions are explained */
  model: string;
  stages: StageInfo[];
  /** dataset ids from the server's configuration (the only values `dataset` params accept) */
  datasets: string[];
  /** where each dataset's JSONL file is on the server's disk (the editor opens examples there) */
  datasetPaths: Record<string, string>;
  /** where the tensor work runs: 'cpu' | 'webgpu' | 'cuda' */
  device: string;
  /** methods that can run now */
  methods: Method[];
  /** methods that cannot run now, each with the reason a person can act on */
  unavailable: Partial<Record<Method, string | null>>;
  /** tracked module names in model order */
  modules: string[];
  warnings: string[];
  /** identifies the model, tokenizer and factor files the server has open: it changes when any of
   * them is replaced or rewritten on disk, which the server notices at its next request and opens
   * them again */
  revision: string;
}

export interface Capabilities {
  /** RPC methods this server answers (besides `initialize`) */
  methods: string[];
  /** `$/progress` with the request's `workDoneToken` */
  workDoneProgress: true;
  /** `$/progress` with the request's `partialResultToken` */
  partialResults: true;
  /** `$/cancelRequest` aborts the work */
  cancellation: true;
  limits: ServerLimits;
}

export interface ServerLimits {
  /** the largest frame (bytes) the server reads; bigger frames close the connection with 1009 */
  maxFrameBytes: number;
  /** heavy requests (explain, fit, index, scan, generate) running at once, over all connections */
  maxConcurrent: number;
  /** heavy requests waiting for a slot; beyond that a request fails with `ServerBusy` */
  maxQueued: number;
}

export interface InitializeResult extends ServiceInfo {
  protocolVersion: number;
  server: { name: string; version: string; pid: number };
  capabilities: Capabilities;
}

export interface StatusResult {
  protocolVersion: number;
  pid: number;
  uptimeMs: number;
  connections: number;
  heavy: { running: number; queued: number } & ServerLimits;
  /** requests in flight over all connections */
  requests: Array<{ method: string; state: 'queued' | 'running'; elapsedMs: number }>;
  /** the service's current view (methods become available after `fit`); absent before it loaded */
  service?: ServiceInfo;
}

// ---- progress (LSP `$/progress`) ----

export type ProgressToken = number | string;

/** Mixed into a request's params to ask for progress / partial results. */
export interface WorkDoneProgressParams {
  workDoneToken?: ProgressToken;
}
export interface PartialResultParams {
  partialResultToken?: ProgressToken;
}

export interface WorkDoneProgressBegin {
  kind: 'begin';
  title: string;
  cancellable?: boolean;
  message?: string;
  /** 0..100 */
  percentage?: number;
}
export interface WorkDoneProgressReport {
  kind: 'report';
  message?: string;
  percentage?: number;
  /** raw counts behind `percentage` (an extension of LSP's payload) */
  done?: number;
  total?: number;
}
export interface WorkDoneProgressEnd {
  kind: 'end';
  message?: string;
}
export type WorkDoneProgress = WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd;

/** `$/progress` params: for a `workDoneToken` the value is `WorkDoneProgress`; for a
 * `partialResultToken` it is the method's partial result (e.g. `ExplainPartial`). */
export interface ProgressParams<T = unknown> {
  token: ProgressToken;
  value: T;
}

// ---- errors ----

/** JSON-RPC error codes. Standard and LSP codes keep their usual meaning. */
export const RpcErrorCode = {
  ParseError: -32700,
  InvalidRequest: -32600,
  MethodNotFound: -32601,
  InvalidParams: -32602,
  InternalError: -32603,
  /** a request other than `initialize`/`status` before `initialize` (LSP) */
  ServerNotInitialized: -32002,
  /** the client cancelled the request (LSP) */
  RequestCancelled: -32800,
  /** a dataset changed on disk while the request ran (LSP's ContentModified) */
  ContentModified: -32801,
  /** too many heavy requests running and queued; try again later */
  ServerBusy: -32010,
  /** `initialize` with a protocol version this server does not speak; `data: {server, client}` */
  ProtocolVersionMismatch: -32011,
  /** the method cannot run yet (e.g. ekfac before `fit`); the message says what to do */
  NotReady: -32012,
  /** a training-data file cannot be used (missing, empty, every line malformed); the message names it and the fix */
  InvalidData: -32013,
  /** EK-FAC factors on disk are unreadable or corrupt; the message names the folder and the fix */
  BrokenFactors: -32014,
} as const;
export type RpcErrorCode = (typeof RpcErrorCode)[keyof typeof RpcErrorCode];

/** WebSocket close codes the server uses. */
export const CloseCode = {
  Normal: 1000,
  GoingAway: 1001,
  /** the client left more than the server's buffer limit unread (it stopped reading) */
  PolicyViolation: 1008,
  /** a frame larger than `maxFrameBytes` */
  MessageTooBig: 1009,
} as const;
