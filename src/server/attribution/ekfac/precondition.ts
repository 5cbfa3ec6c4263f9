// Damped EK-FAC inverse (Grosse et al. 2023, eq. 21):
//   P(V) = Q_S [ (Q_Sᵀ V Q_A) ⊘ (Λ + λ) ] Q_Aᵀ,
// with λ = 0.1 · mean(Λ) per module by default, as kronfluence's `damping_factor=None`
// heuristic (HEURISTIC_DAMPING_SCALE = 0.1 times the mean of the averaged lambda matrix).
// Also the low-rank query of Grosse et al. §3.2: P(G_q) ≈ U diag(σ) Vᵀ.
import { type EighBackend, eigh, JS_MAX_N } from '../../linalg/eigh';
import { type Floats, firstNonFinite, gemm, gemm32, precisionOf, toF64, transpose } from '../../linalg/matrix';
import { nativeLapack } from '../../linalg/native';
import { Rng } from '../../util/random';
import { type Eigenbasis, fromEigenbasis, toEigenbasis } from './eigenbasis';

/** λ added to every corrected eigenvalue: `{relative: f}` means f · mean(Λ); `{absolute: x}` means x. */
export type Damping = { relative: number } | { absolute: number };

export const DEFAULT_DAMPING: Damping = { relative: 0.1 };

/** Held in the precision of the model it serves: Float32Array bases and inverse for a float32
 * model, Float64Array for an fp64 one (ground truths). Λ itself is not kept: scoring needs only
 * 1/(Λ+λ), and at the SmolLM-135M shape Λ is 425 MB in float32 (Λ + λ is 1 / inverse). */
export interface Preconditioner extends Eigenbasis {
  /** the resolved λ */
  damping: number;
  /** 1 / (Λ + λ) with Λ the mean corrected eigenvalues (d_out × d_A), elementwise */
  inverse: Floats;
}

export function resolveDamping(lambda: Floats, damping: Damping = DEFAULT_DAMPING): number {
  if ('absolute' in damping) {
    if (!(damping.absolute >= 0)) throw new Error(`damping must be >= 0, got ${damping.absolute}`);
    return damping.absolute;
  }
  if (!(damping.relative >= 0)) throw new Error(`relative damping must be >= 0, got ${damping.relative}`);
  let s = 0;
  for (let i = 0; i < lambda.length; i++) s += lambda[i];
  return damping.relative * (s / lambda.length);
}

/**
 * Builds P for one module from its eigenbasis and mean Λ; the inverse takes Λ's type (computed in
 * fp64). `inPlace`: the inverse overwrites `lambdaMean` (a caller's scratch copy), so that Λ and
 * its inverse are never held together.
 */
export function makePreconditioner(
  basis: Eigenbasis,
  lambdaMean: Floats,
  damping: Damping = DEFAULT_DAMPING,
  { inPlace = false }: { inPlace?: boolean } = {},
): Preconditioner {
  const what = `module ${basis.module} (preconditioner)`;
  if (lambdaMean.length !== basis.dOut * basis.dA) {
    throw new Error(`lambda of ${what}: expected ${basis.dOut}×${basis.dA}, got ${lambdaMean.length} values`);
  }
  const bad = firstNonFinite(lambdaMean);
  if (bad >= 0) throw new Error(`${lambdaMean[bad]} in lambda of ${what}`);
  const lam = resolveDamping(lambdaMean, damping);
  const fresh = () =>
    precisionOf(lambdaMean) === 'fp32' ? new Float32Array(lambdaMean.length) : new Float64Array(lambdaMean.length);
  const inverse = inPlace ? lambdaMean : fresh();
  for (let i = 0; i < inverse.length; i++) {
    const den = lambdaMean[i] + lam;
    // Λ >= 0 by construction, so den == 0 only with zero damping on a direction with no curvature
    if (!(den > 0)) {
      throw new Error(`${what}: Λ + λ = ${den} at entry ${i}; use a positive damping (λ = ${lam})`);
    }
    inverse[i] = 1 / den;
  }
  return { ...basis, damping: lam, inverse };
}

/** (Q_Sᵀ V Q_A) ⊘ (Λ + λ): the preconditioned gradient in the eigenbasis. */
export function preconditionRotated(p: Preconditioner, Vt: Float64Array, inPlace = false): Float64Array {
  const out = inPlace ? Vt : new Float64Array(Vt.length);
  for (let i = 0; i < out.length; i++) out[i] = Vt[i] * p.inverse[i];
  return out;
}

/** A preconditioner's bases and 1/(Λ+λ) in float32: the arrays themselves for a float32
 * preconditioner, else copies made per use and never kept (at the SmolLM-135M shape keeping
 * them beside the fp64 ones cost 1.7 GB of peak memory) */
export interface SinglePrecision {
  qA: Float32Array;
  qS: Float32Array;
  inverse: Float32Array;
}

export function singlePrecision(p: Preconditioner): SinglePrecision {
  const f32 = (x: Floats) => (x instanceof Float32Array ? x : Float32Array.from(x));
  return { qA: f32(p.qA), qS: f32(p.qS), inverse: f32(p.inverse) };
}

/**
 * P(V) in float32 (sgemm), for query rows that a float32 graph consumes: the same four
 * products as `precondition` at about twice the rate and half the memory (at the SmolLM-135M
 * shape one query row costs 780 GFLOP of rotations). The result differs from the fp64 path by
 * float32 rounding only, which feeding it to the float32 graph would add anyway. Pass `f` to
 * share one conversion between several rows of the same module.
 */
export function precondition32(
  p: Preconditioner,
  V: Float32Array,
  f: SinglePrecision = singlePrecision(p),
  /** false: return R = (Q_Sᵀ V Q_A) ⊘ (Λ+λ), left in the eigenbasis (see `rotateBack32`) */
  back = true,
): Float32Array {
  if (V.length !== p.dOut * p.dA)
    throw new Error(`precondition32: expected a ${p.dOut}×${p.dA} matrix (${p.dOut * p.dA} values), got ${V.length}`);
  // Q_Sᵀ V Q_A, scaled by 1/(Λ+λ), then Q_S (·) Q_Aᵀ
  const T = gemm32(f.qS, V, p.dOut, p.dOut, p.dA, { transA: true });
  const R = gemm32(T, f.qA, p.dOut, p.dA, p.dA);
  for (let i = 0; i < R.length; i++) R[i] *= f.inverse[i];
  return back ? rotateBack32(p, R, f) : R;
}

/** P(V) for a d_out × d_A matrix V, in fp64 (a float32 preconditioner is widened per call). */
export function precondition(p: Preconditioner, V: Floats): Float64Array {
  const Vt = toEigenbasis(p, V);
  return fromEigenbasis(p, preconditionRotated(p, Vt, true));
}

/** M ≈ Σ_i σ_i u_i v_iᵀ with σ descending. */
export interface LowRank {
  rank: number;
  dOut: number;
  dA: number;
  /** d_out × rank row-major; column i = u_i */
  u: Float64Array;
  sigma: Float64Array;
  /** d_A × rank row-major; column i = v_i */
  v: Float64Array;
}

export interface LowRankOptions {
  /** 'gram': eigh of MᵀM or MMᵀ (exact); 'randomized': subspace iteration (Halko et al. 2011,
   * as torch.svd_lowrank in kronfluence). 'auto': gram when min(d_out, d_A) <= 256 or rank
   * is most of it, else randomized. */
  method?: 'auto' | 'gram' | 'randomized';
  /** randomized: power iterations (default 2) and oversampling (default 10) */
  powerIterations?: number;
  oversample?: number;
  seed?: number;
  backend?: EighBackend;
}

/** Rank-r SVD of M (d_out × d_A). A rank >= min(d_out, d_A) reproduces M exactly. */
export function lowRank(M: Floats, dOut: number, dA: number, rank: number, o: LowRankOptions = {}): LowRank {
  if (M.length !== dOut * dA) throw new Error(`lowRank: expected ${dOut}×${dA}, got ${M.length} values`);
  if (!(rank >= 1)) throw new Error(`lowRank: rank must be >= 1, got ${rank}`);
  const m = toF64(M);
  const small = Math.min(dOut, dA);
  const r = Math.min(rank, small);
  let method = o.method ?? 'auto';
  if (method === 'auto') method = small <= 256 || 2 * r >= small ? 'gram' : 'randomized';
  if (method === 'gram' && small > JS_MAX_N && !nativeLapack()) method = 'randomized';
  return method === 'gram' ? gramSvd(m, dOut, dA, r, o.backend) : randomizedSvd(m, dOut, dA, r, o);
}

/** Dense U diag(σ) Vᵀ. */
export function lowRankToDense(f: LowRank): Float64Array {
  const US = Float64Array.from(f.u);
  for (let i = 0; i < f.dOut; i++) for (let k = 0; k < f.rank; k++) US[i * f.rank + k] *= f.sigma[k];
  return gemm(US, f.v, f.dOut, f.rank, f.dA, { transB: true });
}

function gramSvd(M: Float64Array, dOut: number, dA: number, r: number, backend?: EighBackend): LowRank {
  // Work with the smaller Gram matrix; its top eigenvectors are the right (or left) singular vectors.
  const right = dA <= dOut;
  const n = right ? dA : dOut;
  const G = right ? gemm(M, M, dA, dOut, dA, { transA: true }) : gemm(M, M, dOut, dA, dOut, { transB: true });
  const { values, vectors } = eigh(G, n, { label: 'Gram matrix of the preconditioned query (low-rank SVD)', backend });
  // top-r columns, descending
  const W = new Float64Array(n * r);
  const sigma = new Float64Array(r);
  for (let k = 0; k < r; k++) {
    const j = n - 1 - k;
    sigma[k] = Math.sqrt(Math.max(values[j], 0));
    for (let i = 0; i < n; i++) W[i * r + k] = vectors[i * n + j];
  }
  // The other side is M v / σ (or Mᵀ u / σ); σ u = M v holds even for tiny σ, so a full-rank
  // result reproduces M. Exactly zero σ leaves a zero column.
  const other = right ? gemm(M, W, dOut, dA, r) : gemm(M, W, dA, dOut, r, { transA: true });
  const m = right ? dOut : dA;
  for (let k = 0; k < r; k++) {
    const inv = sigma[k] > 0 ? 1 / sigma[k] : 0;
    for (let i = 0; i < m; i++) other[i * r + k] *= inv;
  }
  return right ? { rank: r, dOut, dA, u: other, sigma, v: W } : { rank: r, dOut, dA, u: W, sigma, v: other };
}

function randomizedSvd(M: Float64Array, dOut: number, dA: number, r: number, o: LowRankOptions): LowRank {
  const k = Math.min(r + (o.oversample ?? 10), Math.min(dOut, dA));
  const rng = new Rng(o.seed ?? 0x5eed);
  const Omega = new Float64Array(k * dA);
  for (let i = 0; i < Omega.length; i++) Omega[i] = rng.normal();
  // rows of Qt span the range of M (as row vectors of length d_out)
  let Qt = orthonormalRows(gemm(Omega, M, k, dA, dOut, { transB: true }), k, dOut);
  for (let it = 0; it < (o.powerIterations ?? 2); it++) {
    const Z = orthonormalRows(gemm(Qt, M, k, dOut, dA), k, dA);
    Qt = orthonormalRows(gemm(Z, M, k, dA, dOut, { transB: true }), k, dOut);
  }
  // B = Qᵀ M (k × d_A); SVD of the small B via eigh of B Bᵀ (k × k)
  const B = gemm(Qt, M, k, dOut, dA);
  const { values, vectors } = eigh(gemm(B, B, k, dA, k, { transB: true }), k, {
    label: 'projected preconditioned query (randomized low-rank SVD)',
    backend: o.backend,
  });
  const Wt = new Float64Array(r * k); // row i = i-th top eigenvector of B Bᵀ
  const sigma = new Float64Array(r);
  for (let i = 0; i < r; i++) {
    const j = k - 1 - i;
    sigma[i] = Math.sqrt(Math.max(values[j], 0));
    for (let c = 0; c < k; c++) Wt[i * k + c] = vectors[c * k + j];
  }
  const Ut = gemm(Wt, Qt, r, k, dOut); // u_i = Q w_i
  const Vt = gemm(Wt, B, r, k, dA); // σ_i v_i = Bᵀ w_i
  for (let i = 0; i < r; i++) {
    const inv = sigma[i] > 0 ? 1 / sigma[i] : 0;
    for (let c = 0; c < dA; c++) Vt[i * dA + c] *= inv;
  }
  return { rank: r, dOut, dA, u: transpose(Ut, r, dOut), sigma, v: transpose(Vt, r, dA) };
}

/** Modified Gram-Schmidt, run twice for stability; near-zero rows become 0. */
function orthonormalRows(Y: Float64Array, k: number, n: number): Float64Array {
  for (let pass = 0; pass < 2; pass++) {
    for (let i = 0; i < k; i++) {
      const ri = i * n;
      for (let j = 0; j < i; j++) {
        const rj = j * n;
        let d = 0;
        for (let c = 0; c < n; c++) d += Y[ri + c] * Y[rj + c];
        for (let c = 0; c < n; c++) Y[ri + c] -= d * Y[rj + c];
      }
      let s = 0;
      for (let c = 0; c < n; c++) s += Y[ri + c] * Y[ri + c];
      const inv = s > 1e-300 ? 1 / Math.sqrt(s) : 0;
      for (let c = 0; c < n; c++) Y[ri + c] *= inv;
    }
  }
  return Y;
}

/**
 * One module's query gradients as tokens: row r's gradient is G_r = g_rᵀ ã (d_out × d_A) with
 * ã = a[src[r]]. A query has few tokens T, so the full G need not be formed: the rotation into
 * the eigenbasis works from the tokens (see `preconditionTokens`).
 */
export interface TokenRows {
  dOut: number;
  dA: number;
  /** per forward pass: ã, T × d_A row-major (the bias column 1 appended where the module has one) */
  a: Floats[];
  /** per row: g, T_r × d_out row-major, T_r ≤ the T of its forward (ã's first T_r rows meet it) */
  g: Floats[];
  /** per row: its forward's index into `a` (several rows can share one forward) */
  src: number[];
}

/** T_r of every row and T of every forward, after checking the shapes against d_out × d_A. */
function tokenCounts(t: TokenRows, dOut: number, dA: number, what: string) {
  if (t.dOut !== dOut || t.dA !== dA)
    throw new Error(`${what}: tokens of a ${t.dOut}×${t.dA} module, preconditioner is ${dOut}×${dA}`);
  if (t.src.length !== t.g.length) throw new Error(`${what}: ${t.g.length} gradient rows, ${t.src.length} sources`);
  const forward = t.a.map((a, s) => {
    if (!a || a.length % dA !== 0 || a.length === 0)
      throw new Error(`${what}: activations of forward ${s} are not T × ${dA} (${a?.length} values)`);
    return a.length / dA;
  });
  const rows = t.g.map((g, r) => {
    const s = t.src[r];
    if (!(s >= 0 && s < t.a.length)) throw new Error(`${what}: row ${r} names forward ${s} of ${t.a.length}`);
    if (g.length % dOut !== 0 || g.length === 0 || g.length / dOut > forward[s])
      throw new Error(`${what}: row ${r} has ${g.length} gradient values, not T_r × ${dOut} with T_r <= ${forward[s]}`);
    return g.length / dOut;
  });
  return { rows, forward };
}

/**
 * Whether rotating from the tokens beats forming G: (g Q_S)ᵀ (ã Q_A) costs T_r·d_out·(d_out + d_A)
 * per row plus T·d_A² per forward, against T_r·d_out·d_A + d_out·d_A·(d_out + d_A) per row.
 */
function viaTokens(dOut: number, dA: number, rows: number[], src: number[], forward: number[]): boolean {
  let tokens = 0;
  let direct = 0;
  for (const T of rows) {
    tokens += T * dOut * (dOut + dA);
    direct += T * dOut * dA + dOut * dA * (dOut + dA);
  }
  for (const s of new Set(src)) tokens += forward[s] * dA * dA;
  return tokens < direct;
}

/** ã Q_A of forward s, computed on first use and shared by the rows of that forward. */
function activationsRotated32(t: TokenRows, f: SinglePrecision, forward: number[], dA: number) {
  const done = new Map<number, Float32Array>();
  return (s: number): Float32Array => {
    let xq = done.get(s);
    if (!xq) {
      const a = t.a[s];
      if (!(a instanceof Float32Array)) throw new Error('activations must be float32');
      xq = gemm32(a, f.qA, forward[s], dA, dA);
      done.set(s, xq);
    }
    return xq;
  };
}

/**
 * P(G_r) for every row of `t` in float32 (sgemm), as `precondition32` of the dense G_r but
 * starting from the tokens: Q_Sᵀ G_r Q_A = (g_r Q_S)ᵀ (ã Q_A) when that is cheaper (at T = 32
 * and a 2048 × 513 module, 15× fewer flops), ã Q_A shared by the rows of one forward. The back
 * rotation is as before (one product over all rows at once measured no faster, and held a second
 * copy of every row). Returns the rows back to back in one buffer, d_out × d_A each.
 */
export function preconditionTokens32(
  p: Preconditioner,
  t: TokenRows,
  f: SinglePrecision = singlePrecision(p),
  /** false: return R = (Q_Sᵀ G_r Q_A) ⊘ (Λ+λ), left in the eigenbasis (see `rotateBack32`) */
  back = true,
): Float32Array {
  const { dOut, dA } = p;
  const { rows, forward } = tokenCounts(t, dOut, dA, `preconditionTokens32 (module ${p.module})`);
  const f32 = (x: Floats, what: string) => {
    if (!(x instanceof Float32Array)) throw new Error(`preconditionTokens32: ${what} must be float32`);
    return x;
  };
  const size = dOut * dA;
  const out = new Float32Array(rows.length * size);
  const tokens = viaTokens(dOut, dA, rows, t.src, forward);
  const rotatedA = activationsRotated32(t, f, forward, dA);
  // Left in the eigenbasis, each row is rotated straight into its place in `out`; rotated back,
  // one scratch serves every row. Either way no fresh d_out × d_A array per row: at the
  // SmolLM-135M shape those were ~0.4 GB of new (page-faulted, zeroed) memory per query row.
  const scratch = back ? new Float32Array(size) : undefined;
  const scratchU = back ? new Float32Array(size) : undefined;
  const inverse = f.inverse;
  for (const [r, T] of rows.entries()) {
    const s = t.src[r];
    const a = f32(t.a[s], 'activations');
    const g = f32(t.g[r], 'output gradients');
    const rot = scratch ?? out.subarray(r * size, (r + 1) * size);
    if (tokens) {
      gemm32(gemm32(g, f.qS, T, dOut, dOut), rotatedA(s), dOut, T, dA, { transA: true, out: rot });
    } else {
      const G = gemm32(g, a, dOut, T, dA, { transA: true });
      gemm32(gemm32(f.qS, G, dOut, dOut, dA, { transA: true }), f.qA, dOut, dA, dA, { out: rot });
    }
    scaleInPlace(rot, inverse);
    if (scratch) rotateBack32(p, scratch, f, out.subarray(r * size, (r + 1) * size), scratchU);
  }
  return out;
}

/**
 * The rows of `t` rotated into the eigenbasis as tokens, for a score graph that contracts the
 * candidates with R_r = (g_r Q_S)ᵀ (ã Q_A) ⊘ (Λ+λ) without forming it (`GraphRequest.eigenbasisTokens`):
 * `gs` [rows, T, d_out] = g_r Q_S, each row zero-padded to T = the longest T_r (a zero gradient
 * token adds nothing), and `as` [T, d_A] = the first T rows of ã Q_A, which every row shares: the
 * rows must come from one forward (one query's rows differ only in their loss weights). Σ_r
 * T·d_out + T·d_A floats instead of the rows' rows·d_out·d_A (at Qwen2.5-0.5B, 1.4 GB per row
 * over all modules).
 */
export function rotatedTokens32(
  p: Preconditioner,
  t: TokenRows,
  f: SinglePrecision = singlePrecision(p),
): { T: number; gs: Float32Array; as: Float32Array } {
  const { dOut, dA } = p;
  const { rows, forward } = tokenCounts(t, dOut, dA, `rotatedTokens32 (module ${p.module})`);
  const sources = new Set(t.src);
  if (sources.size !== 1)
    throw new Error(
      `rotatedTokens32 (module ${p.module}): the rows come from ${sources.size} forwards; they must share one`,
    );
  const T = Math.max(1, ...rows);
  const gs = new Float32Array(rows.length * T * dOut);
  const xq = activationsRotated32(t, f, forward, dA)(t.src[0]);
  for (const [r, Tr] of rows.entries()) {
    const g = t.g[r];
    if (!(g instanceof Float32Array)) throw new Error('rotatedTokens32: output gradients must be float32');
    gemm32(g, f.qS, Tr, dOut, dOut, { out: gs.subarray(r * T * dOut, (r * T + Tr) * dOut) });
  }
  return { T, gs, as: xq.slice(0, T * dA) };
}

/**
 * Q_S R Q_Aᵀ in float32: a row of `preconditionTokens32(…, back = false)` turned into P(G_r).
 * `scratch` (d_out × d_A) holds Q_S R: a caller rotating many rows passes one, instead of a fresh
 * array per row (at SmolLM-135M, 8 query rows made 2.7 GB of such garbage, and 3.3 s of the 21 s
 * preconditioning went to collecting it).
 */
export function rotateBack32(
  p: Preconditioner,
  R: Float32Array,
  f: SinglePrecision = singlePrecision(p),
  out?: Float32Array,
  scratch?: Float32Array,
): Float32Array {
  const { dOut, dA } = p;
  if (R.length !== dOut * dA) throw new Error(`rotateBack32: expected ${dOut}×${dA} values, got ${R.length}`);
  if (scratch && scratch.length < dOut * dA)
    throw new Error(`rotateBack32: scratch holds ${scratch.length} values, needs ${dOut}×${dA}`);
  const U = gemm32(f.qS, R, dOut, dOut, dA, { out: scratch?.subarray(0, dOut * dA) });
  return gemm32(U, f.qA, dOut, dA, dA, { transB: true, out });
}

/** x ⊙= s, elementwise, unrolled by four (1.57 → 1.14 ns a value on the Xeon host; V8 does not vectorize it) */
function scaleInPlace(x: Float32Array, s: Float32Array): void {
  const n = x.length;
  let i = 0;
  for (; i + 3 < n; i += 4) {
    x[i] *= s[i];
    x[i + 1] *= s[i + 1];
    x[i + 2] *= s[i + 2];
    x[i + 3] *= s[i + 3];
  }
  for (; i < n; i++) x[i] *= s[i];
}

/** `preconditionTokens32` in fp64 (fp64 graphs: ground truths, finite-difference checks). */
export function preconditionTokens(p: Preconditioner, t: TokenRows, back = true): Float64Array {
  const { dOut, dA } = p;
  const { rows, forward } = tokenCounts(t, dOut, dA, `preconditionTokens (module ${p.module})`);
  const size = dOut * dA;
  const out = new Float64Array(rows.length * size);
  const tokens = viaTokens(dOut, dA, rows, t.src, forward);
  // a float32 preconditioner serving an fp64 graph is widened once per call
  const qA = toF64(p.qA);
  const qS = toF64(p.qS);
  const aq = new Map<number, Float64Array>();
  for (const [r, T] of rows.entries()) {
    const s = t.src[r];
    const a = toF64(t.a[s]);
    const g = toF64(t.g[r]);
    let rot: Float64Array;
    if (tokens) {
      let xq = aq.get(s);
      if (!xq) {
        xq = gemm(a, qA, forward[s], dA, dA);
        aq.set(s, xq);
      }
      rot = gemm(gemm(g, qS, T, dOut, dOut), xq, dOut, T, dA, { transA: true });
    } else rot = toEigenbasis(p, gemm(g, a, dOut, T, dA, { transA: true }));
    preconditionRotated(p, rot, true);
    if (!back) {
      out.set(rot, r * size);
      continue;
    }
    const U = gemm(qS, rot, dOut, dOut, dA);
    gemm(U, qA, dOut, dA, dA, { transB: true, out: out.subarray(r * size, (r + 1) * size) });
  }
  return out;
}
