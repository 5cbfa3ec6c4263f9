// config.json → per-layer attention and the declared config keys of each builder:
// variants transformers reads differently from the same weights must give transformers'
// numbers (the goldens of test/oracle/make_variants.py), and keys whose maths a builder
// does not implement must be refused with one line naming config.json, the key and value.
import assert from 'node:assert/strict';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { contextLength, contextName } from '../../src/server/data/tokenize';
import { resolveRope } from '../../src/server/model/architectures/common';
import { Model } from '../../src/server/model/engine';
import {
  readSafetensorsHeader,
  readTensor,
  type TensorToWrite,
  writeSafetensors,
} from '../../src/server/model/safetensors';
import { useTempHome } from './helpers/env';
import { loadGolden, relErr } from './helpers/golden';

const home = useTempHome();
let n = 0;

/** A copy of a fixture model whose config.json is edited by `edit`. */
function variant(fixture: string, edit: (c: Record<string, unknown>) => void): string {
  const dir = join(home, `m${n++}-${fixture}`);
  cpSync(`test/fixtures/models/${fixture}`, dir, { recursive: true });
  const c = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  edit(c);
  writeFileSync(join(dir, 'config.json'), JSON.stringify(c, null, 2));
  return dir;
}

/** The model in `dir`'s per-token loss on a golden's batch. */
async function tokenNll(dir: string, golden: string): Promise<Float32Array> {
  const out = await (await Model.open(dir, { threads: 1 }).compile({ tokenLoss: true })).run(loadGolden(golden).batch);
  return out.token_nll.data as Float32Array;
}

/** The relative error of the model in `dir` against a golden's per-token loss. */
async function tokenNllError(dir: string, golden: string): Promise<number> {
  const gold = loadGolden(golden);
  const out = await (await Model.open(dir, { threads: 1 }).compile({ tokenLoss: true })).run(gold.batch);
  return relErr(out.token_nll.data as Float32Array, gold.get('token_nll'));
}

async function assertMatchesGolden(dir: string, golden: string) {
  const e = await tokenNllError(dir, golden);
  assert.ok(e <= 1e-4, `${golden}: token_nll relative error ${e.toExponential(2)}`);
}

test('qwen2: a config without layer_types slides the window from max_window_layers on', async () => {
  // the same model as written by transformers < 5: no layer_types
  await assertMatchesGolden(
    variant('qwen2_swa', (c) => {
      delete c.layer_types;
    }),
    'qwen2_swa',
  );
});

test('"layer_types": null is worked out from the other keys, as when it is absent (qwen2, qwen3, gemma3_text)', async () => {
  for (const [fixture, edit] of [
    ['qwen2_swa', {}],
    ['qwen3', {}],
    ['gemma3', { sliding_window_pattern: 2 }],
  ] as const)
    await assertMatchesGolden(
      variant(fixture, (c) => {
        Object.assign(c, { layer_types: null, ...edit });
      }),
      fixture,
    );
});

test('qwen2: layer_types decides over max_window_layers, as in transformers 5', async () => {
  await assertMatchesGolden(
    variant('qwen2_swa', (c) => {
      c.max_window_layers = 0;
    }),
    'qwen2_swa',
  );
});

test('llama: old-style rope_theta + rope_scaling give the same numbers as rope_parameters', async () => {
  await assertMatchesGolden(
    variant('llama_variant', (c) => {
      delete c.rope_parameters;
      c.rope_theta = 500;
      c.rope_scaling = { type: 'linear', factor: 2 };
    }),
    'llama_variant',
  );
  // llama3 scaling without original_max_position_embeddings falls back to max_position_embeddings
  await assertMatchesGolden(
    variant('llama', (c) => {
      const rp = c.rope_parameters as Record<string, unknown>;
      delete rp.original_max_position_embeddings;
      c.max_position_embeddings = 32;
    }),
    'llama',
  );
});

test('gpt_neox: old rotary_pct / rotary_emb_base, and their default of a quarter of each head', async () => {
  // the fixture rotates 0.25 of each head with theta 10000 (rope_parameters)
  await assertMatchesGolden(
    variant('gpt_neox', (c) => {
      delete c.rope_parameters;
      c.rotary_pct = 0.25;
      c.rotary_emb_base = 10000;
    }),
    'gpt_neox',
  );
  await assertMatchesGolden(
    variant('gpt_neox', (c) => {
      delete c.rope_parameters;
    }),
    'gpt_neox',
  );
  // as transformers 4.4x-4.57 save a Pythia config: the shared RoPE code's names beside the old
  // ones, with their values (a real Pythia fine-tune saved by them was refused)
  await assertMatchesGolden(
    variant('gpt_neox', (c) => {
      delete c.rope_parameters;
      Object.assign(c, { rotary_pct: 0.25, rotary_emb_base: 10000, partial_rotary_factor: 0.25, rope_theta: 10000 });
      c.rope_scaling = null;
    }),
    'gpt_neox',
  );
  // disagreeing, or without the old name to agree with: transformers versions read them differently
  for (const edit of [
    (c: Record<string, unknown>) => Object.assign(c, { rotary_pct: 0.25, partial_rotary_factor: 0.5 }),
    (c: Record<string, unknown>) => Object.assign(c, { rotary_emb_base: 10000, rope_theta: 500 }),
    (c: Record<string, unknown>) => Object.assign(c, { partial_rotary_factor: 0.25 }),
  ])
    assert.throws(
      () =>
        Model.open(
          variant('gpt_neox', (c) => {
            delete c.rope_parameters;
            edit(c);
          }),
        ).modules(),
      /config\.json: "(partial_rotary_factor|rope_theta)": .* \(supported: the value of "(rotary_pct|rotary_emb_base)"/,
    );
});

test('an absent num_key_value_heads is the config class default (Mistral 8, Qwen2 and Qwen3 32), null is num_attention_heads', async () => {
  // the fixtures have 1 and 2 KV heads: without the key, transformers builds 8 and 32 and refuses
  // their weights; the refusal names the default, not num_attention_heads
  for (const [fixture, kv] of [
    ['mistral', 8],
    ['qwen2', 32],
    ['qwen3', 32],
  ] as const)
    assert.throws(
      () =>
        Model.open(
          variant(fixture, (c) => {
            delete c.num_key_value_heads;
          }),
        ).modules(),
      new RegExp(`num_key_value_heads absent, so ${fixture}'s default ${kv}`),
    );
  assert.throws(
    () =>
      Model.open(
        variant('llama', (c) => {
          c.num_key_value_heads = null;
        }),
      ).modules(),
    /num_key_value_heads null, so num_attention_heads 4/,
  );
});

test("an absent head_dim is the config class's default (Qwen3 128, Gemma 3 256), not hidden_size / num_attention_heads", () => {
  // the fixtures' heads are 12 wide; without the key transformers builds heads of the default width
  for (const [fixture, modelType, hd] of [
    ['qwen3', 'qwen3', 128],
    ['gemma3', 'gemma3_text', 256],
  ] as const)
    assert.throws(
      () =>
        Model.open(
          variant(fixture, (c) => {
            delete c.head_dim;
          }),
        ).modules(),
      new RegExp(`head_dim absent, so ${modelType}'s default ${hd}`),
    );
});

test('qwen3: every query and key head is normalised: a checkpoint without q_norm is refused naming it', () => {
  const dir = withTensors('qwen3', (tensors) => {
    delete tensors['model.layers.1.self_attn.q_norm.weight'];
  });
  assert.throws(() => Model.open(dir).modules(), /model\.layers\.1\.self_attn\.q_norm\.weight/);
});

test('qwen3 without its window matches transformers only where the window changes nothing: layer_types is read', async () => {
  // the same weights read as all-full attention give other numbers than the golden (window 4 on
  // layer 1), so a builder ignoring layer_types would fail the golden test instead
  const allFull = variant('qwen3', (c) => {
    c.layer_types = ['full_attention', 'full_attention'];
  });
  assert.ok((await tokenNllError(allFull, 'qwen3')) > 1e-3);
});

test('gemma3_text: the older config layout (rope_theta, rope_local_base_freq, rope_scaling) is read as transformers 5 converts it', async () => {
  // the fixture: full-attention layers linear ×2 at base 500, sliding layers base 50
  await assertMatchesGolden(
    variant('gemma3', (c) => {
      delete c.rope_parameters;
      Object.assign(c, {
        rope_theta: 500,
        rope_local_base_freq: 50,
        rope_scaling: { rope_type: 'linear', factor: 2 },
        _sliding_window_pattern: 6,
        // as google/gemma-3-1b-it's config.json (transformers 4.50) has them
        cache_implementation: 'hybrid',
        eos_token_id: [1, 106],
      });
    }),
    'gemma3',
  );
});

test('gemma3_text: without layer_types the layers follow sliding_window_pattern (default 6), as Gemma3TextConfig builds them', async () => {
  // pattern 2 gives the fixture's sliding, full, sliding
  await assertMatchesGolden(
    variant('gemma3', (c) => {
      delete c.layer_types;
      c.sliding_window_pattern = 2;
    }),
    'gemma3',
  );
  // the default pattern 6 makes all three layers sliding: other numbers than the golden's
  const allSliding = variant('gemma3', (c) => {
    delete c.layer_types;
  });
  assert.ok((await tokenNllError(allSliding, 'gemma3')) > 1e-3);
});

test('llama ignores sliding_window, as transformers LlamaModel does', async () => {
  await assertMatchesGolden(
    variant('llama', (c) => {
      c.sliding_window = 2;
    }),
    'llama',
  );
});

const REFUSED: Array<[fixture: string, key: string, value: unknown]> = [
  ['llama', 'attn_logit_softcapping', 50],
  ['llama', 'final_logit_softcapping', 30],
  ['llama', 'rope_parameters', { rope_type: 'yarn', rope_theta: 100, factor: 4 }],
  ['llama', 'rope_parameters', { rope_type: 'linear', rope_theta: 100, factor: 2, partial_rotary_factor: 0.5 }],
  ['llama', 'rope_parameters', { rope_type: 'llama3', rope_theta: 100, factor: 8, attention_factor: 2 }],
  ['qwen2', 'rope_scaling', { type: 'dynamic', factor: 2 }],
  ['llama', 'partial_rotary_factor', 0.5],
  ['llama', 'hidden_act', 'gelu'],
  ['llama', 'qk_layernorm', true],
  ['llama', 'quantization_config', { quant_method: 'gptq', bits: 4 }],
  ['mistral', 'layer_types', ['full_attention', 'sliding_attention']],
  ['qwen2', 'layer_types', ['full_attention']],
  ['gpt2', 'scale_attn_by_inverse_layer_idx', true],
  ['gpt_neox', 'rope_theta', 500],
  ['qwen2', 'use_mrope', true],
  ['qwen3', 'head_dim', null],
  ['qwen3', 'mlp_bias', true],
  ['qwen3', 'rope_parameters', { rope_type: 'yarn', rope_theta: 10000, factor: 4 }],
  ['gemma3', 'attn_logit_softcapping', 50],
  ['gemma3', 'final_logit_softcapping', 30],
  ['gemma3', 'use_bidirectional_attention', true],
  ['gemma3', 'rope_parameters', { rope_type: 'default', rope_theta: 10000 }],
  ['gemma3', 'num_key_value_heads', null],
  ['gemma3', 'hidden_activation', 'silu'],
  ['phi3', 'head_dim', null],
  ['phi3', 'rope_parameters', { rope_type: 'yarn', rope_theta: 10000, factor: 4 }],
  ['phi3', 'rope_parameters', { rope_type: 'longrope', rope_theta: 10000, long_factor: [1, 2] }],
  ['phi3', 'rope_parameters', { rope_type: 'longrope', rope_theta: 10000, short_factor: [1, 2] }],
  ['phi3', 'rope_parameters', { rope_type: 'longrope', rope_theta: 10000, short_factor: [1, 'x'] }],
  ['phi3', 'attention_bias', true],
  ['phi3', 'full_attn_mod', 2],
  ['phi3', 'layer_types', ['full_attention', 'full_attention']],
  ['llama', 'rope_parameters', { rope_type: 'longrope', rope_theta: 100, short_factor: [1, 1] }],
];

test("phi3: configs as the hub writes them (rope keys at the top, auto_map, Phi-4-mini's extra keys) give the golden numbers", async () => {
  const topLevel = (c: Record<string, unknown>) => {
    const rope = c.rope_parameters as Record<string, unknown>;
    delete c.rope_parameters;
    c.rope_theta = rope.rope_theta;
    c.partial_rotary_factor = rope.partial_rotary_factor;
    c.auto_map = { AutoConfig: 'configuration_phi3.Phi3Config', AutoModelForCausalLM: 'modeling_phi3.Phi3ForCausalLM' };
    c.attention_bias = false;
    return rope;
  };
  // Phi-3-mini-4k-instruct's layout
  await assertMatchesGolden(
    variant('phi3', (c) => {
      topLevel(c);
      c.rope_scaling = null;
    }),
    'phi3',
  );
  // Phi-3.5-mini / Phi-4-mini's: rope_scaling with "type" (Phi3Config reads "su" and "yarn" as longrope)
  for (const type of ['longrope', 'su', 'yarn'])
    await assertMatchesGolden(
      variant('phi3_longrope', (c) => {
        const rope = topLevel(c);
        c.rope_scaling = { type, short_factor: rope.short_factor, long_factor: rope.long_factor };
        Object.assign(c, { full_attn_mod: 1, interpolate_factor: 1, lm_head_bias: false, mlp_bias: false });
      }),
      'phi3_longrope',
    );
});

test("phi3: longrope's context is the top-level original_max_position_embeddings, over the rope dict's (transformers' standardize_rope_params)", async () => {
  // with the dict's 32, factor = 256 / 32 would scale cos and sin by another attention factor
  await assertMatchesGolden(
    variant('phi3_longrope', (c) => {
      (c.rope_parameters as Record<string, unknown>).original_max_position_embeddings = 32;
    }),
    'phi3_longrope',
  );
  const other = variant('phi3_longrope', (c) => {
    c.original_max_position_embeddings = 32;
  });
  assert.ok((await tokenNllError(other, 'phi3_longrope')) > 1e-3, 'the top-level key is read');
});

test("phi3: absent original_max_position_embeddings, max_position_embeddings and rms_norm_eps are Phi3Config's defaults", async () => {
  // the attention factor transformers 5.25 computes (_compute_longrope_parameters on Phi3Config):
  // with the top-level key absent, Phi3Config's 4096 overrides the rope dict's 8192 (factor 32);
  // with max_position_embeddings absent it is 4096 (factor 2 over an original 2048)
  const rope = { rope_type: 'longrope', rope_theta: 10000, short_factor: [1], long_factor: [2] };
  const dictOnly = {
    max_position_embeddings: 131072,
    rope_parameters: { ...rope, original_max_position_embeddings: 8192 },
  };
  assert.ok(Math.abs(resolveRope(dictOnly).scaling! - 1.1902380714238083) < 1e-12);
  assert.equal(contextLength(dictOnly), 4096);
  const noMax = { original_max_position_embeddings: 2048, rope_parameters: rope };
  assert.ok(Math.abs(resolveRope(noMax).scaling! - 1.044465935734187) < 1e-12);
  // rms_norm_eps: Phi3Config's 1e-5 (the fixture's value), not the Llama family's 1e-6
  const withEps = await tokenNll('test/fixtures/models/phi3', 'phi3');
  const without = await tokenNll(
    variant('phi3', (c) => {
      assert.equal(c.rms_norm_eps, 1e-5);
      delete c.rms_norm_eps;
    }),
    'phi3',
  );
  assert.deepEqual(without, withEps);
});

test('longrope models are run within their pre-training context, where transformers keeps the short factors', () => {
  const config = (dir: string) => JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  assert.equal(contextLength(config('test/fixtures/models/phi3_longrope')), 64);
  assert.equal(contextLength(config('test/fixtures/models/phi3')), 64);
  // Phi-3.5-mini-instruct's numbers: 131,072 positions, pre-trained at 4,096
  const phi35 = {
    max_position_embeddings: 131072,
    original_max_position_embeddings: 4096,
    rope_scaling: { type: 'longrope', short_factor: [1], long_factor: [2] },
  };
  assert.equal(contextLength(phi35), 4096);
  assert.match(contextName(phi35), /LongRoPE pre-training context/);
  assert.equal(contextLength({ ...phi35, rope_scaling: null }), 131072);
  assert.equal(contextName({ ...phi35, rope_scaling: null }), "the model's context");
});

test('phi3: a short_factor of the wrong length and a partial_rotary_factor that rotates nothing are refused', () => {
  const short = variant('phi3_longrope', (c) => {
    (c.rope_parameters as Record<string, unknown>).short_factor = [1, 2];
  });
  assert.throws(() => Model.open(short).modules(), /"short_factor": 3 numbers above 0/);
  const long = variant('phi3_longrope', (c) => {
    (c.rope_parameters as Record<string, unknown>).long_factor = [1, 2, 3, 4];
  });
  assert.throws(() => Model.open(long).modules(), /"long_factor": 3 numbers above 0/);
  // Phi3Config sizes the factors by hidden_size / num_attention_heads and refuses another head_dim
  const headDim = variant('phi3_longrope', (c) => {
    c.head_dim = 12;
  });
  assert.throws(() => Model.open(headDim).modules(), /"head_dim" 12 is not hidden_size \/ num_attention_heads = 8/);
  const partial = variant('phi3', (c) => {
    (c.rope_parameters as Record<string, unknown>).partial_rotary_factor = 0.1;
  });
  assert.throws(() => Model.open(partial).modules(), /partial_rotary_factor 0.1 rotates 0 of each head's 8 features/);
});

test('keys real configs carry whose values change nothing are accepted: Qwen2.5\'s "use_mrope": false, dropout rates', async () => {
  await assertMatchesGolden(
    variant('qwen2', (c) => {
      c.use_mrope = false;
    }),
    'qwen2',
  );
  await assertMatchesGolden(
    variant('gpt_neox', (c) => {
      c.attention_probs_dropout_prob = 0.1;
      c.hidden_dropout_prob = 0.1;
    }),
    'gpt_neox',
  );
});

for (const [fixture, key, value] of REFUSED) {
  test(`${fixture}: config.json "${key}": ${JSON.stringify(value)} is refused`, () => {
    const dir = variant(fixture, (c) => {
      c[key] = value;
    });
    assert.throws(
      () => Model.open(dir).modules(),
      (e: Error) =>
        e.message.includes(join(dir, 'config.json')) &&
        e.message.includes(`"${key}"`) &&
        e.message.includes(JSON.stringify(value).slice(0, 40)) &&
        !e.message.includes('\n'),
    );
  });
}

/** A copy of a fixture whose tensors `edit` changes (replaces, adds) before they are written back. */
function withTensors(fixture: string, edit: (tensors: Record<string, TensorToWrite>) => void): string {
  const dir = variant(fixture, () => {});
  const file = join(dir, 'model.safetensors');
  const h = readSafetensorsHeader(file);
  const tensors: Record<string, TensorToWrite> = {};
  for (const name of h.tensors.keys()) {
    const t = readTensor(h, name);
    tensors[name] = { dtype: t.dtype, shape: t.shape, data: t.data };
  }
  edit(tensors);
  writeSafetensors(file, tensors, { format: 'pt' });
  return dir;
}

/** The tied `llama` fixture with lm_head.weight stored beside the embedding, `scale` × its values. */
function withStoredHead(scale: number): string {
  return withTensors('llama', (tensors) => {
    const emb = tensors['model.embed_tokens.weight'];
    assert.equal(emb.dtype, 'F32');
    tensors['lm_head.weight'] = {
      dtype: 'F32',
      shape: emb.shape,
      data: (emb.data as Float32Array).map((x) => x * scale),
    };
  });
}

test('a tied checkpoint that also stores its head: read as tied when the copy is identical, refused when it differs', async () => {
  // transformers 5 ties identical copies and keeps different ones untied (4.x tied them anyway)
  await assertMatchesGolden(withStoredHead(1), 'llama');
  assert.throws(
    () => Model.open(withStoredHead(2)).modules(),
    /"tie_word_embeddings" is true, but the checkpoint also has lm_head\.weight with other values than model\.embed_tokens\.weight.*transformers 5 then uses lm_head\.weight.*set "tie_word_embeddings": false/,
  );
});

test('a config that contradicts the weights is refused: biases, tied head, sliding layers without a window', () => {
  const cases: Array<[string, (c: Record<string, unknown>) => void, RegExp]> = [
    [
      'llama',
      (c) => {
        c.mlp_bias = true;
      },
      /no model\.layers\.0\.mlp\.gate_proj\.bias.*"mlp_bias" is true/,
    ],
    [
      'llama_variant',
      (c) => {
        c.attention_bias = false;
      },
      /has model\.layers\.0\.self_attn\.q_proj\.bias.*"attention_bias" is false/,
    ],
    [
      'llama_variant',
      (c) => {
        c.tie_word_embeddings = true;
      },
      /"tie_word_embeddings" is true, but the checkpoint also has lm_head\.weight with other values.*set "tie_word_embeddings": false/,
    ],
    [
      'llama',
      (c) => {
        c.tie_word_embeddings = false;
      },
      /"tie_word_embeddings" is false.*no lm_head\.weight/,
    ],
    [
      'qwen2_swa',
      (c) => {
        c.use_sliding_window = false;
      },
      /"layer_types" has "sliding_attention".*"use_sliding_window"/,
    ],
  ];
  for (const [fixture, edit, message] of cases)
    assert.throws(() => Model.open(variant(fixture, edit)).modules(), message, fixture);
});

/** A copy of a fixture with the tensor `name` replaced (or added) by one of this shape. */
function reweighted(fixture: string, name: string, shape: number[]): string {
  return withTensors(fixture, (tensors) => {
    const size = shape.reduce((a, b) => a * b, 1);
    tensors[name] = { dtype: 'F32', shape, data: new Float32Array(size).fill(0.01) };
  });
}

test('weights of another shape than config.json gives are refused naming the tensor, as transformers refuses them at load', () => {
  const cases: Array<[string, string, number[], RegExp]> = [
    // a position table shorter than n_positions ran until a text outgrew it
    [
      'gpt2',
      'transformer.wpe.weight',
      [32, 32],
      /transformer\.wpe\.weight has shape \[32, 32\], but config\.json says \[64, 32\] \(n_positions 64/,
    ],
    [
      'gpt2',
      'transformer.h.0.ln_1.bias',
      [31],
      /ln_1\.bias has shape \[31\], but config\.json says \[32\] \(a norm over 32 features\)/,
    ],
    [
      'llama',
      'model.layers.0.input_layernorm.weight',
      [31],
      /input_layernorm\.weight has shape \[31\].*a norm over 32 features/,
    ],
    ['llama', 'model.layers.0.input_layernorm.weight', [1, 32], /input_layernorm\.weight has shape \[1, 32\]/],
    [
      'gpt_neox',
      'gpt_neox.layers.0.attention.query_key_value.bias',
      [95],
      /query_key_value\.bias has shape \[95\].*the bias of a layer with 96 outputs/,
    ],
    [
      'qwen2',
      'model.layers.0.self_attn.q_proj.bias',
      [16],
      /q_proj\.bias has shape \[16\].*the bias of a layer with 32 outputs/,
    ],
    [
      'gpt_neox',
      'embed_out.weight',
      [320, 16],
      /embed_out\.weight has shape \[320, 16\], but config\.json says \[320, 32\] \(vocab_size 320 × the hidden size 32, the width of gpt_neox\.embed_in\.weight\)/,
    ],
    ['llama', 'model.embed_tokens.weight', [1, 320, 32], /embed_tokens\.weight has shape \[1, 320, 32\]/],
  ];
  for (const [fixture, name, shape, why] of cases)
    assert.throws(() => Model.open(reweighted(fixture, name, shape)).modules(), why, `${fixture} ${name}`);
});
