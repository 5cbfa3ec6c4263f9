// Gemma 3, text only (model_type gemma3_text: Gemma-3-270M and 1B, Gemma3ForCausalLM): a
// Llama-like decoder with what transformers 5's Gemma3TextModel adds: embeddings scaled by
// √hidden_size, RMSNorms that scale by (1 + weight), a norm after attention and after the MLP
// besides the ones before them, an RMSNorm of each query and key head, attention scaled by
// query_pre_attn_scalar^-½, a tanh-GELU MLP, and two kinds of layer: sliding-window layers
// rotating with a local RoPE base, full-attention layers with the global one.
import type { Tensor } from '../onnx/graph';
import {
  type Architecture,
  attention,
  attentionMask,
  type BuildContext,
  type Config,
  ConfigError,
  decoderSizes,
  embed,
  gatedMlp,
  linear,
  num,
  outputHead,
  qkvProjections,
  type RopeSpec,
  resolveRope,
  rmsNorm,
  ropeTables,
} from './common';
import {
  anything,
  boolean,
  type ConfigKeys,
  type KeyRule,
  nullOr,
  oneOf,
  positiveInt,
  positiveNumber,
  ropeRule,
} from './config-keys';

const LAYER_TYPES = ['full_attention', 'sliding_attention'] as const;
type LayerType = (typeof LAYER_TYPES)[number];

/** Gemma3TextConfig's defaults for keys a config may leave out. */
const DEFAULTS = { headDim: 256, kvHeads: 4, window: 4096, pattern: 6, globalTheta: 1_000_000, localTheta: 10_000 };

/** transformers 5's rope_parameters for Gemma 3: one RoPE dict per layer type. */
const perLayerTypeRope: KeyRule = {
  accepts: `null or a dict of ${LAYER_TYPES.join(' / ')}, each null or a RoPE dict (${ropeRule(false).accepts})`,
  ok(v, c) {
    if (v === null) return true;
    if (!v || typeof v !== 'object' || Array.isArray(v)) return false;
    return Object.entries(v).every(
      ([k, d]) => (LAYER_TYPES as readonly string[]).includes(k) && ropeRule(false).ok(d, c),
    );
  },
};

const GEMMA3_KEYS: ConfigKeys = {
  vocab_size: positiveInt,
  hidden_size: positiveInt,
  intermediate_size: positiveInt,
  num_hidden_layers: positiveInt,
  num_attention_heads: positiveInt,
  // Gemma3Attention reads both as they are: null would fail there
  num_key_value_heads: positiveInt,
  head_dim: positiveInt,
  hidden_activation: oneOf('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast', 'gelu', 'gelu_python'),
  // not read by Gemma3MLP (it reads hidden_activation); older Gemma configs carry it
  hidden_act: anything,
  rms_norm_eps: positiveNumber,
  tie_word_embeddings: boolean,
  attention_bias: boolean,
  query_pre_attn_scalar: positiveNumber,
  sliding_window: nullOr(positiveInt),
  // null: Gemma3TextConfig works them out, as when the key is absent
  layer_types: nullOr({
    accepts: `a list of num_hidden_layers entries, each ${LAYER_TYPES.map((t) => `"${t}"`).join(' or ')}`,
    ok: (v, c) =>
      Array.isArray(v) &&
      v.length === c.num_hidden_layers &&
      v.every((t) => (LAYER_TYPES as readonly string[]).includes(t as string)),
  }),
  // Gemma3TextConfig builds layer_types from sliding_window_pattern when layer_types is absent;
  // the underscored key that hub configs carry is not read for it
  sliding_window_pattern: positiveInt,
  _sliding_window_pattern: anything,
  rope_parameters: perLayerTypeRope,
  // older names: rope_scaling goes to the full-attention layers, rope_theta is their base,
  // rope_local_base_freq the sliding layers' base (Gemma3TextConfig.convert_rope_params_to_dict)
  rope_scaling: ropeRule(false),
  rope_theta: positiveNumber,
  rope_local_base_freq: positiveNumber,
  attn_logit_softcapping: oneOf(null),
  final_logit_softcapping: oneOf(null),
  // bidirectional attention (EmbeddingGemma) is not a causal language model
  use_bidirectional_attention: oneOf(false, null),
};

/** Each layer's type, as Gemma3TextConfig.__post_init__ decides it. */
function layerTypes(c: Config, n: number): LayerType[] {
  if (Array.isArray(c.layer_types)) return c.layer_types as LayerType[];
  const pattern = typeof c.sliding_window_pattern === 'number' ? c.sliding_window_pattern : DEFAULTS.pattern;
  return Array.from({ length: n }, (_, i) => ((i + 1) % pattern ? 'sliding_attention' : 'full_attention'));
}

/** The RoPE of each layer type, as Gemma3TextConfig.convert_rope_params_to_dict resolves it. */
function ropeSpecs(c: Config): Record<LayerType, RopeSpec> {
  const given = (c.rope_parameters ?? {}) as Record<string, Config | null>;
  const full: Config = { rope_type: 'default', ...(given.full_attention ?? {}) };
  if (c.rope_scaling !== null && c.rope_scaling !== undefined) Object.assign(full, c.rope_scaling);
  full.rope_theta ??= c.rope_theta ?? DEFAULTS.globalTheta;
  const sliding: Config = { rope_type: 'default', ...(given.sliding_attention ?? {}) };
  sliding.rope_theta ??= c.rope_local_base_freq ?? DEFAULTS.localTheta;
  const spec = (d: Config) => resolveRope({ rope_parameters: d, max_position_embeddings: c.max_position_embeddings });
  return { full_attention: spec(full), sliding_attention: spec(sliding) };
}

/** Gemma3RMSNorm: x / √(mean(x²) + eps) · (1 + weight). */
function gemmaNorm(ctx: BuildContext, x: Tensor, prefix: string, eps: number): Tensor {
  return rmsNorm(ctx, x, prefix, eps, 1);
}

export const gemma3: Architecture = {
  modelTypes: ['gemma3_text'],
  basePrefix: 'model.',
  headNames: ['lm_head.weight'],
  configKeys: GEMMA3_KEYS,
  describe: (c) =>
    `gemma3_text (${num(c, ['num_hidden_layers'])} layers, d=${num(c, ['hidden_size'])}, ` +
    `${num(c, ['num_attention_heads'])} heads, ${num(c, ['num_key_value_heads'], DEFAULTS.kvHeads)} KV heads)`,
  forward(ctx: BuildContext, c: Config) {
    const { g } = ctx;
    const d = num(c, ['hidden_size']);
    const nHead = num(c, ['num_attention_heads']);
    const nKv = num(c, ['num_key_value_heads'], DEFAULTS.kvHeads);
    const nLayer = num(c, ['num_hidden_layers']);
    const hd = num(c, ['head_dim'], DEFAULTS.headDim);
    const inter = num(c, ['intermediate_size']);
    const eps = num(c, ['rms_norm_eps'], 1e-6);
    if (d % nHead !== 0)
      throw new ConfigError(
        `config.json: hidden_size ${d} is not a multiple of num_attention_heads ${nHead} (transformers refuses this config too)`,
      );
    const hdWhy = typeof c.head_dim === 'number' ? `head_dim ${hd}` : `head_dim absent, so gemma3_text's default ${hd}`;
    const kvWhy =
      typeof c.num_key_value_heads === 'number'
        ? `num_key_value_heads ${nKv}`
        : `num_key_value_heads absent, so gemma3_text's default ${nKv}`;
    const shape = { d, nHead, nKv, hd, inter, hdWhy, kvWhy };
    const size = decoderSizes(c, shape);
    const bias = {
      expected: c.attention_bias === true,
      because: `config.json "attention_bias" is ${c.attention_bias === true}`,
    };
    const noBias = { expected: false, because: 'Gemma 3 has no MLP biases' };
    const act = String(c.hidden_activation ?? 'gelu_pytorch_tanh');
    const scale = num(c, ['query_pre_attn_scalar'], 256) ** -0.5;
    const types = layerTypes(c, nLayer);
    const window = c.sliding_window === undefined ? DEFAULTS.window : c.sliding_window;
    if (types.includes('sliding_attention') && typeof window !== 'number')
      throw new ConfigError(
        'config.json: "sliding_window" is null, but some layers are "sliding_attention" (layer_types); give the window size',
      );
    const specs = ropeSpecs(c);
    const ropes = {
      full_attention: ropeTables(ctx, hd, specs.full_attention),
      sliding_attention: ropeTables(ctx, hd, specs.sliding_attention),
    };
    const masks = {
      full_attention: attentionMask(ctx),
      sliding_attention: attentionMask(ctx, typeof window === 'number' ? window : undefined),
    };
    const table = 'model.embed_tokens.weight';
    // Gemma3TextScaledWordEmbedding: √hidden_size as a float32 tensor, cast to the weights' type
    let x = g.mul(embed(ctx, table, { vocab: size.vocab, hidden: size.hidden }), g.scalar(Math.fround(Math.sqrt(d))));
    for (let i = 0; i < nLayer; i++) {
      const p = `model.layers.${i}`;
      const type = types[i];
      const h = gemmaNorm(ctx, x, `${p}.input_layernorm`, eps);
      const { q, k, v } = qkvProjections(ctx, `${p}.self_attn`, h, shape, size, bias, { eps, offset: 1 });
      const a = attention(ctx, q, k, v, {
        nHeads: nHead,
        nKv,
        headDim: hd,
        rope: ropes[type],
        mask: masks[type],
        scale,
      });
      const o = linear(ctx, `${p}.self_attn.o_proj`, a, 'attention', 'out_in', bias, size.hidden);
      x = g.add(x, gemmaNorm(ctx, o, `${p}.post_attention_layernorm`, eps));
      const h2 = gemmaNorm(ctx, x, `${p}.pre_feedforward_layernorm`, eps);
      const down = gatedMlp(ctx, `${p}.mlp`, h2, act, noBias, size);
      x = g.add(x, gemmaNorm(ctx, down, `${p}.post_feedforward_layernorm`, eps));
    }
    const hidden = gemmaNorm(ctx, x, 'model.norm', eps);
    const unembedding = outputHead(ctx, c, table, 'lm_head.weight', true);
    return { unembedding, hidden };
  },
};
