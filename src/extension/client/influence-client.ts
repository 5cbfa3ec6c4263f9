// What the extension needs from the influence server. The commands and views are written
// against this interface only; `ServerClient` implements it over WebSocket JSON-RPC
// (`src/protocol/rpc.ts`). No `vscode` import: a VS Code CancellationToken satisfies
// `Cancellation` structurally.
import type { ExampleId, ExplainParams, ExplainPartial, ExplainResult, Method } from '../../protocol/types';

export interface Cancellation {
  readonly isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

/** LSP-style work-done progress, as the server reports it. */
export interface Progress {
  message?: string;
  /** 0..100 */
  percentage?: number;
}

/** A model whose EK-FAC factors can be fitted: the one being explained, or its base model. */
export type Stage = 'finetuned' | 'pretrained';

export interface ClientInfo {
  /** shown in the status bar, e.g. "assets/default/finetuned" */
  model: string;
  /** 'cpu' | 'webgpu' | 'cuda' */
  device: string;
  /** dataset ids the server accepts */
  datasets: string[];
  /** where each dataset lives on disk, when the server says (the editor opens examples there) */
  datasetPaths?: Record<string, string>;
  /** methods that can run now */
  methods: Method[];
  /** methods that cannot run now, with the reason a person can act on */
  unavailable: Partial<Record<Method, string | null>>;
  /** methods that can run once these stages' factors are fitted (`fit`) */
  needsFit: Partial<Record<Method, Stage[]>>;
  /** what the server noticed about the models (e.g. modules it skips) */
  warnings: string[];
}

export interface FitResult {
  stage: Stage;
  /** what the server can do now */
  info: ClientInfo;
}

/** `generate`: the model's own continuation of a prompt. */
export interface GenerateParams {
  prompt: string;
  maxTokens?: number;
  temperature?: number;
  seed?: number;
}
export interface GenerateResult {
  prompt: string;
  completion: string;
}

/** `scanDataset`: training examples ranked by self-influence (unusual or memorized first). */
export interface ScanParams {
  dataset: string;
  topK?: number;
}
export interface ScannedExample {
  id: ExampleId;
  rank: number;
  kind: string;
  text: string;
  selfInfluence: number;
}
export interface ScanResult {
  dataset: string;
  scored: number;
  examples: ScannedExample[];
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
    onProgress?: (p: Progress) => void,
  ): Promise<ExplainResult>;
  generate(params: GenerateParams, token: Cancellation): Promise<GenerateResult>;
  scanDataset(params: ScanParams, token: Cancellation, onProgress?: (p: Progress) => void): Promise<ScanResult>;
  /** fits a stage's EK-FAC factors on its dataset (minutes for a real model) */
  fit(stage: Stage, token: Cancellation, onProgress?: (p: Progress) => void): Promise<FitResult>;
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
