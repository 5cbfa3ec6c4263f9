// The fine-tune's training checkpoints as scoring stages: each opened with the final model's
// tokenizer and with its own EK-FAC factors. A checkpoint's factors live under the final
// model's factors folder, named by the checkpoint's content fingerprint:
//   <factors>/checkpoints/<name>-<model fingerprint>/
// so a retrained run (new weights under the same checkpoint-<step> name) never meets the old
// run's factors, and `fit` (runFitJob) refuses factors of other data instead of reusing them.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { CheckpointPlan, TrainingCheckpoint } from '../model/checkpoints';
import { type EngineOptions, Model, type ModuleSelection } from '../model/engine';
import { OUR_ARGUMENTS_FILE } from './ekfac/factors-io';
import type { Damping } from './ekfac/precondition';
import { modelFingerprint } from './fingerprint';
import type { TokenizedExample } from './fit';
import { type FitJobOptions, type FitJobResult, runFitJob } from './fit-job';
import { selfInfluenceScores } from './influence';
import { type CheckpointStages, ExplainError, type Stage } from './setup';
import { type OpenedStage, openStage, TrainingMismatchError } from './stage';

/**
 * Where checkpoint `ck`'s factors are (or will be) for the final model's factors folder
 * `factorsDir`; `cacheDir` is where weight digests are remembered (the configured cache folder).
 */
export function checkpointFactorsDir(factorsDir: string, ck: TrainingCheckpoint, cacheDir?: string): string {
  return join(factorsDir, 'checkpoints', `${ck.name}-${modelFingerprint(ck.checkpoint, cacheDir)}`);
}

export interface OpenedCheckpoints extends CheckpointStages {
  /** checkpoints whose factors are not fitted yet (their stages have no preconditioners) */
  unfitted: string[];
  /** checkpoint folders left out while the trainer is still writing them (CheckpointPlan.pending) */
  pending?: string[];
}

/** Opens every checkpoint of `plan` as a stage, with its factors when `factorsDir` holds them. */
export function openCheckpointStages(
  plan: CheckpointPlan,
  opts: {
    factorsDir?: string;
    damping?: Damping;
    engine?: EngineOptions;
    modules: ModuleSelection;
    /** checkpoint folder → its model already opened (a server reopening for new factors only) */
    models?: Map<string, Model>;
  },
): OpenedCheckpoints {
  const unfitted: string[] = [];
  const stages = plan.checkpoints.map((ck, i) => {
    const model = opts.models?.get(ck.dir) ?? Model.fromCheckpoint(ck.checkpoint, opts.engine);
    const dir = opts.factorsDir ? checkpointFactorsDir(opts.factorsDir, ck, opts.engine?.cacheDir) : undefined;
    let fitted = !!dir && existsSync(join(dir, OUR_ARGUMENTS_FILE));
    let st: OpenedStage;
    try {
      st = openStage(ck.dir, fitted ? dir : undefined, { damping: opts.damping, model });
    } catch (e) {
      // fitted under another training convention: as stale as factors of other data (fitCheckpoints refits them)
      if (!(e instanceof TrainingMismatchError)) throw e;
      fitted = false;
      st = openStage(ck.dir, undefined, { damping: opts.damping, model });
    }
    if (!fitted) unfitted.push(ck.name);
    if (fitted && st.modules !== opts.modules)
      // the final model's factors decide the modules; a checkpoint fitted over others is stale
      unfitted.push(ck.name);
    return {
      name: ck.name,
      step: ck.step,
      weight: plan.weights[i],
      ...(ck.learningRate !== undefined ? { learningRate: ck.learningRate } : {}),
      stage: st,
    };
  });
  return {
    stages,
    weighting: plan.weighting,
    note: plan.note,
    unfitted,
    ...(plan.pending ? { pending: plan.pending } : {}),
  };
}

/**
 * Fits the factors of every checkpoint (each resumable and reused when up to date, like the
 * final model's: runFitJob), with the same data, modules, labels and seed as the final fit.
 */
export async function fitCheckpoints(
  plan: CheckpointPlan,
  o: Omit<FitJobOptions, 'modelDir' | 'model' | 'base' | 'out' | 'partition' | 'onProgress'> & {
    factorsDir: string;
    engine?: EngineOptions;
    /** the fit's stage, with the checkpoint it is at */
    onProgress?: (stage: string, done: number, total: number) => void;
  },
): Promise<Array<{ name: string; result: FitJobResult }>> {
  const out: Array<{ name: string; result: FitJobResult }> = [];
  for (const [i, ck] of plan.checkpoints.entries()) {
    const at = `${ck.name} (${i + 1}/${plan.checkpoints.length})`;
    const result = await runFitJob({
      ...o,
      modelDir: ck.dir,
      model: Model.fromCheckpoint(ck.checkpoint, o.engine),
      out: checkpointFactorsDir(o.factorsDir, ck, o.engine?.cacheDir),
      log: (line) => o.log?.(`${at}: ${line}`),
      onProgress: (s, d, t) => o.onProgress?.(`${s} @ ${at}`, d, t),
    });
    out.push({ name: ck.name, result });
  }
  return out;
}

/**
 * Self-influence ⟨P(G_z), G_z⟩ summed over the checkpoints with their weights (TracInCP's
 * self-influence, Pruthi et al. 2020 §4), or the final model's alone without checkpoints.
 */
export async function selfInfluence(
  final: Stage,
  checkpoints: CheckpointStages | undefined,
  candidates: TokenizedExample[],
  opts: {
    modules: ModuleSelection;
    batchSize?: number;
    onProgress?: (stage: string, done: number, total: number) => void;
    signal?: AbortSignal;
  },
): Promise<Float64Array> {
  const run = (st: Stage, label: string) => {
    if (!st.preconditioners) throw new ExplainError(`self-influence needs EK-FAC factors for ${label}`, 'factors');
    return selfInfluenceScores(st.model, st.preconditioners, candidates, {
      ...opts,
      onProgress: (d, t) => opts.onProgress?.(`self-influence${label === 'the model' ? '' : ` @ ${label}`}`, d, t),
    });
  };
  if (!checkpoints?.stages.length) return run(final, 'the model');
  const sum = new Float64Array(candidates.length);
  for (const c of checkpoints.stages) {
    const s = await run(c.stage, c.name);
    for (let i = 0; i < sum.length; i++) sum[i] += c.weight * s[i];
  }
  return sum;
}
