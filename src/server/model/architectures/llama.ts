import type { Tensor } from '../onnx/graph';
import {
  type Architecture,
  attention,
  attentionMask,
  type Bias,
  type BuildContext,
  type Config,
  ConfigError,
  decoderSizes,
  embed,
  gatedMlp,
  LONGROPE_NAMES,
  linear,
  num,
  outputHead,
  qkvProjections,
  type RopeSpec,
  resolveRope,
  rmsNorm,
  ropeTables,
  rotaryDims,
} from './common';
import {
  anything,
  boolean,
  type ConfigKeys,
  nullOr,
  oneOf,
  positiveInt,
  positiveNumber,
  ropeRule,
} from './config-keys';

/** What differs between the three model types. */
interface Variant {
  /** sliding window of each layer (undefined = full causal attention) */
  windows(c: Config, nLayer: number): Array<number | undefined>;
  /** whether q/k/v, o and the MLP projections have biases, and the config key that says so */
  biases(c: Config): { qkv: boolean; o: boolean; mlp: boolean; because: (part: string) => string };
  /** KV heads when config.json has no num_key_value_heads key (null, or Llama: num_attention_heads) */
  kvHeadsWhenAbsent?: number;
  /** head_dim when config.json has no head_dim key (else hidden_size / num_attention_heads) */
  headDimWhenAbsent?: number;
  /** an RMSNorm over head_dim of every query and key head, before RoPE (`self_attn.q_norm` / `k_norm`) */
  headNorms?: boolean;
  /**
   * Phi-3: q, k and v come from one `self_attn.qkv_proj` and the MLP's gate and up from one
   * `mlp.gate_up_proj` (each tracked as the one linear layer it is, as kronfluence does), split after
   */
  fused?: boolean;
  /** Phi-3: RoPE rotates the first partial_rotary_factor of each head (the rope dict's, else the top-level key) */
  partialRotary?: boolean;
  /** rms_norm_eps when config.json has no such key (the config class's default; Llama, Mistral, Qwen: 1e-6) */
  epsWhenAbsent?: number;
}

/** Keys every Llama-family config may have (LlamaConfig / MistralConfig / Qwen2Config). */
const COMMON_KEYS: ConfigKeys = {
  vocab_size: positiveInt,
  hidden_size: positiveInt,
  intermediate_size: positiveInt,
  num_hidden_layers: positiveInt,
  num_attention_heads: positiveInt,
  num_key_value_heads: nullOr(positiveInt),
  head_dim: nullOr(positiveInt),
  hidden_act: oneOf('silu', 'swish'),
  rms_norm_eps: positiveNumber,
  rope_theta: positiveNumber,
  rope_scaling: ropeRule(false),
  rope_parameters: ropeRule(false),
  tie_word_embeddings: boolean,
};

const LAYER_TYPES = ['full_attention', 'sliding_attention'];

/** transformers' MistralConfig / Qwen2Config default when the key is absent */
const DEFAULT_WINDOW = 4096;

const llamaVariant: Variant = {
  windows: (_c, n) => Array(n).fill(undefined),
  biases: (c) => ({
    qkv: c.attention_bias === true,
    o: c.attention_bias === true,
    mlp: c.mlp_bias === true,
    because: (part) =>
      part === 'mlp'
        ? `config.json "mlp_bias" is ${c.mlp_bias === true}`
        : `config.json "attention_bias" is ${c.attention_bias === true}`,
  }),
};

const LLAMA_KEYS: ConfigKeys = {
  ...COMMON_KEYS,
  attention_bias: boolean,
  mlp_bias: boolean,
  // read by no LlamaModel code path in transformers 5
  pretraining_tp: anything,
  // LlamaModel has no sliding window: transformers ignores this key, and so do we
  sliding_window: anything,
  // written by nanotron exports (SmolLM); transformers ignores them and rotates halves,
  // which is what an interleaved=false model was trained with
  is_llama_config: anything,
  rope_interleaved: oneOf(false),
};

const mistralVariant: Variant = {
  kvHeadsWhenAbsent: 8, // MistralConfig's default
  // MistralModel slides the window on every layer (it ignores layer_types)
  windows: (c, n) => Array(n).fill(window(c)),
  biases: () => ({ qkv: false, o: false, mlp: false, because: () => 'Mistral has no biases' }),
};

const MISTRAL_KEYS: ConfigKeys = {
  ...COMMON_KEYS,
  sliding_window: nullOr(positiveInt),
  // MistralModel warns and ignores layer_types: accept it only where it says what Mistral does
  layer_types: {
    accepts:
      'absent, or every layer "sliding_attention" when sliding_window is set, "full_attention" when not (MistralModel ignores layer_types; for alternating layers the model type is "ministral")',
    ok: (v, c) =>
      Array.isArray(v) && v.every((t) => t === (window(c) === undefined ? 'full_attention' : 'sliding_attention')),
  },
};

const qwen2Variant: Variant = {
  kvHeadsWhenAbsent: 32, // Qwen2Config's default
  windows(c, n) {
    // Qwen2Config.__post_init__: the window exists only with use_sliding_window; layer_types,
    // when absent, slides it on the layers from max_window_layers on.
    const w = c.use_sliding_window === true ? window(c) : undefined;
    const first = typeof c.max_window_layers === 'number' ? c.max_window_layers : 28;
    const types = Array.isArray(c.layer_types)
      ? (c.layer_types as string[])
      : Array.from({ length: n }, (_, i) => (w !== undefined && i >= first ? 'sliding_attention' : 'full_attention'));
    return types.map((t) => {
      if (t !== 'sliding_attention') return undefined;
      if (w === undefined)
        throw new ConfigError(
          `config.json: "layer_types" has "sliding_attention" layers but ${c.use_sliding_window === true ? '"sliding_window" is null' : '"use_sliding_window" is not true'} (transformers refuses this config too)`,
        );
      return w;
    });
  },
  biases: () => ({
    qkv: true,
    o: false,
    mlp: false,
    because: (part) =>
      part === 'qkv' ? 'Qwen2 has q/k/v biases' : 'Qwen2 has biases only on q_proj, k_proj and v_proj',
  }),
};

const QWEN2_KEYS: ConfigKeys = {
  ...COMMON_KEYS,
  // Qwen2.5's own configs carry "use_mrope": false; multimodal RoPE (true) is Qwen2-VL's
  use_mrope: oneOf(false),
  use_sliding_window: boolean,
  sliding_window: nullOr(positiveInt),
  max_window_layers: { accepts: 'a non-negative integer', ok: (v) => Number.isInteger(v) && (v as number) >= 0 },
  // null: the config class works them out, as when the key is absent
  layer_types: nullOr({
    accepts: `a list of num_hidden_layers entries, each ${LAYER_TYPES.map((t) => `"${t}"`).join(' or ')}`,
    ok: (v, c) =>
      Array.isArray(v) && v.length === c.num_hidden_layers && v.every((t) => LAYER_TYPES.includes(t as string)),
  }),
};

/**
 * Qwen3: Qwen2's layout and sliding-window rules (Qwen3Config.__post_init__ is Qwen2Config's)
 * with q/k/v/o biases from attention_bias, a head_dim of its own (128 when absent) and an
 * RMSNorm of each query and key head before RoPE.
 */
const qwen3Variant: Variant = {
  kvHeadsWhenAbsent: 32, // Qwen3Config's default
  headDimWhenAbsent: 128, // Qwen3Config's default, whatever hidden_size / num_attention_heads is
  headNorms: true,
  windows: qwen2Variant.windows,
  biases: (c) => ({
    qkv: c.attention_bias === true,
    o: c.attention_bias === true,
    mlp: false,
    because: (part) =>
      part === 'mlp' ? 'Qwen3 has no MLP biases' : `config.json "attention_bias" is ${c.attention_bias === true}`,
  }),
};

const QWEN3_KEYS: ConfigKeys = {
  ...QWEN2_KEYS,
  // Qwen3Attention reads config.head_dim as it is: null would fail there
  head_dim: positiveInt,
  attention_bias: boolean,
};

/**
 * Phi-3 (Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini): the Llama layout with fused projections
 * (`qkv_proj` = [q; k; v], `gate_up_proj` = [gate; up]), no biases, partial RoPE, longrope
 * scaling (its short factors: see `contextLength`) and a sliding window on every layer when
 * sliding_window is set (Phi3Model masks every layer with it).
 */
const phi3Variant: Variant = {
  fused: true,
  partialRotary: true,
  epsWhenAbsent: 1e-5, // Phi3Config's default
  windows: (c, n) => Array(n).fill(typeof c.sliding_window === 'number' ? c.sliding_window : undefined),
  biases: () => ({ qkv: false, o: false, mlp: false, because: () => 'Phi-3 has no biases' }),
};

const PHI3_ROPE_TYPES = ['default', ...LONGROPE_NAMES];

const PHI3_KEYS: ConfigKeys = {
  ...COMMON_KEYS,
  // Phi3Attention reads config.head_dim when the key exists: null would fail there
  head_dim: positiveInt,
  rope_scaling: ropeRule(true, PHI3_ROPE_TYPES),
  rope_parameters: ropeRule(true, PHI3_ROPE_TYPES),
  partial_rotary_factor: positiveNumber,
  original_max_position_embeddings: positiveInt,
  sliding_window: nullOr(positiveInt),
  // not Phi3Config fields, read by no Phi3 module (which have no biases); accepted only as false
  attention_bias: oneOf(false),
  mlp_bias: oneOf(false),
  lm_head_bias: oneOf(false),
  // Phi-4-mini's config.json keys for its repository's own code (trust_remote_code), read by
  // transformers' Phi3 model; accepted at the values that code reads as no change
  full_attn_mod: oneOf(1),
  interpolate_factor: oneOf(1),
  // the hub's Phi-3 configs name their repositories' model code; transformers runs its own Phi3
  // model unless trust_remote_code is set, and that model is what we reproduce
  auto_map: anything,
};

/** sliding_window with transformers' default for an absent key */
function window(c: Config): number | undefined {
  if (!('sliding_window' in c)) return DEFAULT_WINDOW;
  return typeof c.sliding_window === 'number' ? c.sliding_window : undefined;
}

/**
 * KV heads as the family's config class sets them: num_key_value_heads; null means
 * num_attention_heads; absent is the class default (Mistral 8, Qwen2 32; Llama: num_attention_heads).
 */
function kvHeads(c: Config, variant: Variant): number {
  const nHead = num(c, ['num_attention_heads']);
  if (!('num_key_value_heads' in c)) return variant.kvHeadsWhenAbsent ?? nHead;
  return num(c, ['num_key_value_heads'], nHead);
}

function llamaFamily(modelType: string, configKeys: ConfigKeys, variant: Variant): Architecture {
  return {
    modelTypes: [modelType],
    basePrefix: 'model.',
    headNames: ['lm_head.weight'],
    configKeys,
    describe: (c) =>
      `${String(c.model_type)} (${num(c, ['num_hidden_layers'])} layers, d=${num(c, ['hidden_size'])}, ` +
      `${num(c, ['num_attention_heads'])} heads, ${kvHeads(c, variant)} KV heads)`,
    forward(ctx: BuildContext, c: Config) {
      const { g } = ctx;
      const d = num(c, ['hidden_size']);
      const nHead = num(c, ['num_attention_heads']);
      const nKv = kvHeads(c, variant);
      const nLayer = num(c, ['num_hidden_layers']);
      const hd = num(c, ['head_dim'], variant.headDimWhenAbsent ?? Math.floor(d / nHead));
      const inter = num(c, ['intermediate_size']);
      // the output size each weight must have, from the config keys transformers builds it from
      const hdWhy =
        typeof c.head_dim === 'number'
          ? `head_dim ${hd}`
          : variant.headDimWhenAbsent !== undefined
            ? `head_dim absent, so ${modelType}'s default ${hd}`
            : `head_dim = hidden_size / num_attention_heads = ${hd}`;
      const kvWhy =
        typeof c.num_key_value_heads === 'number'
          ? `num_key_value_heads ${nKv}`
          : !('num_key_value_heads' in c) && variant.kvHeadsWhenAbsent !== undefined
            ? `num_key_value_heads absent, so ${modelType}'s default ${nKv}`
            : `num_key_value_heads ${c.num_key_value_heads === null ? 'null' : 'absent'}, so num_attention_heads ${nKv}`;
      const shape = { d, nHead, nKv, hd, inter, hdWhy, kvWhy };
      const size = decoderSizes(c, shape);
      const eps = num(c, ['rms_norm_eps'], variant.epsWhenAbsent ?? 1e-6);
      const act = String(c.hidden_act ?? 'silu');
      const ropeSpec = resolveRope(c);
      const rope = ropeTables(ctx, rotatedFeatures(c, ropeSpec, hd, variant), ropeSpec);
      const windows = variant.windows(c, nLayer);
      // one mask per distinct window, shared by the layers that use it
      const masks = new Map<number | undefined, ReturnType<typeof attentionMask>>();
      const maskFor = (w: number | undefined) => {
        let m = masks.get(w);
        if (!m) {
          m = attentionMask(ctx, w);
          masks.set(w, m);
        }
        return m;
      };
      const b = variant.biases(c);
      const qkvBias = { expected: b.qkv, because: b.because('qkv') };
      const mlpBias = { expected: b.mlp, because: b.because('mlp') };
      // Qwen3: an RMSNorm of each query and key head
      const headNorm = variant.headNorms ? { eps, offset: 0 } : undefined;
      let x = embed(ctx, 'model.embed_tokens.weight', { vocab: size.vocab, hidden: size.hidden });
      for (let i = 0; i < nLayer; i++) {
        const p = `model.layers.${i}`;
        const h = rmsNorm(ctx, x, `${p}.input_layernorm`, eps);
        const { q, k, v } = variant.fused
          ? fusedQkv(ctx, `${p}.self_attn.qkv_proj`, h, size, qkvBias)
          : qkvProjections(ctx, `${p}.self_attn`, h, shape, size, qkvBias, headNorm);
        const a = attention(ctx, q, k, v, { nHeads: nHead, nKv, headDim: hd, rope, mask: maskFor(windows[i]) });
        const o = linear(
          ctx,
          `${p}.self_attn.o_proj`,
          a,
          'attention',
          'out_in',
          { expected: b.o, because: b.because('o') },
          size.hidden,
        );
        x = g.add(x, o);
        const h2 = rmsNorm(ctx, x, `${p}.post_attention_layernorm`, eps);
        x = g.add(x, gatedMlp(ctx, `${p}.mlp`, h2, act, mlpBias, size, variant.fused));
      }
      const hidden = rmsNorm(ctx, x, 'model.norm', eps);
      const unembedding = outputHead(ctx, c, 'model.embed_tokens.weight', 'lm_head.weight', false);
      return { unembedding, hidden };
    },
  };
}

/** Features of each head RoPE rotates: all of them, or Phi-3's partial_rotary_factor of them. */
function rotatedFeatures(c: Config, rope: RopeSpec, hd: number, variant: Variant): number {
  if (!variant.partialRotary) return hd;
  // Phi3Config checks the LongRoPE factors' length against hidden_size / num_attention_heads
  const split = Math.floor(num(c, ['hidden_size']) / num(c, ['num_attention_heads']));
  if (rope.type === 'longrope' && hd !== split)
    throw new ConfigError(
      `config.json: "head_dim" ${hd} is not hidden_size / num_attention_heads = ${split}; transformers' Phi3Config refuses LongRoPE factors sized for it`,
    );
  return rotaryDims(hd, Number(rope.params.partial_rotary_factor ?? c.partial_rotary_factor ?? 1));
}

/** Phi-3's `qkv_proj`: one linear layer whose outputs are q, then k, then v. */
function fusedQkv(
  ctx: BuildContext,
  name: string,
  h: Tensor,
  size: ReturnType<typeof decoderSizes>,
  bias: Bias,
): { q: Tensor; k: Tensor; v: Tensor } {
  const out = {
    size: size.q.size + 2 * size.kv.size,
    because: `q: ${size.q.because}, plus k and v: 2 × ${size.kv.because}`,
  };
  const qkv = linear(ctx, name, h, 'attention', 'out_in', bias, out);
  const [q, k, v] = ctx.g.split(qkv, [size.q.size, size.kv.size, size.kv.size], -1);
  return { q, k, v };
}

export const llama = llamaFamily('llama', LLAMA_KEYS, llamaVariant);
export const mistral = llamaFamily('mistral', MISTRAL_KEYS, mistralVariant);
export const qwen2 = llamaFamily('qwen2', QWEN2_KEYS, qwen2Variant);
export const qwen3 = llamaFamily('qwen3', QWEN3_KEYS, qwen3Variant);
export const phi3 = llamaFamily('phi3', PHI3_KEYS, phi3Variant);
