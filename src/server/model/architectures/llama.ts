// Llama family (Llama, Mistral, Qwen2): RMSNorm, rotary embedding, SwiGLU MLP,
// grouped-query attention, optional q/k/v biases (Qwen2), optional sliding window.
import {
  type Architecture,
  activation,
  attention,
  attentionBias,
  type BuildContext,
  type Config,
  embed,
  linear,
  num,
  rmsNorm,
  ropeTables,
} from './common';

export const llama: Architecture = {
  modelTypes: ['llama', 'mistral', 'qwen2'],
  describe: (c) =>
    `${String(c.model_type)} (${num(c, ['num_hidden_layers'])} layers, d=${num(c, ['hidden_size'])}, ` +
    `${num(c, ['num_attention_heads'])} heads, ${num(c, ['num_key_value_heads'], num(c, ['num_attention_heads']))} KV heads)`,
  forward(ctx: BuildContext, c: Config) {
    const { g, w } = ctx;
    const d = num(c, ['hidden_size']);
    const nHead = num(c, ['num_attention_heads']);
    const nKv = num(c, ['num_key_value_heads'], nHead);
    const nLayer = num(c, ['num_hidden_layers']);
    const hd = num(c, ['head_dim'], d / nHead);
    const eps = num(c, ['rms_norm_eps'], 1e-6);
    const rp = c.rope_parameters as Config | undefined;
    const theta = num(c, ['rope_theta'], (rp?.rope_theta as number) ?? 10000);
    const act = String(c.hidden_act ?? 'silu');
    const window =
      typeof c.sliding_window === 'number' && (c.model_type !== 'qwen2' || c.use_sliding_window)
        ? c.sliding_window
        : undefined;
    const scaling = (c.rope_scaling as Config) ?? (rp && rp.rope_type !== 'default' ? rp : null);
    const rope = ropeTables(ctx, hd, theta, scaling);
    const bias = attentionBias(ctx, window);
    let x = embed(ctx, 'model.embed_tokens.weight');
    for (let i = 0; i < nLayer; i++) {
      const p = `model.layers.${i}`;
      const h = rmsNorm(ctx, x, `${p}.input_layernorm`, eps);
      const q = linear(ctx, `${p}.self_attn.q_proj`, h, 'attention');
      const k = linear(ctx, `${p}.self_attn.k_proj`, h, 'attention');
      const v = linear(ctx, `${p}.self_attn.v_proj`, h, 'attention');
      const a = attention(ctx, q, k, v, { nHeads: nHead, nKv, headDim: hd, rope, bias });
      x = g.add(x, linear(ctx, `${p}.self_attn.o_proj`, a, 'attention'));
      const h2 = rmsNorm(ctx, x, `${p}.post_attention_layernorm`, eps);
      const gate = activation(g, linear(ctx, `${p}.mlp.gate_proj`, h2, 'mlp'), act);
      const up = linear(ctx, `${p}.mlp.up_proj`, h2, 'mlp');
      x = g.add(x, linear(ctx, `${p}.mlp.down_proj`, g.mul(gate, up), 'mlp'));
    }
    const hidden = rmsNorm(ctx, x, 'model.norm', eps);
    const head = w.has('lm_head.weight') ? 'lm_head.weight' : 'model.embed_tokens.weight';
    const logits = g.gemm(hidden, w.get(head), null, true);
    return { logits, hidden };
  },
};
