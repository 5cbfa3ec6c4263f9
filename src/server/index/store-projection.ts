// How the gradient store compresses a module's gradient G (d_out × d_A): the graph forms
// PSᵀ G PA = Σ_t (PSᵀ g_t)(PAᵀ ã_t)ᵀ (k_S × k_A) per example without the full gradient, the
// store keeps some of its entries (`keep`), and a query matrix M is reduced the same way, so
// that Σ_kept (PSᵀ M PA)_ij (PSᵀ G PA)_ij approximates ⟨M, G⟩.
//
// 'random' (LoGra's random initialisation; Choe et al. 2024, "What is Your Data Worth to
//   GPT? LLM-Scale Data Valuation with Influence Functions"): Gaussian PA, PS of variance
//   1/k, every entry kept. Unbiased for any query, but the EK-FAC query M = P(G_q) lives
//   mostly in the low-curvature directions (amplified by 1/(Λ+λ)) and G(z) mostly in the
//   high-curvature ones, so ⟨M, G⟩ is small against ‖M‖‖G‖ and the estimate is noise.
// 'eigen': PA, PS are columns of the EK-FAC eigenbases Q_A, Q_S (LoGra's PCA
//   initialisation), and the store keeps the eigen-pairs (i, j) that carry the most of the
//   preconditioned score. In the eigenbasis ⟨P(G_q), G⟩ = Σ_ij G̃_q,ij G̃_ij / (Λ_ij + λ), so
//   the truncated sum over the kept pairs is exact on those pairs, and exact in all at full
//   rank. A pair's weight is E_z[G̃_ij²] / (Λ_ij + λ) over a pilot sample of the data
//   being stored (its expected share of the score's spread across examples when queries
//   look like the data), and the pairs are chosen across all modules at once, so the
//   budget goes to the modules and directions that carry the score. Neither the factors'
//   own eigenvalues (a square k × k block per module) nor Λ (fitted with sampled labels)
//   rank the pairs as well: bench/results/2026-12-02-vm-store.md.
import { createHash } from 'node:crypto';
import type { Preconditioner } from '../attribution/ekfac/precondition';
import type { Floats } from '../linalg/matrix';
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

/** The whole eigenbasis of `p` (the pilot pass reads every eigen-pair of its examples). */
export function fullEigenbasis(p: Preconditioner): StoreModule {
  return { name: p.module, dA: p.dA, dOut: p.dOut, kA: p.dA, kS: p.dOut, PA: p.qA, PS: p.qS };
}

/**
 * The `budget` eigen-pairs to keep, as flat indices i·d_A + j per module, ascending: each
 * module's heaviest pair (so that every module's graph input has a shape), then the heaviest
 * of the rest over all modules. `weight` holds each module's E[G̃²] / (Λ + λ) (d_out × d_A).
 */
export function chooseEigenPairs(weight: Map<string, Float64Array>, budget: number): Map<string, Int32Array> {
  if (!(budget >= weight.size)) throw new Error(`the store's budget (${budget}) is below one pair per module`);
  const chosen = new Map<string, number[]>();
  for (const [name, w] of weight) chosen.set(name, [w.reduce((b, v, i) => (v > w[b] ? i : b), 0)]);
  let left = budget - weight.size;
  const rest: number[] = [];
  for (const [name, w] of weight) {
    const first = chosen.get(name)![0];
    for (let i = 0; i < w.length; i++) if (i !== first) rest.push(w[i]);
  }
  if (left >= rest.length) {
    for (const [name, w] of weight) chosen.set(name, Array.from(w.keys()));
  } else if (left > 0) {
    // the left-th largest of the rest: everything above it is kept, ties at it in module order
    const threshold = Float64Array.from(rest).sort()[rest.length - left];
    for (const pass of ['above', 'at'] as const)
      for (const [name, w] of weight) {
        const list = chosen.get(name)!;
        for (let i = 0; i < w.length && left > 0; i++) {
          if (i === list[0]) continue;
          if (pass === 'above' ? w[i] > threshold : w[i] === threshold) {
            list.push(i);
            left--;
          }
        }
      }
  }
  return new Map([...chosen].map(([name, l]) => [name, Int32Array.from(l).sort()]));
}

/** The projections that compute the chosen pairs: the rows and columns they use, and which grid entries to keep. */
export function eigenPairsModule(p: Preconditioner, pairs: Int32Array): StoreModule {
  const { dA, dOut } = p;
  const rows = [...new Set(Array.from(pairs, (x) => Math.floor(x / dA)))].sort((a, b) => a - b);
  const cols = [...new Set(Array.from(pairs, (x) => x % dA))].sort((a, b) => a - b);
  const columnsOf = (Q: Floats, d: number, pick: number[]) => {
    const P = new Float64Array(d * pick.length);
    for (let r = 0; r < d; r++) for (let c = 0; c < pick.length; c++) P[r * pick.length + c] = Q[r * d + pick[c]];
    return P;
  };
  const rowAt = new Map(rows.map((r, i) => [r, i]));
  const colAt = new Map(cols.map((c, i) => [c, i]));
  const keep = Int32Array.from(pairs, (x) => rowAt.get(Math.floor(x / dA))! * cols.length + colAt.get(x % dA)!);
  return {
    name: p.module,
    dA,
    dOut,
    kA: cols.length,
    kS: rows.length,
    PA: columnsOf(p.qA, dA, cols),
    PS: columnsOf(p.qS, dOut, rows),
    keep,
  };
}

/** A content hash of the eigenbases and damped eigenvalues an eigen-projected store is built from. */
export function preconditionerFingerprint(preconditioners: Map<string, Preconditioner>): string {
  const h = createHash('sha256');
  for (const name of [...preconditioners.keys()].sort()) {
    const p = preconditioners.get(name)!;
    h.update(`${name}:${p.dOut}x${p.dA}:${p.damping}\n`);
    for (const a of [p.qA, p.qS, p.inverse]) h.update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  }
  return h.digest('hex').slice(0, 16);
}
