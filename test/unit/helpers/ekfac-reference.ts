// Test-only dense references (the product scores inside ONNX graphs: src/server/attribution/influence.ts).
// Influence scores (Grosse et al. 2023, eq. 24 with the EK-FAC inverse of eq. 21):
//   score(q, z) = Σ_l ⟨ P_l(G_l(q)), G_l(z) ⟩,
// with G the gradients of the losses −Σ log p, so score > 0 means "supporting" (docs/ARCHITECTURE.md).
// Per-module scores are the terms of the sum; per-token scores split the candidate side,
// c_t = g_tᵀ M ã_t with M = P(G(q)), so Σ_t c_t equals the score.
import { type Basis, type Eigenbasis, toEigenbasis } from '../../../src/server/attribution/ekfac/eigenbasis';
import {
  activationRows,
  factorDim,
  gradientRows,
  type ModuleShape,
  type RowWeights,
} from '../../../src/server/attribution/ekfac/gradient';
import {
  type LowRank,
  type LowRankOptions,
  lowRank,
  type Preconditioner,
  precondition,
} from '../../../src/server/attribution/ekfac/precondition';
import { dot, type Floats, gemm, toF64 } from '../../../src/server/linalg/matrix';

/** One example's gradients, per module name: d_out × d_A row-major. */
export type ModuleGradients = Record<string, Floats>;

/** A query preconditioned per module: dense M = P(G_q), or its low-rank factors. */
export type PreconditionedQuery = Record<string, Float64Array | LowRank>;

export interface ScoreMatrix {
  queries: number;
  candidates: number;
  /** queries × candidates row-major, summed over modules */
  total: Float64Array;
  /** the same per module (layer-wise influence) */
  perModule: Record<string, Float64Array>;
}

/** M_l = P_l(G_l(q)) for each module, optionally as a rank-r SVD (query batching, §3.2). */
export function preconditionQuery(
  pre: Record<string, Preconditioner>,
  G: ModuleGradients,
  options: { rank?: number; lowRank?: LowRankOptions } = {},
): PreconditionedQuery {
  const out: PreconditionedQuery = {};
  for (const name of Object.keys(pre)) {
    const p = pre[name];
    const g = G[name];
    if (!g) throw new Error(`query gradient has no module ${name}`);
    const M = precondition(p, g);
    out[name] = options.rank ? lowRank(M, p.dOut, p.dA, options.rank, options.lowRank) : M;
  }
  return out;
}

/** ⟨M, G⟩ for a dense or low-rank M: Σ_i σ_i u_iᵀ G v_i in the low-rank case. */
export function innerProduct(M: Float64Array | LowRank, G: Floats): number {
  if (M instanceof Float64Array) return dot(M, G);
  const { dOut, dA, rank, u, sigma, v } = M;
  if (G.length !== dOut * dA) throw new Error(`innerProduct: expected ${dOut}×${dA}, got ${G.length} values`);
  const GV = gemm(toF64(G), v, dOut, dA, rank);
  let s = 0;
  for (let i = 0; i < dOut; i++) for (let k = 0; k < rank; k++) s += sigma[k] * u[i * rank + k] * GV[i * rank + k];
  return s;
}

/** Pairwise scores for preconditioned queries × candidate gradients, per module and summed. */
export function pairwiseScores(queries: PreconditionedQuery[], candidates: ModuleGradients[]): ScoreMatrix {
  const nQ = queries.length;
  const nC = candidates.length;
  const total = new Float64Array(nQ * nC);
  const perModule: Record<string, Float64Array> = {};
  const modules = nQ ? Object.keys(queries[0]) : [];
  for (const name of modules) {
    const S = new Float64Array(nQ * nC);
    for (let c = 0; c < nC; c++) {
      const G = candidates[c][name];
      if (!G) throw new Error(`candidate ${c} has no gradient for module ${name}`);
      for (let q = 0; q < nQ; q++) {
        const M = queries[q][name];
        if (!M) throw new Error(`query ${q} has no module ${name}`);
        S[q * nC + c] = innerProduct(M, G);
      }
    }
    for (let i = 0; i < S.length; i++) total[i] += S[i];
    perModule[name] = S;
  }
  return { queries: nQ, candidates: nC, total, perModule };
}

/**
 * Self-influence ⟨P(G), G⟩ = Σ (Q_Sᵀ G Q_A)² ⊘ (Λ + λ): positive for any non-zero G,
 * computed in the eigenbasis so it needs one rotation per module.
 */
export function selfInfluence(
  pre: Record<string, Preconditioner>,
  G: ModuleGradients,
): { total: number; perModule: Record<string, number> } {
  const perModule: Record<string, number> = {};
  let total = 0;
  for (const name of Object.keys(pre)) {
    const p = pre[name];
    const g = G[name];
    if (!g) throw new Error(`gradient has no module ${name}`);
    const Gt = toEigenbasis(p, g);
    let s = 0;
    for (let i = 0; i < Gt.length; i++) s += Gt[i] * Gt[i] * p.inverse[i];
    perModule[name] = s;
    total += s;
  }
  return { total, perModule };
}

/**
 * Training-side token scores for one module: c_t = g_tᵀ M ã_t (rows values), where `a` is
 * rows × d_in and `g` rows × d_out from the candidate's forward/backward pass. With a low-rank
 * M, c_t = (Uᵀ g_t) · σ · (Vᵀ ã_t). Σ_t c_t = ⟨M, Σ_t g_t ã_tᵀ⟩ = ⟨M, G⟩.
 */
export function perTokenScores(
  M: Float64Array | LowRank,
  a: Floats,
  g: Floats,
  rows: number,
  shape: { dIn: number; dOut: number; appendOne: boolean; name?: string },
  weights?: RowWeights,
): Float64Array {
  const label = shape.name ? `module ${shape.name}` : 'module';
  const X = activationRows(a, rows, shape.dIn, shape.appendOne, `activations of ${label} (token scores)`, weights);
  const Y = gradientRows(g, rows, shape.dOut, `output gradients of ${label} (token scores)`);
  const dA = shape.dIn + (shape.appendOne ? 1 : 0);
  const c = new Float64Array(rows);
  if (M instanceof Float64Array) {
    if (M.length !== shape.dOut * dA) throw new Error(`perTokenScores(${label}): M has ${M.length} values`);
    const YM = gemm(Y, M, rows, shape.dOut, dA);
    for (let t = 0; t < rows; t++) c[t] = dot(YM.subarray(t * dA, (t + 1) * dA), X.subarray(t * dA, (t + 1) * dA));
    return c;
  }
  const { rank, u, sigma, v } = M;
  const YU = gemm(Y, u, rows, shape.dOut, rank);
  const XV = gemm(X, v, rows, dA, rank);
  for (let t = 0; t < rows; t++) {
    let s = 0;
    for (let k = 0; k < rank; k++) s += YU[t * rank + k] * sigma[k] * XV[t * rank + k];
    c[t] = s;
  }
  return c;
}

/** Baseline: gradient dot product ⟨G_q, G_z⟩ (identity Hessian), per module and summed. */
export function gradientDot(Gq: ModuleGradients, Gz: ModuleGradients, modules = Object.keys(Gq)) {
  const perModule: Record<string, number> = {};
  let total = 0;
  for (const name of modules) {
    if (!Gz[name]) throw new Error(`candidate gradient has no module ${name}`);
    perModule[name] = dot(Gq[name], Gz[name]);
    total += perModule[name];
  }
  return { total, perModule };
}

/** Baseline: cosine of the full (all-module) gradients; 0 when either is zero. */
export function gradientCosine(Gq: ModuleGradients, Gz: ModuleGradients, modules = Object.keys(Gq)): number {
  let qq = 0;
  let zz = 0;
  let qz = 0;
  for (const name of modules) {
    if (!Gz[name]) throw new Error(`candidate gradient has no module ${name}`);
    qq += dot(Gq[name], Gq[name]);
    zz += dot(Gz[name], Gz[name]);
    qz += dot(Gq[name], Gz[name]);
  }
  return qq > 0 && zz > 0 ? qz / Math.sqrt(qq * zz) : 0;
}

/**
 * One example's gradient G = Σ_t w_t g_t ã_tᵀ (d_out × d_A, row-major, fp64) from its tokens.
 * `weights` (e.g. a loss mask) multiply each token's term.
 */
export function exampleGradient(shape: ModuleShape, a: Floats, g: Floats, rows: number, weights?: RowWeights) {
  const X = activationRows(a, rows, shape.dIn, shape.appendOne, `activations of module ${shape.name}`, weights);
  const Y = gradientRows(g, rows, shape.dOut, `output gradients of module ${shape.name}`);
  return gemm(Y, X, shape.dOut, rows, factorDim(shape), { transA: true });
}

/** K-FAC's eigenvalues in the EK-FAC layout: Λ_ij = λ_S[i] · λ_A[j] (no correction). */
export function kfacLambda(b: Pick<Eigenbasis, 'eigA' | 'eigS' | 'dA' | 'dOut'> & Basis): Float64Array {
  const L = new Float64Array(b.dOut * b.dA);
  for (let i = 0; i < b.dOut; i++) for (let j = 0; j < b.dA; j++) L[i * b.dA + j] = b.eigS[i] * b.eigA[j];
  return L;
}
