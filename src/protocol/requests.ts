// Every request and notification of the protocol, declared once, as rust-analyzer's
// `lsp_ext.ts` declares its LSP extensions: a `RequestType<Params, Result, Error>` per method.
// The server's method table (src/server/service/handlers.ts) and the clients
// (src/transport/client.ts, src/extension/client/server-client.ts) are typed from these, so a
// params or result type changes in one place. The params' JSON schemas are in ./params-schema,
// keyed by the same method names.
import { NotificationType, RequestType, RequestType0 } from 'vscode-jsonrpc';
import type {
  InitializeParams,
  InitializeResult,
  PartialResultParams,
  ProgressParams,
  StatusResult,
  WorkDoneProgressParams,
} from './rpc';
import type {
  ExampleDetail,
  ExplainManyParams,
  ExplainManyResult,
  ExplainParams,
  ExplainResult,
  FitParams,
  FitResult,
  GenerateParams,
  GenerateResult,
  GetExampleParams,
  IndexParams,
  IndexResult,
  ReloadParams,
  ReloadResult,
  ScanParams,
  ScanResult,
} from './types';

/** The first request on every connection. */
export const Initialize = new RequestType<InitializeParams, InitializeResult, void>('initialize');
/** Server health and load, and the service's current view. */
export const Status = new RequestType0<StatusResult, void>('status');

/** Scores the training examples behind a completion; streams `ExplainPartial`s as partial results. */
export const Explain = new RequestType<
  ExplainParams & WorkDoneProgressParams & PartialResultParams,
  ExplainResult,
  void
>('explain');
/** Several queries scored in one pass over the dataset: each query's gradient is preconditioned once. */
export const ExplainMany = new RequestType<ExplainManyParams & WorkDoneProgressParams, ExplainManyResult, void>(
  'explainMany',
);
export const Generate = new RequestType<GenerateParams & WorkDoneProgressParams, GenerateResult, void>('generate');
export const GetExample = new RequestType<GetExampleParams, ExampleDetail, void>('getExample');
export const ScanDataset = new RequestType<ScanParams & WorkDoneProgressParams, ScanResult, void>('scanDataset');
export const Fit = new RequestType<FitParams & WorkDoneProgressParams, FitResult, void>('fit');
export const Index = new RequestType<IndexParams & WorkDoneProgressParams, IndexResult, void>('index');
export const Reload = new RequestType<ReloadParams, ReloadResult, void>('reload');

/** The requests the influence service answers (besides `initialize` and `status`, which the transport answers). */
export const SERVICE_REQUESTS = [Explain, ExplainMany, Generate, GetExample, ScanDataset, Fit, Index, Reload] as const;

/** client → server: abort the request with this id (LSP). */
export const CancelRequestNotification = new NotificationType<{ id: number | string }>('$/cancelRequest');
/** server → client: work-done progress or a partial result for a token the request carried (LSP). */
export const ProgressNotification = new NotificationType<ProgressParams>('$/progress');
