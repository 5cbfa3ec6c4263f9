// What an explanation runs with: the model that produced the completion, its EK-FAC factors,
// the pre-trained stage for multistage, and the error a method raises when one is missing.
// Its own file so that explain.ts and the per-method scorers (methods/) share it without a cycle.
import type { Model, ModuleSelection } from '../model/engine';
import type { Preconditioner } from './ekfac/precondition';

export class ExplainError extends Error {}

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
}

/** `v`, or an ExplainError saying what is missing. */
export function need<T>(v: T | undefined, message: string): T {
  if (!v) throw new ExplainError(message);
  return v;
}
