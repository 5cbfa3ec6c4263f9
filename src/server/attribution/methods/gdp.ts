// Gradient dot product: ⟨G(q), G(z)⟩, influence with an identity Hessian.
import type { GradientScorer } from './scorer';

export const gdp: GradientScorer = {
  kind: 'gradient',
  overCheckpoints: true,
  query: (setup, qg) => ({ M: qg.G, candidateModel: setup.model.model }),
};
