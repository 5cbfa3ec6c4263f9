// Gradient cosine: ⟨G(q), G(z)⟩ / (‖G(q)‖ ‖G(z)‖), norms over all selected modules together.
import type { GradientScorer } from './scorer';

export const cosine: GradientScorer = {
  kind: 'gradient',
  query: (setup, qg) => ({ M: qg.G, candidateModel: setup.model.model }),
  normalize: {
    query: (qg, rows) => {
      const norm = new Float64Array(rows);
      for (const list of qg.G.values()) for (let r = 0; r < rows; r++) for (const v of list[r]) norm[r] += v * v;
      for (let r = 0; r < rows; r++) norm[r] = Math.sqrt(norm[r]) || 1;
      return norm;
    },
    candidate: (gradSqNorm) => Math.sqrt(gradSqNorm) || 1,
  },
};
