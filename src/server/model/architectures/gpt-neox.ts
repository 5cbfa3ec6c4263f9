// GPT-NeoX / Pythia: fused query_key_value laid out per head as [h, 3, hd], partial
// rotary embedding (rotary_pct of each head), LayerNorm, parallel or sequential residual.
import {
  type Architecture,
  activation,
  attention,
  attentionMask,
  type BuildContext,
  type Config,
  embed,
  layerNorm,
  linear,
  num,
  outputHead,
  resolveRope,
  ropeDict,
  ropeTables,
  rotaryDims,
} from './common';
import {
  boolean,
  type ConfigKeys,
  finiteNumber,
  type KeyRule,
  oneOf,
  positiveInt,
  positiveNumber,
  ropeRule,
} from './config-keys';

/** The config keys GPTNeoXConfig defines that this builder reproduces. */
const GPT_NEOX_KEYS: ConfigKeys = {
  vocab_size: positiveInt,
  hidden_size: positiveInt,
  num_hidden_layers: positiveInt,
  num_attention_heads: positiveInt,
  intermediate_size: positiveInt,
  hidden_act: oneOf('gelu', 'gelu_python', 'gelu_new', 'gelu_pytorch_tanh', 'gelu_fast'),
  layer_norm_eps: positiveNumber,
  use_parallel_residual: boolean,
  attention_bias: boolean,
  tie_word_embeddings: boolean,
  rope_scaling: ropeRule(true),
  rope_parameters: ropeRule(true),
  // the older names GPTNeoXConfig still reads
  rotary_pct: finiteNumber,
  rotary_emb_base: positiveNumber,
  // transformers 4.4x-4.57 save the names its shared RoPE code reads beside them, set from them
  // (rotary_pct and rotary_emb_base win when such a config is loaded): accepted while they agree
  partial_rotary_factor: sameAs('rotary_pct'),
  rope_theta: sameAs('rotary_emb_base'),
};

/** A number equal to another key of the config, which must be there (the value transformers uses). */
function sameAs(key: string): KeyRule {
  return {
    accepts: `the value of "${key}", as the transformers versions that write both keys set it`,
    ok: (v, c) => typeof v === 'number' && c[key] === v,
  };
}

export const gptNeox: Architecture = {
  modelTypes: ['gpt_neox'],
  basePrefix: 'gpt_neox.',
  headNames: ['embed_out.weight'],
  configKeys: GPT_NEOX_KEYS,
  describe: (c) =>
    `GPT-NeoX (${num(c, ['num_hidden_layers'])} layers, d=${num(c, ['hidden_size'])}, ${num(c, ['num_attention_heads'])} heads, ` +
    `${c.use_parallel_residual === false ? 'sequential' : 'parallel'} residual)`,
  forward(ctx: BuildContext, c: Config) {
    const { g } = ctx;
    const d = num(c, ['hidden_size']);
    const nHead = num(c, ['num_attention_heads']);
    const nLayer = num(c, ['num_hidden_layers']);
    const eps = num(c, ['layer_norm_eps'], 1e-5);
    const hd = d / nHead;
    // GPTNeoXConfig.convert_rope_params_to_dict: the dict's values first, then the old
    // top-level names, then 10000 and a quarter of each head
    const spec = resolveRope({
      ...c,
      rope_theta: c.rotary_emb_base ?? 10000,
      rope_scaling: {
        partial_rotary_factor: c.rotary_pct ?? 0.25,
        ...ropeDict(c),
      },
    });
    const rotDim = rotaryDims(hd, Number(spec.params.partial_rotary_factor), 'partial_rotary_factor / rotary_pct');
    const parallel = c.use_parallel_residual !== false;
    const act = String(c.hidden_act ?? 'gelu');
    const rope = ropeTables(ctx, rotDim, spec);
    const attnBias = c.attention_bias !== false;
    const because = `config.json "attention_bias" is ${attnBias}`;
    const mask = attentionMask(ctx);
    const inter = num(c, ['intermediate_size']);
    const size = {
      qkv: { size: 3 * d, because: `3 × hidden_size ${d}` },
      hidden: { size: d, because: `hidden_size ${d}` },
      inter: { size: inter, because: `intermediate_size ${inter}` },
      vocab: { size: num(c, ['vocab_size']), because: `vocab_size ${num(c, ['vocab_size'])}` },
    };
    let x = embed(ctx, 'gpt_neox.embed_in.weight', { vocab: size.vocab, hidden: size.hidden });
    for (let i = 0; i < nLayer; i++) {
      const p = `gpt_neox.layers.${i}`;
      const h = layerNorm(ctx, x, `${p}.input_layernorm`, eps);
      const qkv = linear(
        ctx,
        `${p}.attention.query_key_value`,
        h,
        'attention',
        'out_in',
        { expected: attnBias, because },
        size.qkv,
      );
      // per head [q | k | v]: view [N, h, 3, hd] and take each third
      const per = g.reshape(qkv, [-1, nHead, 3, hd]);
      const [q, k, v] = g.split(per, [1, 1, 1], 2).map((t) => g.reshape(t, [-1, d]));
      const a = attention(ctx, q, k, v, { nHeads: nHead, nKv: nHead, headDim: hd, rope, mask });
      const attnOut = linear(
        ctx,
        `${p}.attention.dense`,
        a,
        'attention',
        'out_in',
        { expected: attnBias, because },
        size.hidden,
      );
      const mlpIn = parallel ? layerNorm(ctx, x, `${p}.post_attention_layernorm`, eps) : null;
      if (parallel) {
        const up = activation(
          g,
          linear(ctx, `${p}.mlp.dense_h_to_4h`, mlpIn!, 'mlp', 'out_in', undefined, size.inter),
          act,
        );
        x = g.add(
          g.add(x, attnOut),
          linear(ctx, `${p}.mlp.dense_4h_to_h`, up, 'mlp', 'out_in', undefined, size.hidden),
        );
      } else {
        x = g.add(x, attnOut);
        const h2 = layerNorm(ctx, x, `${p}.post_attention_layernorm`, eps);
        const up = activation(
          g,
          linear(ctx, `${p}.mlp.dense_h_to_4h`, h2, 'mlp', 'out_in', undefined, size.inter),
          act,
        );
        x = g.add(x, linear(ctx, `${p}.mlp.dense_4h_to_h`, up, 'mlp', 'out_in', undefined, size.hidden));
      }
    }
    const hidden = layerNorm(ctx, x, 'gpt_neox.final_layer_norm', eps);
    const unembedding = outputHead(ctx, c, 'gpt_neox.embed_in.weight', 'embed_out.weight', false);
    return { unembedding, hidden };
  },
};
