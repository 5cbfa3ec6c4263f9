// The engine's graphs against PyTorch autograd (goldens from test/oracle/make_fixtures.py,
// computed in float64): per-token loss, pooled hidden state, every module's a_t and g_t,
// and the gradient of every parameter, on tiny random models of each architecture.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { Model } from '../../src/server/model/engine';
import { useTempHome } from './helpers/env';
import { loadGolden, relErr } from './helpers/golden';

// qwen2_swa: sliding window on layer 1 only (layer_types); llama_variant: biases, head_dim ≠ hidden/heads, linear RoPE;
// qwen3: per-head query/key norms; gemma3: Gemma 3 text (sandwich norms, per-layer-type RoPE);
// phi3: fused qkv_proj / gate_up_proj, partial RoPE, a window on every layer; phi3_longrope: LongRoPE's
// short factors and attention factor, 6 of 8 features rotated, tied head
const ARCHS = [
  'gpt2',
  'gpt_neox',
  'gpt_neox_seq',
  'llama',
  'qwen2',
  'mistral',
  'qwen2_swa',
  'llama_variant',
  'qwen3',
  'gemma3',
  'phi3',
  'phi3_longrope',
];
const FIX = 'test/fixtures';
const TOL = 1e-4;

useTempHome();

// headRows 3: the LM head and its loss in chunks of 3 tokens (model/head.ts), the last one
// padded; with headVocab 7 also the vocabulary in blocks of 7 words (the last one shorter: 320 =
// 45 × 7 + 5), the log-sum-exp and the gradient carried from block to block; attentionRows 2: attention's queries in chunks of 2 rows (architectures/common.ts),
// forward and backward, the last one padded where T is odd. So each chunked loop is checked
// against PyTorch, not only against itself.
const VARIANTS: Array<{ headRows?: number; headVocab?: number; attentionRows?: number }> = [
  {},
  { headRows: 3 },
  { headRows: 3, headVocab: 7 },
  { attentionRows: 2 },
];
for (const [arch, v] of ARCHS.flatMap((a) => VARIANTS.map((v) => [a, v] as const))) {
  const what = v.headVocab
    ? ` (head in chunks of ${v.headRows} tokens × ${v.headVocab} words)`
    : v.headRows
      ? ` (head in chunks of ${v.headRows} tokens)`
      : v.attentionRows
        ? ` (attention in chunks of ${v.attentionRows} queries)`
        : '';
  test(`golden: ${arch} matches PyTorch${what}`, async () => {
    assert.ok(existsSync(`${FIX}/golden/${arch}.safetensors`), 'golden missing: run test/oracle/make_fixtures.py');
    const model = Model.open(`${FIX}/models/${arch}`, {
      threads: 1,
      cacheDir: process.env.INFLUENCE_LENS_CACHE,
      ...v,
    });
    const gold = loadGolden(arch);
    if (v.headRows) assert.ok(gold.batch.B * gold.batch.T > 2 * v.headRows, 'the batch spans several chunks');
    if (v.headVocab) assert.ok(Number(model.config.vocab_size) % v.headVocab !== 0, 'the last block is shorter');
    if (v.attentionRows) assert.ok(gold.batch.T > 2 * v.attentionRows, 'the queries span several chunks');
    const graph = await model.compile({
      tokenLoss: true,
      hidden: true,
      perToken: true,
      paramGrads: true,
      modules: 'all',
    });
    const out = await graph.run(gold.batch);
    const check = (ours: string, theirs: string) => {
      const e = relErr(out[ours].data as Float32Array, gold.get(theirs));
      assert.ok(e <= TOL, `${arch} ${theirs}: relative error ${e.toExponential(2)} > ${TOL}`);
    };
    check('token_nll', 'token_nll');
    check('loss', 'loss');
    check('hidden_mean', 'hidden_mean');
    let nMod = 0;
    let nGrad = 0;
    for (const name of gold.names) {
      if (name.startsWith('a.') || name.startsWith('g.')) {
        assert.ok(out[name], `${arch}: engine does not track module ${name.slice(2)}`);
        check(name, name);
        nMod++;
      } else if (name.startsWith('grad.')) {
        assert.ok(out[name], `${arch}: engine has no gradient for ${name.slice(5)}`);
        check(name, name);
        nGrad++;
      }
    }
    // every module and every parameter of the checkpoint is covered by the goldens
    assert.equal(nMod / 2, graph.modules.length, 'tracked modules vs golden modules');
    assert.equal(nGrad, model.parameters().length, 'parameters vs golden gradients');
    // without the per-token loss as an output, only the tokens in the loss go through the head
    // (engine.ts weightedRows): the same gradients (row 2 is weighted only at 5..10, row 1 is padded)
    const lean = await model.compile({ perToken: true, paramGrads: true, modules: 'all' });
    const outLean = await lean.run(gold.batch);
    for (const name of gold.names)
      if (name.startsWith('a.') || name.startsWith('g.') || name.startsWith('grad.')) {
        const e = relErr(outLean[name].data as Float32Array, gold.get(name));
        assert.ok(
          e <= TOL,
          `${arch} ${name} (head over the weighted tokens only): relative error ${e.toExponential(2)}`,
        );
      }
  });
}

test('per-token rows of modules that read one input are one output, fetched under every name', async () => {
  const model = Model.open(`${FIX}/models/llama`, { threads: 1, cacheDir: process.env.INFLUENCE_LENS_CACHE });
  const gold = loadGolden('llama');
  const graph = await model.compile({ perToken: true, modules: 'all' });
  const names = graph.modules.map((m) => m.name);
  const layer0 = (p: string) => names.find((n) => n.endsWith(p) && n.includes('.0.'))!;
  const [q, k, v, gate, up] = ['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj'].map(layer0);
  // the session computes one tensor for q/k/v and one for gate/up (no copies); the others alias it
  assert.equal(graph.aliases.get(`a.${k}`), `a.${q}`);
  assert.equal(graph.aliases.get(`a.${v}`), `a.${q}`);
  assert.equal(graph.aliases.get(`a.${up}`), `a.${gate}`);
  for (const alias of graph.aliases.keys()) assert.ok(!graph.session.outputNames.includes(alias), alias);
  assert.equal(graph.session.outputNames.length + graph.aliases.size, graph.outputNames.length);
  // an alias alone is fetched through its tensor, and equals PyTorch's rows for that module
  const out = await graph.run(gold.batch, { outputs: [`a.${k}`, `g.${k}`] });
  assert.deepEqual(Object.keys(out).sort(), [`a.${k}`, `a.${q}`, `g.${k}`].sort());
  const e = relErr(out[`a.${k}`].data as Float32Array, gold.get(`a.${k}`));
  assert.ok(e <= TOL, `a.${k}: relative error ${e}`);
});
