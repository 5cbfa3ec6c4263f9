// GPT-NeoX / Pythia: fused query_key_value laid out per head as [h, 3, hd], partial
// rotary embedding (rotary_pct of each head), LayerNorm, parallel or sequential residual.
import {
  type Architecture,
  activation,
  attention,
  attentionBias,
  type BuildContext,
  type Config,
  embed,
  layerNorm,
  linear,
  num,
  ropeTables,
} from './common';

export const gptNeox: Architecture = {
  modelTypes: ['gpt_neox'],
  describe: (c) =>
    `GPT-NeoX (${num(c, ['num_hidden_layers'])} layers, d=${num(c, ['hidden_size'])}, ${num(c, ['num_attention_heads'])} heads, ` +
    `${c.use_parallel_residual === false ? 'sequential' : 'parallel'} residual)`,
  forward(ctx: BuildContext, c: Config) {
    const { g, w } = ctx;
    const d = num(c, ['hidden_size']);
    const nHead = num(c, ['num_attention_heads']);
    const nLayer = num(c, ['num_hidden_layers']);
    const eps = num(c, ['layer_norm_eps'], 1e-5);
    const hd = d / nHead;
    const rp = c.rope_parameters as Config | undefined;
    const pct = num(c, ['rotary_pct', 'partial_rotary_factor'], (rp?.partial_rotary_factor as number) ?? 1);
    const theta = num(c, ['rotary_emb_base', 'rope_theta'], (rp?.rope_theta as number) ?? 10000);
    const rotDim = Math.floor(hd * pct);
    const parallel = c.use_parallel_residual !== false;
    const act = String(c.hidden_act ?? 'gelu');
    const rope = ropeTables(ctx, rotDim, theta, (c.rope_scaling as Config) ?? null);
    const bias = attentionBias(ctx);
    let x = embed(ctx, 'gpt_neox.embed_in.weight');
    for (let i = 0; i < nLayer; i++) {
      const p = `gpt_neox.layers.${i}`;
      const h = layerNorm(ctx, x, `${p}.input_layernorm`, eps);
      const qkv = linear(ctx, `${p}.attention.query_key_value`, h, 'attention');
      // per head [q | k | v]: view [N, h, 3, hd] and take each third
      const per = g.reshape(qkv, [-1, nHead, 3, hd]);
      const [q, k, v] = g.split(per, [1, 1, 1], 2).map((t) => g.reshape(t, [-1, d]));
      const a = attention(ctx, q, k, v, { nHeads: nHead, nKv: nHead, headDim: hd, rope, bias });
      const attnOut = linear(ctx, `${p}.attention.dense`, a, 'attention');
      const mlpIn = parallel ? layerNorm(ctx, x, `${p}.post_attention_layernorm`, eps) : null;
      if (parallel) {
        const up = activation(g, linear(ctx, `${p}.mlp.dense_h_to_4h`, mlpIn!, 'mlp'), act);
        x = g.add(g.add(x, attnOut), linear(ctx, `${p}.mlp.dense_4h_to_h`, up, 'mlp'));
      } else {
        x = g.add(x, attnOut);
        const h2 = layerNorm(ctx, x, `${p}.post_attention_layernorm`, eps);
        const up = activation(g, linear(ctx, `${p}.mlp.dense_h_to_4h`, h2, 'mlp'), act);
        x = g.add(x, linear(ctx, `${p}.mlp.dense_4h_to_h`, up, 'mlp'));
      }
    }
    const hidden = layerNorm(ctx, x, 'gpt_neox.final_layer_norm', eps);
    const logits = g.gemm(hidden, w.get('embed_out.weight'), null, true);
    return { logits, hidden };
  },
};
