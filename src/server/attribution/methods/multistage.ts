// Multi-stage influence ("Multi-Stage Influence Function", Chen et al. 2020; with EK-FAC, "Scalable
// Multi-Stage Influence Function for Large Language Models via Eigenvalue-Corrected
// Kronecker-Factored Parameterization", Bao et al. 2025, eq. 12): the fine-tuned model's query
// gradient, preconditioned by both stages' factors, met by the pre-trained model's candidate
// gradients. As in that paper, the proximity strength α is the fine-tuned damping and the
// constant α in front of the score is dropped (README, "The score").
import { queryMatrices } from '../influence';
import { checkSameModules } from '../multistage-regime';
import { ExplainError, need } from '../setup';
import type { GradientScorer } from './scorer';

export const multistage: GradientScorer = {
  kind: 'gradient',
  query: (setup, qg) => {
    if (!setup.pretrained)
      throw new ExplainError('multistage needs the pre-trained model and its EK-FAC factors', 'pretrained');
    const pt = need(
      setup.pretrained.preconditioners,
      'multistage needs EK-FAC factors fitted on the pre-trained model',
      'pretrained',
    );
    const ft = need(
      setup.model.preconditioners,
      'multistage needs EK-FAC factors fitted on the fine-tuned model',
      'factors',
    );
    // before any scoring: a pair of other modules fails inside the preconditioning otherwise
    checkSameModules(setup.model.model, setup.pretrained.model, setup.modules);
    // ⟨P_ft(G_q), P_pt(G_z)⟩ = ⟨P_pt(P_ft(G_q)), G_z⟩ since P_pt is symmetric
    return { M: queryMatrices(qg.tokens, [ft, pt]), candidateModel: setup.pretrained.model };
  },
};
