// The contract shared by the server, the extension, the webview and `influence-lens explain
// --json`: the params and results of every request (declared once, as `RequestType`s, in
// ./requests). Plain data only (no classes, no Node or VS Code imports), so every side,
// the webview included, can import it.
import type { ServiceInfo } from './rpc';

/** Bumped whenever a message below changes incompatibly; checked in `initialize`. */
export const PROTOCOL_VERSION = 1;

import type { Method } from './methods';

// the methods are declared in ./methods (one registry); re-exported for the types below' users
export { METHODS, type Method } from './methods';

/** Words for a score's sign; score > 0 means up-weighting the example raises p(completion). */
export type Sign = 'supporting' | 'opposing' | 'neutral';

/** A training example's identity: lines move, hashes don't. */
export interface ExampleId {
  /** dataset id from the server's configuration (or the file path for the CLI) */
  dataset: string;
  /** 1-based line number in the JSONL file */
  line: number;
  /** 16 hex digits of sha256 over the record's canonical JSON */
  hash: string;
}

/** Token-level values over a text: `offsets[i]` = [start, end) in UTF-16 code units. */
export interface TokenScores {
  offsets: Array<[number, number]>;
  values: number[];
}

export interface ExplainedExample {
  id: ExampleId;
  /** 1-based rank within this result (by score, descending) */
  rank: number;
  /** the record rendered as the model sees it */
  text: string;
  /** 'text' | 'prompt_completion' | 'messages' */
  kind: string;
  score: number;
  sign: Sign;
  /** share of the scored pool with a lower score, 0..100 */
  percentile: number;
  /** per tracked module (layer-wise influence); absent for repsim / bm25 */
  perModule?: Record<string, number>;
  /** training-side heatmap: token t's contribution; values sum to `score` */
  tokenScores?: TokenScores;
  /** completion-side heatmap: the score with the query restricted to each completion token */
  completionTokenScores?: number[];
  /** the example's rank under the other methods that were run (agreement badges) */
  otherRanks?: Partial<Record<Method, number>>;
}

export interface ExplainParams {
  prompt: string;
  completion: string;
  /** a chat record whose last assistant turn is the completion: the server renders it as it
   * renders training data (the model's chat template; the stand-in without one) and ignores
   * `prompt`/`completion` for scoring */
  messages?: Array<{ role: string; content: string }>;
  /** dataset id (server) — never a path */
  dataset: string;
  method: Method;
  topK: number;
  /** score every example, or only those retrieved by BM25 + RepSim first */
  candidates?: 'all' | 'retrieved';
  /** also compute these methods' ranks for agreement (default: none) */
  compare?: Method[];
}

/** `explainMany`: several queries, all scored in one pass over the dataset (one ExplainResult each). */
export type ExplainManyParams = Omit<ExplainParams, 'prompt' | 'completion' | 'messages'> & {
  queries: Array<Pick<ExplainParams, 'prompt' | 'completion' | 'messages'>>;
};

/** One ExplainResult per query, in the order of `queries`. */
export interface ExplainManyResult {
  results: ExplainResult[];
}

export interface ExplainResult {
  query: {
    prompt: string;
    completion: string;
    /** −log p(completion | prompt) under the (fine-tuned) model */
    loss: number;
    /** completion tokens: offsets into `completion`, and each token's −log p. For a `messages`
     * query `completion` is the last assistant message's content (as in the JSONL line) and tokens
     * of template text (an end-of-turn token) get an empty range at its end */
    completionTokens: TokenScores;
    /** how the query was rendered: 'stand-in' means the model has no chat template and the chat
     * was rendered as `<|role|>\n` + content, which no real chat model was trained on */
    rendering?: 'plain' | 'chat_template' | 'stand-in';
    /** `explain --queries`: the file and line the query came from (`queries.jsonl:4`) */
    where?: string;
  };
  method: Method;
  model: string;
  /** how many examples were scored */
  scored: number;
  /** examples sorted by score, descending: supporting first, opposing last */
  supporting: ExplainedExample[];
  /** the most opposing examples, most negative first */
  opposing: ExplainedExample[];
  /** histogram of all scores in the pool, for the results panel */
  histogram: { edges: number[]; counts: number[] };
  /** module names in model order, for the per-layer chart */
  modules: string[];
  /** per module, the sum of the returned supporting examples' per-module scores (per-layer chart) */
  moduleTotals?: Record<string, number>;
  /** per signed method in `compare`, how many examples it scores below 0 (opposing): its bottom ranks are those */
  otherOpposing?: Partial<Record<Method, number>>;
  /** multistage only: whether the fine-tune is close enough to the pre-trained model for it */
  multiStage?: MultiStageRegime;
  timings: Record<string, number>;
  /** the server's `ServiceInfo.revision` when it computed this result (absent from the CLI) */
  revision?: string;
  /** what its reader must know about how it was computed (factors fitted on other data than
   * their fit dataset); the CLI says these on stderr instead */
  warnings?: string[];
  /** which computation produced the scores: the final model alone, or a weighted sum over training checkpoints */
  attribution?: Attribution;
}

/**
 * How a result's scores were computed. `over: 'checkpoints'`: score = Σ_c weight_c · score_c(θ_c),
 * each term the method's score on training checkpoint c with its own factors (TracIn, Pruthi et
 * al. 2020); `weighting` says whether the weights are the checkpoints' learning rates (normalized
 * to sum to 1) or equal because the learning rates were unknown (`note` says which).
 */
export interface Attribution {
  method: Method;
  over: 'final-model' | 'checkpoints';
  /** each term: its folder, step, weight and the learning rate the weight comes from (when known) */
  checkpoints?: Array<{ name: string; step: number; weight: number; learningRate?: number }>;
  weighting?: 'learning-rate' | 'uniform';
  note?: string;
  /**
   * The pool was ranked approximately first (from the gradient store, or with a rank-r query) and
   * only `exact` examples were rescored exactly: the shown examples are among them and carry exact
   * scores; the other examples' ranks, percentiles and the histogram come from the estimates.
   */
  preranked?: { by: 'gradient-store' | 'low-rank'; exact: number };
  /**
   * (candidates "retrieved") only the examples BM25 and RepSim retrieved were scored: `scored` of
   * the dataset's `of`; ranks, percentiles and both lists are within them
   */
  retrieved?: { scored: number; of: number };
  /** lines of the dataset that were not scored because they are malformed (bad JSON, an unaccepted
   * record): how many, and the first few with the reason */
  skipped?: { count: number; lines: Array<{ line: number; message: string }> };
}

/**
 * Multi-stage influence assumes the fine-tuned weights stay close to the pre-trained ones. Each
 * tracked linear module's relative distance ‖W_ft − W_pt‖_F / ‖W_pt‖_F says how far they moved.
 */
export interface MultiStageRegime {
  distance: { median: number; max: number; perModule: Record<string, number> };
  /** the largest distance (max over modules) for which multistage is trusted */
  threshold: number;
  inRegime: boolean;
  /** when not in the regime: what that means, in one sentence */
  warning?: string;
}

/** Streamed while `explain` runs: the best examples among those scored so far (no heatmaps yet). */
export interface ExplainPartial {
  method: Method;
  scored: number;
  total: number;
  supporting: Array<Pick<ExplainedExample, 'id' | 'score' | 'sign' | 'text'>>;
  opposing: Array<Pick<ExplainedExample, 'id' | 'score' | 'sign' | 'text'>>;
}

/** `generate`: the model's own continuation of a prompt (greedy at temperature 0). */
export interface GenerateParams {
  prompt: string;
  maxTokens?: number;
  temperature?: number;
  seed?: number;
}
export interface GenerateResult {
  prompt: string;
  completion: string;
  /** each generated token's log-probability */
  logprobs: number[];
  /** what in the request changed nothing (a seed at temperature 0), so it is not silently ignored */
  notes?: string[];
}

/** `getExample`: one training example, found by line (or by hash when the file was edited). */
export interface GetExampleParams {
  dataset: string;
  line: number;
  hash?: string;
}
export interface ExampleDetail {
  id: ExampleId;
  /** 'text' | 'prompt_completion' | 'messages' */
  kind: string;
  /** the record rendered as the model sees it */
  text: string;
  /** the JSONL record as written */
  record: unknown;
  /** the rendered text's tokens: offsets into `text` and token ids */
  tokens: { offsets: Array<[number, number]>; ids: number[] };
}

/** `scanDataset`: training examples ranked by self-influence (unusual or memorized first). */
export interface ScanParams {
  dataset: string;
  topK?: number;
}
export interface ScannedExample extends ExampleDetail {
  rank: number;
  selfInfluence: number;
}
export interface ScanResult {
  dataset: string;
  scored: number;
  examples: ScannedExample[];
}

/** The two models of a (possibly two-stage) setup: the one explained, and its base model. */
export type StageName = 'finetuned' | 'pretrained';

/** `fit`: fits a stage's EK-FAC factors on its dataset. */
export interface FitParams {
  /** default 'finetuned' */
  stage?: StageName;
}
export interface FitResult {
  /** 'done': factors written now; 'up-to-date': they already were; 'waiting': other partitions must run */
  status: 'done' | 'up-to-date' | 'waiting';
  message: string;
  examples: number;
  tokens: number;
  seconds: number;
  /** what the server can do now (ekfac appears once its factors are fitted) */
  info: ServiceInfo;
}

/** `index`: builds (or loads) a dataset's gradient store. */
export interface IndexParams {
  dataset: string;
}
export interface IndexResult {
  dataset: string;
  examples: number;
  bytes: number;
}

/** `reload`: forgets a dataset's cached copy and reads its file again. */
export interface ReloadParams {
  dataset: string;
}
export interface ReloadResult {
  dataset: string;
  examples: number;
  /** malformed lines skipped */
  skipped: number;
}
