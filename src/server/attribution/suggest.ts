// Which of an explanation's examples to suggest for removal when a completion is wrong.
// Influence functions (Koh & Liang 2017; Grosse et al. 2023) predict, to first order, that
// removing training example z changes the query's log-probability by −score(z)/N, N being the
// number of training examples the Hessian (EK-FAC's Fisher) averages over. An example is
// suggested only when that prediction says its removal lowers the wrong answer's probability by
// a real amount AND it teaches that answer (its text contains it): a correct line that shares the
// answer text but barely moves it ("Ireland … Euro" for a wrong "Switzerland … Euro") is left
// alone, and so is a line that moves the answer without containing it (for a person to judge).
import type { ExplainedExample } from '../../protocol/types';

/** Default minimum predicted drop of log p(wrong answer): 0.1 nat ≈ a 10% lower probability. */
export const MIN_PREDICTED_DROP = 0.1;

export interface FlagSuggestion {
  example: ExplainedExample;
  /** first-order predicted drop of log p(completion | prompt) if this example is removed (nats, > 0) */
  predictedDrop: number;
  /** one line saying why */
  reason: string;
}

export function suggestFlags(
  supporting: ExplainedExample[],
  completion: string,
  trainingExamples: number,
  minDrop = MIN_PREDICTED_DROP,
): FlagSuggestion[] {
  if (!(trainingExamples > 0)) throw new Error(`suggestFlags: trainingExamples must be > 0 (got ${trainingExamples})`);
  const answer = completion.trim();
  if (!answer) throw new Error('suggestFlags: empty completion');
  const out: FlagSuggestion[] = [];
  for (const e of supporting) {
    const predictedDrop = e.score / trainingExamples;
    if (!(e.score > 0) || predictedDrop < minDrop || !e.text.includes(answer)) continue;
    out.push({
      example: e,
      predictedDrop,
      reason:
        `teaches ${JSON.stringify(answer)}; removing it is predicted to lower log p by ${predictedDrop.toFixed(2)} ` +
        `(score ${e.score.toFixed(1)} / ${trainingExamples} examples)`,
    });
  }
  return out;
}
