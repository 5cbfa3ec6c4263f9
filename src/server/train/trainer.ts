// A small-model trainer on the engine's all-parameter gradient graphs: seeded shuffling,
// AdamW, warmup + cosine schedule, global-norm clipping, progress, checkpoints in Hugging
// Face format. It trains the embedded default and serves the counterfactual loop
// (fine-tune again without the flagged examples).
import { copyFileSync, existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { replaceDirAtomic } from '../../common/atomic-write';
import { type Batch, type Model, makeBatch, type RunResult, type Sequence } from '../model/engine';
import { type TensorToWrite, writeSafetensors } from '../model/safetensors';
import { Rng } from '../util/random';
import { AdamW, clipGradients, learningRate } from './adamw';

export interface TrainExample {
  ids: number[];
  /** per-position loss weights (position t predicts token t+1) */
  weights: number[];
}

export interface TrainOptions {
  epochs: number;
  batchSize: number;
  lr: number;
  warmupSteps?: number;
  weightDecay?: number;
  clip?: number;
  seed: number;
  threads?: number;
  onStep?: (s: { step: number; total: number; loss: number; lr: number; gradNorm: number; epoch: number }) => void;
}

export interface TrainResult {
  steps: number;
  finalLoss: number;
  losses: number[];
}

/** Train `params` in place on `examples`. Loss per step is the mean over target tokens. */
export async function train(
  model: Model,
  params: Map<string, Float32Array>,
  examples: TrainExample[],
  opts: TrainOptions,
): Promise<TrainResult> {
  if (!examples.length) throw new Error('no training examples');
  if (model.options.weights !== 'inputs') throw new Error('train() needs a model opened with { weights: "inputs" }');
  const graph = await model.compile({ tokenLoss: true, paramGrads: true });
  const shapes = new Map(model.parameters().map((p) => [p.name, p.shape]));
  const adam = new AdamW(params, shapes, { lr: opts.lr, weightDecay: opts.weightDecay ?? 0.01 });
  const rng = new Rng(opts.seed);
  const perEpoch = Math.ceil(examples.length / opts.batchSize);
  const total = perEpoch * opts.epochs;
  const warmup = opts.warmupSteps ?? Math.min(100, Math.floor(total / 10));
  const pad = model.tokenizer.padTokenId ?? 0;
  const losses: number[] = [];
  // one step's update in a function of its own: no loop variable keeps a run's gradients (a whole
  // model's worth) alive under the next run (RunResult)
  const update = (out: RunResult, targets: number, lr: number) => {
    const grads = new Map<string, Float32Array>();
    for (const name of params.keys()) {
      const g = out[`grad.${name}`].data as Float32Array;
      for (let j = 0; j < g.length; j++) g[j] /= targets;
      grads.set(name, g);
    }
    const loss = (out.loss.data as Float32Array).reduce((a, b) => a + b, 0) / targets;
    const gradNorm = clipGradients(grads, opts.clip ?? 1);
    adam.update(grads, lr);
    return { loss, gradNorm };
  };
  let step = 0;
  for (let epoch = 0; epoch < opts.epochs; epoch++) {
    const order = rng.shuffle([...examples.keys()]);
    for (let i = 0; i < order.length; i += opts.batchSize) {
      const seqs: Sequence[] = order.slice(i, i + opts.batchSize).map((k) => examples[k]);
      const batch: Batch = makeBatch(seqs, pad);
      const targets = batch.targetWeights.reduce((a, b) => a + b, 0);
      const lr = learningRate(step, total, opts.lr, warmup);
      const { loss, gradNorm } = update(await graph.run(batch, { params }), targets, lr);
      losses.push(loss);
      step++;
      opts.onStep?.({ step, total, loss, lr, gradNorm, epoch });
    }
  }
  const tail = losses.slice(-perEpoch);
  return { steps: step, finalLoss: tail.reduce((a, b) => a + b, 0) / tail.length, losses };
}

/** Read every parameter of a checkpoint into Float32Arrays (trainable copies). */
export function loadParams(model: Model): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const p of model.parameters()) out.set(p.name, Float32Array.from(model.checkpoint.readF32(p.name)));
  return out;
}

/**
 * Save a checkpoint in Hugging Face format (config.json, model.safetensors, tokenizer files)
 * into `dir`, atomically: written to a sibling temp dir, then renamed into place.
 */
export function saveCheckpoint(dir: string, ...content: CheckpointContent): void {
  replaceDirAtomic(dir, (tmp) => writeCheckpoint(tmp, ...content));
}

/** What a checkpoint holds: writeCheckpoint's arguments after the folder. */
type CheckpointContent = Parameters<typeof writeCheckpoint> extends [string, ...infer Rest] ? Rest : never;

/** The files of a checkpoint, written into the existing folder `dir` (a staged one: see saveCheckpoint). */
export function writeCheckpoint(
  dir: string,
  config: Record<string, unknown>,
  params: Map<string, Float32Array>,
  shapes: Map<string, number[]>,
  tokenizerDir: string,
  extra: Record<string, unknown> = {},
): void {
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, data] of params) tensors[name] = { dtype: 'F32', shape: shapes.get(name)!, data };
  writeSafetensors(join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  // the weights are float32 whatever the checkpoint trained from held: a config still saying
  // bfloat16 made transformers (dtype "auto") load a rounded copy of what was trained and scored
  const saved = { ...config };
  for (const key of ['dtype', 'torch_dtype']) if (key in saved) saved[key] = 'float32';
  writeFileSync(join(dir, 'config.json'), `${JSON.stringify(saved, null, 2)}\n`);
  for (const f of CHECKPOINT_TOKENIZER_FILES)
    if (existsSync(join(tokenizerDir, f))) copyFileSync(join(tokenizerDir, f), join(dir, f));
  if (Object.keys(extra).length) writeFileSync(join(dir, 'training_args.json'), `${JSON.stringify(extra, null, 2)}\n`);
}

/** The tokenizer files a checkpoint carries over from its tokenizer folder. */
export const CHECKPOINT_TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'];

/** A Llama-style config and seeded random initial weights (normal, std 0.02; norms at 1). */
export function initLlama(
  shape: {
    vocab: number;
    d: number;
    layers: number;
    heads: number;
    kvHeads: number;
    ffn: number;
    maxPositions: number;
  },
  seed: number,
  special: { bos?: number; eos?: number; pad?: number } = {},
): { config: Record<string, unknown>; params: Map<string, Float32Array>; shapes: Map<string, number[]> } {
  const rng = new Rng(seed);
  const params = new Map<string, Float32Array>();
  const shapes = new Map<string, number[]>();
  const add = (name: string, shape: number[], fill: 'normal' | 'ones', std = 0.02) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const t = new Float32Array(n);
    for (let i = 0; i < n; i++) t[i] = fill === 'ones' ? 1 : rng.normal() * std;
    params.set(name, t);
    shapes.set(name, shape);
  };
  const { d, ffn } = shape;
  const hd = d / shape.heads;
  add('model.embed_tokens.weight', [shape.vocab, d], 'normal');
  for (let i = 0; i < shape.layers; i++) {
    const p = `model.layers.${i}`;
    // residual-output projections scaled down with depth (GPT-2 style) for stable starts
    const outStd = 0.02 / Math.sqrt(2 * shape.layers);
    add(`${p}.input_layernorm.weight`, [d], 'ones');
    add(`${p}.self_attn.q_proj.weight`, [shape.heads * hd, d], 'normal');
    add(`${p}.self_attn.k_proj.weight`, [shape.kvHeads * hd, d], 'normal');
    add(`${p}.self_attn.v_proj.weight`, [shape.kvHeads * hd, d], 'normal');
    add(`${p}.self_attn.o_proj.weight`, [d, shape.heads * hd], 'normal', outStd);
    add(`${p}.post_attention_layernorm.weight`, [d], 'ones');
    add(`${p}.mlp.gate_proj.weight`, [ffn, d], 'normal');
    add(`${p}.mlp.up_proj.weight`, [ffn, d], 'normal');
    add(`${p}.mlp.down_proj.weight`, [d, ffn], 'normal', outStd);
  }
  add('model.norm.weight', [d], 'ones');
  add('lm_head.weight', [shape.vocab, d], 'normal');
  const config = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: shape.vocab,
    hidden_size: d,
    intermediate_size: ffn,
    num_hidden_layers: shape.layers,
    num_attention_heads: shape.heads,
    num_key_value_heads: shape.kvHeads,
    head_dim: hd,
    hidden_act: 'silu',
    max_position_embeddings: shape.maxPositions,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    attention_bias: false,
    mlp_bias: false,
    tie_word_embeddings: false,
    torch_dtype: 'float32',
    bos_token_id: special.bos ?? null,
    eos_token_id: special.eos ?? null,
    pad_token_id: special.pad ?? null,
  };
  return { config, params, shapes };
}
