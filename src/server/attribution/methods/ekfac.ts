// EK-FAC influence (Grosse et al. 2023, "Studying Large Language Model Generalization with
// Influence Functions"): M = P(G_q) with the fine-tuned model's factors, met by G(z) of the same model.
import { queryMatrices } from '../influence';
import { need } from '../setup';
import type { GradientScorer } from './scorer';

export const ekfac: GradientScorer = {
  kind: 'gradient',
  overCheckpoints: true,
  query: (setup, qg) => ({
    M: queryMatrices(qg.tokens, [
      need(setup.model.preconditioners, 'ekfac needs EK-FAC factors for the fine-tuned model', 'factors'),
    ]),
    candidateModel: setup.model.model,
  }),
};
