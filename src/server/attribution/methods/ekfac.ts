// EK-FAC influence (Grosse et al. 2023, "Studying Large Language Model Generalization with
// Influence Functions"): M = P(G_q) with the fine-tuned model's factors, met by G(z) of the same model.
import { eigenbasisCheaper, queryMatrices } from '../influence';
import { need } from '../setup';
import type { GradientScorer } from './scorer';

export const ekfac: GradientScorer = {
  kind: 'gradient',
  overCheckpoints: true,
  query: (setup, qg, pool) => {
    const pre = need(setup.model.preconditioners, 'ekfac needs EK-FAC factors for the fine-tuned model', 'factors');
    // ⟨P(G_q), G_z⟩ = ⟨R_q, Q_Sᵀ G_z Q_A⟩: leave the rows in the eigenbasis when rotating the
    // candidates' tokens costs less than rotating every query row back
    const eigen = pool !== undefined && eigenbasisCheaper(pre, qg.tokens.keys(), qg.rows, pool.candidateTokens);
    return {
      M: queryMatrices(qg.tokens, [pre], { eigenbasis: eigen }),
      candidateModel: setup.model.model,
      ...(eigen ? { eigen: pre } : {}),
    };
  },
  eigenTokens: (setup) => setup.model.preconditioners,
};
