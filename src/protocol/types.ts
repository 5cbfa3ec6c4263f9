// The contract shared by the server, the extension, the webview and `influence-lens explain
// --json`: JSON-RPC method names, params, results and notifications. Plain data only (no
// classes, no Node or VS Code imports), so every side can import it.

/** Bumped whenever a message below changes incompatibly; checked in `initialize`. */
export const PROTOCOL_VERSION = 1;

export type Method = 'ekfac' | 'multistage' | 'gdp' | 'cosine' | 'repsim' | 'bm25';
export const METHODS: readonly Method[] = ['ekfac', 'multistage', 'gdp', 'cosine', 'repsim', 'bm25'];

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
  /** dataset id (server) — never a path */
  dataset: string;
  method: Method;
  topK: number;
  /** score every example, or only those retrieved by BM25 + RepSim first */
  candidates?: 'all' | 'retrieved';
  /** also compute these methods' ranks for agreement (default: none) */
  compare?: Method[];
}

/** `explain` with several queries: all are scored in one pass over the dataset; the response is an ExplainManyResult. */
export type ExplainManyParams = Omit<ExplainParams, 'prompt' | 'completion'> & {
  queries: Array<{ prompt: string; completion: string }>;
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
    /** completion tokens: offsets into `completion`, and each token's −log p */
    completionTokens: TokenScores;
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
  timings: Record<string, number>;
}

/** Streamed while `explain` runs: the best examples among those scored so far (no heatmaps yet). */
export interface ExplainPartial {
  method: Method;
  scored: number;
  total: number;
  supporting: Array<Pick<ExplainedExample, 'id' | 'score' | 'sign' | 'text'>>;
  opposing: Array<Pick<ExplainedExample, 'id' | 'score' | 'sign' | 'text'>>;
}
