// The server's default numbers, in one place: every function, CLI flag and config key that has
// a default reads it from here, so two places cannot drift apart. (Limits on what clients may
// send live in src/protocol/limits.ts; the config file's JSON schema repeats the store defaults
// for editors, and test/unit/rpc-config.test.ts checks it against these.)

export const DEFAULTS = {
  /**
   * Examples per graph run when scoring, fitting or indexing. An upper bound only: batches are
   * further cut to fit the memory budget (attribution/chunking.ts), and no result depends on it
   * beyond float rounding (sampled labels are drawn per example: fit.ts uniformsFor).
   */
  batchSize: 16,
  /** Examples per optimizer step in `train` (unlike `batchSize`, this changes the trained model). */
  trainBatchSize: 16,
  /** Sequences generated together. */
  generateBatchSize: 64,
  /**
   * Training checkpoints to sum influence over (model/checkpoints.ts): 'auto' uses the
   * checkpoint-<step>/ folders a trainer wrote beside the fine-tuned model, when there are any.
   */
  checkpoints: 'auto',
  /** The gradient store (index/gradient-store.ts), when the config asks for one. */
  store: {
    /**
     * Coordinates kept per example: k² per module (with the EK-FAC factors, the k²·modules
     * eigen-pairs of largest weight over all modules; otherwise a random k × k projection per
     * module), in fp16: 2·k²·modules bytes per example. bench/results/2026-12-02-vm-store.md
     * measures k against exact EK-FAC.
     */
    k: 40,
    /**
     * Use the store only for datasets at least this large. Below a few hundred examples exact
     * scoring of the whole dataset costs about what building the store does, so the store's
     * approximation would buy nothing.
     */
    minExamples: 512,
    /** the store's top and bottom candidates re-scored exactly */
    rerank: 50,
    /**
     * Score sums over the fine-tune's checkpoints (ekfac, gdp) from one store per checkpoint,
     * the estimates summed with the checkpoint weights before the exact rerank. Off: at k = 40
     * on the embedded default's two checkpoints each store's estimate reaches Spearman only
     * 0.45–0.67 against that checkpoint's exact EK-FAC (0.98–0.999 on the final model, planted
     * queries), and the exact top 10 of the sum fell outside the top/bottom 50 for 28 of 35
     * queries (k = 48: 29, k = 64: 24); at full rank the stores are exact
     * (bench/results/2026-12-03-vm-store-disk.md). Sums over checkpoints are scored exactly.
     */
    checkpoints: false,
  },
  /** Multi-stage influence (attribution/multistage-regime.ts). */
  multiStage: {
    /**
     * The largest relative distance ‖W_ft − W_pt‖_F / ‖W_pt‖_F of any tracked linear module for
     * which a multistage result is reported as in its regime. Measured on the embedded corpus
     * (bench/results/2026-12-02-vm-multistage.md): from a pre-trained model that had not
     * memorized its lines, multi-stage EK-FAC traced the held-out facts better than single-stage
     * for fine-tunes up to 33.5% (max; median 20%), so 30% is kept below what was measured to
     * work; further out is untested. Closeness is not enough: from the shipped pre-trained model,
     * which has memorized its lines, multi-stage was near chance at every distance (5–18%).
     */
    maxRelativeDistance: 0.3,
  },
  /**
   * Examples (evenly spaced) whose gradients in the full EK-FAC eigenbasis weigh the gradient
   * store's eigen-pairs. 64 chose pairs as good as all 313 of the embedded default's
   * fine-tuning set (bench/results/2026-12-02-vm-store.md).
   */
  storePilot: 256,
} as const;
