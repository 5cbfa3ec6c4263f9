// `--checkpoints auto|off|<dir>[,<dir>]` for fit, explain, scan and serve: which training
// checkpoints influence is summed over (model/checkpoints.ts), and the line that says so.
import { type OpenedCheckpoints, openCheckpointStages } from '../attribution/checkpoints';
import type { Damping } from '../attribution/ekfac/precondition';
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
export function cliPlan(modelDir: string, model: Model, setting: CheckpointsSetting): CheckpointPlan | undefined {
  const plan = planCheckpoints(modelDir, model.checkpoint, setting);
  if (plan) process.stderr.write(`${describePlan(plan)}\n`);
  return plan;
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
      `${opened.unfitted.join(', ')} ${opened.unfitted.length === 1 ? 'has' : 'have'} no EK-FAC factors yet; ` +
        `fit them with: influence-lens fit --model ${o.model} --data <train.jsonl> --out ${o.factorsDir ?? '<factors-dir>'} ` +
        '(fits every checkpoint too), or pass --checkpoints off',
    );
  return opened;
}
