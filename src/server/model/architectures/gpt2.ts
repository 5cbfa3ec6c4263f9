// GPT-2: learned positions, pre-LayerNorm, Conv1D weights stored [d_in, d_out], fused
// c_attn producing q|k|v, tanh-GELU MLP, unembedding tied to the token embedding.
import {
  type Architecture,
  activation,
  attention,
  attentionMask,
  type BuildContext,
  type Config,
  ConfigError,
  embed,
  expectShape,
  layerNorm,
  linear,
  num,
  outputHead,
  positions,
} from './common';
import { anything, boolean, type ConfigKeys, nullOr, oneOf, positiveInt, positiveNumber } from './config-keys';

/** The config keys GPT2Config defines that this builder reproduces. */
const GPT2_KEYS: ConfigKeys = {
  vocab_size: positiveInt,
  n_positions: positiveInt,
  n_ctx: positiveInt,
  n_embd: positiveInt,
  n_layer: positiveInt,
  n_head: positiveInt,
  n_inner: nullOr(positiveInt),
  activation_function: oneOf('gelu_new', 'gelu', 'gelu_python', 'gelu_pytorch_tanh', 'gelu_fast'),
  layer_norm_epsilon: positiveNumber,
  scale_attn_weights: boolean,
  scale_attn_by_inverse_layer_idx: oneOf(false),
  reorder_and_upcast_attn: oneOf(false),
  tie_word_embeddings: boolean,
  // the sequence-summary head of GPT2DoubleHeadsModel, not part of the causal LM
  summary_type: anything,
  summary_use_proj: anything,
  summary_activation: anything,
  summary_proj_to_labels: anything,
  summary_first_dropout: anything,
};

export const gpt2: Architecture = {
  modelTypes: ['gpt2'],
  basePrefix: 'transformer.',
  headNames: ['lm_head.weight'],
  configKeys: GPT2_KEYS,
  describe: (c) => `GPT-2 (${num(c, ['n_layer'])} layers, d=${num(c, ['n_embd'])}, ${num(c, ['n_head'])} heads)`,
  forward(ctx: BuildContext, c: Config) {
    const { g, w } = ctx;
    const d = num(c, ['n_embd']);
    const nHead = num(c, ['n_head']);
    const nLayer = num(c, ['n_layer']);
    const eps = num(c, ['layer_norm_epsilon'], 1e-5);
    const act = String(c.activation_function ?? 'gelu_new');
    if (c.scale_attn_by_inverse_layer_idx || c.reorder_and_upcast_attn)
      throw new ConfigError(
        'GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported',
      );
    const scaleAttn = c.scale_attn_weights !== false;
    const mask = attentionMask(ctx);
    // a table of another size than n_positions: transformers refuses it (a shorter one ran here
    // until a text was longer than its rows)
    const nPos = num(c, ['n_positions'], 1024); // GPT2Config's default
    expectShape(ctx, 'transformer.wpe.weight', [nPos, d], `n_positions ${nPos} × n_embd ${d}`);
    const pos = g.gatherRows(w.get('transformer.wpe.weight'), positions(ctx)); // [T, d]
    const inner = num(c, ['n_inner'], 4 * d);
    const size = {
      qkv: { size: 3 * d, because: `3 × n_embd ${d}` },
      hidden: { size: d, because: `n_embd ${d}` },
      inner: {
        size: inner,
        because: typeof c.n_inner === 'number' ? `n_inner ${inner}` : `n_inner absent, so 4 × n_embd = ${inner}`,
      },
      vocab: { size: num(c, ['vocab_size']), because: `vocab_size ${num(c, ['vocab_size'])}` },
    };
    const tok = embed(ctx, 'transformer.wte.weight', { vocab: size.vocab, hidden: size.hidden }); // [B·T, d]
    const posShape = g.noGrad(() => g.concatInts([ctx.bt, g.ints([d])]));
    // add positions by viewing tokens as [B, T, d]
    let x = g.reshape(g.add(g.reshape(tok, posShape, ['B', 'T', d]), pos), [-1, d]);
    for (let i = 0; i < nLayer; i++) {
      const p = `transformer.h.${i}`;
      const h = layerNorm(ctx, x, `${p}.ln_1`, eps);
      const qkv = linear(ctx, `${p}.attn.c_attn`, h, 'attention', 'in_out', undefined, size.qkv);
      const [q, k, v] = g.split(qkv, [d, d, d], 1);
      const a = attention(ctx, q, k, v, {
        nHeads: nHead,
        nKv: nHead,
        headDim: d / nHead,
        mask,
        scale: scaleAttn ? undefined : 1,
      });
      x = g.add(x, linear(ctx, `${p}.attn.c_proj`, a, 'attention', 'in_out', undefined, size.hidden));
      const h2 = layerNorm(ctx, x, `${p}.ln_2`, eps);
      const up = activation(g, linear(ctx, `${p}.mlp.c_fc`, h2, 'mlp', 'in_out', undefined, size.inner), act);
      x = g.add(x, linear(ctx, `${p}.mlp.c_proj`, up, 'mlp', 'in_out', undefined, size.hidden));
    }
    const hidden = layerNorm(ctx, x, 'transformer.ln_f', eps);
    const unembedding = outputHead(ctx, c, 'transformer.wte.weight', 'lm_head.weight', true);
    return { unembedding, hidden };
  },
};
