// Influence of training candidates on a query (docs/ARCHITECTURE.md, "The maths contract"):
//   score(q, z) = Σ_l ⟨ P_l(G_l(q)), G_l(z) ⟩,   > 0 = supporting, < 0 = opposing.
// One mechanism serves every method: a "query matrix" M_l per module is computed in JS
// (fp64), fed to the candidate graph, and the graph returns ⟨M_l, G_l(z)⟩ per module and
// per training token without any candidate gradient leaving ONNX Runtime.
//   EK-FAC:        M = P(G_q)
//   multi-stage:   M = P_pt(P_ft(G_q on the fine-tuned model)), scored on the pre-trained model
//   gradient dot:  M = G_q           (identity Hessian)
// Extra query rows give the completion-side heatmap: row k carries only completion token k's loss.

import { type Floats, gemm, gemm32 } from '../linalg/matrix';
import type { Batch, CompiledGraph, Model, ModuleSelection, RunResult } from '../model/engine';
import type { ort } from '../model/onnx/session';
import { DEFAULTS } from '../settings';
import { memoryBoundedBatches, type RunShape, runBudgetBytes, runShape } from './chunking';
import { fromEigenbasis, toEigenbasis } from './ekfac/eigenbasis';
import {
  lowRank,
  lowRankToDense,
  type Preconditioner,
  precondition,
  precondition32,
  preconditionRotated,
  preconditionTokens,
  preconditionTokens32,
  rotateBack32,
  rotatedTokens32,
  singlePrecision,
  type TokenRows,
} from './ekfac/precondition';
import type { TokenizedExample } from './fit';

export type { TokenRows } from './ekfac/precondition';

/**
 * Query gradients per module as tokens (`TokenRows`): the full d_out × d_A rows are formed only
 * where a consumer needs them (`denseGradients`); at the SmolLM-135M shape one fp32 row is 425 MB.
 */
export type QueryTokens = Map<string, TokenRows>;

export interface QueryGradients {
  /** per module: the rows as tokens (row 0 = the whole completion, row k = completion token k), in the graph's precision */
  tokens: QueryTokens;
  /** number of rows */
  rows: number;
  /**
   * per module: the rows as full d_out × d_A matrices, formed on first use and kept (gradient
   * dot product and cosine meet them as they are); EK-FAC preconditions from `tokens` instead
   */
  readonly G: Map<string, Floats[]>;
  /**
   * the completion positions whose loss each token row isolates: row k ↔ targetPositions[k-1]
   * after the whole completion's row 0, or row k ↔ targetPositions[k] without it (`whole` false)
   */
  targetPositions: number[];
  /** whether row 0 is the whole completion's gradient */
  whole: boolean;
  /** query loss −log p(completion | prompt) */
  loss: number;
  /** −log p(token t+1) at every position t of the query */
  tokenNll: Float64Array;
  hidden?: Float32Array;
}

/**
 * Gradients of the query's completion loss (row 0) and, as rows 1…, of single completion tokens'
 * losses alone: every one (`perCompletionToken`) or the target positions in `completionRows`.
 */
export async function queryGradients(
  model: Model,
  query: TokenizedExample,
  opts: {
    modules: ModuleSelection;
    perCompletionToken?: boolean;
    completionRows?: number[];
    /** false: return only the token rows (the whole completion's is still run, for the loss) */
    whole?: boolean;
    hidden?: boolean;
  },
): Promise<QueryGradients> {
  const targets = query.weights.flatMap((w, t) => (w > 0 ? [t] : []));
  if (!targets.length) throw new Error('the query has no completion token to explain');
  const isTarget = new Set(targets);
  const targetPositions = opts.completionRows ?? (opts.perCompletionToken ? targets : []);
  for (const t of targetPositions)
    if (!isTarget.has(t)) throw new Error(`internal: position ${t} is not a completion token of the query`);
  const rows = [query];
  for (const t of targetPositions)
    rows.push({ ids: query.ids, weights: query.weights.map((_, u) => (u === t ? 1 : 0)) });
  const graph = await model.compile({
    labels: 'data',
    perToken: true,
    tokenLoss: true,
    hidden: opts.hidden,
    modules: opts.modules,
  });
  // every row is the same forward pass (only the loss weights differ): one ã serves them all
  const tokens = emptyTokens(graph, rows.length, 1);
  let loss = 0;
  let tokenNll = new Float64Array(0);
  let hidden: Float32Array | undefined;
  const shape = runShape(graph.moduleInfo, model.config, false, graph.fp64);
  // a function of its own: no loop variable keeps a run's rows alive under the next run (RunResult)
  const read = (r: RunResult, batch: Batch, idx: number[]) => {
    readTokens(graph, r, batch, idx, tokens, () => 0);
    // the loss outputs come from row 0 (the whole completion)
    const b0 = idx.indexOf(0);
    if (b0 < 0) return;
    loss = (r.loss.data as Float32Array)[b0];
    const T = batch.T;
    tokenNll = Float64Array.from((r.token_nll.data as Float32Array).subarray(b0 * T, b0 * T + query.ids.length));
    if (opts.hidden) {
      const d = r.hidden_mean.dims[1] as number;
      hidden = (r.hidden_mean.data as Float32Array).slice(b0 * d, (b0 + 1) * d);
    }
  };
  for (const { batch, idx } of memoryBoundedBatches(rows, rows.length, model.tokenizer.padTokenId ?? 0, shape)) {
    read(await graph.run(batch), batch, idx);
  }
  const whole = opts.whole !== false;
  if (!whole) {
    if (!targetPositions.length) throw new Error('internal: query gradients without the whole row need token rows');
    for (const t of tokens.values()) {
      t.g.shift();
      t.src.shift();
    }
  }
  let dense: Map<string, Floats[]> | undefined;
  return {
    tokens,
    rows: rows.length - (whole ? 0 : 1),
    whole,
    get G() {
      dense ??= denseGradients(tokens);
      return dense;
    },
    targetPositions,
    loss,
    tokenNll,
    hidden,
  };
}

/** Gradients of several queries' completion losses in one batched run: one row per query, as tokens. */
export async function queryBatchGradients(
  model: Model,
  queries: TokenizedExample[],
  opts: { modules: ModuleSelection },
): Promise<QueryTokens> {
  const graph = await model.compile({ labels: 'data', perToken: true, modules: opts.modules });
  const tokens = emptyTokens(graph, queries.length, queries.length);
  const shape = runShape(graph.moduleInfo, model.config, false, graph.fp64);
  for (const { batch, idx } of memoryBoundedBatches(queries, queries.length, model.tokenizer.padTokenId ?? 0, shape))
    readTokens(graph, await graph.run(batch), batch, idx, tokens, (k) => k);
  return tokens;
}

function emptyTokens(graph: CompiledGraph, rows: number, forwards: number): QueryTokens {
  return new Map(
    graph.moduleInfo.map((m) => [
      m.name,
      {
        dOut: m.dOut,
        dA: m.dIn + (m.hasBias ? 1 : 0),
        a: new Array(forwards),
        g: new Array(rows),
        src: new Array(rows).fill(0),
      },
    ]),
  );
}

/**
 * Copies one run's per-token outputs into `out`: for batch row b (query row idx[b]) its real
 * tokens' g, the trailing tokens whose g is exactly zero dropped (positions after the last one
 * with a loss weight: nothing downstream of them carries loss), and, the first time its forward
 * `srcOf(k)` is seen, ã = [a, 1] over the real tokens (padding never enters: its g is zero and
 * its rows are cut). Modules reading the same input (q/k/v, gate/up) share one ã.
 */
function readTokens(
  graph: CompiledGraph,
  r: RunResult,
  batch: Batch,
  idx: number[],
  out: QueryTokens,
  srcOf: (k: number) => number,
) {
  const shared = new Map<string, Floats[]>();
  for (const m of graph.modules) {
    const t = out.get(m.name)!;
    const a = r[`a.${m.name}`].data as Floats;
    const g = r[`g.${m.name}`].data as Floats;
    const key = `${m.input.name}:${m.hasBias}`;
    let tilde = shared.get(key);
    if (!tilde) {
      tilde = idx.map((_, b) => withOnes(a, b * batch.T, batch.lengths[b], m.dIn, m.hasBias));
      shared.set(key, tilde);
    }
    idx.forEach((k, b) => {
      const s = srcOf(k);
      t.src[k] = s;
      t.a[s] ??= tilde[b];
      const from = b * batch.T;
      let len = batch.lengths[b];
      while (len > 1 && allZero(g, (from + len - 1) * m.dOut, (from + len) * m.dOut)) len--;
      t.g[k] = g.slice(from * m.dOut, (from + len) * m.dOut);
    });
  }
}

/** Rows [from, from + len) of x (len × dIn), with a trailing column of ones when `ones`. */
function withOnes(x: Floats, from: number, len: number, dIn: number, ones: boolean): Floats {
  if (!ones) return x.slice(from * dIn, (from + len) * dIn);
  const dA = dIn + 1;
  const y = x instanceof Float32Array ? new Float32Array(len * dA) : new Float64Array(len * dA);
  for (let t = 0; t < len; t++) {
    y.set(x.subarray((from + t) * dIn, (from + t + 1) * dIn), t * dA);
    y[t * dA + dIn] = 1;
  }
  return y;
}

function allZero(x: Floats, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (x[i] !== 0) return false;
  return true;
}

/** G_r = g_rᵀ ã of every row, in the tokens' precision, rows of a module back to back in one buffer. */
export function denseGradients(tokens: QueryTokens): Map<string, Floats[]> {
  const out = new Map<string, Floats[]>();
  for (const [name, t] of tokens) {
    const size = t.dOut * t.dA;
    const single = t.g[0] instanceof Float32Array;
    const flat = single ? new Float32Array(t.g.length * size) : new Float64Array(t.g.length * size);
    const rows = t.g.map((g, r) => {
      const a = t.a[t.src[r]];
      const T = g.length / t.dOut;
      const view = flat.subarray(r * size, (r + 1) * size);
      if (single)
        gemm32(g as Float32Array, a as Float32Array, t.dOut, T, t.dA, { transA: true, out: view as Float32Array });
      else gemm(g as Float64Array, a as Float64Array, t.dOut, T, t.dA, { transA: true, out: view as Float64Array });
      return view;
    });
    out.set(name, rows);
  }
  return out;
}

/**
 * Apply one or more preconditioners in order (multi-stage applies fine-tune then pre-train), to
 * full gradients or to tokens (then the first stage rotates from the tokens and no G is formed).
 * With `eigenbasis` (one preconditioner only) the rows are left in its eigenbasis,
 * R = (Q_Sᵀ G Q_A) ⊘ (Λ + λ), for `scoreCandidates(…, { eigenbasis })`: the rotation back is skipped.
 */
export function queryMatrices(
  G: Map<string, Floats[]> | QueryTokens,
  preconditioners: Array<Map<string, Preconditioner>>,
  opts: { eigenbasis?: boolean } = {},
): Map<string, Floats[]> {
  if (opts.eigenbasis && preconditioners.length !== 1)
    throw new Error(
      `queryMatrices: an eigenbasis query needs exactly one preconditioner, got ${preconditioners.length}`,
    );
  const out = new Map<string, Floats[]>();
  for (const [name, input] of G) {
    const stages = preconditioners.map((p) => {
      const pm = p.get(name);
      if (!pm) throw new Error(`the factors have no module ${name}: fit them over the same modules`);
      return pm;
    });
    // in the rows' own precision, the graph's (the result is fed back to it): fp64 graphs
    // (ground truths, finite-difference checks) precondition in fp64, fp32 graphs in fp32
    const single = (Array.isArray(input) ? input : input.g).some((r) => r instanceof Float32Array)
      ? stages.map(singlePrecision)
      : [];
    let rows: Floats[];
    let rest = stages.entries();
    if (opts.eigenbasis && Array.isArray(input)) {
      const p = stages[0];
      rows = input.map((v) =>
        v instanceof Float32Array
          ? precondition32(p, v, single[0], false)
          : preconditionRotated(p, toEigenbasis(p, v), true),
      );
      out.set(name, contiguous(rows));
      continue;
    }
    if (Array.isArray(input)) rows = input;
    else {
      if (!stages.length) throw new Error('queryMatrices: tokens need at least one preconditioner');
      const p = stages[0];
      const back = !opts.eigenbasis;
      const flat = single.length ? preconditionTokens32(p, input, single[0], back) : preconditionTokens(p, input, back);
      const size = p.dOut * p.dA;
      rows = input.g.map((_, r) => flat.subarray(r * size, (r + 1) * size));
      rest = [...stages.entries()].slice(1).values();
    }
    let done = rows;
    for (const [i, pm] of rest)
      done = done.map((v) => (v instanceof Float32Array ? precondition32(pm, v, single[i]) : precondition(pm, v)));
    out.set(name, contiguous(done));
  }
  return out;
}

/**
 * Query rows as a gradient scorer hands them over: P(G) per module, or (with `eigen`) R, the same
 * rows left in the eigenbasis of `eigen` (`queryMatrices(…, { eigenbasis: true })`).
 */
export interface QueryRows {
  M: Map<string, Floats[]>;
  eigen?: Map<string, Preconditioner>;
}

/** P(G) = Q_S R Q_Aᵀ of the rows `which` (default all), as new arrays in the rows' precision. */
export function denseRows(q: QueryRows, which?: number[]): Map<string, Floats[]> {
  const out = new Map<string, Floats[]>();
  for (const [name, rows] of q.M) {
    const picked = which ? which.map((r) => rows[r]) : rows;
    const p = q.eigen?.get(name);
    if (!q.eigen) {
      out.set(name, picked);
      continue;
    }
    if (!p) throw new Error(`the factors have no module ${name}: fit them over the same modules`);
    const f = picked.some((r) => r instanceof Float32Array) ? singlePrecision(p) : undefined;
    out.set(
      name,
      contiguous(picked.map((r) => (r instanceof Float32Array ? rotateBack32(p, r, f) : fromEigenbasis(p, r)))),
    );
  }
  return out;
}

/** One module's query rows as rotated tokens, with the float32 factors the score graph needs. */
export interface EigenTokenRows {
  rows: number;
  /** the longest row's tokens (shorter rows are zero-padded) */
  T: number;
  /** [rows, T, d_out] = g_r Q_S */
  gs: Float32Array;
  /** [T, d_A] = ã Q_A of the one forward every row shares, its first T tokens */
  as: Float32Array;
  inverse: Float32Array;
  qA: Float32Array;
  qS: Float32Array;
}

/**
 * The query rows of `tokens` as rotated tokens in the eigenbasis of `pre`, for
 * `scoreCandidates(…, { eigenbasis: pre, eigenTokens })`: the graph scores the rows
 * R_r = (g_r Q_S)ᵀ (ã Q_A) ⊘ (Λ+λ) without forming them, the same rows `queryMatrices(tokens,
 * [pre], { eigenbasis: true })` holds whole. Null for fp64 tokens (ground-truth graphs), which keep
 * the rows.
 */
export function eigenTokenRows(
  tokens: QueryTokens,
  pre: Map<string, Preconditioner>,
): Map<string, EigenTokenRows> | null {
  const out = new Map<string, EigenTokenRows>();
  for (const [name, t] of tokens) {
    if (!t.g.every((g) => g instanceof Float32Array)) return null;
    const p = pre.get(name);
    if (!p) throw new Error(`the factors have no module ${name}: fit them over the same modules`);
    const f = singlePrecision(p);
    const { T, gs, as } = rotatedTokens32(p, t, f);
    out.set(name, { rows: t.g.length, T, gs, as, inverse: f.inverse, qA: f.qA, qS: f.qS });
  }
  return out;
}

/**
 * How many query rows one pass may score as rotated tokens: Σ_modules Tq·d_out floats a row (its
 * g Q_S) and the graph's copy of them for the contraction (two of the widest module's), beside
 * the Σ_modules Tq·d_A floats of ã Q_A that all rows share, within half the run budget, so the
 * candidates keep the rest (at Qwen2.5-0.5B and a 16-token query, 25 rows of 20 MB; held whole,
 * one row is 1.4 GB and the budget takes one).
 */
export function tokenRowsPerPass(pre: Map<string, Preconditioner>, modules: Iterable<string>, Tq: number): number {
  let perRow = 0;
  let shared = 0;
  let widest = 0;
  for (const name of modules) {
    const p = pre.get(name);
    if (!p) continue;
    perRow += Tq * p.dOut;
    shared += Tq * p.dA;
    widest = Math.max(widest, p.dOut);
  }
  perRow += 2 * widest * Tq;
  return Math.max(1, Math.floor((runBudgetBytes() / 2 / 4 - shared) / perRow));
}

/** Tests set `force` to run one path wherever the cost rule would choose (both must agree). */
export const eigenbasisPolicy: { force?: 'eigenbasis' | 'rotate-back' } = {};

/**
 * Whether scoring in the eigenbasis costs less than rotating the query rows back: it adds
 * T_c·(d_out² + d_A²) per candidate and module (rotating its tokens), and saves
 * d_out²·d_A + d_out·d_A² per query row and module (Q_S R Q_Aᵀ). At the Pythia-70M shape a
 * 16-token query's 17 rows outweigh a few hundred short candidates; a whole large corpus does not.
 */
export function eigenbasisCheaper(
  pre: Map<string, Preconditioner>,
  modules: Iterable<string>,
  queryRows: number,
  candidateTokens: number,
): boolean {
  if (eigenbasisPolicy.force) return eigenbasisPolicy.force === 'eigenbasis';
  let perToken = 0;
  let perRow = 0;
  for (const name of modules) {
    const p = pre.get(name);
    if (!p) throw new Error(`the factors have no module ${name}: fit them over the same modules`);
    perToken += p.dOut * p.dOut + p.dA * p.dA;
    perRow += p.dOut * p.dOut * p.dA + p.dOut * p.dA * p.dA;
  }
  return candidateTokens * perToken < queryRows * perRow;
}

/** Tokens of the candidates (what `eigenbasisCheaper` weighs). */
export function tokenCount(candidates: TokenizedExample[]): number {
  return candidates.reduce((s, c) => s + c.ids.length, 0);
}

/**
 * `scoreCandidates` for query rows of either form: rows in the eigenbasis are scored there when
 * `eigenbasisCheaper` says so for these candidates, else rotated back first (and always for a
 * low-rank query, whose SVD is of P(G)).
 */
export function scoreQuery(
  model: Model,
  q: QueryRows,
  candidates: TokenizedExample[],
  opts: Parameters<typeof scoreCandidates>[3],
): Promise<CandidateScores> {
  if (!q.eigen) return scoreCandidates(model, q.M, candidates, opts);
  const rows = q.M.values().next().value?.length ?? 0;
  if (opts.rank === undefined && eigenbasisCheaper(q.eigen, q.M.keys(), rows, tokenCount(candidates)))
    return scoreCandidates(model, q.M, candidates, { ...opts, eigenbasis: q.eigen });
  return scoreCandidates(model, denseRows(q), candidates, opts);
}

export interface CandidateScores {
  /** [candidate][query row] total score */
  scores: Float64Array[];
  /** module → [candidate][query row] */
  perModule: Map<string, Float64Array[]>;
  /** [candidate] → per-token scores of query row 0 (position t = token t's contribution), when asked */
  tokenScores?: Float32Array[];
  /** [candidate] Σ_modules ‖G(z)‖², when asked (for cosine) */
  gradSqNorm?: Float64Array;
  /** [candidate] mean-pooled last hidden state, when asked (for RepSim) */
  hidden?: Float32Array[];
  /**
   * With `rank`: ‖M − M_r‖_F and ‖M‖_F of query row 0 over all modules (Frobenius norms of the
   * concatenated per-module matrices). By Cauchy–Schwarz, |exact − low-rank score| of a candidate
   * is at most lowRankResidual · ‖G(z)‖ (its `gradSqNorm`, always returned with `rank`).
   */
  lowRankResidual?: number;
  queryNorm?: number;
}

/**
 * The rows as views into one buffer, in order: `scoreCandidates` then hands that buffer to the
 * graph as it is instead of copying every row into a new one (a third copy of all query
 * matrices: 3.4 GB at the SmolLM-135M shape with 8 queries).
 */
function contiguous(rows: Floats[]): Floats[] {
  if (rows.length < 2 || asOne(rows, rows[0] instanceof Float32Array ? 'float32' : 'float64')) return rows;
  const size = rows[0].length;
  const flat =
    rows[0] instanceof Float32Array ? new Float32Array(rows.length * size) : new Float64Array(rows.length * size);
  rows.forEach((r, q) => {
    flat.set(r, q * size);
    rows[q] = flat.subarray(q * size, (q + 1) * size);
  });
  return rows;
}

/** `rows` viewed as one [Q, size] array when they already are consecutive views of one buffer, else null. */
function asOne(rows: Floats[], type: 'float32' | 'float64'): Floats | null {
  const first = rows[0];
  if (!first || (type === 'float32') !== first instanceof Float32Array) return null;
  const size = first.length;
  const bytes = first.BYTES_PER_ELEMENT;
  for (const [q, r] of rows.entries())
    if (r.buffer !== first.buffer || r.length !== size || r.byteOffset !== first.byteOffset + q * size * bytes)
      return null;
  return first instanceof Float32Array
    ? new Float32Array(first.buffer, first.byteOffset, rows.length * size)
    : new Float64Array(first.buffer, first.byteOffset, rows.length * size);
}

/** Score candidates against query matrices M (per module, Q rows each). */
export async function scoreCandidates(
  model: Model,
  M: Map<string, Floats[]>,
  candidates: TokenizedExample[],
  opts: {
    modules: ModuleSelection;
    tokenScores?: boolean;
    gradNorms?: boolean;
    hidden?: boolean;
    batchSize?: number;
    onProgress?: (done: number, total: number) => void;
    /** after each batch: the candidate indices just scored (their rows of `scores` are final) */
    onBatch?: (idx: number[], scores: Float64Array[]) => void;
    signal?: AbortSignal;
    /** score with a rank-r approximation of each query matrix (faster for wide modules) */
    rank?: number;
    /** M holds rows in these preconditioners' eigenbases (`queryMatrices(…, { eigenbasis: true })`) */
    eigenbasis?: Map<string, Preconditioner>;
    /**
     * with `eigenbasis`, the rows as rotated tokens (`eigenTokenRows`) instead of `M` (pass an
     * empty M): the graph scores them without forming them (only row 0, for the token scores)
     */
    eigenTokens?: Map<string, EigenTokenRows>;
  },
): Promise<CandidateScores> {
  if (opts.eigenbasis && opts.rank !== undefined)
    throw new Error('scoreCandidates: a low-rank query is taken of P(G), not of rows in the eigenbasis');
  if (opts.eigenTokens && !opts.eigenbasis)
    throw new Error('scoreCandidates: rows as rotated tokens need the eigenbasis they are rotated into');
  const graph = await model.compile({
    labels: 'data',
    scores: true,
    tokenScores: opts.tokenScores,
    lowRank: opts.rank !== undefined,
    ...(opts.eigenbasis ? { eigenbasis: true } : {}),
    ...(opts.eigenTokens ? { eigenbasisTokens: true } : {}),
    // the low-rank error bound needs every candidate's gradient norm
    gradNorms: opts.gradNorms || opts.rank !== undefined,
    hidden: opts.hidden,
    modules: opts.modules,
  });
  const feeds: Record<string, ort.Tensor> = {};
  let Q = 0;
  let residualSq = 0;
  let querySq = 0;
  // rows as rotated tokens: the graph forms only row 0, for the token scores (every module's may
  // be alive at once); the contraction's copy of the rows, [Q, d_out·Tq], and its [B, d_out, Tq]
  // products are a few MB (counted as two copies of the rows)
  let formedBytes = 0;
  for (const m of graph.moduleInfo) {
    const dA = m.dIn + (m.hasBias ? 1 : 0);
    const tokens = opts.eigenTokens?.get(m.name);
    if (opts.eigenTokens) {
      const p = opts.eigenbasis!.get(m.name);
      if (!tokens || !p) throw new Error(`no query tokens or factors for module ${m.name}`);
      if (p.dOut !== m.dOut || p.dA !== dA)
        throw new Error(`module ${m.name}: factors are ${p.dOut}×${p.dA}, the model's gradient ${m.dOut}×${dA}`);
      Q = tokens.rows;
      feeds[`RS.${m.name}`] = graph.tensor(tokens.gs, [Q, tokens.T, m.dOut]);
      feeds[`RA.${m.name}`] = graph.tensor(tokens.as, [tokens.T, dA]);
      feeds[`IL.${m.name}`] = graph.tensor(tokens.inverse, [m.dOut, dA]);
      feeds[`QA.${m.name}`] = graph.tensor(tokens.qA, [dA, dA]);
      feeds[`QS.${m.name}`] = graph.tensor(tokens.qS, [m.dOut, m.dOut]);
      if (opts.tokenScores) formedBytes += m.dOut * dA * (graph.fp64 ? 8 : 4);
      formedBytes += 2 * m.dOut * Q * tokens.T * (graph.fp64 ? 8 : 4);
      continue;
    }
    const rows = M.get(m.name);
    if (!rows) throw new Error(`no query matrix for module ${m.name}`);
    Q = rows.length;
    if (opts.rank) {
      // rank-r SVD of each query row: U = u·diag(σ) [dOut, R], V = v [dA, R]
      const lr = rows.map((r) => lowRank(r, m.dOut, dA, opts.rank!));
      const R = lr[0].rank;
      // row 0's truncation error, formed densely (the factors need not be exactly orthogonal)
      const dense = lowRankToDense(lr[0]);
      for (let i = 0; i < dense.length; i++) {
        residualSq += (rows[0][i] - dense[i]) ** 2;
        querySq += rows[0][i] ** 2;
      }
      const U = new Float64Array(Q * m.dOut * R);
      const V = new Float64Array(Q * dA * R);
      lr.forEach((f, q) => {
        for (let i = 0; i < m.dOut; i++)
          for (let k = 0; k < R; k++) U[q * m.dOut * R + i * R + k] = f.u[i * R + k] * f.sigma[k];
        V.set(f.v, q * dA * R);
      });
      feeds[`U.${m.name}`] = graph.tensor(U, [Q, m.dOut, R]);
      feeds[`V.${m.name}`] = graph.tensor(V, [Q, dA, R]);
      continue;
    }
    // straight into the graph's precision: an fp64 staging copy of every query's matrix
    // cost 1.2 GB at the Pythia-70M shape with 8 queries
    let flat = asOne(rows, graph.fp64 ? 'float64' : 'float32');
    if (!flat) {
      flat = graph.fp64 ? new Float64Array(Q * m.dOut * dA) : new Float32Array(Q * m.dOut * dA);
      for (const [q, r] of rows.entries()) flat.set(r, q * m.dOut * dA);
    }
    if (opts.eigenbasis) {
      const p = opts.eigenbasis.get(m.name);
      if (!p) throw new Error(`the factors have no module ${m.name}: fit them over the same modules`);
      if (p.dOut !== m.dOut || p.dA !== dA)
        throw new Error(`module ${m.name}: factors are ${p.dOut}×${p.dA}, the model's gradient ${m.dOut}×${dA}`);
      feeds[`R.${m.name}`] = graph.tensor(flat, [Q, m.dOut, dA]);
      feeds[`QA.${m.name}`] = graph.tensor(p.qA, [dA, dA]);
      feeds[`QS.${m.name}`] = graph.tensor(p.qS, [m.dOut, m.dOut]);
    } else feeds[`M.${m.name}`] = graph.tensor(flat, [Q, m.dOut, dA]);
  }
  const n = candidates.length;
  const scores = Array.from({ length: n }, () => new Float64Array(Q));
  const perModule = new Map(
    graph.moduleInfo.map((m) => [m.name, Array.from({ length: n }, () => new Float64Array(Q))]),
  );
  const tokenScores: Float32Array[] = new Array(n);
  const gradSqNorm = new Float64Array(n);
  const hidden: Float32Array[] = new Array(n);
  // keep candidate order: batch by length, remember where each candidate sits
  const shape = runShape(
    graph.moduleInfo,
    model.config,
    !opts.rank || opts.gradNorms ? 'transient' : false,
    graph.fp64,
  );
  // a function of its own: no loop variable keeps a run's outputs alive under the next run (RunResult)
  const read = (out: RunResult, batch: Batch, idx: number[]) => {
    const s = out.scores.data as Float32Array;
    idx.forEach((k, b) => {
      for (let q = 0; q < Q; q++) scores[k][q] = s[b * Q + q];
      for (const m of graph.moduleInfo) {
        const sm = out[`score.${m.name}`].data as Float32Array;
        for (let q = 0; q < Q; q++) perModule.get(m.name)![k][q] = sm[b * Q + q];
      }
      if (opts.tokenScores) {
        // token_scores [Q, B, T]: query row 0, candidate b
        const ts = out.token_scores.data as Float32Array;
        tokenScores[k] = ts.slice(b * batch.T, b * batch.T + candidates[k].ids.length);
      }
      if (opts.gradNorms || opts.rank !== undefined) gradSqNorm[k] = (out.grad_sqnorm.data as Float32Array)[b];
      if (opts.hidden) {
        const d = out.hidden_mean.dims[1] as number;
        hidden[k] = (out.hidden_mean.data as Float32Array).slice(b * d, (b + 1) * d);
      }
    });
  };
  let done = 0;
  for (const { batch, idx } of memoryBoundedBatches(
    candidates,
    opts.batchSize ?? DEFAULTS.batchSize,
    model.tokenizer.padTokenId ?? 0,
    shape,
    Math.max(0, runBudgetBytes() - formedBytes),
  )) {
    if (opts.signal?.aborted) throw new Error('cancelled');
    read(await graph.run(batch, { feeds }), batch, idx);
    done += idx.length;
    opts.onBatch?.(idx, scores);
    opts.onProgress?.(done, n);
  }
  return {
    scores,
    perModule,
    tokenScores: opts.tokenScores ? tokenScores : undefined,
    gradSqNorm: opts.gradNorms || opts.rank !== undefined ? gradSqNorm : undefined,
    hidden: opts.hidden ? hidden : undefined,
    lowRankResidual: opts.rank !== undefined ? Math.sqrt(residualSq) : undefined,
    queryNorm: opts.rank !== undefined ? Math.sqrt(querySq) : undefined,
  };
}

/** Self-influence ⟨P(G_z), G_z⟩ of each candidate (ranks unusual training examples without a query). */
export async function selfInfluenceScores(
  model: Model,
  pre: Map<string, Preconditioner>,
  candidates: TokenizedExample[],
  opts: {
    modules: ModuleSelection;
    batchSize?: number;
    onProgress?: (done: number, total: number) => void;
    signal?: AbortSignal;
  },
): Promise<Float64Array> {
  const graph = await model.compile({ labels: 'data', selfInfluence: true, modules: opts.modules });
  const feeds: Record<string, ort.Tensor> = {};
  for (const m of graph.moduleInfo) {
    const p = pre.get(m.name);
    if (!p) throw new Error(`the factors have no module ${m.name}: fit them over the same modules`);
    feeds[`QA.${m.name}`] = graph.tensor(p.qA, [p.dA, p.dA]);
    feeds[`QS.${m.name}`] = graph.tensor(p.qS, [p.dOut, p.dOut]);
    feeds[`IL.${m.name}`] = graph.tensor(p.inverse, [p.dOut, p.dA]);
  }
  const out = new Float64Array(candidates.length);
  await forEachBatch(
    model,
    candidates,
    opts.batchSize ?? DEFAULTS.batchSize,
    async (batch, idx) => {
      const r = await graph.run(batch, { feeds });
      const s = r.self_influence.data as Float32Array | Float64Array;
      idx.forEach((k, b) => {
        out[k] = s[b];
      });
    },
    opts.onProgress,
    opts.signal,
    runShape(graph.moduleInfo, model.config, 'transient', graph.fp64),
  );
  return out;
}

/** Mean-pooled last hidden state of each candidate (RepSim). */
export async function candidateHidden(
  model: Model,
  candidates: TokenizedExample[],
  opts: { batchSize?: number; onProgress?: (done: number, total: number) => void; signal?: AbortSignal } = {},
): Promise<Float32Array[]> {
  const graph = await model.compile({ hidden: true });
  const out: Float32Array[] = new Array(candidates.length);
  await forEachBatch(
    model,
    candidates,
    opts.batchSize ?? DEFAULTS.batchSize,
    async (batch, idx) => {
      const r = await graph.run(batch);
      const d = r.hidden_mean.dims[1] as number;
      const h = r.hidden_mean.data as Float32Array | Float64Array;
      idx.forEach((k, b) => {
        out[k] = Float32Array.from(h.subarray(b * d, (b + 1) * d));
      });
    },
    opts.onProgress,
    opts.signal,
  );
  return out;
}

/** Runs `fn` over length-sorted, memory-bounded batches; `idx` maps batch rows back to candidate indices. */
async function forEachBatch(
  model: Model,
  candidates: TokenizedExample[],
  batchSize: number,
  fn: (batch: Batch, idx: number[]) => Promise<void>,
  onProgress?: (done: number, total: number) => void,
  signal?: AbortSignal,
  shape: RunShape = runShape([], model.config, false, model.options.precision === 'fp64'),
): Promise<void> {
  let done = 0;
  for (const { batch, idx } of memoryBoundedBatches(candidates, batchSize, model.tokenizer.padTokenId ?? 0, shape)) {
    if (signal?.aborted) throw new Error('cancelled');
    await fn(batch, idx);
    done += idx.length;
    onProgress?.(done, candidates.length);
  }
}
