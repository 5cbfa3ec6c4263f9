// What an explanation runs with: the model that produced the completion, its EK-FAC factors,
// the pre-trained stage for multistage, and the error a method raises when one is missing.
// Its own file so that explain.ts and the per-method scorers (methods/) share it without a cycle.
import type { Model, ModuleSelection } from '../model/engine';
import type { Preconditioner } from './ekfac/precondition';

/**
 * A setting the person chose (or must supply) that an engine error is about. The engine names
 * the thing, never how to set it: the editor user has no flags, the CLI user no config keys.
 * Each front end adds its own hint (the CLI: the flag, src/server/cli/util.ts `withFlagHint`).
 */
export type Setting = 'damping' | 'factors' | 'pretrained' | 'modules' | 'partition' | 'out';

/** An error a person fixes by changing `setting` (when known). */
export class SettingError extends Error {
  constructor(
    message: string,
    readonly setting?: Setting,
  ) {
    super(message);
  }
}

export class ExplainError extends SettingError {
  override name = 'ExplainError';
}

/** A model with the EK-FAC preconditioners fitted for it (none for gdp/cosine/repsim/bm25). */
export interface Stage {
  model: Model;
  preconditioners?: Map<string, Preconditioner>;
}

export interface ExplainSetup {
  /** the model that produced the completion (the fine-tuned one in a two-stage setup) */
  model: Stage;
  /** the pre-trained stage, for multistage */
  pretrained?: Stage;
  /** modules whose gradients are used (must match the factors) */
  modules: ModuleSelection;
  /**
   * The fine-tune's training checkpoints, each with its factors and weight: the methods whose
   * scorer says `overCheckpoints` score Σ_c weight_c · score(θ_c) instead of the final model's score.
   */
  checkpoints?: CheckpointStages;
}

/** A training checkpoint opened for scoring (attribution/checkpoints.ts builds these). */
export interface CheckpointStage {
  name: string;
  step: number;
  weight: number;
  /** the learning rate the weight comes from, when known */
  learningRate?: number;
  stage: Stage;
}

export interface CheckpointStages {
  stages: CheckpointStage[];
  weighting: 'learning-rate' | 'uniform';
  note?: string;
}

/** `v`, or an ExplainError saying what is missing. */
export function need<T>(v: T | undefined, message: string, setting?: Setting): T {
  if (!v) throw new ExplainError(message, setting);
  return v;
}
