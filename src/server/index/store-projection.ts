// How the gradient store compresses a module's gradient G (d_out × d_A): it keeps PSᵀ G PA
// (k_S × k_A) per example, and reduces a query matrix M to QSᵀ M QA; then
// ⟨QSᵀ M QA, PSᵀ G PA⟩ = tr(Mᵀ (QS PSᵀ) G (PA QAᵀ)) is an unbiased estimate of ⟨M, G⟩ when
// E[QS PSᵀ] = E[PA QAᵀ] = I (with the two sides drawn independently).
//
// 'random' (LoGra's random initialisation; Choe et al. 2024, "What is Your Data Worth to
//   GPT?"): Gaussian PA = QA, PS = QS. Unbiased, but the EK-FAC query M = P(G_q) lives mostly
//   in the low-curvature directions (amplified by 1/(Λ+λ)) and G(z) mostly in the
//   high-curvature ones, so ⟨M, G⟩ is small against ‖M‖‖G‖ and the estimate is noise
//   (whole-set Spearman 0.23 with exact EK-FAC at k = 16).
// 'eigen': the projections start from the factors' eigenbases (LoGra's PCA initialisation)
//   and whiten: with Λ_ij + λ ≈ u_i v_j (a separable fit of the damped EK-FAC eigenvalues),
//     PS = Q_S diag(u)^(-1/2) R_S,   QS = Q_S diag(u)^(1/2) R_S   (and likewise for A),
//   so both sides are stored in the coordinates where the preconditioned inner product is
//   the plain one and the projection's error is balanced between query and example. R is a
//   random matrix with orthonormal columns scaled by √(d/k), so E[R Rᵀ] = I: the estimate
//   stays unbiased for any query, and exact when k equals the dimension.
import { createHash } from 'node:crypto';
import type { Preconditioner } from '../attribution/ekfac/precondition';
import type { Rng } from '../util/random';
import type { StoreModule } from './gradient-store';

export type StoreProjection = 'random' | 'eigen';

/** Gaussian projections of variance 1/k; a side no wider than k is kept exact. */
export function randomProjection(name: string, dA: number, dOut: number, k: number, rng: Rng): StoreModule {
  const side = (d: number) => {
    const kk = Math.min(k, d);
    const P = new Float64Array(d * kk);
    if (kk === d) for (let i = 0; i < d; i++) P[i * d + i] = 1;
    else for (let i = 0; i < P.length; i++) P[i] = rng.normal() / Math.sqrt(kk);
    return { k: kk, P };
  };
  const a = side(dA);
  const s = side(dOut);
  return { name, dA, dOut, kA: a.k, kS: s.k, PA: a.P, PS: s.P };
}

/** Whitened projections in the EK-FAC eigenbasis of `p` (see the top of this file). */
export function eigenProjection(name: string, p: Preconditioner, k: number, rng: Rng): StoreModule {
  const { dA, dOut } = p;
  // log(Λ + λ) ≈ α_i + β_j (least squares: row and column means), so u = e^α, v = e^β
  const logW = new Float64Array(dOut * dA);
  for (let i = 0; i < logW.length; i++) logW[i] = -Math.log(p.inverse[i]);
  const alpha = new Float64Array(dOut);
  const beta = new Float64Array(dA);
  let mu = 0;
  for (let i = 0; i < dOut; i++)
    for (let j = 0; j < dA; j++) {
      const v = logW[i * dA + j];
      alpha[i] += v / dA;
      beta[j] += v / dOut;
      mu += v / (dOut * dA);
    }
  for (let i = 0; i < dOut; i++) alpha[i] -= mu / 2;
  for (let j = 0; j < dA; j++) beta[j] -= mu / 2;
  const side = (Q: Float64Array, logScale: Float64Array, d: number) => {
    const kk = Math.min(k, d);
    const R = orthonormalColumns(d, kk, rng);
    const P = new Float64Array(d * kk); // example side: Q diag(e^(-s/2)) R
    const Qq = new Float64Array(d * kk); // query side: Q diag(e^(s/2)) R
    for (let r = 0; r < d; r++)
      for (let e = 0; e < d; e++) {
        const q = Q[r * d + e];
        if (q === 0) continue;
        const down = q * Math.exp(-logScale[e] / 2);
        const up = q * Math.exp(logScale[e] / 2);
        for (let c = 0; c < kk; c++) {
          const x = R[e * kk + c];
          P[r * kk + c] += down * x;
          Qq[r * kk + c] += up * x;
        }
      }
    return { k: kk, P, Q: Qq };
  };
  const a = side(p.qA, beta, dA);
  const s = side(p.qS, alpha, dOut);
  return { name, dA, dOut, kA: a.k, kS: s.k, PA: a.P, PS: s.P, QA: a.Q, QS: s.Q };
}

/** d × k with orthonormal columns scaled by √(d/k) (Gram-Schmidt of a Gaussian matrix); the identity when k = d. */
function orthonormalColumns(d: number, k: number, rng: Rng): Float64Array {
  const R = new Float64Array(d * k);
  if (k === d) {
    for (let i = 0; i < d; i++) R[i * d + i] = 1;
    return R;
  }
  const cols: Float64Array[] = [];
  for (let c = 0; c < k; c++) {
    for (;;) {
      const v = new Float64Array(d);
      for (let i = 0; i < d; i++) v[i] = rng.normal();
      for (let pass = 0; pass < 2; pass++)
        for (const u of cols) {
          let dot = 0;
          for (let i = 0; i < d; i++) dot += u[i] * v[i];
          for (let i = 0; i < d; i++) v[i] -= dot * u[i];
        }
      let n = 0;
      for (let i = 0; i < d; i++) n += v[i] * v[i];
      if (n < 1e-12) continue;
      const inv = 1 / Math.sqrt(n);
      for (let i = 0; i < d; i++) v[i] *= inv;
      cols.push(v);
      break;
    }
  }
  const scale = Math.sqrt(d / k);
  for (let c = 0; c < k; c++) for (let i = 0; i < d; i++) R[i * k + c] = cols[c][i] * scale;
  return R;
}

/** A content hash of the eigenbases and damped eigenvalues an eigen-projected store is built from. */
export function preconditionerFingerprint(preconditioners: Map<string, Preconditioner>): string {
  const h = createHash('sha256');
  for (const name of [...preconditioners.keys()].sort()) {
    const p = preconditioners.get(name)!;
    h.update(`${name}:${p.dOut}x${p.dA}:${p.damping}\n`);
    for (const a of [p.qA, p.qS, p.lambda]) h.update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  }
  return h.digest('hex').slice(0, 16);
}
