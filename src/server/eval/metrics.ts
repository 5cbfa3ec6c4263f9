// Retrieval and datamodeling metrics for the evaluation benchmarks (issue: evaluation).
import { spearman } from '../util/stats';

/** Share of the relevant items found in the first k of `ranking` (indices, best first). */
export function recallAtK(ranking: number[], relevant: Set<number>, k: number): number {
  if (!relevant.size) throw new Error('recallAtK: no relevant items');
  let hit = 0;
  for (const i of ranking.slice(0, k)) if (relevant.has(i)) hit++;
  return hit / relevant.size;
}

/** 1 / rank of the first relevant item (0 when none is ranked). */
export function reciprocalRank(ranking: number[], relevant: Set<number>): number {
  const r = ranking.findIndex((i) => relevant.has(i));
  return r < 0 ? 0 : 1 / (r + 1);
}

/** Indices sorted by score, highest first (ties by index, so rankings are deterministic). */
export function rankingOf(scores: ArrayLike<number>): number[] {
  return Array.from({ length: scores.length }, (_, i) => i).sort((a, b) => scores[b] - scores[a] || a - b);
}

/**
 * Linear datamodeling score (Park et al. 2023) for one query: over training subsets S_j, the
 * Spearman correlation between the predicted effect Σ_{z∈S_j} score(z) and the measured
 * −loss of the query after training on S_j (score > 0 = supporting = lowers the loss).
 */
export function lds(scores: ArrayLike<number>, subsets: number[][], losses: number[]): number {
  if (subsets.length !== losses.length) throw new Error('lds: one loss per subset');
  const predicted = subsets.map((s) => s.reduce((a, i) => a + scores[i], 0));
  return spearman(
    predicted,
    losses.map((l) => -l),
  );
}

export function mean(xs: number[]): number {
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : Number.NaN;
}
