// The embedded default's fine-tuning recipe (scripts/build-default.mjs), for the experiments that
// retrain it: with the same seed and threads they reproduce assets/default/finetuned byte for byte.
export const EMBEDDED_FINETUNE = {
  epochs: 12,
  lr: 5e-4,
  batchSize: 8,
  seed: 0,
  clip: 1,
  weightDecay: 0.01,
  threads: 2,
} as const;
