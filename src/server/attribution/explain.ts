// "Explain this completion": rank training examples by their influence on a completion's
// log-likelihood (docs/ARCHITECTURE.md, "The maths contract"), with the same output for every method so that methods
// can be compared side by side:
//   ekfac       Σ_l ⟨P_l(G_l(q)), G_l(z)⟩ with the fine-tuned model's EK-FAC factors
//   multistage  Σ_l ⟨P_l^ft(G_l(q; θ_ft)), P_l^pt(G_l(z; θ_pt))⟩ (pre-trained candidates; docs/ARCHITECTURE.md)
//   gdp         ⟨G(q), G(z)⟩ (identity Hessian)
//   cosine      ⟨G(q), G(z)⟩ / (‖G(q)‖ ‖G(z)‖)
//   repsim      cosine of mean-pooled last hidden states
//   bm25        BM25 (scored as lunr scores it) of the prompt + completion against the example's text
// Each method's scorer lives in methods/ (one file each). The gradient methods share one path
// here: a query matrix per module (influence.ts) scored against every candidate inside the graph.
// Extra query rows (one per completion token) give the completion-side heatmap: as many as fit
// (rowsPerPass) ride along with the pool's pass, and the rest are scored in passes against the
// shown examples only; the first such pass also gives their training-side token scores.
import { toField } from '../../common/records/render';
import { GRADIENT_METHODS, METHOD_LABELS, methodInfo } from '../../protocol/methods';
import type {
  Attribution,
  ExplainedExample,
  ExplainPartial,
  ExplainResult,
  Method,
  Sign,
  TokenScores,
} from '../../protocol/types';
import type { Dataset } from '../data/dataset';
import { QueryError } from '../data/errors';
import { renderForModel } from '../data/format';
import {
  contextLength,
  describeUntrained,
  type TokenizedText,
  tokenizeExamples,
  tokenizeQuery,
  tokenizeRecord,
  unknownWordsWarning,
} from '../data/tokenize';
import { Bm25Index } from '../index/bm25';
import type { GradientStore } from '../index/gradient-store';
import type { Floats } from '../linalg/matrix';
import type { Model } from '../model/engine';
import { nonFiniteMessage } from '../model/weight-health';
import { collectWhenBuffersGrew } from '../util/gc';
import { matrixBytes, runBudgetBytes, sequenceLimitBytes } from './chunking';
import type { Preconditioner } from './ekfac/precondition';
import {
  type CandidateScores,
  candidateHidden,
  eigenTokenRows,
  type QueryGradients,
  type QueryRows,
  queryGradients,
  scoreCandidates,
  scoreQuery,
  tokenCount,
  tokenRowsPerPass,
} from './influence';
import { type GradientScorer, SCORERS } from './methods';
import { repsimScores } from './methods/repsim';
import { multiStageRegime, relativeWeightDistance } from './multistage-regime';
import { type CheckpointStages, ExplainError, type ExplainSetup } from './setup';

export { ExplainError, type ExplainSetup, type Stage } from './setup';

/**
 * A dataset with what methods derive from it, each made on first use and kept: the tokens of every
 * example (gradient methods, the store), the rendered texts (BM25), the BM25 index, hidden states.
 * Nothing is tokenized before it is needed: the server's light lane answers BM25 and getExample
 * from the texts and single examples, so only the lane that scores gradients tokenizes the whole
 * dataset (at 100k examples tokenizing costs tens of seconds, parsing about one).
 */
export class Corpus {
  private all?: { tokens: TokenizedText[]; truncated: number };
  private texts?: string[];
  private bm25?: Bm25Index;
  private hidden = new Map<Model, Promise<Float32Array[]>>();
  private readonly maxLength: number;

  constructor(
    readonly id: string,
    readonly dataset: Dataset,
    private readonly model: Model,
  ) {
    this.maxLength = contextLength(model.config);
  }

  get size(): number {
    return this.dataset.examples.length;
  }

  /** Every example tokenized for the model (done on first access). */
  get tokens(): TokenizedText[] {
    this.all ??= tokenizeExamples(this.model.tokenizer, this.dataset.examples, this.maxLength, this.dataset.path);
    return this.all.tokens;
  }

  /** How many examples were cut to the model's context (tokenizes the dataset). */
  get truncated(): number {
    void this.tokens;
    return this.all!.truncated;
  }

  /**
   * What a result over this corpus says about its examples (`tokenize`: tokenize the dataset if not yet done): how many were
   * cut to the model's context, and which have no trained token, whose gradient is zero (an audit
   * saw "6 training examples scored" where 3 scored 0 and were never mentioned; fit says so).
   */
  notes(tokenize = false): string[] {
    // the server's large datasets go through a gradient store and are not tokenized for a note
    if (!this.all && !tokenize) return [];
    const tokens = this.tokens;
    const out: string[] = [];
    if (this.truncated) out.push(`${this.truncated} example(s) were cut to the model's context`);
    const lines = this.dataset.examples.filter((_, i) => !tokens[i].weights.some((w) => w > 0)).map((e) => e.line);
    if (lines.length)
      out.push(
        `${lines.length} example(s) have no trained token (${describeUntrained(tokens, this.maxLength)}): their gradient is zero, so gradient methods score them 0, neither supporting nor opposing (${lines.length > 1 ? 'lines' : 'line'} ${lines.slice(0, 5).join(', ')}${lines.length > 5 ? ', …' : ''} of ${this.dataset.path})`,
      );
    return out;
  }

  /** Example i tokenized: from the whole dataset's tokens when they exist, else on its own (the same result). */
  token(i: number): TokenizedText {
    if (this.all) return this.all.tokens[i];
    const ex = this.dataset.examples[i];
    return tokenizeRecord(this.model.tokenizer, ex.record, `${this.dataset.path}:${ex.line}`, this.maxLength);
  }

  /**
   * The text example i is rendered to for the model, without tokenizing it: always the rendering,
   * never the tokens' text, which a training convention extends (an appended EOS) and the context
   * cuts, so that BM25 scores the same whether or not the dataset was tokenized first.
   */
  text(i: number): string {
    this.texts ??= this.dataset.examples.map(
      (ex) => renderForModel(ex.record, `${this.dataset.path}:${ex.line}`, this.model.tokenizer.chatTemplate()).text,
    );
    return this.texts[i];
  }

  bm25Index(): Bm25Index {
    this.bm25 ??= new Bm25Index(this.size, (i) => this.text(i));
    return this.bm25;
  }

  hiddenStates(model: Model, signal?: AbortSignal): Promise<Float32Array[]> {
    let h = this.hidden.get(model);
    if (!h) {
      h = candidateHidden(model, this.tokens, { signal });
      this.hidden.set(model, h);
      h.catch(() => this.hidden.delete(model));
    }
    return h;
  }
}

export interface ExplainRequest {
  prompt: string;
  completion: string;
  /** a chat record: its last assistant turn is explained, rendered like the training data */
  messages?: unknown;
  method: Method;
  topK: number;
  /** score every example, or only the union of BM25's and RepSim's top `retrieve` */
  candidates?: 'all' | 'retrieved';
  retrieve?: number;
  /** other methods whose ranks are reported per returned example */
  compare?: Method[];
  batchSize?: number;
  /** score the pool with a rank-r query (Grosse et al. §3.2), then recompute the top and bottom exactly */
  rank?: number;
  /**
   * score the pool from gradient stores, then rerank the top and bottom `rerank` exactly: the
   * store built on the model a score is taken at (the final model's, or one per checkpoint
   * when the method sums over checkpoints; the terms' estimates are summed before the rerank)
   */
  store?: StoreRef | StoreRef[];
  rerank?: number;
  signal?: AbortSignal;
  /** names the query in its refusals (a --queries file's `path:line`); explainMany's own are `query i of n` */
  where?: string;
  onProgress?: (stage: string, done: number, total: number) => void;
  /** the best examples among those scored so far, at most every `partialEveryMs` (default 250) */
  onPartial?: (p: ExplainPartial) => void;
  partialEveryMs?: number;
}

/** A gradient store and the model whose gradients it holds. */
export interface StoreRef {
  model: Model;
  store: GradientStore;
}

/** The store of `req` that holds `model`'s gradients, if any. */
function storeOf(req: Pick<ExplainRequest, 'store'>, model: Model): GradientStore | undefined {
  const refs = req.store ? (Array.isArray(req.store) ? req.store : [req.store]) : [];
  return refs.find((r) => r.model === model)?.store;
}

/**
 * What scorePool is asked for internally: a term of a sum scored approximately (gradient store,
 * low-rank query) leaves its exact rerank to the sum, which chooses it on the summed estimate.
 */
type PoolRequest = ExplainRequest & { deferRerank?: boolean };

/** One method's scores over the pool (indices into the corpus). */
interface PoolScores {
  scores: Float64Array;
  perModule?: Map<string, Float64Array>;
  /** the heatmaps of the pool items at `positions` (the shown ones), in that order */
  shown?: (positions: number[]) => Promise<ShownParts>;
  signed: boolean;
  /** when the pool was scored approximately (store, low rank): the positions recomputed exactly, the only ones shown */
  exact?: Set<number>;
  /**
   * (deferRerank) the estimate, not yet reranked, and the exact rescoring of the positions chosen
   * on the sum: a store's standard errors, or a low-rank query's bound |exact − estimate| ≤ radius
   */
  pending?: { sd?: Float64Array; radius?: Float64Array; rescore: (redo: number[] | undefined) => Promise<PoolScores> };
}

/** A shown example's heatmaps: both sum to its score. */
interface ShownParts {
  /** training-side token scores (position t = token t's contribution) */
  tokenScores: Float32Array[];
  /** completion-side: the query restricted to each completion token, in completion order */
  completion: Float64Array[];
}

type Query = ReturnType<typeof tokenizeQuery>;

/**
 * How many query rows one scoring pass may carry: the run budget (INFLUENCE_LENS_RUN_MB), in rows
 * of Σ_modules d_out × d_A floats (76 MB at the Pythia-70M shape, so 14 rows; 1.4 GB at
 * Qwen2.5-0.5B, so one). The completion heatmap needs a row per completion token; those that fit
 * ride along with the pool's pass, the rest are scored in passes of this many against the shown
 * examples only, so memory does not grow with the completion's length or the model's size. Half
 * the budget cost Pythia-70M an extra pass over the shown examples for a 16-token completion.
 */
function rowsPerPass(setup: ExplainSetup): number {
  return Math.max(1, Math.floor(runBudgetBytes() / rowBytes(setup)));
}

/** Bytes of one query row: Σ_modules d_out × d_A floats in the graph's precision. */
function rowBytes(setup: ExplainSetup): number {
  const model = setup.model.model;
  return matrixBytes(model.modules(setup.modules), model.precision === 'fp64');
}

/** Tests set `force` to score the heatmap passes in one form wherever the rule would choose (both must agree). */
/**
 * Query rows dropped between explain's passes worth a full collection: at real shapes one row is
 * tens of MB (Pythia-70M: 76 MB) and a pass holds up to the run budget; a tiny model's rows are
 * kilobytes, where a collection per query cost more than the query.
 */
const ROWS_GARBAGE_BYTES = 32 * 2 ** 20;

export const heatmapRowsPolicy: { force?: 'whole' | 'tokens' } = {};

/**
 * How the completion-heatmap passes of `method` carry their rows for a query of Tq tokens. Single-
 * stage EK-FAC in float32 can hand the graph each row as its rotated tokens (g Q_S, ã Q_A) for the
 * graph to score without forming it (`eigenTokenRows`): tens of MB a row for a short query where
 * a whole row is every module's d_out × d_A (1.4 GB at Qwen2.5-0.5B: one pass of up to 25 rows
 * of a 16-token query instead of a pass per row, each a minute over 16 shown examples). Used when
 * it lets more rows into a pass; a long query's tokens outweigh its whole rows.
 */
function heatmapRows(
  setup: ExplainSetup,
  method: Method,
  Tq: number,
): { tokens?: Map<string, Preconditioner>; perPass: number } {
  const whole = rowsPerPass(setup);
  const pre = gradientScorer(method).eigenTokens?.(setup);
  if (heatmapRowsPolicy.force === 'whole' || !pre || setup.model.model.precision === 'fp64') return { perPass: whole };
  const perPass = tokenRowsPerPass(
    pre,
    setup.model.model.modules(setup.modules).map((m) => m.name),
    Tq,
  );
  return perPass > whole || heatmapRowsPolicy.force === 'tokens' ? { tokens: pre, perPass } : { perPass: whole };
}

/** Tests set `maxPoolRows` to split several queries' pool passes wherever memory would allow one. */
export const poolRowsPolicy: { maxPoolRows?: number } = {};

/**
 * Consecutive runs of queries (by index) whose rows add up to at most `maxRows` (a query with more
 * rows than that runs alone): the passes over the pool that `explain --queries` makes.
 */
export function splitByRows(rows: number[], maxRows: number): number[][] {
  const out: number[][] = [];
  let sum = 0;
  for (const [i, r] of rows.entries()) {
    if (!out.length || sum + r > maxRows) {
      out.push([]);
      sum = 0;
    }
    out[out.length - 1].push(i);
    sum += r;
  }
  return out;
}

/** prompt/completion as the result reports them: for a chat query, the completion is the last assistant content */
function queryTexts(req: ExplainRequest, q: Query): { prompt: string; completion: string } {
  if (!q.rendered) return { prompt: req.prompt, completion: req.completion };
  const field = q.rendered.last.field;
  const i = Number(/^messages\[(\d+)\]/.exec(field)?.[1]);
  const content = (req.messages as Array<{ content: string }>)[i].content;
  return { prompt: q.text.slice(0, q.promptLength), completion: content };
}

/** a query token's range in the reported completion (for chats: in the assistant content, template text → its end) */
function completionOffset(q: Query, [s, e]: [number, number]): [number, number] {
  if (!q.rendered) return [Math.max(0, s - q.promptLength), Math.max(0, e - q.promptLength)];
  const f = toField(q.rendered, s, e);
  if (f && f.field === q.rendered.last.field) return [f.start, f.end];
  const end = q.rendered.pieces.find((p) => p.field === q.rendered!.last.field);
  const at = end ? end.fieldStart + end.end - end.start : 0;
  return [at, at];
}

export async function explain(setup: ExplainSetup, corpus: Corpus, req: ExplainRequest): Promise<ExplainResult> {
  return (await explainMany(setup, corpus, [req]))[0];
}

/** One query, tokenized, with its pool and gradients. */
interface Prepared {
  req: ExplainRequest;
  q: ReturnType<typeof tokenizeQuery>;
  query: { ids: number[]; weights: number[] };
  targets: number[];
  pool: number[];
  qg: QueryGradients;
  timings: Record<string, number>;
  t0: number;
}

/**
 * Several queries against one corpus. When every query asks for the same gradient method over
 * the whole corpus (no low-rank query, no store), all queries' matrices go into one scoring pass:
 * each candidate's gradient is formed once and scored against every query's rows. Each result
 * equals what `explain` returns for that query alone.
 */
export async function explainMany(
  setup: ExplainSetup,
  corpus: Corpus,
  reqs: ExplainRequest[],
  /** each result as soon as it is final, in the requests' order (the CLI writes it at once, so a
   * batch of thousands stopped midway keeps what it finished) */
  onResult?: (result: ExplainResult, index: number) => void,
): Promise<ExplainResult[]> {
  // each query's row 0 and as many of its completion rows as fit in the pool's pass
  const poolRows = Math.max(1, Math.floor(rowsPerPass(setup) / Math.max(1, reqs.length)));
  const model = setup.model.model;
  // which of the queries is refused (too long for the model, too short, ...)
  const naming = <T>(i: number, f: () => T): T => {
    try {
      return f();
    } catch (e) {
      const where = reqs[i].where ?? (reqs.length > 1 ? `query ${i + 1} of ${reqs.length}` : undefined);
      if ((e instanceof QueryError || e instanceof ExplainError) && where) e.message = `${where}: ${e.message}`;
      throw e;
    }
  };
  // every query is checked and tokenized before any gradient is taken: a bad last query of a
  // batch was refused only after every other query's gradient (minutes at real model sizes)
  const tokenized = reqs.map((req, i) =>
    naming(i, () => {
      if (!(Number.isInteger(req.topK) && req.topK >= 1)) throw new ExplainError('top-k must be a positive integer');
      return tokenizeQuery(model.tokenizer, req.prompt, req.completion, contextLength(model.config), req.messages);
    }),
  );
  const prepared: Prepared[] = [];
  for (const [i, req] of reqs.entries()) prepared.push(await prepare(setup, corpus, req, tokenized[i], poolRows));
  const method = reqs[0]?.method;
  const batched =
    reqs.length > 1 &&
    GRADIENT_METHODS.includes(method) &&
    reqs.every((r) => r.method === method && r.candidates !== 'retrieved' && !r.rank && !r.store) &&
    !checkpointsFor(method, setup);
  const mains = batched ? await scorePoolBatched(method, setup, corpus, prepared) : undefined;
  // every multistage result says whether the pair is in the regime the method assumes
  const regime =
    setup.pretrained && reqs.some((r) => r.method === 'multistage')
      ? multiStageRegime(relativeWeightDistance(setup.model.model, setup.pretrained.model, setup.modules))
      : undefined;
  const out: ExplainResult[] = [];
  for (const [i, p] of prepared.entries()) {
    const r = await finish(setup, corpus, p, mains?.[i]);
    if (regime && r.method === 'multistage') r.multiStage = regime;
    out.push(r);
    onResult?.(r, i);
  }
  return out;
}

async function prepare(
  setup: ExplainSetup,
  corpus: Corpus,
  req: ExplainRequest,
  q: ReturnType<typeof tokenizeQuery>,
  poolRows: number,
): Promise<Prepared> {
  const timings: Record<string, number> = {};
  const t0 = Date.now();
  const model = setup.model.model;
  const query = { ids: q.ids, weights: q.weights };
  const targets = q.weights.flatMap((w, t) => (w > 0 ? [t] : []));

  // the pool of candidates
  let pool = Array.from({ length: corpus.size }, (_, i) => i);
  if (req.candidates === 'retrieved') {
    const r = Math.max(req.retrieve ?? 10 * req.topK, req.topK);
    const bm = corpus.bm25Index().scores(q.text);
    const rep = await repsimScores(model, corpus, query, req.signal);
    const keep = new Set([...topIndices(bm, r), ...topIndices(rep, r)]);
    pool = pool.filter((i) => keep.has(i));
    timings.retrieve_ms = Date.now() - t0;
  }

  const wantsGradients = [req.method, ...(req.compare ?? [])].some((m) => GRADIENT_METHODS.includes(m));
  let qg: QueryGradients;
  if (wantsGradients) {
    const t = Date.now();
    // When the completion's rows do not all fit the pool's pass and every gradient method's
    // heatmap passes take them as rotated tokens, the pool's pass carries row 0 alone: the heatmap
    // passes needed anyway take the rest, and the pool's pass holds one whole row instead of a
    // run budget's worth (1 GiB beside a 2,048-token run at Pythia-70M)
    const methods = [req.method, ...(req.compare ?? [])].filter((m) => GRADIENT_METHODS.includes(m));
    const toTokens =
      targets.length > poolRows - 1 && methods.every((m) => heatmapRows(setup, m, query.ids.length).tokens);
    const completionRows = toTokens ? [] : targets.slice(0, poolRows - 1);
    qg = await queryGradients(model, query, { modules: setup.modules, completionRows });
    timings.query_ms = Date.now() - t;
  } else {
    // the query's token losses are reported for every method
    qg = await queryGradients(model, query, { modules: setup.modules });
  }
  // a NaN loss ranked nothing (every score NaN, or 0 for RepSim) and looked like a result
  if (!Number.isFinite(qg.loss))
    throw new ExplainError(
      nonFiniteMessage(model.checkpoint, `the model's loss on this completion (−log p = ${qg.loss})`),
    );
  return { req, q, query, targets, pool, qg, timings, t0 };
}

async function finish(
  setup: ExplainSetup,
  corpus: Corpus,
  p: Prepared,
  precomputed?: PoolScores,
): Promise<ExplainResult> {
  const { req, q, query, targets, pool, qg, timings, t0 } = p;
  const model = setup.model.model;
  const run = async (method: Method): Promise<PoolScores> => {
    const t = Date.now();
    const r = await scorePool(method, setup, corpus, pool, q.text, query, qg, req);
    timings[`${method}_ms`] = Date.now() - t;
    return r;
  };
  const main = precomputed ?? (await run(req.method));
  const others = new Map<Method, Float64Array>();
  for (const m of new Set(req.compare ?? [])) if (m !== req.method) others.set(m, (await run(m)).scores);
  // a NaN score sorts anywhere: one example's forward (a damaged embedding row it alone reads) or
  // damaged factors would reorder the list without a word
  for (const [m, scores] of [[req.method, main.scores] as const, ...others]) {
    const i = scores.findIndex((x) => !Number.isFinite(x));
    if (i < 0) continue;
    const ex = corpus.dataset.examples[pool[i]];
    throw new ExplainError(
      nonFiniteMessage(
        model.checkpoint,
        `the ${METHOD_LABELS[m]} score of ${corpus.id}:${ex.line} (${scores[i]})`,
        methodInfo(m)?.needsFactors ? 'or its factors hold damaged values (fit them again)' : undefined,
      ),
    );
  }

  // rank
  const n = pool.length;
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => main.scores[b] - main.scores[a] || a - b);
  // the scores ascending: `order` read backwards (at 100k examples each sort costs tens of ms)
  const sorted = order.map((i) => main.scores[i]).reverse();
  const below = (s: number) => lowerBound(sorted, s);
  // 1 = highest score; ties share the better rank
  const rankOfScore = (s: number) => n - upperBound(sorted, s) + 1;
  const K = Math.min(req.topK, n);
  const showable = main.exact ? order.filter((i) => main.exact!.has(i)) : order;
  const supportingPos = main.signed ? showable.filter((i) => main.scores[i] > 0).slice(0, K) : showable.slice(0, K);
  const opposingPos = main.signed
    ? showable
        .filter((i) => main.scores[i] < 0)
        .reverse()
        .slice(0, K)
    : [];
  const shown = [...supportingPos, ...opposingPos];
  const t1 = Date.now();
  collectWhenBuffersGrew(ROWS_GARBAGE_BYTES); // the pool's query rows, before the heatmap passes make theirs
  const parts = main.shown ? await main.shown(shown) : undefined;
  if (main.shown) timings.token_scores_ms = Date.now() - t1;
  const otherRanks = new Map<Method, Int32Array>();
  for (const [m, s] of others) otherRanks.set(m, rankOf(s));

  const modules = setup.model.model.modules(setup.modules).map((m) => m.name);
  const describe = (pos: number, j: number): ExplainedExample => {
    const ex = corpus.dataset.examples[pool[pos]];
    const tok = corpus.token(pool[pos]);
    const score = main.scores[pos];
    const e: ExplainedExample = {
      id: { dataset: corpus.id, line: ex.line, hash: ex.hash },
      rank: rankOfScore(score),
      // the rendering that was tokenized (the chat template's), which tokenScores index into
      text: tok.text,
      kind: ex.kind,
      score,
      sign: main.signed ? signOf(score) : 'neutral',
      percentile: n > 1 ? (100 * below(score)) / (n - 1) : 100,
    };
    if (main.perModule) e.perModule = Object.fromEntries(modules.map((m) => [m, main.perModule!.get(m)![pos]]));
    if (parts) {
      e.tokenScores = trainingTokenScores(tok, parts.tokenScores[j]);
      e.completionTokenScores = Array.from(parts.completion[j]);
    }
    if (otherRanks.size) e.otherRanks = Object.fromEntries([...otherRanks].map(([m, r]) => [m, r[pos]]));
    return e;
  };
  const supporting = supportingPos.map((p, j) => describe(p, j));
  const opposing = opposingPos.map((p, j) => describe(p, supportingPos.length + j));
  const moduleTotals = main.perModule
    ? Object.fromEntries(modules.map((m) => [m, supportingPos.reduce((s, p) => s + main.perModule!.get(m)![p], 0)]))
    : undefined;
  timings.total_ms = Date.now() - t0;
  const unknown = unknownWordsWarning(model.tokenizer, q);
  return {
    ...(unknown ? { warnings: [unknown] } : {}),
    query: {
      ...queryTexts(req, q),
      loss: qg.loss,
      rendering: q.rendering,
      completionTokens: {
        offsets: targets.map((t) => completionOffset(q, q.offsets[t + 1])),
        values: targets.map((t) => qg.tokenNll[t]),
      },
    },
    method: req.method,
    model: model.checkpoint.dir,
    scored: n,
    supporting,
    opposing,
    histogram: histogram(main.scores, 20),
    modules,
    moduleTotals,
    // how many examples each signed other method calls opposing: an agreement badge on an opposing
    // row needs the other method's rank among those, not just near the bottom of a small pool
    ...(others.size
      ? {
          otherOpposing: Object.fromEntries(
            [...others]
              .filter(([m]) => methodInfo(m)?.signed)
              .map(([m, sc]) => [m, sc.reduce((k, x) => k + (x < 0 ? 1 : 0), 0)]),
          ),
        }
      : {}),
    timings,
    attribution: {
      ...attributionOf(req.method, setup),
      // say when most of the pool carries estimates, not scores
      ...(main.exact
        ? { preranked: { by: req.rank !== undefined ? 'low-rank' : 'gradient-store', exact: main.exact.size } }
        : {}),
      // a retrieval prefilter: the lists and ranks are of the retrieved examples, not of the dataset
      ...(req.candidates === 'retrieved' ? { retrieved: { scored: n, of: corpus.size } } : {}),
      // a file with malformed lines is scored without them (the server, the CLI's --skip-malformed): say so
      ...(corpus.dataset.skipped.length
        ? {
            skipped: {
              count: corpus.dataset.skipped.length,
              lines: corpus.dataset.skipped
                .slice(0, 5)
                .map((x) => ({ line: x.line, message: clipWords(x.message, 200) })),
            },
          }
        : {}),
    },
  };
}

/** `text` cut to about `max` characters at a word boundary, with "…" where it was cut. */
function clipWords(text: string, max: number): string {
  if (text.length <= max) return text;
  const cut = text.lastIndexOf(' ', max);
  return `${text.slice(0, cut > max / 2 ? cut : max).replace(/[\s,;:]+$/, '')} …`;
}

/** The training checkpoints `method` sums over in this setup (none: it scores on the final model). */
function checkpointsFor(method: Method, setup: ExplainSetup): CheckpointStages | undefined {
  const scorer = SCORERS[method];
  const c = setup.checkpoints;
  return scorer.kind === 'gradient' && scorer.overCheckpoints && c?.stages.length ? c : undefined;
}

/** What the result says about how its scores were computed. */
export function attributionOf(method: Method, setup: ExplainSetup): Attribution {
  const c = checkpointsFor(method, setup);
  if (!c) {
    const unused = setup.checkpoints?.stages.length
      ? `${method} does not sum over checkpoints; scored on the final model alone`
      : undefined;
    return { method, over: 'final-model', ...(unused ? { note: unused } : {}) };
  }
  return {
    method,
    over: 'checkpoints',
    checkpoints: c.stages.map((s) => ({
      name: s.name,
      step: s.step,
      weight: s.weight,
      ...(s.learningRate !== undefined ? { learningRate: s.learningRate } : {}),
    })),
    weighting: c.weighting,
    ...(c.note ? { note: c.note } : {}),
  };
}

/**
 * One method's score for every example of the corpus (no lists, no heatmaps): what the
 * evaluation benchmarks correlate with ground truth. With `store`, the store's approximation.
 */
export async function scoreCorpus(
  setup: ExplainSetup,
  corpus: Corpus,
  req: Pick<ExplainRequest, 'prompt' | 'completion' | 'messages' | 'method' | 'batchSize' | 'store'>,
): Promise<Float64Array> {
  const model = setup.model.model;
  const q = tokenizeQuery(model.tokenizer, req.prompt, req.completion, contextLength(model.config), req.messages);
  const query = { ids: q.ids, weights: q.weights };
  const pool = Array.from({ length: corpus.size }, (_, i) => i);
  const qg = await queryGradients(model, query, { modules: setup.modules });
  const r = await scorePool(req.method, setup, corpus, pool, q.text, query, qg, {
    ...req,
    topK: 1,
    rerank: req.store ? 0 : undefined,
  });
  return r.scores;
}

async function scorePool(
  method: Method,
  setup: ExplainSetup,
  corpus: Corpus,
  pool: number[],
  queryText: string,
  query: { ids: number[]; weights: number[] },
  qg: QueryGradients,
  req: PoolRequest,
): Promise<PoolScores> {
  const over = checkpointsFor(method, setup);
  if (over) return scoreOverCheckpoints(method, setup, over, corpus, pool, queryText, query, qg, req);
  const scorer = SCORERS[method];
  if (scorer.kind === 'pool') {
    const scores = await scorer.scores({
      model: setup.model.model,
      corpus,
      pool,
      queryText,
      query,
      signal: req.signal,
    });
    return { scores, signed: methodInfo(method)!.signed };
  }
  // gradient methods: a query matrix per module, scored against every candidate in the graph
  const candidates = pool.map((i) => corpus.tokens[i]);
  // a store's estimate and a low-rank query are taken of P(G) itself: no eigenbasis rows for them
  const exactPass = req.rank === undefined && req.store === undefined;
  const { M, candidateModel, eigen } = scorer.query(
    setup,
    qg,
    exactPass ? { candidateTokens: tokenCount(candidates) } : undefined,
  );
  const q: QueryRows = { M, eigen };
  const store = scorer.normalize ? undefined : storeOf(req, candidateModel);
  if (store) {
    if (eigen) throw new Error('internal: a store-scored pool got query rows in the eigenbasis');
    // the store pre-ranks; the exact rerank is chosen on the final score (this one, or a sum over checkpoints)
    req.onProgress?.(`gradient store (${method})`, 0, 1);
    const est = await storeScores(store, M, pool);
    const rescore = (redo: number[] | undefined) =>
      finishGradientPool(method, setup, corpus, pool, query, qg, q, candidateModel, est.res, req, { redo });
    const approx = Float64Array.from(est.res.scores, (r) => r[0]);
    if (req.deferRerank) return { scores: approx, signed: true, pending: { sd: est.sd, rescore } };
    if (req.onPartial) partials(method, corpus, pool, { ...req, partialEveryMs: 0 })([...pool.keys()], est.res.scores);
    return rescore(req.rerank === 0 ? undefined : storeRerankSet(approx, est.sd, req));
  }
  const res = await scoreQuery(candidateModel, q, candidates, {
    modules: setup.modules,
    gradNorms: !!scorer.normalize,
    rank: req.rank,
    batchSize: req.batchSize,
    signal: req.signal,
    onProgress: (d, t) => req.onProgress?.(`scoring (${method})`, d, t),
    onBatch: req.onPartial ? partials(method, corpus, pool, req) : undefined,
  });
  return finishGradientPool(method, setup, corpus, pool, query, qg, q, candidateModel, res, req);
}

/**
 * Which positions a store-scored pool recomputes exactly: the top and bottom `rerank` of the
 * estimate, and (random projection) every one whose 2-σ interval reaches the top or bottom k.
 */
function storeRerankSet(approx: Float64Array, sd: Float64Array | undefined, req: ExplainRequest): number[] {
  const byScore = Array.from(approx.keys()).sort((a, b) => approx[b] - approx[a]);
  const margin = Math.max(req.rerank ?? 5 * req.topK, req.topK);
  const unsure = sd
    ? plausible(
        Array.from(approx, (x) => Float64Array.of(x)),
        sd,
        req.topK,
        2,
      )
    : [];
  return [...new Set([...byScore.slice(0, margin), ...byScore.slice(-margin), ...unsure])];
}

/**
 * TracIn over the fine-tune's checkpoints (Pruthi et al. 2020, "Estimating Training Data Influence
 * by Tracing Gradient Descent"): score(q, z) = Σ_c w_c · score_c(q, z), where score_c is the
 * method's score with the query gradient, the factors and the candidate gradients all taken at
 * checkpoint c. Every part of a pool's scores is linear in the terms, so each is the weighted sum
 * of the terms' parts: per-module scores, completion-token rows and training-token scores (which
 * therefore still sum to the score). An approximate pool (stores, low rank) is reranked on the sum.
 */
async function scoreOverCheckpoints(
  method: Method,
  setup: ExplainSetup,
  over: CheckpointStages,
  corpus: Corpus,
  pool: number[],
  queryText: string,
  query: { ids: number[]; weights: number[] },
  qg: QueryGradients,
  req: PoolRequest,
): Promise<PoolScores> {
  const n = over.stages.length;
  const terms: PoolScores[] = [];
  for (const [i, c] of over.stages.entries()) {
    if (methodInfo(method)?.needsFactors && !c.stage.preconditioners)
      throw new ExplainError(
        `${method} over checkpoints needs EK-FAC factors for ${c.name} (step ${c.step})`,
        'factors',
      );
    const at = `@ ${c.name} (${i + 1}/${n})`;
    req.onProgress?.(`query gradients ${at}`, 0, 1);
    const qgc = await queryGradients(c.stage.model, query, {
      modules: setup.modules,
      completionRows: qg.targetPositions,
    });
    const sub: ExplainSetup = { model: c.stage, modules: setup.modules };
    terms.push(
      await scorePool(method, sub, corpus, pool, queryText, query, qgc, {
        ...req,
        // an approximate term (store, low rank) is reranked on the sum, below; a partial of one term is not the sum
        deferRerank: true,
        onPartial: undefined,
        onProgress: (s, d, t) => req.onProgress?.(`${s} ${at}`, d, t),
      }),
    );
  }
  const w = over.stages.map((c) => c.weight);
  if (terms.some((t) => t.pending)) {
    // every term estimated (its checkpoint's store, or a low-rank query): the estimates are summed
    // with the checkpoint weights, the rerank set is chosen on that sum, and each term rescores it
    // exactly. Chosen per term, an example of the sum's top k outside some term's top k was never
    // rescored, and so never shown.
    const missing = over.stages.filter((_, c) => !terms[c].pending).map((c) => c.name);
    if (missing.length)
      throw new ExplainError(`the gradient stores cover some checkpoints but not ${missing.join(', ')}`);
    const approx = new Float64Array(pool.length);
    terms.forEach((t, c) => {
      for (let j = 0; j < approx.length; j++) approx[j] += w[c] * t.scores[j];
    });
    const radii = terms.map((t) => t.pending!.radius);
    // the sum's error is at most the weighted sum of the terms' (the terms' projections are not independent)
    const sds = terms.map((t) => t.pending!.sd);
    const sd = sds.every((x) => x)
      ? Float64Array.from(approx, (_, j) => sds.reduce((a, x, c) => a + Math.abs(w[c]) * x![j], 0))
      : undefined;
    if (req.onPartial)
      partials(method, corpus, pool, { ...req, partialEveryMs: 0 })(
        [...pool.keys()],
        Array.from(approx, (x) => Float64Array.of(x)),
      );
    // low rank: |Σ_c w_c (exact_c − estimate_c)| ≤ Σ_c |w_c| radius_c
    const redo = radii.every((x) => x)
      ? reachable(
          approx,
          Float64Array.from(approx, (_, j) => radii.reduce((a, x, c) => a + Math.abs(w[c]) * x![j], 0)),
          Math.min(req.topK, pool.length),
        )
      : req.rerank === 0
        ? undefined
        : storeRerankSet(approx, sd, req);
    for (const [c, t] of terms.entries()) {
      const at = `@ ${over.stages[c].name} (${c + 1}/${n})`;
      terms[c] = await t.pending!.rescore(redo);
      req.onProgress?.(`exact rerank ${at}`, c + 1, n);
    }
  }
  const sum = (parts: Float64Array[]) => {
    const o = new Float64Array(parts[0].length);
    parts.forEach((p, c) => {
      for (let j = 0; j < o.length; j++) o[j] += w[c] * p[j];
    });
    return o;
  };
  const scores = sum(terms.map((t) => t.scores));
  const perModule = new Map<string, Float64Array>();
  for (const m of terms[0].perModule?.keys() ?? []) perModule.set(m, sum(terms.map((t) => t.perModule!.get(m)!)));
  const shown = async (positions: number[]): Promise<ShownParts> => {
    const each: ShownParts[] = [];
    for (const t of terms) each.push(await t.shown!(positions));
    return {
      tokenScores: positions.map((_, j) =>
        Float32Array.from(sum(each.map((e) => Float64Array.from(e.tokenScores[j])))),
      ),
      completion: positions.map((_, j) => sum(each.map((e) => e.completion[j]))),
    };
  };
  let exact: Set<number> | undefined;
  for (const t of terms)
    if (t.exact) exact = exact ? new Set([...exact].filter((p) => t.exact!.has(p))) : new Set(t.exact);
  return { scores, perModule, shown, signed: true, exact };
}

/** The scorer of a gradient method (the batched path and the gradient pool run only these). */
function gradientScorer(method: Method): GradientScorer {
  const scorer = SCORERS[method];
  if (scorer.kind !== 'gradient') throw new Error(`${method} is not a gradient method`);
  return scorer;
}

/** All queries' rows in one scoring pass over the whole corpus, split back per query. */
async function scorePoolBatched(
  method: Method,
  setup: ExplainSetup,
  corpus: Corpus,
  prepared: Prepared[],
): Promise<PoolScores[]> {
  const t = Date.now();
  const scorer = gradientScorer(method);
  const pool = prepared[0].pool;
  const candidates = pool.map((i) => corpus.tokens[i]);
  const hint = { candidateTokens: tokenCount(candidates) };
  const req = prepared[0].req;
  // as many queries' rows in one pass over the pool as memory allows (at least a run budget's
  // worth, up to half of what the machine has left): 64 queries' rows at Qwen2.5-0.5B are 90 GB
  const maxRows =
    poolRowsPolicy.maxPoolRows ?? Math.max(rowsPerPass(setup), Math.floor(sequenceLimitBytes() / 2 / rowBytes(setup)));
  const passes = splitByRows(
    prepared.map((p) => p.qg.rows),
    maxRows,
  );
  const out: PoolScores[] = new Array(prepared.length);
  for (const [b, batch] of passes.entries()) {
    // each query's rows in the form it would take alone, so that each result equals the
    // single-query one exactly; the queries of each form are scored in one pass. The rows are
    // made per pass and dropped after it.
    const queries = new Map(batch.map((i) => [i, scorer.query(setup, prepared[i].qg, hint)]));
    const of = (i: number) => queries.get(i)!;
    const candidateModel = of(batch[0]).candidateModel;
    const at = passes.length > 1 ? `, pass ${b + 1}/${passes.length}` : '';
    for (const eigen of [...new Set(batch.map((i) => of(i).eigen))]) {
      const group = batch.filter((i) => of(i).eigen === eigen);
      const all = new Map<string, Floats[]>();
      for (const name of of(group[0]).M.keys())
        all.set(
          name,
          group.flatMap((i) => of(i).M.get(name)!),
        );
      const res = await scoreQuery(candidateModel, { M: all, eigen }, candidates, {
        modules: setup.modules,
        gradNorms: !!scorer.normalize,
        batchSize: req.batchSize,
        signal: req.signal,
        onProgress: (d, n) => req.onProgress?.(`scoring (${method}, ${group.length} queries${at})`, d, n),
      });
      let offset = 0;
      for (const i of group) {
        const rows = of(i).M.values().next().value?.length ?? 1;
        const slice = (x: Float64Array) => x.slice(offset, offset + rows);
        const mine: CandidateScores = {
          scores: res.scores.map(slice),
          perModule: new Map([...res.perModule].map(([m, s]) => [m, s.map(slice)])),
          gradSqNorm: res.gradSqNorm,
        };
        offset += rows;
        const p = prepared[i];
        const q = { M: of(i).M, eigen: of(i).eigen };
        out[i] = await finishGradientPool(method, setup, corpus, pool, p.query, p.qg, q, candidateModel, mine, p.req);
      }
    }
  }
  for (const p of prepared) p.timings[`${method}_ms`] = Date.now() - t;
  return out;
}

/** Exact rerank (store, low rank), cosine normalization and the lazy token scores of a scored pool. */
async function finishGradientPool(
  method: Method,
  setup: ExplainSetup,
  corpus: Corpus,
  pool: number[],
  query: { ids: number[]; weights: number[] },
  qg: QueryGradients,
  q: QueryRows,
  candidateModel: Model,
  res: CandidateScores,
  req: PoolRequest,
  /**
   * the positions to recompute exactly, chosen by the caller (a gradient store's rerank, or a
   * sum's low-rank rerank); none: the estimate stays
   */
  fromStore?: { redo?: number[] },
): Promise<PoolScores> {
  const candidates = pool.map((i) => corpus.tokens[i]);
  const normalize = gradientScorer(method).normalize;
  const M = q.M;
  const rows = M.values().next().value?.length ?? 1;
  // a normalizing method (cosine) divides by a factor of each query row and of each candidate
  const qNorm = normalize ? normalize.query(qg, rows) : new Float64Array(rows).fill(1);
  const zNorm = new Float64Array(pool.length).fill(1);
  if (normalize) for (let k = 0; k < pool.length; k++) zNorm[k] = normalize.candidate(res.gradSqNorm![k]);
  let exactSet: Set<number> | undefined;
  if (fromStore ? fromStore.redo : req.rank) {
    const t = Date.now();
    let redo: number[];
    if (fromStore) {
      // chosen on the final score by storeRerankSet (the store's top and bottom, its unsure ones)
      redo = fromStore.redo!;
    } else {
      // low-rank query: |⟨M, G_z⟩ − ⟨M_r, G_z⟩| ≤ ‖M − M_r‖_F ‖G_z‖_F (Cauchy–Schwarz over all
      // modules), plus an allowance for the graph's rounding; every candidate whose interval can
      // reach the top-k or bottom-k lists is recomputed exactly.
      const rounding = candidateModel.options.precision === 'fp64' ? 1e-12 : 1e-4;
      const slack = res.lowRankResidual! + rounding * res.queryNorm!;
      const approx = Float64Array.from(pool, (_, k) => res.scores[k][0] / (qNorm[0] * zNorm[k]));
      const radius = Float64Array.from(pool, (_, k) => (slack * Math.sqrt(res.gradSqNorm![k])) / (qNorm[0] * zNorm[k]));
      // a term of a sum over checkpoints: the sum chooses what to recompute (scoreOverCheckpoints)
      if (req.deferRerank)
        return {
          scores: approx,
          signed: true,
          pending: {
            radius,
            rescore: (chosen) =>
              finishGradientPool(method, setup, corpus, pool, query, qg, q, candidateModel, res, req, {
                redo: chosen ?? [],
              }),
          },
        };
      redo = reachable(approx, radius, Math.min(req.topK, pool.length));
    }
    exactSet = new Set(redo);
    const exact = await scoreQuery(
      candidateModel,
      q,
      redo.map((p) => candidates[p]),
      { modules: setup.modules, gradNorms: !!normalize, batchSize: req.batchSize, signal: req.signal },
    );
    redo.forEach((p, j) => {
      res.scores[p] = exact.scores[j];
      for (const [m, s] of exact.perModule) res.perModule.get(m)![p] = s[j];
      if (normalize) {
        res.gradSqNorm![p] = exact.gradSqNorm![j];
        zNorm[p] = normalize.candidate(exact.gradSqNorm![j]);
      }
    });
    req.onProgress?.(`exact recompute of ${redo.length} (${Date.now() - t} ms)`, redo.length, redo.length);
  }
  const scores = Float64Array.from(pool, (_, k) => res.scores[k][0] / (qNorm[0] * zNorm[k]));
  const perModule = new Map<string, Float64Array>();
  for (const [m, s] of res.perModule)
    perModule.set(
      m,
      Float64Array.from(pool, (_, k) => s[k][0] / (qNorm[0] * zNorm[k])),
    );
  // the heatmaps of the shown examples: the completion rows scored with the pool, then the rest
  // in passes of rowsPerPass; row 0 comes along with the first pass for the training-side token scores
  const targets = query.weights.flatMap((w, t) => (w > 0 ? [t] : []));
  const place = new Map(targets.map((t, i) => [t, i]));
  const scored = new Set(qg.targetPositions);
  const rest = targets.filter((t) => !scored.has(t));
  const shown = async (positions: number[]): Promise<ShownParts> => {
    if (!positions.length) return { tokenScores: [], completion: [] };
    const cands = positions.map((p) => candidates[p]);
    const completion = positions.map((k) => {
      const c = new Float64Array(targets.length);
      for (let r = 1; r < rows; r++)
        c[place.get(qg.targetPositions[r - 1])!] = res.scores[k][r] / (qNorm[r] * zNorm[k]);
      return c;
    });
    // the first pass: row 0 (for the training-side token scores) and up to perPass − 1 token
    // rows; the later ones: perPass token rows each, without row 0 (`heatmapRows`)
    const { tokens: pre, perPass } = heatmapRows(setup, method, query.ids.length);
    const passes = 1 + Math.max(0, Math.ceil((rest.length - (perPass - 1)) / perPass));
    let tokenScores: Float32Array[] = [];
    let pass = 0;
    for (let i = 0, first = true; first || i < rest.length; first = false) {
      // a long completion on a large model takes minutes here: say which pass is running
      req.onProgress?.(`token heatmaps (${method})`, pass++, passes);
      if (!first) collectWhenBuffersGrew(ROWS_GARBAGE_BYTES); // the last pass's rows, before this pass makes its own
      const part = rest.slice(i, i + (first ? perPass - 1 : perPass));
      i += part.length;
      const skip = first ? 1 : 0; // rows of the pass before its token rows
      // each pass makes its own rows (the first one its own row 0 too), so that nothing holds the
      // pool's rows once the pool is scored (with several queries, every query's would stay)
      const qgp = await queryGradients(setup.model.model, query, {
        modules: setup.modules,
        completionRows: part,
        whole: first,
      });
      const norms = normalize ? normalize.query(qgp, qgp.rows) : new Float64Array(qgp.rows).fill(1);
      const opts = { modules: setup.modules, tokenScores: first, batchSize: req.batchSize, signal: req.signal };
      let t: CandidateScores;
      if (pre) {
        // heatmapRows chose this form for a float32 model, whose query tokens are float32
        const eigenTokens = eigenTokenRows(qgp.tokens, pre);
        if (!eigenTokens) throw new Error(`explain: the ${method} heatmap rows are not float32 tokens`);
        t = await scoreCandidates(candidateModel, new Map(), cands, { ...opts, eigenbasis: pre, eigenTokens });
      } else {
        const made = gradientScorer(method).query(setup, qgp, { candidateTokens: tokenCount(cands) });
        const rowsOfPass: QueryRows = { M: made.M, eigen: made.eigen };
        t = await scoreQuery(candidateModel, rowsOfPass, cands, opts);
      }
      if (first)
        tokenScores = t.tokenScores!.map((ts, j) => {
          const scale = 1 / (qNorm[0] * zNorm[positions[j]]);
          return ts.map((v) => v * scale);
        });
      positions.forEach((k, j) => {
        for (let r = 0; r < part.length; r++)
          completion[j][place.get(part[r])!] = t.scores[j][r + skip] / (norms[r + skip] * zNorm[k]);
      });
    }
    req.onProgress?.(`token heatmaps (${method})`, passes, passes);
    return { tokenScores, completion };
  };
  return { scores, perModule, shown, signed: true, exact: exactSet };
}

/**
 * The candidates that can be among the k highest (positive) or k lowest (negative) scores, when
 * each true score lies in [approx − radius, approx + radius]. At least k candidates score at least
 * the k-th largest lower bound, so one whose upper bound is below it cannot be in the top k.
 */
export function reachable(approx: Float64Array, radius: Float64Array, k: number): number[] {
  const n = approx.length;
  if (k <= 0 || n === 0) return [];
  const lo = Float64Array.from(approx, (s, i) => s - radius[i]).sort();
  const hi = Float64Array.from(approx, (s, i) => s + radius[i]).sort();
  const kthLower = lo[Math.max(0, n - k)];
  const kthUpper = hi[Math.min(n - 1, k - 1)];
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const ub = approx[i] + radius[i];
    const lb = approx[i] - radius[i];
    if ((ub >= kthLower && ub > 0) || (lb <= kthUpper && lb < 0)) out.push(i);
  }
  return out;
}

/** Streams the running top-k while candidates are scored (raw scores; cosine's normalization comes at the end). */
function partials(method: Method, corpus: Corpus, pool: number[], req: ExplainRequest) {
  const done: number[] = [];
  let last = 0;
  return (idx: number[], scores: Float64Array[]) => {
    done.push(...idx);
    const now = Date.now();
    if (now - last < (req.partialEveryMs ?? 250) && done.length < pool.length) return;
    last = now;
    const sorted = [...done].sort((a, b) => scores[b][0] - scores[a][0]);
    const brief = (p: number) => {
      const ex = corpus.dataset.examples[pool[p]];
      const score = scores[p][0];
      const text = corpus.tokens[pool[p]].text;
      return { id: { dataset: corpus.id, line: ex.line, hash: ex.hash }, score, sign: signOf(score), text };
    };
    req.onPartial!({
      method,
      scored: done.length,
      total: pool.length,
      supporting: sorted
        .filter((p) => scores[p][0] > 0)
        .slice(0, req.topK)
        .map(brief),
      opposing: sorted
        .filter((p) => scores[p][0] < 0)
        .reverse()
        .slice(0, req.topK)
        .map(brief),
    });
  };
}

/** The store's approximate scores in the shape scoreCandidates returns (row 0 only; no per-module terms), and their standard errors. */
async function storeScores(
  store: GradientStore,
  M: Map<string, Floats[]>,
  pool: number[],
): Promise<{ res: CandidateScores; sd?: Float64Array }> {
  const all = await store.estimate(new Map([...M].map(([m, rows]) => [m, rows[0]])));
  const rows = M.values().next().value?.length ?? 1;
  const scores = pool.map((i) => {
    const r = new Float64Array(rows);
    r[0] = all.scores[i];
    return r;
  });
  // no per-module terms from the store: one shared row of zeros (the exact rerank replaces rows, never writes into them)
  const zeros = new Float64Array(rows);
  const perModule = new Map([...M.keys()].map((m) => [m, pool.map(() => zeros)]));
  const sd = all.sd;
  return { res: { scores, perModule }, sd: sd && Float64Array.from(pool, (i) => sd[i]) };
}

/**
 * Pool positions whose interval score ± c·sd can reach the top k or the bottom k: those
 * above the k-th largest lower bound, or below the k-th smallest upper bound. Exact
 * rescoring of these never hides an example the exact ranking would show (up to c σ).
 */
export function plausible(scores: Float64Array[], sd: Float64Array, k: number, c: number): number[] {
  const n = scores.length;
  if (n <= k) return [...scores.keys()];
  const lo = Float64Array.from(scores, (s, i) => s[0] - c * sd[i]).sort();
  const hi = Float64Array.from(scores, (s, i) => s[0] + c * sd[i]).sort();
  const topBar = lo[n - k];
  const bottomBar = hi[k - 1];
  return [...scores.keys()].filter((i) => scores[i][0] + c * sd[i] >= topBar || scores[i][0] - c * sd[i] <= bottomBar);
}

/**
 * Position t's contribution c_t flows through the prediction of token t+1, so it is shown on
 * token t+1; the first token gets 0. The values still sum to the score.
 */
function trainingTokenScores(tok: TokenizedText, c: Float32Array): TokenScores {
  const values = tok.ids.map((_, j) => (j === 0 ? 0 : c[j - 1]));
  return { offsets: tok.offsets.map(([s, e]) => [s, e] as [number, number]), values };
}

function signOf(s: number): Sign {
  return s > 0 ? 'supporting' : s < 0 ? 'opposing' : 'neutral';
}

/** 1 = highest score; ties share the better rank. */
function rankOf(scores: Float64Array): Int32Array {
  const order = Array.from(scores.keys()).sort((a, b) => scores[b] - scores[a]);
  const r = new Int32Array(scores.length);
  order.forEach((i, k) => {
    r[i] = k > 0 && scores[order[k - 1]] === scores[i] ? r[order[k - 1]] : k + 1;
  });
  return r;
}

function topIndices(s: Float64Array, k: number): number[] {
  return Array.from(s.keys())
    .sort((a, b) => s[b] - s[a])
    .slice(0, k);
}

/** Number of entries of ascending `sorted` at most `x`. */
function upperBound(sorted: number[], x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Number of entries of ascending `sorted` strictly below `x`. */
function lowerBound(sorted: number[], x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function histogram(values: Float64Array, bins: number): { edges: number[]; counts: number[] } {
  if (!values.length) return { edges: [], counts: [] };
  let lo = Number.POSITIVE_INFINITY;
  let hi = Number.NEGATIVE_INFINITY;
  for (const v of values) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  if (hi === lo) hi = lo + 1;
  const edges = Array.from({ length: bins + 1 }, (_, i) => lo + ((hi - lo) * i) / bins);
  const counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor(((v - lo) / (hi - lo)) * bins))]++;
  return { edges, counts };
}
