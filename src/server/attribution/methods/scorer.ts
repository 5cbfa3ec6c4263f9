// What a scorer is: how one attribution method turns a query into scores over the pool.
// Two kinds, because the methods compute in two ways:
//  - gradient methods build a query matrix M_l per module; the candidate graph returns
//    ⟨M_l, G_l(z)⟩ for every candidate z of `candidateModel` (influence.ts). explain.ts does the
//    rest for all of them alike: the gradient store, low-rank queries and their exact rerank,
//    the completion-side rows, the training-side token scores, streaming partial results.
//  - pool methods (text, representations) score the pool directly.
// Whether a method's scores are signed comes from the registry (src/protocol/methods.ts).
import type { Floats } from '../../linalg/matrix';
import type { Model } from '../../model/engine';
import type { Preconditioner } from '../ekfac/precondition';
import type { Corpus } from '../explain';
import type { QueryGradients } from '../influence';
import type { ExplainSetup } from '../setup';

export interface GradientScorer {
  readonly kind: 'gradient';
  /**
   * The query matrices (per module, one row per query row of `qg`), and the model whose candidate
   * gradients they meet. With `eigen`, M holds the rows in those factors' eigenbases (`QueryRows`):
   * a scorer may return that when told what it will be scored against (`pool`) and it is cheaper.
   */
  query(
    setup: ExplainSetup,
    qg: QueryGradients,
    /** the candidates' total tokens (each query decides on its own rows, batched or not) */
    pool?: { candidateTokens: number },
  ): { M: Map<string, Floats[]>; candidateModel: Model; eigen?: Map<string, Preconditioner> };
  /**
   * The factors in whose eigenbasis this method's rows can be scored straight from the query's
   * tokens (`eigenTokenRows`: the rows are exactly those of `query` with `eigen`), so that the
   * heatmap passes never hold a row whole. Single-stage EK-FAC only.
   */
  eigenTokens?(setup: ExplainSetup): Map<string, Preconditioner> | undefined;
  /**
   * Divide each score by a query row's norm and a candidate's norm (cosine). A method with a
   * normalization needs every candidate's ‖G(z)‖², so it cannot score from the gradient store.
   */
  /**
   * With training checkpoints in the setup, score Σ_c w_c · score(θ_c): query gradient, factors and
   * candidate gradients all taken at checkpoint c (TracIn, Pruthi et al. 2020). explain.ts sums the
   * terms for every such method alike; a method whose candidates live on another model (multistage)
   * or whose score is not linear in the terms' sum (cosine) leaves it unset.
   */
  readonly overCheckpoints?: boolean;
  readonly normalize?: {
    /** one factor per query row of `qg` */
    query(qg: QueryGradients, rows: number): Float64Array;
    /** from the candidate's Σ_modules ‖G(z)‖² */
    candidate(gradSqNorm: number): number;
  };
}

export interface PoolScorer {
  readonly kind: 'pool';
  /** The score of each pool item (indices into the corpus), in pool order. */
  scores(ctx: PoolContext): Promise<Float64Array>;
}

export interface PoolContext {
  model: Model;
  corpus: Corpus;
  pool: number[];
  /** the query as text (prompt + completion, as rendered for the model) */
  queryText: string;
  query: { ids: number[]; weights: number[] };
  signal?: AbortSignal;
}

export type Scorer = GradientScorer | PoolScorer;
