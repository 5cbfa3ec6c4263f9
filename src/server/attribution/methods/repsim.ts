// RepSim: cosine of the query's mean-pooled last hidden state with each example's.
import type { Model } from '../../model/engine';
import type { Corpus } from '../explain';
import { candidateHidden } from '../influence';
import type { PoolScorer } from './scorer';

export const repsim: PoolScorer = {
  kind: 'pool',
  scores: async ({ model, corpus, query, signal, pool }) => {
    const all = await repsimScores(model, corpus, query, signal, pool);
    return Float64Array.from(pool, (i) => all[i]);
  },
};

/** Cosine of the query's mean hidden state with each example's (all examples, or those in `pool`); also the retrieval step of `candidates: 'retrieved'`. */
export async function repsimScores(
  model: Model,
  corpus: Corpus,
  query: { ids: number[]; weights: number[] },
  signal?: AbortSignal,
  pool?: number[],
): Promise<Float64Array> {
  const [hq] = await candidateHidden(model, [query]);
  const hs = await corpus.hiddenStates(model, signal);
  const out = new Float64Array(corpus.size);
  for (const i of pool ?? hs.keys()) out[i] = cosineSim(hq, hs[i]);
  return out;
}

function cosineSim(a: Float32Array, b: Float32Array): number {
  let ab = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < a.length; i++) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return aa > 0 && bb > 0 ? ab / Math.sqrt(aa * bb) : 0;
}
