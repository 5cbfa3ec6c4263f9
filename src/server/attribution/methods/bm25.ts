// BM25 (lunr's scoring, our index: index/bm25.ts) of the query's text against each example's text: a text-match baseline.
import type { PoolScorer } from './scorer';

export const bm25: PoolScorer = {
  kind: 'pool',
  scores: async ({ corpus, pool, queryText }) => {
    const all = corpus.bm25Index().scores(queryText);
    return Float64Array.from(pool, (i) => all[i]);
  },
};
