// The training checkpoints of a fine-tune, as trainers already write them, so influence can be
// summed over the training trajectory (TracIn, Pruthi et al. 2020, "Estimating Training Data
// Influence by Tracing Gradient Descent"):
//   - transformers' Trainer: <output_dir>/checkpoint-<step>/ with config.json, model.safetensors
//     (or adapter_model.safetensors for PEFT) and trainer_state.json, whose "log_history"
//     entries carry the learning rate logged at each logging step;
//   - our own `train --save-steps N`: <out>/checkpoint-<step>/ with training_args.json
//     {global_step, learning_rate}.
// The final model is not a term of the sum (TracIn sums over the checkpoints the trainer saved):
// on the embedded default it is where memorised answers' own sources turn "opposing", and the
// lr-weighted checkpoints alone put none of them in the bottom 10%
// (bench/results/2026-12-02-vm-sources.md, 2026-12-02-vm-checkpoint-subsets.md). A Trainer
// checkpoint saved at the last step is a term like any other when the model is the output_dir;
// when the model named is that checkpoint itself, its earlier siblings are the terms.
// Each checkpoint must be the same model as the final one (config, parameter names and shapes,
// tokenizer, adapter or not): a sum over checkpoints of another model means nothing, so any
// difference is refused in one line naming the folder and what differs.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, realpathSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { readFileNoWait } from '../../common/read-file';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS } from './adapter';
import { type Checkpoint, CheckpointError, openCheckpoint } from './checkpoint';

/** What to sum over: 'auto' (the checkpoints found beside or inside the model), 'off', or the folders given. */
export type CheckpointsSetting = 'auto' | 'off' | string[];

export class CheckpointsError extends CheckpointError {
  override name = 'CheckpointsError';
}

export interface TrainingCheckpoint {
  /** the folder's name, e.g. "checkpoint-80" */
  name: string;
  /** absolute path */
  dir: string;
  /** the optimizer step it was saved at */
  step: number;
  /** the learning rate at that step, when the trainer recorded it */
  learningRate?: number;
  /** how `learningRate` was read: logged at the step itself (or recorded by our trainer), or
   * estimated from the logged steps around it (interpolated) or nearest to it */
  rateFrom?:
    | { kind: 'logged' }
    | { kind: 'interpolated' | 'extrapolated'; steps: [number, number] }
    | { kind: 'nearest'; step: number };
  /** the opened checkpoint (headers only), checked against the final model */
  checkpoint: Checkpoint;
}

export interface CheckpointPlan {
  checkpoints: TrainingCheckpoint[];
  /** one weight per checkpoint, summing to 1 */
  weights: number[];
  /** 'learning-rate': w_c = η_c / Σ η; 'uniform': the learning rates were not all known (see `note`) */
  weighting: 'learning-rate' | 'uniform';
  note?: string;
  /** checkpoint folders left out as still being written (no trainer_state.json yet): watched, so
   * that a server takes them in once complete */
  pending?: string[];
}

export const CHECKPOINT_DIR = /^checkpoint-(\d+)$/;

/** Parses the `--checkpoints` flag / the config's `checkpoints` key: auto, off, or folders separated by commas. */
export function parseCheckpointsSetting(v: string | string[] | undefined, baseDir = process.cwd()): CheckpointsSetting {
  if (v === undefined || v === 'auto') return 'auto';
  if (v === 'off') return 'off';
  const items = (Array.isArray(v) ? v : v.split(',')).map((s) => s.trim());
  const dirs = items.filter(Boolean);
  if (!dirs.length) throw new CheckpointsError(`checkpoints must be "auto", "off" or checkpoint folders (got "${v}")`);
  // "a,,b" or "a,": a name left out of the list, not a folder to skip without a word
  if (dirs.length !== items.length)
    throw new CheckpointsError(
      `checkpoints "${items.join(',')}" has an empty name in its list: name each checkpoint folder once`,
    );
  // "Auto", "none", "false": a setting misspelt, not a folder (unless one of that name exists)
  const word = /^(auto|off|none|no|false|true|on|yes)$/i;
  if (dirs.length === 1 && word.test(dirs[0]) && !existsSync(resolve(baseDir, dirs[0])))
    throw new CheckpointsError(
      `checkpoints "${dirs[0]}": use "auto" (the checkpoint-<step> folders in or beside the model) or "off", in lower case, or name checkpoint folders`,
    );
  return dirs.map((d) => resolve(baseDir, d));
}

/**
 * The checkpoints to sum over for the model in `modelDir` (already opened as `final`), in step
 * order, with their weights. 'auto' looks for checkpoint-<step>/ folders inside the model folder
 * (a Trainer output_dir holding the final model) or, when the model folder is itself a
 * checkpoint-<N>, its siblings with a smaller step. None found (or 'off'): no plan.
 */
export function planCheckpoints(
  modelDir: string,
  final: Checkpoint,
  setting: CheckpointsSetting,
): CheckpointPlan | undefined {
  if (setting === 'off') return undefined;
  const all = setting === 'auto' ? discover(modelDir) : setting;
  // A Trainer writes a checkpoint's weights first and its trainer_state.json last (seconds to
  // minutes later at real sizes): among checkpoints that have one, a folder without it is still
  // being written. It is left out, unread (its files may be half there), and watched.
  const hasState = (d: string) => existsSync(join(d, 'trainer_state.json'));
  const pending =
    setting === 'auto' && all.some(hasState)
      ? all.filter((d) => !hasState(d) && !existsSync(join(d, 'training_args.json')))
      : [];
  const dirs = all.filter((d) => !pending.includes(d));
  if (!dirs.length) return undefined;
  // every checkpoint's log_history is a prefix of the same run's: the longest one also has the
  // steps logged after a checkpoint, to read its rate between two logged steps
  const log = runLog([...dirs, resolve(modelDir)]);
  const found = dirs.map((d) => readTrainingCheckpoint(d, final, log));
  const steps = new Map<number, string>();
  for (const c of found) {
    const other = steps.get(c.step);
    if (other) throw new CheckpointsError(`${c.dir} and ${other} are both at step ${c.step}; give each step once`);
    steps.set(c.step, c.dir);
  }
  found.sort((a, b) => a.step - b.step);
  const weights = checkpointWeights(found);
  const notes = [
    weights.note,
    pending.length
      ? `left out ${pending.map((d) => basename(d)).join(', ')}: no trainer_state.json yet (a checkpoint the trainer is still writing)`
      : undefined,
  ].filter(Boolean);
  return {
    checkpoints: found,
    ...weights,
    ...(notes.length ? { note: notes.join('; ') } : {}),
    ...(pending.length ? { pending } : {}),
  };
}

/**
 * TracIn weighs each checkpoint's term by the learning rate of the step it was saved at. Weights are
 * normalized to sum to 1 (the same ranking as Σ η_c · score_c, on the scale of one model's scores).
 * Without every learning rate (or with all zero), the checkpoints weigh the same and the note says so.
 */
export function checkpointWeights(cks: Array<Pick<TrainingCheckpoint, 'name' | 'learningRate' | 'rateFrom'>>): {
  weights: number[];
  weighting: CheckpointPlan['weighting'];
  note?: string;
} {
  const lrs = cks.map((c) => c.learningRate);
  const total = lrs.reduce<number>((s, x) => s + (x ?? 0), 0);
  if (lrs.every((x) => x !== undefined && x >= 0) && total > 0) {
    const estimated = cks.flatMap((c) => {
      const f = c.rateFrom;
      if (!f || f.kind === 'logged') return [];
      return [
        f.kind === 'nearest'
          ? `${c.name}'s from step ${f.step}`
          : `${c.name}'s ${f.kind} from steps ${f.steps[0]} and ${f.steps[1]}`,
      ];
    });
    return {
      weights: lrs.map((x) => x! / total),
      weighting: 'learning-rate',
      ...(estimated.length
        ? {
            note: `learning rates not logged at the checkpoints' steps, estimated from trainer_state.json's log: ${estimated.join(', ')} (save_steps a multiple of logging_steps gives exact ones)`,
          }
        : {}),
    };
  }
  const unknown = cks.filter((c) => c.learningRate === undefined).map((c) => c.name);
  return {
    weights: cks.map(() => 1 / cks.length),
    weighting: 'uniform',
    note: unknown.length
      ? `learning rate unknown for ${unknown.join(', ')} (no learning_rate in trainer_state.json's log_history, no training_args.json): checkpoints weighed equally; log the learning rate (logging_steps ≤ save_steps) or list the checkpoints that have one with --checkpoints`
      : 'the recorded learning rates are all zero: checkpoints weighed equally',
  };
}

function discover(modelDirIn: string): string[] {
  // through symbolic links: a model reached by a link (runs/latest → checkpoint-20) has the
  // siblings of where it is, and a linked checkpoint folder is a checkpoint
  const modelDir = realpathSync(modelDirIn);
  const folders = (dir: string) =>
    readdirSync(dir).filter((n) => {
      if (!CHECKPOINT_DIR.test(n)) return false;
      try {
        return statSync(join(dir, n)).isDirectory();
      } catch {
        return false; // a dangling link
      }
    });
  const inside = folders(modelDir).map((n) => join(modelDir, n));
  if (inside.length) return inside;
  // the model is itself a Trainer checkpoint: the earlier checkpoints of the same run
  const own = CHECKPOINT_DIR.exec(basename(modelDir));
  if (!own) return [];
  const parent = dirname(modelDir);
  return folders(parent)
    .filter((n) => Number(CHECKPOINT_DIR.exec(n)![1]) < Number(own[1]))
    .map((n) => join(parent, n));
}

type LogEntry = { step: number; lr: number; loss?: number };

/**
 * The logged learning rates of the run, from the longest log_history among the folders'
 * trainer_state.json. Every folder's log must be the start of it: a checkpoint left by another
 * run (an earlier run into the same folder, one copied in) logs other rates or losses at the same
 * steps, and was summed in with its own rates (an adversarial review: a foreign checkpoint took
 * the largest weight and flipped a score's sign). Which of two disagreeing folders is the stray
 * one cannot be told, so both are named.
 */
function runLog(dirs: string[]): LogEntry[] {
  const logs = dirs.map((d) => ({ dir: d, log: logOf(readJson(join(d, 'trainer_state.json'))) }));
  const longest = logs.reduce((a, b) => (b.log.length > a.log.length ? b : a), logs[0]);
  for (const { dir, log } of logs) {
    const i = log.findIndex((e, k) => !sameEntry(e, longest.log[k]));
    if (i < 0) continue;
    const [a, b] = [log[i], longest.log[i]];
    throw new CheckpointsError(
      `the training logs of ${dir} and ${longest.dir} disagree at step ${a.step} (${describeEntry(a)} against ${b ? describeEntry(b) : 'nothing logged'} in trainer_state.json's log_history): they are not checkpoints of one run; remove the one an earlier or another run left there, or name the checkpoints with --checkpoints (or "checkpoints" in influence-lens.json)`,
    );
  }
  return longest.log;
}

function sameEntry(a: LogEntry, b: LogEntry | undefined): boolean {
  return (
    b !== undefined &&
    a.step === b.step &&
    a.lr === b.lr &&
    (a.loss === undefined || b.loss === undefined || a.loss === b.loss)
  );
}

function describeEntry(e: LogEntry): string {
  return `learning rate ${e.lr}${e.loss === undefined ? '' : `, loss ${e.loss}`}`;
}

function logOf(state: Record<string, unknown> | undefined): LogEntry[] {
  const log = state?.log_history;
  if (!Array.isArray(log)) return [];
  const out: LogEntry[] = [];
  for (const e of log as Array<Record<string, unknown>>) {
    const step = num(e?.step);
    const lr = num(e?.learning_rate);
    const loss = num(e?.loss);
    if (step !== undefined && lr !== undefined) out.push(loss === undefined ? { step, lr } : { step, lr, loss });
  }
  return out.sort((a, b) => a.step - b.step);
}

/** One checkpoint folder: its step and learning rate, checked to be the same model as `final`. */
export function readTrainingCheckpoint(dirIn: string, final: Checkpoint, runLogIn?: LogEntry[]): TrainingCheckpoint {
  const dir = resolve(dirIn);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new CheckpointsError(`checkpoint ${dirIn}: not a folder`);
  const name = basename(dir);
  const hasWeights = ['model.safetensors', 'model.safetensors.index.json', ADAPTER_WEIGHTS].some((f) =>
    existsSync(join(dir, f)),
  );
  if (!hasWeights)
    throw new CheckpointsError(
      `checkpoint ${dir} holds no weights (no model.safetensors, model.safetensors.index.json or ${ADAPTER_WEIGHTS}); ` +
        'save checkpoints as safetensors (the Trainer does by default since transformers 4.35), or turn checkpoints off',
    );
  const state = readJson(join(dir, 'trainer_state.json'));
  const ours = readJson(join(dir, 'training_args.json'));
  const fromName = CHECKPOINT_DIR.exec(name)?.[1];
  const step = num(state?.global_step) ?? num(ours?.global_step) ?? (fromName ? Number(fromName) : undefined);
  if (step === undefined)
    throw new CheckpointsError(
      `checkpoint ${dir}: cannot tell its training step (no trainer_state.json global_step, no training_args.json global_step, not named checkpoint-<step>)`,
    );
  // the run's longer log only where this checkpoint's own log is the start of it (the same run,
  // not a stale checkpoint of another run left in the folder)
  const own = logOf(state);
  const log =
    runLogIn &&
    runLogIn.length >= own.length &&
    own.every((e, i) => e.step === runLogIn[i].step && e.lr === runLogIn[i].lr)
      ? runLogIn
      : own;
  const fromLog = rateAt(log, step);
  const ourRate = num(ours?.learning_rate);
  const learningRate = fromLog?.lr ?? ourRate;
  const rateFrom = fromLog ? fromLog.from : ourRate !== undefined ? ({ kind: 'logged' } as const) : undefined;
  const isAdapter = existsSync(join(dir, ADAPTER_CONFIG));
  if (isAdapter !== !!final.adapter)
    throw new CheckpointsError(
      `checkpoint ${dir} is ${isAdapter ? 'a LoRA adapter' : 'a full model'} but the model ${final.dir} is ${final.adapter ? 'a LoRA adapter' : 'a full model'}; ` +
        'sum over checkpoints of the same kind (or turn checkpoints off)',
    );
  let ck: Checkpoint;
  try {
    ck = openCheckpoint(dir, final.adapter ? { base: dirname(final.configFiles[0]) } : {});
  } catch (e) {
    throw new CheckpointsError(`checkpoint ${dir}: ${(e as Error).message}`);
  }
  // another model first (the more telling reason), then another tokenizer
  const diff = modelDifference(final, ck);
  if (diff) throw new CheckpointsError(`checkpoint ${dir} is not the same model as ${final.dir}: ${diff}`);
  // a Trainer checkpoint holds a tokenizer only when the Trainer was given one: then it must be the model's
  // (both files that decide the ids: the checkpoint is tokenized with the model's)
  for (const file of ['tokenizer.json', 'tokenizer_config.json']) {
    if (!existsSync(join(dir, file))) continue;
    const theirs = join(final.tokenizerDir, file);
    if (!existsSync(theirs) || fileHash(join(dir, file)) !== fileHash(theirs))
      throw new CheckpointsError(`checkpoint ${dir} has another ${file} than the model ${final.dir}`);
  }
  return {
    name,
    dir,
    step,
    learningRate,
    ...(rateFrom ? { rateFrom } : {}),
    checkpoint: { ...ck, tokenizerDir: final.tokenizerDir },
  };
}

/**
 * The learning rate at `step` from trainer_state.json's log_history: the entry at that step (the
 * Trainer logs the rate it used for the step); else, between two logged steps, the straight line
 * between their rates (exact for a linear schedule, close for cosine); beyond the logged steps,
 * the line through the two nearest (clamped at 0); with one logged step, its rate. Trainer logs
 * every logging_steps, so a save step may fall between logs.
 */
export function learningRateAt(state: Record<string, unknown> | undefined, step: number): number | undefined {
  return rateAt(logOf(state), step)?.lr;
}

function rateAt(
  log: LogEntry[],
  step: number,
): { lr: number; from: NonNullable<TrainingCheckpoint['rateFrom']> } | undefined {
  if (!log.length) return undefined;
  const at = log.filter((e) => e.step === step);
  if (at.length) return { lr: at[at.length - 1].lr, from: { kind: 'logged' } };
  const before = log.filter((e) => e.step < step).pop();
  const after = log.find((e) => e.step > step);
  if (before && after) {
    const t = (step - before.step) / (after.step - before.step);
    return {
      lr: before.lr + t * (after.lr - before.lr),
      from: { kind: 'interpolated', steps: [before.step, after.step] },
    };
  }
  // past the last logged step (a run's last checkpoint, often) or before the first: the line
  // through the two nearest logged steps (exact for a linear schedule or its warm-up), never below 0
  const side = before ? log.filter((e) => e.step < step).slice(-2) : log.filter((e) => e.step > step).slice(0, 2);
  if (side.length === 2 && side[0].step !== side[1].step) {
    const [a, b] = side;
    const lr = Math.max(0, a.lr + ((step - a.step) * (b.lr - a.lr)) / (b.step - a.step));
    return { lr, from: { kind: 'extrapolated', steps: [a.step, b.step] } };
  }
  const near = (before ?? after)!;
  return { lr: near.lr, from: { kind: 'nearest', step: near.step } };
}

/** Keys a trainer rewrites without changing the model. */
const VOLATILE_CONFIG_KEYS = new Set(['_name_or_path', 'transformers_version', 'torch_dtype', 'dtype', 'use_cache']);

/**
 * The first config.json key (beyond those that only describe a run) whose value differs, as
 * "key: b's vs a's"; undefined when the two configs describe the same model.
 */
export function configDifference(a: Record<string, unknown>, b: Record<string, unknown>): string | undefined {
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
  const k = keys.find((x) => !VOLATILE_CONFIG_KEYS.has(x) && JSON.stringify(a[x]) !== JSON.stringify(b[x]));
  const show = (v: unknown) => (v === undefined ? '(absent)' : JSON.stringify(v));
  return k === undefined ? undefined : `${k}: ${show(b[k])} vs ${show(a[k])}`;
}

function modelDifference(a: Checkpoint, b: Checkpoint): string | undefined {
  const config = configDifference(a.config, b.config);
  if (config) return `config.json differs (${config})`;
  if (a.adapter && b.adapter) {
    const cfg = (c: Checkpoint) => JSON.stringify({ ...c.adapter!.config, base_model_name_or_path: null });
    if (cfg(a) !== cfg(b)) return `${ADAPTER_CONFIG} differs`;
  }
  for (const [name, w] of a.weights) {
    const o = b.weights.get(name);
    if (!o) return `it has no tensor "${name}"`;
    if (o.shape.join('×') !== w.shape.join('×'))
      return `tensor "${name}" is ${o.shape.join('×')}, the model's is ${w.shape.join('×')}`;
  }
  const extra = [...b.weights.keys()].find((n) => !a.weights.has(n));
  if (extra) return `it has a tensor "${extra}" the model does not`;
  return undefined;
}

function readJson(path: string): Record<string, unknown> | undefined {
  if (!existsSync(path)) return undefined;
  try {
    const v = JSON.parse(readFileNoWait(path, 'utf8'));
    return v && typeof v === 'object' && !Array.isArray(v) ? v : undefined;
  } catch (e) {
    throw new CheckpointsError(`${path}: not valid JSON (${(e as Error).message})`);
  }
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

function fileHash(path: string): string {
  return createHash('sha256').update(readFileNoWait(path)).digest('hex');
}
