// Building blocks shared by every architecture: linear layers that record themselves as
// tracked modules, norms, rotary embeddings, causal attention with grouped KV heads, and
// config parsing helpers. Activations live as 2-D [N = B·T, d] tensors between blocks
// so every linear layer is one Gemm (no weight transposes, cheap backward).
import { type LoraAdapter, PEFT_PREFIX, targets } from '../adapter';
import { chunkBounds, chunkPlan } from '../onnx/chunks';
import { DataType, type Dim, type Graph, type Tensor } from '../onnx/graph';

export type ModuleKind = 'mlp' | 'attention';

/** A linear layer whose input activations and output gradients we can observe. */
export interface TrackedModule {
  /** Hugging Face module name, e.g. `model.layers.0.mlp.up_proj` */
  name: string;
  kind: ModuleKind;
  /** [N, dIn] module input */
  input: Tensor;
  /** [N, dOut] module output (its gradient is g_t) */
  output: Tensor;
  dIn: number;
  dOut: number;
  hasBias: boolean;
  weightName: string;
  biasName?: string;
  /** 'out_in' = torch Linear [dOut, dIn]; 'in_out' = GPT-2 Conv1D [dIn, dOut] */
  layout: 'out_in' | 'in_out';
}

/** Gives the float tensor for a parameter, by its Hugging Face name. */
export interface WeightSource {
  get(name: string): Tensor;
  has(name: string): boolean;
  shape(name: string): number[];
  /** same dtype, shape and bytes (a tied head stored twice) */
  sameValues(a: string, b: string): boolean;
}

export interface BuildContext {
  g: Graph;
  w: WeightSource;
  /** [B, T] int64 token ids and attention mask (1 = real token, right padding) */
  inputIds: Tensor;
  attentionMask: Tensor;
  /** Shape(input_ids) = [B, T] as int64 */
  bt: Tensor;
  modules: TrackedModule[];
  /**
   * a PEFT LoRA adapter: its A and B layers wrap the targeted linear layers and are the tracked
   * modules; matchedTargets collects every target_modules entry that selected a linear layer
   */
  lora?: { adapter: LoraAdapter; usedTensors: Set<string>; matchedTargets: Set<string> };
  /** query rows per attention chunk (default: ATTENTION_CHUNK_BYTES of scores; tests set it small) */
  attentionRows?: number;
}

/** What an architecture's forward pass produces. */
export interface ForwardResult {
  /** [V, d] unembedding: the next-token logits are hidden · unembeddingᵀ (computed in chunks: head.ts) */
  unembedding: Tensor;
  /** [N, d] final hidden state after the final norm */
  hidden: Tensor;
}

export interface Architecture {
  /** config.json `model_type` values this builder accepts */
  modelTypes: string[];
  /**
   * transformers' `base_model_prefix` with its dot ("model.", "transformer.", "gpt_neox."): a file
   * saved from the base model (no key has it, as in the hub's original gpt2) gets it added to every
   * key but the head's, as from_pretrained does (checkpoint.ts)
   */
  basePrefix: string;
  /** the output head's tensor names, which sit outside the base model */
  headNames: string[];
  /** the config.json keys this builder implements and the values it accepts (see config-keys.ts) */
  configKeys: Readonly<Record<string, { accepts: string; ok(value: unknown, config: Config): boolean }>>;
  describe(config: Config): string;
  forward(ctx: BuildContext, config: Config): ForwardResult;
}

export type Config = Record<string, unknown>;

export class ConfigError extends Error {}

export function num(config: Config, keys: string[], fallback?: number): number {
  for (const k of keys) {
    const v = config[k];
    if (typeof v === 'number' && Number.isFinite(v)) return v;
  }
  if (fallback !== undefined) return fallback;
  throw new ConfigError(`config.json is missing ${keys.join(' / ')} (a number)`);
}

/** Linear layer y = x Wᵀ + b (or x W + b for Conv1D), recorded as a tracked module. */
export function linear(
  ctx: BuildContext,
  name: string,
  x: Tensor,
  kind: ModuleKind,
  layout: 'out_in' | 'in_out' = 'out_in',
  /** what config.json says about this layer's bias (transformers creates it, or not, from the config alone) */
  bias?: { expected: boolean; because: string },
  /** the output size config.json gives this layer (transformers refuses weights of another shape) */
  out?: ConfigSize,
): Tensor {
  const weightName = `${name}.weight`;
  const biasName = ctx.w.has(`${name}.bias`) ? `${name}.bias` : undefined;
  if (bias && bias.expected !== !!biasName)
    throw new ConfigError(
      bias.expected
        ? `the checkpoint has no ${name}.bias, but ${bias.because} (transformers would fill it with random numbers)`
        : `the checkpoint has ${name}.bias, but ${bias.because} (transformers would ignore it)`,
    );
  const dims = ctx.w.shape(weightName);
  if (dims.length !== 2)
    throw new ConfigError(`weight ${weightName} has shape [${dims.join(', ')}]; a linear layer's weight is a matrix`);
  const [r, c] = dims;
  const [dOut, dIn] = layout === 'out_in' ? [r, c] : [c, r];
  if (out && dOut !== out.size)
    throw new ConfigError(
      `weight ${weightName} has ${dOut} outputs, but config.json says ${out.size} (${out.because}); transformers refuses to load weights of another shape`,
    );
  if (x.shape[1] !== dIn)
    throw new ConfigError(`weight ${weightName} has input size ${dIn} but the layer receives ${x.shape[1]}`);
  if (biasName) expectShape(ctx, biasName, [dOut], `the bias of a layer with ${dOut} outputs`);
  const y = ctx.g.gemm(x, ctx.w.get(weightName), biasName ? ctx.w.get(biasName) : null, layout === 'out_in');
  if (ctx.lora) return loraBranch(ctx, ctx.lora, name, x, y, kind, dIn, dOut);
  ctx.modules.push({ name, kind, input: x, output: y, dIn, dOut, hasBias: !!biasName, weightName, biasName, layout });
  return y;
}

/**
 * PEFT's LoRA Linear forward on a targeted layer: y + scaling · B(A x), dropout off. A and B
 * are the tracked modules (named as in adapter_model.safetensors without `.weight`); the
 * base layer is frozen and untracked. A and B are torch Linear layers whatever the base's
 * layout: fan_in_fan_out only says how the base weight is stored (GPT-2's Conv1D), which the
 * architecture already knows.
 */
function loraBranch(
  ctx: BuildContext,
  lora: NonNullable<BuildContext['lora']>,
  name: string,
  x: Tensor,
  y: Tensor,
  kind: ModuleKind,
  dIn: number,
  dOut: number,
): Tensor {
  const { adapter } = lora;
  const selecting = targets(adapter, name);
  if (!selecting.length) return y;
  for (const t of selecting) lora.matchedTargets.add(t);
  const target = selecting[0];
  const prefix = `${PEFT_PREFIX}${name}`;
  const aName = `${prefix}.lora_A.weight`;
  const bName = `${prefix}.lora_B.weight`;
  for (const t of [aName, bName])
    if (!ctx.w.has(t))
      throw new ConfigError(
        `${adapter.weightsPath}: no tensor ${t}, but "target_modules" ${JSON.stringify(target)} in adapter_config.json selects ${name}`,
      );
  const r = adapter.r;
  const expect = (t: string, shape: number[]) => {
    const got = ctx.w.shape(t);
    if (got.length !== 2 || got[0] !== shape[0] || got[1] !== shape[1])
      throw new ConfigError(
        `${adapter.weightsPath}: ${t} has shape [${got.join(', ')}], expected [${shape.join(', ')}] (adapter_config.json "r": ${r})`,
      );
  };
  expect(aName, [r, dIn]);
  expect(bName, [dOut, r]);
  lora.usedTensors.add(aName).add(bName);
  const { g } = ctx;
  const ax = g.gemm(x, ctx.w.get(aName), null, true);
  const bax = g.gemm(ax, ctx.w.get(bName), null, true);
  const common = { kind, hasBias: false, layout: 'out_in' as const };
  ctx.modules.push({ ...common, name: `${prefix}.lora_A`, input: x, output: ax, dIn, dOut: r, weightName: aName });
  ctx.modules.push({ ...common, name: `${prefix}.lora_B`, input: ax, output: bax, dIn: r, dOut, weightName: bName });
  return g.add(y, g.mul(bax, g.scalar(adapter.scaling)));
}

export function layerNorm(ctx: BuildContext, x: Tensor, prefix: string, eps: number): Tensor {
  const { g, w } = ctx;
  // x̂ = (x − mean)·r, r = 1/√(var + eps) (as PyTorch's kernel computes it), with the backward
  // written out: dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂ ⊙ x̂)): 7 ops on [N, d] where
  // differentiating the forward's ops emitted about twice as many.
  const { xn, r } = g.noGrad(() => {
    const xc = g.sub(x, g.reduceMean(x, [-1], true));
    const variance = g.reduceMean(g.mul(xc, xc), [-1], true);
    const r = g.div(g.scalar(1), g.sqrt(g.add(variance, g.scalar(eps))));
    return { xn: g.mul(xc, r), r };
  });
  g.custom([x], [xn], ([gxn]) => {
    const centred = g.sub(gxn!, g.reduceMean(gxn!, [-1], true));
    const along = g.mul(xn, g.reduceMean(g.mul(gxn!, xn), [-1], true));
    return [g.mul(g.sub(centred, along), r)];
  });
  normShapes(ctx, x, prefix);
  const scaled = g.mul(xn, w.get(`${prefix}.weight`));
  return w.has(`${prefix}.bias`) ? g.add(scaled, w.get(`${prefix}.bias`)) : scaled;
}

/** A norm's weight (and bias) have the features of what it normalises. */
function normShapes(ctx: BuildContext, x: Tensor, prefix: string): void {
  const d = x.shape[x.shape.length - 1];
  if (typeof d !== 'number') return;
  for (const part of ['weight', 'bias'])
    if (part === 'weight' || ctx.w.has(`${prefix}.${part}`))
      expectShape(ctx, `${prefix}.${part}`, [d], `a norm over ${d} features`);
}

/** x / √(mean(x²) + eps) · weight, or · (offset + weight) (Gemma's norms store weight − 1: offset 1). */
export function rmsNorm(ctx: BuildContext, x: Tensor, prefix: string, eps: number, offset = 0): Tensor {
  const { g, w } = ctx;
  normShapes(ctx, x, prefix);
  const ms = g.reduceMean(g.mul(x, x), [-1], true);
  const weight = w.get(`${prefix}.weight`);
  return g.mul(g.div(x, g.sqrt(g.add(ms, g.scalar(eps)))), offset ? g.add(weight, g.scalar(offset)) : weight);
}

export function gelu(g: Graph, x: Tensor, kind: string): Tensor {
  const exact = kind === 'gelu' || kind === 'gelu_python';
  if (!exact && kind !== 'gelu_new' && kind !== 'gelu_pytorch_tanh' && kind !== 'gelu_fast')
    throw new ConfigError(`unsupported activation "${kind}" (supported: gelu, gelu_new, gelu_pytorch_tanh, silu)`);
  const c = Math.sqrt(2 / Math.PI);
  const y = g.noGrad(() =>
    exact
      ? // exact: 0.5·x·(1 + erf(x/√2))
        g.mul(g.mul(x, g.scalar(0.5)), g.add(g.scalar(1), g.erf(g.mul(x, g.scalar(Math.SQRT1_2)))))
      : // tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        g.mul(
          g.mul(x, g.scalar(0.5)),
          g.add(g.scalar(1), g.tanh(g.mul(g.add(x, g.mul(g.pow(x, 3), g.scalar(0.044715))), g.scalar(c)))),
        ),
  );
  // The derivative is recomputed from x alone: the forward's intermediates (three [N, 4d]
  // tensors a layer) are not kept for the backward. Written with other constants than the
  // forward (erf(−x/√2), a factored tanh argument), so that ONNX Runtime's common
  // subexpression elimination cannot merge the two and keep the forward's alive after all.
  g.custom([x], [y], ([gy]) => {
    let dy: Tensor;
    if (exact) {
      // ½(1 + erf(x/√2)) + x·φ(x), φ the standard normal density
      const cdf = g.mul(g.sub(g.scalar(1), g.erf(g.mul(x, g.scalar(-Math.SQRT1_2)))), g.scalar(0.5));
      const pdf = g.mul(g.exp(g.mul(g.mul(x, x), g.scalar(-0.5))), g.scalar(1 / Math.sqrt(2 * Math.PI)));
      dy = g.add(cdf, g.mul(x, pdf));
    } else {
      // ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715·x²), t = tanh(x·(√(2/π) + √(2/π)·0.044715·x²))
      const x2 = g.mul(x, x);
      const t = g.tanh(g.mul(x, g.add(g.mul(x2, g.scalar(c * 0.044715)), g.scalar(c))));
      // (no x·½ node: the forward has one, and ORT's GELU fusion must not find it shared)
      const half = g.add(g.mul(x2, g.scalar(1.5 * 0.044715 * c)), g.scalar(0.5 * c));
      const slope = g.mul(g.mul(x, g.sub(g.scalar(1), g.mul(t, t))), half);
      dy = g.add(g.mul(g.add(t, g.scalar(1)), g.scalar(0.5)), slope);
    }
    return [g.mul(gy!, dy)];
  });
  return y;
}

export function silu(g: Graph, x: Tensor): Tensor {
  return g.mul(x, g.sigmoid(x));
}

export function activation(g: Graph, x: Tensor, kind: string): Tensor {
  return kind === 'silu' || kind === 'swish' ? silu(g, x) : gelu(g, x, kind);
}

export interface Rope {
  /** [T, rotDim] cos and sin tables (no gradient) */
  cos: Tensor;
  sin: Tensor;
  rotDim: number;
}

/**
 * A config's rotary embedding settings, resolved as transformers 5 does
 * (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`): an old-style `rope_scaling`
 * dict replaces `rope_parameters`; `rope_theta` comes from that dict, else the top-level
 * key, else 10000; the type from `rope_type` (or the older `type`), else "default"; llama3
 * scaling falls back to `max_position_embeddings` for its original context length.
 */
export interface RopeSpec {
  type: string;
  theta: number;
  params: Config;
  /** what cos and sin are multiplied by (longrope's attention factor; 1 for the other types) */
  scaling?: number;
}

export function resolveRope(config: Config): RopeSpec {
  const params: Config = { ...ropeDict(config) };
  params.rope_theta ??= config.rope_theta ?? 10000;
  if (params.rope_type === undefined) params.rope_type = params.type ?? 'default';
  if (params.rope_type === 'llama3') {
    params.original_max_position_embeddings ??= config.max_position_embeddings;
    // transformers would fall back to its config class's default context (2048 for Llama): the
    // scaling depends on it, so it is asked for instead of guessed (without it every frequency is NaN)
    if (typeof params.original_max_position_embeddings !== 'number')
      throw new ConfigError(
        'config.json: rope type "llama3" needs "original_max_position_embeddings" in its rope dict, or "max_position_embeddings" (the context the model was pre-trained at)',
      );
  }
  if (LONGROPE_NAMES.includes(String(params.rope_type))) params.rope_type = 'longrope'; // Phi3Config renames them
  const spec: RopeSpec = { type: String(params.rope_type), theta: Number(params.rope_theta), params };
  if (spec.type === 'longrope') spec.scaling = longropeScaling(config, params);
  return spec;
}

/** Phi3Config's defaults for original_max_position_embeddings and max_position_embeddings. */
const PHI3_DEFAULT_CONTEXT = 4096;

/** LongRoPE's pre-training context: see `longropeScaling`. */
function longropeOriginal(config: Config): number {
  const top = config.original_max_position_embeddings;
  return typeof top === 'number' ? top : PHI3_DEFAULT_CONTEXT;
}

/**
 * LongRoPE (Phi-3.5, Phi-4-mini, Phi-3's 128k models; only Phi-3 accepts it), as transformers'
 * _compute_longrope_parameters and standardize_rope_params: the pre-training context is the
 * top-level original_max_position_embeddings, whose Phi3Config default (4096) overrides the rope
 * dict's value even when the key is absent; `factor` defaults to max_position_embeddings (default
 * 4096) over it, and cos and sin are multiplied by `attention_factor`, else
 * √(1 + ln factor / ln context) when factor > 1. Only the short factors are built: transformers
 * switches to the long ones when a padded batch is longer than that context, which `contextLength`
 * (data/tokenize.ts) never lets a sequence be.
 */
function longropeScaling(config: Config, params: Config): number {
  const original = longropeOriginal(config);
  params.original_max_position_embeddings = original;
  if (!(original > 1))
    throw new ConfigError(
      'config.json: rope type "longrope" needs "original_max_position_embeddings" (the context the model was pre-trained at) above 1',
    );
  if (typeof params.attention_factor === 'number') return params.attention_factor;
  const max =
    typeof config.max_position_embeddings === 'number' ? config.max_position_embeddings : PHI3_DEFAULT_CONTEXT;
  const factor = typeof params.factor === 'number' ? params.factor : max / original;
  return factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(original));
}

/**
 * The longest sequence a longrope model is run on: its pre-training context, where transformers
 * keeps the short factors (beyond it the long ones, chosen per padded batch); undefined for the
 * other RoPE types and for models without RoPE.
 */
export function longropeContext(config: Config): number | undefined {
  const d = ropeDict(config);
  return LONGROPE_NAMES.includes(String(d.rope_type ?? d.type)) ? longropeOriginal(config) : undefined;
}

/** Phi3Config reads "su" and "yarn" as longrope. */
export const LONGROPE_NAMES: readonly string[] = ['longrope', 'su', 'yarn'];

/**
 * The rope dict transformers reads: `rope_scaling or rope_parameters`, in Python's truthiness, so
 * an empty `rope_scaling: {}` (or null) leaves `rope_parameters` in force.
 */
export function ropeDict(config: Config): Config {
  const truthy = (v: unknown) => !!v && typeof v === 'object' && Object.keys(v as object).length > 0;
  if (truthy(config.rope_scaling)) return config.rope_scaling as Config;
  if (truthy(config.rope_parameters)) return config.rope_parameters as Config;
  return {};
}

/** The `rope_parameters` / `rope_scaling` sub-keys each RoPE type reads (others are refused). */
export const ROPE_TYPE_KEYS: Readonly<Record<string, readonly string[]>> = {
  default: [],
  linear: ['factor'],
  llama3: ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'],
  longrope: ['short_factor', 'long_factor', 'factor', 'attention_factor', 'original_max_position_embeddings'],
};

/** The RoPE types of the Llama family, GPT-NeoX and Gemma 3 (longrope is Phi-3's, `ropeRule`). */
export const COMMON_ROPE_TYPES: readonly string[] = ['default', 'linear', 'llama3'];

/** RoPE's inverse frequencies for `rotDim` rotated features, as transformers computes them. */
export function inverseFrequencies(rotDim: number, rope: RopeSpec): number[] {
  const half = rotDim / 2;
  const theta = rope.theta;
  const scaling = rope.params;
  // The inverse frequencies as transformers computes them: float32 tensors, each operation rounded
  // to float32 (Math.fround), a Python scalar taken as float32 in an operation with a tensor.
  // Rounded once from float64 instead, a third of them differed by one unit in the last place,
  // an angle error that grows with the position (2e-3 rad at 32k positions).
  const f32 = Math.fround;
  let invFreq = Array.from({ length: half }, (_, i) => f32(1 / f32(f32(theta) ** f32((2 * i) / rotDim))));
  const type = rope.type;
  if (type === 'linear') {
    const factor = f32(Number(scaling.factor));
    invFreq = invFreq.map((f) => f32(f / factor));
  } else if (type === 'llama3') {
    // transformers' _compute_llama3_parameters, operation by operation
    const factor = f32(Number(scaling.factor));
    const lowFreqFactor = Number(scaling.low_freq_factor);
    const highFreqFactor = Number(scaling.high_freq_factor);
    const oldCtx = Number(scaling.original_max_position_embeddings);
    const lowWavelen = f32(oldCtx / lowFreqFactor);
    const highWavelen = f32(oldCtx / highFreqFactor);
    const twoPi = f32(2 * Math.PI);
    invFreq = invFreq.map((f) => {
      const wavelen = f32(twoPi / f);
      const llama = wavelen > lowWavelen ? f32(f / factor) : f;
      if (wavelen < highWavelen || wavelen > lowWavelen) return llama;
      const smooth = f32(f32(f32(oldCtx) / wavelen) - f32(lowFreqFactor)) / f32(highFreqFactor - lowFreqFactor);
      const s = f32(smooth);
      return f32(f32(f32(f32(1 - s) * llama) / factor) + f32(s * llama));
    });
  } else if (type === 'longrope') {
    // transformers: 1 / (short_factor · base^(2i/dim)), in float32
    const short = scaling.short_factor as number[];
    for (const key of ['short_factor', 'long_factor']) {
      const f = scaling[key];
      // Phi3Config's validation refuses other lengths, for the long factors too
      if (!Array.isArray(f) || f.length !== half || !f.every((x) => typeof x === 'number' && x > 0))
        throw new ConfigError(
          `config.json: rope type "longrope" needs "${key}": ${half} numbers above 0 (half the ${rotDim} rotated features of a head)`,
        );
    }
    invFreq = Array.from({ length: half }, (_, i) =>
      f32(1 / f32(f32(short[i]) * f32(f32(theta) ** f32((2 * i) / rotDim)))),
    );
  } else if (type !== 'default') {
    throw new ConfigError(`unsupported rope type "${type}" (supported: ${Object.keys(ROPE_TYPE_KEYS).join(', ')})`);
  }
  return invFreq;
}

/**
 * Features of each head RoPE rotates: int(head_dim · partial_rotary_factor), as transformers; rotate_half
 * splits them in two halves, so an even number from 2 to head_dim (`what` names the config keys).
 */
export function rotaryDims(hd: number, factor: number, what = 'partial_rotary_factor'): number {
  const dims = Math.floor(hd * factor);
  if (!(dims >= 2 && dims <= hd && dims % 2 === 0))
    throw new ConfigError(
      `config.json: ${what} ${factor} rotates ${dims} of each head's ${hd} features; an even number from 2 to ${hd} is supported`,
    );
  return dims;
}

/** Rotary tables for positions 0..T-1 (non-interleaved halves, as in Llama / GPT-NeoX). */
export function ropeTables(ctx: BuildContext, rotDim: number, rope: RopeSpec): Rope {
  const { g } = ctx;
  const half = rotDim / 2;
  const invFreq = inverseFrequencies(rotDim, rope);
  return g.noGrad(() => {
    const pos = positions(ctx);
    const posF = g.cast(
      g.node('Unsqueeze', [pos, g.ints([1])], [{ dtype: DataType.INT64, shape: ['T', 1] }])[0],
      g.float,
    );
    // Compute the angles in float64 precision on the JS side is impossible for dynamic T, so
    // match PyTorch: fp32 positions × fp32 inverse frequencies.
    const freqs = g.node('Mul', [posF, g.floats(invFreq, [1, half])], [{ dtype: g.float, shape: ['T', half] }])[0];
    const emb = g.node('Concat', [freqs, freqs], [{ dtype: g.float, shape: ['T', rotDim] }], { axis: 1 })[0];
    let cos = g.node('Cos', [emb], [{ dtype: g.float, shape: ['T', rotDim] }])[0];
    let sin = g.node('Sin', [emb], [{ dtype: g.float, shape: ['T', rotDim] }])[0];
    if (rope.scaling !== undefined && rope.scaling !== 1) {
      cos = g.mul(cos, g.scalar(rope.scaling));
      sin = g.mul(sin, g.scalar(rope.scaling));
    }
    return { cos, sin, rotDim };
  });
}

/** int64 [T] positions 0..T-1 */
export function positions(ctx: BuildContext): Tensor {
  const { g } = ctx;
  return g.noGrad(() => {
    const t = g.node(
      'Squeeze',
      [g.shapeOf(ctx.inputIds, 1, 2), g.ints([0])],
      [{ dtype: DataType.INT64, shape: [] }],
    )[0];
    return g.node(
      'Range',
      [g.scalar(0, DataType.INT64), t, g.scalar(1, DataType.INT64)],
      [{ dtype: DataType.INT64, shape: ['T'] }],
    )[0];
  });
}

/** Apply rotary embedding to x [..., T, headDim] on its first rotDim features. */
function applyRope(g: Graph, x: Tensor, rope: Rope): Tensor {
  const hd = x.shape[x.shape.length - 1] as number;
  const [rot, pass] = rope.rotDim < hd ? g.split(x, [rope.rotDim, hd - rope.rotDim], -1) : [x, null];
  const [x1, x2] = g.split(rot, [rope.rotDim / 2, rope.rotDim / 2], -1);
  const rotated = g.concat([g.neg(x2), x1], -1);
  const out = g.add(g.mul(rot, rope.cos), g.mul(rotated, rope.sin));
  return pass ? g.concat([out, pass], -1) : out;
}

/**
 * What decides which keys a query may attend: causal order, real (unpadded) keys, and a sliding
 * window if any. The additive bias is built a chunk of queries at a time inside `attention`'s
 * loops ([B, 1, 1, c, T]), never whole: a [B, 1, 1, T, T] bias is 4 GB at 32k tokens.
 */
export interface AttentionMask {
  /** [B, 1, 1, 1, T] bool: the key is a real token */
  keyReal: Tensor;
  /** [1, T] int64 key positions */
  keyPos: Tensor;
  slidingWindow?: number;
}

export function attentionMask(ctx: BuildContext, slidingWindow?: number): AttentionMask {
  const { g } = ctx;
  return g.noGrad(() => {
    const B = DataType.BOOL;
    const keyPos = g.node('Unsqueeze', [positions(ctx), g.ints([0])], [{ dtype: DataType.INT64, shape: [1, 'T'] }])[0];
    const real = g.node('Cast', [ctx.attentionMask], [{ dtype: B, shape: ['B', 'T'] }], { to: B })[0];
    const keyReal = g.node('Unsqueeze', [real, g.ints([1, 2, 3])], [{ dtype: B, shape: ['B', 1, 1, 1, 'T'] }])[0];
    return { keyReal, keyPos, slidingWindow };
  });
}

/**
 * The additive bias [B, 1, 1, c, T] for queries at positions start … start + c − 1 (built in a
 * loop body `b`): 0 where query i may attend key j (j ≤ i, a real key, within the window), a
 * large negative otherwise. Padded query rows past T attend every earlier key: finite, unused.
 */
function chunkBias(b: Graph, mask: AttentionMask, start: Tensor, end: Tensor): Tensor {
  const I = DataType.INT64;
  const B = DataType.BOOL;
  const scalar = (t: Tensor) => b.node('Squeeze', [t, b.ints([0])], [{ dtype: I, shape: [] }])[0];
  const range = b.node('Range', [scalar(start), scalar(end), b.scalar(1, I)], [{ dtype: I, shape: ['c'] }])[0];
  const qi = b.node('Unsqueeze', [range, b.ints([1])], [{ dtype: I, shape: ['c', 1] }])[0];
  let allowed = b.node('LessOrEqual', [mask.keyPos, qi], [{ dtype: B, shape: ['c', 'T'] }])[0];
  if (mask.slidingWindow) {
    const dist = b.node('Sub', [qi, mask.keyPos], [{ dtype: I, shape: ['c', 'T'] }])[0];
    const near = b.node('Less', [dist, b.scalar(mask.slidingWindow, I)], [{ dtype: B, shape: ['c', 'T'] }])[0];
    allowed = b.node('And', [allowed, near], [{ dtype: B, shape: ['c', 'T'] }])[0];
  }
  const both = b.node('And', [allowed, mask.keyReal], [{ dtype: B, shape: ['B', 1, 1, 'c', 'T'] }])[0];
  return b.node('Where', [both, b.scalar(0), b.scalar(-1e9)], [{ dtype: b.float, shape: ['B', 1, 1, 'c', 'T'] }])[0];
}

/** Bytes of one query chunk's [B, h, c, T] scores: a handful of such tensors are alive in an iteration. */
export const ATTENTION_CHUNK_BYTES = 32 * 2 ** 20;

export interface AttentionSpec {
  nHeads: number;
  nKv: number;
  headDim: number;
  rope?: Rope;
  mask: AttentionMask;
  scale?: number;
}

/**
 * Scaled dot-product attention on projected q [N, h·hd], k, v [N, kv·hd]; returns [N, h·hd].
 * Grouped-query attention without copying K/V: queries are laid out [B, kv, rep, T, hd] and
 * keys [B, kv, 1, T, hd], so one broadcast MatMul serves MHA (rep = 1) and GQA alike.
 * Head i uses KV head floor(i / rep), as transformers' repeat_kv does.
 *
 * Queries are taken a chunk of c rows at a time in an ONNX Loop (forward and backward), so the
 * B·h·c·T scores and probabilities of one chunk are alive, not B·h·T² (at 2,048 tokens of
 * Pythia-70M's 8 heads: 134 MB a copy, four or five copies in the backward). Rows are
 * independent in attention, so each row's result is the same computation as on the whole matrix.
 */
export function attention(ctx: BuildContext, q: Tensor, k: Tensor, v: Tensor, s: AttentionSpec): Tensor {
  const { g, bt } = ctx;
  const rep = s.nHeads / s.nKv;
  if (!Number.isInteger(rep))
    throw new ConfigError(`num_attention_heads ${s.nHeads} is not a multiple of kv heads ${s.nKv}`);
  const hd = s.headDim;
  const qShape = g.noGrad(() => g.concatInts([bt, g.ints([s.nKv, rep, hd])]));
  const kShape = g.noGrad(() => g.concatInts([bt, g.ints([s.nKv, 1, hd])]));
  // [N, h·hd] → [B, T, kv, rep, hd] → [B, kv, rep, T, hd]
  let qh = g.transpose(g.reshape(q, qShape, ['B', 'T', s.nKv, rep, hd]), [0, 2, 3, 1, 4]);
  let kh = g.transpose(g.reshape(k, kShape, ['B', 'T', s.nKv, 1, hd]), [0, 2, 3, 1, 4]);
  const vh = g.transpose(g.reshape(v, kShape, ['B', 'T', s.nKv, 1, hd]), [0, 2, 3, 1, 4]);
  if (s.rope) {
    qh = applyRope(g, qh, s.rope);
    kh = applyRope(g, kh, s.rope);
  }
  const scale = s.scale ?? 1 / Math.sqrt(hd);
  const F = g.float;
  const qs = qh.shape; // [B, kv, rep, T, hd]
  const chunk = (c: Dim) => [qs[0], qs[1], qs[2], c, hd];
  const lay = g.noGrad(() => queryChunks(ctx, s.nHeads, g.float === DataType.DOUBLE ? 8 : 4));
  const kT = () => g.noGrad(() => g.transpose(kh, [0, 1, 2, 4, 3])); // [B, kv, 1, hd, T]
  /** one chunk's rows of a padded [B, kv, rep, P, hd] tensor, and the chunk's bias, in a loop body */
  const chunkOf = (b: Graph, i: Tensor) => {
    const { start, end } = chunkBounds(b, i, lay.c);
    return {
      rows: (x: Tensor) => b.node('Slice', [x, start, end, b.ints([3])], [{ dtype: x.dtype, shape: chunk('c') }])[0],
      bias: chunkBias(b, s.mask, start, end),
    };
  };
  /** softmax(q_c kᵀ · scale + bias_c) for one chunk: [B, kv, rep, c, T] */
  const probs = (b: Graph, qc: Tensor, kt: Tensor, bias: Tensor) =>
    b.softmax(b.add(b.matmul(b.mul(qc, b.scalar(scale)), kt), bias), -1);
  /** [K, B, kv, rep, c, hd] stacked chunks → [B, kv, rep, T, hd] */
  const unchunk = (stacked: Tensor) => {
    const t = g.transpose(stacked, [1, 2, 3, 0, 4, 5]);
    const p = g.reshape(t, [0, 0, 0, -1, hd]);
    return g.node('Slice', [p, g.ints([0]), lay.T, g.ints([3])], [{ dtype: F, shape: qs }])[0];
  };

  const out = g.noGrad(() => {
    const qP = lay.pad(qh);
    const kt = kT();
    const [stacked] = g.loop(lay.k, [], [{ dtype: F, shape: chunk('c') }], (b, i) => {
      const c = chunkOf(b, i);
      return { carried: [], scans: [b.matmul(probs(b, c.rows(qP), kt, c.bias), vh)] };
    });
    return unchunk(stacked);
  });
  // The backward recomputes each chunk's probabilities instead of keeping them from the forward.
  // k and v get their gradients summed over the chunks (loop-carried); q's rows come chunk by chunk.
  g.custom([qh, kh, vh], [out], ([gOut], [nq, nk, nv]) => {
    const qP = lay.pad(qh);
    const gP = lay.pad(gOut!);
    const kt = kT();
    const vT = g.transpose(vh, [0, 1, 2, 4, 3]);
    // GQA: k and v are broadcast over the rep axis, so their gradients sum over it
    const overRep = (b: Graph, t: Tensor) => (rep > 1 ? b.reduceSum(t, [2], true) : t);
    const needQK = nq || nk;
    const init = [g.zerosLike(kh), ...(needQK ? [g.zerosLike(kh)] : [])];
    const res = g.loop(lay.k, init, nq ? [{ dtype: F, shape: chunk('c') }] : [], (b, i, [dvAcc, dkAcc]) => {
      const c = chunkOf(b, i);
      const qc = c.rows(qP);
      const gy = c.rows(gP);
      const p = probs(b, qc, kt, c.bias);
      const dv = b.add(dvAcc, overRep(b, b.matmul(b.transpose(p, [0, 1, 2, 4, 3]), gy)));
      if (!needQK) return { carried: [dv], scans: [] };
      const dp = b.matmul(gy, vT);
      const ds = b.mul(b.mul(p, b.sub(dp, b.reduceSum(b.mul(dp, p), [-1], true))), b.scalar(scale));
      const dk = b.add(dkAcc, overRep(b, b.matmul(b.transpose(ds, [0, 1, 2, 4, 3]), qc)));
      return { carried: [dv, dk], scans: nq ? [b.matmul(ds, kh)] : [] };
    });
    const dv = nv ? res[0] : null;
    const dk = nk ? res[1] : null;
    const dq = nq ? unchunk(res[2]) : null;
    return [dq, dk, dv];
  });
  return g.reshape(g.transpose(out, [0, 3, 1, 2, 4]), [-1, s.nHeads * hd]);
}

/**
 * How `attention` splits the queries (`chunkPlan`): rows = as many as keep one chunk's B·h·c·T
 * scores within ATTENTION_CHUNK_BYTES (or ctx.attentionRows, for tests).
 */
function queryChunks(ctx: BuildContext, heads: number, bytesPerFloat: number) {
  const { g } = ctx;
  const I = DataType.INT64;
  const int = (op: string, a: Tensor, b: Tensor) => g.node(op, [a, b], [{ dtype: I, shape: [1] }])[0];
  const B = g.shapeOf(ctx.inputIds, 0, 1);
  const T = g.shapeOf(ctx.inputIds, 1, 2);
  let rows: Tensor;
  if (ctx.attentionRows !== undefined) rows = g.ints([ctx.attentionRows]);
  else {
    const perRow = int('Mul', int('Mul', B, T), g.ints([heads]));
    rows = int('Max', int('Div', g.ints([Math.floor(ATTENTION_CHUNK_BYTES / bytesPerFloat)]), perRow), g.ints([1]));
  }
  const { k, c, pad: padRows } = chunkPlan(g, T, rows);
  const zeros = g.ints([0, 0, 0]);
  const pads = g.concatInts([zeros, g.ints([0]), g.ints([0]), zeros, padRows, g.ints([0])]);
  const pad = (x: Tensor) =>
    g.node('Pad', [x, pads], [{ dtype: x.dtype, shape: [...x.shape.slice(0, 3), 'P', x.shape[4]] }], {
      mode: 'constant',
    })[0];
  return { k, c, T, pad };
}

/**
 * The unembedding matrix as transformers picks it: the token embedding when
 * `tie_word_embeddings` is true, the separate head otherwise. A tied checkpoint that also
 * stores the head is read as tied only when the two are the same bytes (then every loader
 * agrees); with other values transformers 5 keeps them untied while 4.x replaced the head by
 * the embedding, so that checkpoint is refused rather than guessed at, as is a checkpoint
 * without the head its config asks for.
 */
export function outputHead(ctx: BuildContext, config: Config, embedding: string, head: string, tieDefault: boolean) {
  const tie = typeof config.tie_word_embeddings === 'boolean' ? config.tie_word_embeddings : tieDefault;
  const setting = `"tie_word_embeddings" is ${tie}${'tie_word_embeddings' in config ? '' : ' (the default)'}`;
  if (tie && ctx.w.has(head) && !ctx.w.sameValues(embedding, head))
    throw new ConfigError(
      `config.json: ${setting}, but the checkpoint also has ${head} with other values than ${embedding} (transformers 5 then uses ${head}, transformers 4 replaced it by ${embedding}); set "tie_word_embeddings": false in config.json if ${head} is this model's head`,
    );
  if (!tie && !ctx.w.has(head))
    throw new ConfigError(
      `config.json: ${setting}, but the checkpoint has no ${head} (transformers would fill it with random numbers)`,
    );
  const used = tie ? embedding : head;
  // vocab_size rows; its columns meet the hidden states: the embedding's width (checked by embed)
  const width = ctx.w.shape(embedding)[1];
  const vocab = typeof config.vocab_size === 'number' ? config.vocab_size : ctx.w.shape(used)[0];
  expectShape(ctx, used, [vocab, width], `vocab_size ${vocab} × the hidden size ${width}, the width of ${embedding}`);
  return ctx.w.get(used);
}

/** A size config.json gives a weight, and the keys it comes from (for the refusal). */
export interface ConfigSize {
  size: number;
  because: string;
}

/** What config.json says a Llama-like decoder's shapes are, with where head_dim and the KV heads came from. */
export interface DecoderShape {
  d: number;
  nHead: number;
  nKv: number;
  hd: number;
  inter: number;
  /** e.g. "head_dim 128", "head_dim absent, so qwen3's default 128" */
  hdWhy: string;
  kvWhy: string;
}

/** The output sizes config.json gives a Llama-like decoder's weights, each with the keys it comes from. */
export function decoderSizes(c: Config, s: DecoderShape) {
  const vocab = num(c, ['vocab_size']);
  return {
    q: { size: s.nHead * s.hd, because: `num_attention_heads ${s.nHead} × ${s.hdWhy}` },
    kv: { size: s.nKv * s.hd, because: `${s.kvWhy} × ${s.hdWhy}` },
    hidden: { size: s.d, because: `hidden_size ${s.d}` },
    inter: { size: s.inter, because: `intermediate_size ${s.inter}` },
    vocab: { size: vocab, because: `vocab_size ${vocab}` },
  };
}

/** What config.json says about a layer's bias (see `linear`). */
export type Bias = { expected: boolean; because: string };

/**
 * One layer's `self_attn.{q,k,v}_proj`; with `headNorm`, every query and key head goes through an
 * RMSNorm over its head_dim features first (`self_attn.q_norm` / `k_norm`: Qwen3, and Gemma 3
 * with offset 1), [N, heads·hd] → [N, heads, hd] and back.
 */
export function qkvProjections(
  ctx: BuildContext,
  prefix: string,
  h: Tensor,
  shape: DecoderShape,
  sizes: ReturnType<typeof decoderSizes>,
  bias: Bias,
  headNorm?: { eps: number; offset: number },
): { q: Tensor; k: Tensor; v: Tensor } {
  const { g } = ctx;
  const normed = (t: Tensor, heads: number, name: string) =>
    headNorm
      ? g.reshape(
          rmsNorm(ctx, g.reshape(t, [-1, heads, shape.hd]), `${prefix}.${name}`, headNorm.eps, headNorm.offset),
          [-1, heads * shape.hd],
        )
      : t;
  const proj = (name: string, size: ConfigSize) =>
    linear(ctx, `${prefix}.${name}`, h, 'attention', 'out_in', bias, size);
  return {
    q: normed(proj('q_proj', sizes.q), shape.nHead, 'q_norm'),
    k: normed(proj('k_proj', sizes.kv), shape.nKv, 'k_norm'),
    v: proj('v_proj', sizes.kv),
  };
}

/**
 * A gated MLP, `down(act(gate(x)) · up(x))` (`{prefix}.gate_proj`, `up_proj`, `down_proj`); `fused`:
 * gate and up are the two halves of one `{prefix}.gate_up_proj` (Phi-3), tracked as that one layer.
 */
export function gatedMlp(
  ctx: BuildContext,
  prefix: string,
  x: Tensor,
  act: string,
  bias: Bias,
  sizes: ReturnType<typeof decoderSizes>,
  fused = false,
): Tensor {
  const { g } = ctx;
  const inter = sizes.inter;
  const [gate, up] = fused
    ? g.split(
        linear(ctx, `${prefix}.gate_up_proj`, x, 'mlp', 'out_in', bias, {
          size: 2 * inter.size,
          because: `2 × ${inter.because}`,
        }),
        [inter.size, inter.size],
        -1,
      )
    : [
        linear(ctx, `${prefix}.gate_proj`, x, 'mlp', 'out_in', bias, inter),
        linear(ctx, `${prefix}.up_proj`, x, 'mlp', 'out_in', bias, inter),
      ];
  return linear(ctx, `${prefix}.down_proj`, g.mul(activation(g, gate, act), up), 'mlp', 'out_in', bias, sizes.hidden);
}

/**
 * The weight `name` must have this shape, as transformers builds the module from config.json
 * (it refuses a checkpoint of another shape at load; without this check a wrong bias or norm
 * surfaced as an ONNX Runtime broadcast error, a short position table as an out-of-bounds Gather
 * once a text was long enough).
 */
export function expectShape(ctx: BuildContext, name: string, shape: number[], because: string): void {
  const got = ctx.w.shape(name);
  if (got.length !== shape.length || got.some((n, i) => n !== shape[i]))
    throw new ConfigError(
      `weight ${name} has shape [${got.join(', ')}], but config.json says [${shape.join(', ')}] (${because}); transformers refuses to load weights of another shape`,
    );
}

/** Token embedding lookup for the flattened [N] ids; the table must have the config's vocab_size × hidden size. */
export function embed(ctx: BuildContext, table: string, shape?: { vocab: ConfigSize; hidden: ConfigSize }): Tensor {
  const { g } = ctx;
  if (shape)
    expectShape(ctx, table, [shape.vocab.size, shape.hidden.size], `${shape.vocab.because}, ${shape.hidden.because}`);
  const ids = g.noGrad(
    () => g.node('Reshape', [ctx.inputIds, g.ints([-1])], [{ dtype: DataType.INT64, shape: ['B*T'] }])[0],
  );
  return g.gatherRows(ctx.w.get(table), ids);
}
