// What the extension needs from the influence server. The commands and views are written
// against this interface only; `ServerClient` implements it over WebSocket JSON-RPC
// (requests declared in `src/protocol/requests.ts`). No `vscode` import: a VS Code CancellationToken satisfies
// `Cancellation` structurally.
import type {
  ExplainParams,
  ExplainPartial,
  ExplainResult,
  GenerateParams,
  GenerateResult,
  Method,
  ScanParams,
  ScanResult,
  StageName,
} from '../../protocol/types';

// the wire types the commands use, re-exported so they import from one place
export type {
  GenerateParams,
  GenerateResult,
  ScannedExample,
  ScanParams,
  ScanResult,
  StageName,
} from '../../protocol/types';

export interface Cancellation {
  readonly isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

/** Work-done progress as the editor shows it (from the server's LSP-style `WorkDoneProgress`). */
export interface ProgressUpdate {
  message?: string;
  /** 0..100 */
  percentage?: number;
}

export interface ClientInfo {
  /** shown in the status bar, e.g. "assets/default/finetuned" */
  model: string;
  /** 'cpu' | 'webgpu' | 'cuda' */
  device: string;
  /** dataset ids the server accepts */
  datasets: string[];
  /** the server's model, tokenizer and factor files as of its last request (ServiceInfo.revision) */
  revision?: string;
  /** where each dataset lives on disk, when the server says (the editor opens examples there) */
  datasetPaths?: Record<string, string>;
  /** methods that can run now */
  methods: Method[];
  /** methods that cannot run now, with the reason a person can act on */
  unavailable: Partial<Record<Method, string | null>>;
  /** methods that can run once these stages' factors are fitted (`fit`) */
  needsFit: Partial<Record<Method, StageName[]>>;
  /** what the server noticed about the models (e.g. modules it skips) */
  warnings: string[];
}

/** What `fit` leaves the editor with: the stage fitted and the server's new view. */
export interface Fitted {
  stage: StageName;
  /** what the server can do now */
  info: ClientInfo;
}

export interface InfluenceClient {
  /** a short name for the status bar ("local server", "ws://127.0.0.1:7070") */
  readonly label: string;
  /** connects if needed and says what the server can do */
  info(token?: Cancellation): Promise<ClientInfo>;
  explain(
    params: ExplainParams,
    onPartial: (p: ExplainPartial) => void,
    token: Cancellation,
    onProgress?: (p: ProgressUpdate) => void,
  ): Promise<ExplainResult>;
  generate(params: GenerateParams, token: Cancellation): Promise<GenerateResult>;
  scanDataset(params: ScanParams, token: Cancellation, onProgress?: (p: ProgressUpdate) => void): Promise<ScanResult>;
  /** fits a stage's EK-FAC factors on its dataset (minutes for a real model) */
  fit(stage: StageName, token: Cancellation, onProgress?: (p: ProgressUpdate) => void): Promise<Fitted>;
  dispose(): void;
}

/** An error whose message a person can act on; `retry` says whether trying again may help. */
export class ClientError extends Error {
  constructor(
    message: string,
    readonly retry = false,
  ) {
    super(message);
  }
}

export class CancelledError extends Error {
  constructor() {
    super('cancelled');
  }
}
