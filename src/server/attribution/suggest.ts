// Which of an explanation's examples to suggest for removal when a completion is wrong.
// An example is suggested only when it teaches that answer (its text contains it) AND its score
// is a real share of the strongest supporting example's: a correct line that shares the answer
// text but barely moves it ("Ireland … Euro" for a wrong "Switzerland … Euro") is left alone, and
// so is a line that moves the answer without containing it (for a person to judge).
//
// The rule is relative on purpose. To first order (Koh & Liang 2017; Grosse et al. 2023) removing
// example z changes the query's log-probability by −score(z)/N, but that size is not calibrated:
// retraining the embedded default without single examples moved log p tens to thousands of times
// less than score/N (an independent review with `influence-lens retrain`; duplicated facts make a
// single removal nearly free, and the damped, unconverged fit is not the Hessian the formula
// assumes). Scores rank examples well; ratios between them are what the rule uses.
import type { ExplainedExample } from '../../protocol/types';

/** Default minimum share of the strongest supporting example's score: a tenth. */
export const MIN_SHARE = 0.1;

export interface FlagSuggestion {
  example: ExplainedExample;
  /** its score over the strongest supporting example's (in (0, 1]) */
  share: number;
  /** one line saying why */
  reason: string;
}

export function suggestFlags(
  supporting: ExplainedExample[],
  completion: string,
  minShare = MIN_SHARE,
): FlagSuggestion[] {
  const answer = completion.trim();
  if (!answer) throw new Error('suggestFlags: empty completion');
  const strongest = Math.max(0, ...supporting.map((e) => e.score).filter(Number.isFinite));
  if (!(strongest > 0)) return [];
  const out: FlagSuggestion[] = [];
  for (const e of supporting) {
    const share = e.score / strongest;
    if (!(e.score > 0) || share < minShare || !e.text.includes(answer)) continue;
    out.push({
      example: e,
      share,
      reason:
        `teaches ${JSON.stringify(answer)}; its score ${e.score.toFixed(1)} is ${(100 * share).toFixed(0)}% of the strongest ` +
        `supporting example's (suggested from ${(100 * minShare).toFixed(0)}%)`,
    });
  }
  return out;
}
