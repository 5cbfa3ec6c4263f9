// `--checkpoints auto|off|<dir>[,<dir>]` for fit, explain, scan and serve: which training
// checkpoints influence is summed over (model/checkpoints.ts), and the line that says so.
import { methodInfo } from '../../protocol/methods';
import { type OpenedCheckpoints, openCheckpointStages } from '../attribution/checkpoints';
import type { Damping } from '../attribution/ekfac/precondition';
import { SCORERS } from '../attribution/methods';
import { trainingArgument } from '../data/training';
import {
  type CheckpointPlan,
  type CheckpointsSetting,
  parseCheckpointsSetting,
  planCheckpoints,
} from '../model/checkpoints';
import type { EngineOptions, Model, ModuleSelection } from '../model/engine';
import { DEFAULTS } from '../settings';
import { CliError } from './util';

export const CHECKPOINTS_OPTION = { checkpoints: { type: 'string' } } as const;

export function checkpointsSetting(v: string | undefined): CheckpointsSetting {
  return parseCheckpointsSetting(v ?? DEFAULTS.checkpoints);
}

/** The plan for `--model`, and one line on stderr naming the checkpoints and their weights. */
export function cliPlan(
  modelDir: string,
  model: Model,
  setting: CheckpointsSetting,
  /** the methods asked for (explain): the line names the checkpoints only if one of them sums over them */
  methods?: readonly string[],
): CheckpointPlan | undefined {
  const plan = planCheckpoints(modelDir, model.checkpoint, setting);
  if (plan && methods && !methods.some(sumsOverCheckpoints)) {
    // BM25 reads the text alone: no model to speak of
    const modelled = methods.filter((m) => methodInfo(m)?.usesModel !== false);
    if (modelled.length)
      process.stderr.write(
        `${plan.checkpoints.length} training checkpoint(s) found; ${modelled.join(', ')} ${modelled.length === 1 ? 'scores' : 'score'} the final model alone\n`,
      );
  } else if (plan) process.stderr.write(`${describePlan(plan)}\n`);
  return plan;
}

/** Whether a method's scores are summed over the training checkpoints (the others score the final model). */
export function sumsOverCheckpoints(m: string): boolean {
  const s = (SCORERS as Record<string, (typeof SCORERS)[keyof typeof SCORERS] | undefined>)[m];
  return s?.kind === 'gradient' && !!s.overCheckpoints;
}

export function describePlan(plan: CheckpointPlan): string {
  const list = plan.checkpoints
    .map(
      (c, i) =>
        `${c.name} ×${plan.weights[i].toFixed(3)}${c.learningRate !== undefined ? ` (lr ${c.learningRate.toExponential(2)})` : ''}`,
    )
    .join(', ');
  return (
    `summing over ${plan.checkpoints.length} training checkpoint(s), ${plan.weighting === 'learning-rate' ? 'weighted by learning rate' : 'weighed equally'}: ${list}` +
    (plan.note ? ` (${plan.note})` : '') +
    '; --checkpoints off scores the final model alone'
  );
}

/** The checkpoints opened with their factors; refuses when factors are needed and some are not fitted. */
export function cliCheckpointStages(
  plan: CheckpointPlan,
  o: {
    factorsDir?: string;
    damping?: Damping;
    engine?: EngineOptions;
    modules: ModuleSelection;
    needFactors: boolean;
    model: string;
  },
): OpenedCheckpoints {
  const opened = openCheckpointStages(plan, o);
  if (o.needFactors && opened.unfitted.length)
    throw new CliError(
      `${opened.unfitted.join(', ')} ${opened.unfitted.length === 1 ? 'has' : 'have'} no EK-FAC factors yet (or factors fitted under another training convention or over other modules); ` +
        `fit them with: influence-lens fit --model ${o.model} --data <train.jsonl> --out ${o.factorsDir ?? '<factors-dir>'}` +
        `${o.engine?.training ? ` ${trainingArgument(o.engine.training)}` : ''} (fits every checkpoint too), or pass --checkpoints off`,
    );
  return opened;
}
