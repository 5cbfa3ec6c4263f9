// How many sequences one ONNX Runtime run may take. ORT keeps a run's intermediates alive
// until the run ends (and its arena keeps the memory afterwards), so a batch of 16 sequences
// at the Pythia-70M shape, with every module's per-example gradient, peaked above 8 GB.
// Batches are split so that one run's estimated intermediates stay within a budget; every
// caller sums or concatenates the runs' results, so the split changes nothing but memory.
import { totalmem } from 'node:os';
import { ATTENTION_CHUNK_BYTES } from '../model/architectures/common';
import { type Batch, EngineError, type ModuleInfo, makeBatch, type Sequence } from '../model/engine';
import { headChunkRows } from '../model/head';
import { positiveEnv } from '../util/env';

/**
 * Default bytes one run's intermediates may take (INFLUENCE_LENS_RUN_MB overrides, in MiB).
 * 1024 rather than 768: at the SmolLM-135M shape it lets the Λ pass take two sequences per run
 * (Λ 31.4 → 23.1 s, fit 96 → 86 s) for +0.1 GB of peak; at Pythia-70M +0.5 GB (2.5 → 3.0 GB,
 * kronfluence 3.35 GB) at the same speed; 2048 was no faster at 70M and took 3.6 GB there.
 */
export function runBudgetBytes(): number {
  return (positiveEnv('INFLUENCE_LENS_RUN_MB', 'MiB') ?? 1024) * 2 ** 20;
}

/** Bytes of one d_out × d_A matrix per module (a query row, a Λ sum) in a graph's precision. */
export function matrixBytes(modules: ModuleInfo[], fp64: boolean): number {
  let floats = 0;
  for (const m of modules) floats += m.dOut * (m.dIn + (m.hasBias ? 1 : 0));
  return floats * (fp64 ? 8 : 4);
}

export interface RunShape {
  modules: ModuleInfo[];
  vocab: number;
  /**
   * the graph forms a d_out × d_A matrix per sequence and module: `true`/'outputs' when they are
   * returned (per-example gradients: all of them live until the run ends), 'transient' when each
   * is reduced inside the graph (Λ, scores, self-influence: ONNX Runtime frees one module's
   * before the next module's exists, so only the largest counts)
   */
  perExampleMatrices: boolean | 'outputs' | 'transient';
  /** 4 (fp32) or 8 (fp64) */
  bytesPerFloat: number;
  /** attention heads (0 when unknown): one layer's h·T² scores are alive at a time */
  heads?: number;
}

/**
 * Estimated bytes one sequence of T tokens adds to a run: a few copies of one head chunk's
 * logits, two of every tracked module's input and output gradient per token, and the d_out × d_A matrices
 * formed per sequence: every module's when they are outputs, plus three of the largest module's
 * (the matrix, its square or product, and the reduction's input) while one is being reduced.
 * Calibrated at the Pythia-70M shape: 4 sequences of ~220 tokens with Λ took 1.85 GiB; at the
 * SmolLM-135M shape, scoring 8 sequences of 128 tokens in one run took 2.0 GB above the 1-sequence
 * runs' baseline, where counting every module's matrix three times had predicted 13 GB.
 */
export function bytesPerSequence(shape: RunShape, T: number): number {
  let io = 0;
  let mats = 0;
  let largest = 0;
  for (const m of shape.modules) {
    const dA = m.dIn + (m.hasBias ? 1 : 0);
    io += dA + m.dOut;
    mats += m.dOut * dA;
    largest = Math.max(largest, m.dOut * dA);
  }
  const kind = shape.perExampleMatrices;
  const matrices = kind === 'transient' ? 3 * largest : kind ? mats + 3 * largest : 0;
  // The head runs a chunk of tokens at a time (model/head.ts): four [c, V] tensors (logits,
  // log-softmax, its exponential, the gradient), c = min(T, the chunk's rows), where a chunk's
  // logits span the vocabulary (the head weight's own gradient). Every loss and its gradient go
  // the vocabulary in blocks of HEAD_BLOCK_BYTES, far less: this counts the larger of the two.
  const head = 4 * Math.min(T, headChunkRows(shape.vocab || 1, shape.bytesPerFloat)) * shape.vocab;
  // Attention takes its queries a chunk at a time, forward and backward (architectures/common.ts):
  // scores, probabilities and their two gradients of one chunk, h·c·T each, where the chunk's rows c
  // keep a run's h·c·T within ATTENTION_CHUNK_BYTES (never less than one row, never more than T).
  const h = shape.heads ?? 0;
  const chunkFloats = Math.max(ATTENTION_CHUNK_BYTES / shape.bytesPerFloat, h * T);
  const attention = 4 * Math.min(h * T * T, chunkFloats);
  return shape.bytesPerFloat * (T * 2 * io + head + matrices + attention);
}

/**
 * The memory one sequence's run may be estimated at before it is refused: what the machine has
 * beyond this process now (INFLUENCE_LENS_MEMORY_MB replaces the machine's total, for tests). The
 * estimate counts only the larger tensors, so a sequence over this limit cannot fit: run anyway,
 * the kernel would kill the whole process (the server with every lane) partway through.
 */
export function sequenceLimitBytes(): number {
  return machineMemoryBytes() - process.memoryUsage().rss;
}

/** The machine's memory (INFLUENCE_LENS_MEMORY_MB replaces it, for tests). */
export function machineMemoryBytes(): number {
  const mb = positiveEnv('INFLUENCE_LENS_MEMORY_MB', 'MiB');
  return mb !== undefined ? mb * 2 ** 20 : totalmem();
}

/**
 * Length-sorted batches of at most `batchSize` sequences, each small enough for the budget
 * (never fewer than one sequence). `idx` maps a batch's rows back to positions in `seqs`.
 * A sequence too long for the machine's memory even alone is refused (sequenceLimitBytes).
 */
export function memoryBoundedBatches(
  seqs: Sequence[],
  batchSize: number,
  pad: number,
  shape: RunShape,
  budget = runBudgetBytes(),
): Array<{ batch: Batch; idx: number[] }> {
  const order = [...seqs.keys()].sort((a, b) => seqs[a].ids.length - seqs[b].ids.length || a - b);
  if (order.length) {
    const T = seqs[order[order.length - 1]].ids.length;
    const need = bytesPerSequence(shape, T);
    const limit = sequenceLimitBytes();
    if (need > limit) {
      const gib = (b: number) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(1)} GiB` : `${Math.ceil(b / 2 ** 20)} MiB`);
      throw new EngineError(
        `a sequence of ${T} tokens needs at least ${gib(need)} in one run (every tracked module's per-token rows, a chunk of attention scores and a chunk of logits), more than the ${gib(Math.max(0, limit))} this machine has beyond this process: shorten the longest examples (or the query), track fewer modules, or use a machine with more memory`,
      );
    }
  }
  const out: Array<{ batch: Batch; idx: number[] }> = [];
  let i = 0;
  while (i < order.length) {
    let j = i + 1;
    // sorted by length: the batch's T is the last sequence's length
    while (
      j < order.length &&
      j - i < batchSize &&
      (j - i + 1) * bytesPerSequence(shape, seqs[order[j]].ids.length) <= budget
    )
      j++;
    const idx = order.slice(i, j);
    const batch = makeBatch(
      idx.map((k) => seqs[k]),
      pad,
    );
    // one sequence alone over the budget: its run maps its large tensors (util/malloc.ts)
    if (idx.length === 1) {
      const need = bytesPerSequence(shape, seqs[idx[0]].ids.length);
      if (need > budget) batch.overBudget = true;
      if (2 * need > budget) batch.alone = true;
    }
    out.push({ batch, idx });
    i = j;
  }
  return out;
}

/** The run shape of a model's graph. */
export function runShape(
  modules: ModuleInfo[],
  config: Record<string, unknown>,
  perExampleMatrices: RunShape['perExampleMatrices'],
  fp64: boolean,
): RunShape {
  const text = (config.text_config as Record<string, unknown> | undefined) ?? {};
  const vocab = Number(config.vocab_size ?? text.vocab_size);
  const heads = Number(config.num_attention_heads ?? config.n_head ?? text.num_attention_heads);
  return {
    modules,
    vocab: Number.isFinite(vocab) ? vocab : 0,
    perExampleMatrices,
    bytesPerFloat: fp64 ? 8 : 4,
    heads: Number.isFinite(heads) ? heads : 0,
  };
}
