// PEFT LoRA adapters: the engine's forward and the LoRA A/B layers' a_t, g_t against PyTorch +
// PEFT in float64 (goldens from test/oracle/make_lora.py), and every adapter_config.json
// setting we do not implement refused by name.
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, test } from 'node:test';
import { Model } from '../../src/server/model/engine';
import { isUserError } from '../../src/server/user-errors';
import { useTempHome } from './helpers/env';
import { loadGolden, relErr } from './helpers/golden';

const FIX = 'test/fixtures/models';

useTempHome();

// float64 graphs and float32 graphs (what users run) against the float64 goldens, both at 1e-5
for (const [name, precision, TOL] of ['llama_lora', 'llama_rslora', 'gpt2_lora'].flatMap((n) => [
  [n, 'fp64', 1e-5] as const,
  [n, 'fp32', 1e-5] as const,
])) {
  test(`LoRA golden: ${name} (${precision}) matches PyTorch + PEFT`, async () => {
    const model = Model.open(`${FIX}/${name}`, { threads: 1, precision });
    const gold = loadGolden(name);
    const graph = await model.compile({ tokenLoss: true, perToken: true, modules: 'all' });
    const out = await graph.run(gold.batch);
    const check = (key: string) => {
      const e = relErr(out[key].data as Float64Array | Float32Array, gold.get(key));
      assert.ok(e <= TOL, `${name} ${key}: relative error ${e.toExponential(2)} > ${TOL}`);
    };
    check('token_nll');
    check('loss');
    const golden = gold.names.filter((n) => n.startsWith('a.')).map((n) => n.slice(2));
    // the tracked modules are exactly the adapter's A and B layers, named as in the safetensors file
    assert.deepEqual(graph.modules.map((m) => m.name).sort(), golden.sort());
    for (const m of golden) {
      check(`a.${m}`);
      check(`g.${m}`);
    }
    assert.ok(golden.every((m) => /^base_model\.model\..*\.lora_[AB]$/.test(m)));
  });
}

test('LoRA: the adapter changes the base model (the goldens are not the base losses)', async () => {
  const gold = loadGolden('llama_lora');
  const base = await Model.open(`${FIX}/llama`, { threads: 1, precision: 'fp64' }).compile({ tokenLoss: true });
  const out = await base.run(gold.batch);
  assert.ok(relErr(out.token_nll.data as Float64Array, gold.get('token_nll')) > 1e-2);
});

// ---- refusals --------------------------------------------------------------------------

const tmp = mkdtempSync(join(tmpdir(), 'il-lora-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
let n = 0;

/** a copy of the llama adapter with adapter_config.json edited; the base given by absolute path */
function variant(edit: (c: Record<string, unknown>) => void): string {
  const dir = join(tmp, `v${n++}`);
  cpSync(`${FIX}/llama_lora`, dir, { recursive: true });
  const c = JSON.parse(readFileSync(join(dir, 'adapter_config.json'), 'utf8'));
  c.base_model_name_or_path = resolve(`${FIX}/llama`);
  edit(c);
  writeFileSync(join(dir, 'adapter_config.json'), JSON.stringify(c));
  return dir;
}

const REFUSED: Array<[string, (c: Record<string, unknown>) => void, RegExp]> = [
  ['DoRA', (c) => (c.use_dora = true), /adapter_config\.json: "use_dora": true is not supported.*DoRA/],
  ['modules_to_save', (c) => (c.modules_to_save = ['lm_head']), /adapter_config\.json: "modules_to_save"/],
  ['rank_pattern', (c) => (c.rank_pattern = { q_proj: 2 }), /adapter_config\.json: "rank_pattern"/],
  ['alpha_pattern', (c) => (c.alpha_pattern = { q_proj: 2 }), /adapter_config\.json: "alpha_pattern"/],
  ['layers_to_transform', (c) => (c.layers_to_transform = [0]), /adapter_config\.json: "layers_to_transform"/],
  ['peft_type', (c) => (c.peft_type = 'IA3'), /adapter_config\.json: "peft_type" is "IA3"; only LoRA/],
  ['bias', (c) => (c.bias = 'all'), /adapter_config\.json: "bias": "all" is not supported/],
  ['PiSSA init', (c) => (c.init_lora_weights = 'pissa'), /adapter_config\.json: "init_lora_weights": "pissa"/],
  ['EVA init', (c) => (c.init_lora_weights = 'eva'), /"init_lora_weights": "eva" is not supported.*EVA/],
  ['an unknown switched-on key', (c) => (c.use_future_thing = true), /adapter_config\.json: "use_future_thing"/],
  [
    'a target that is not in the base',
    (c) => (c.target_modules = ['q_proj', 'v_proj', 'down_proj', 'query_key_value']),
    /adapter_config\.json: "target_modules" entry "query_key_value" matches no linear layer/,
  ],
  [
    'adapter tensors no target selects',
    (c) => (c.target_modules = ['q_proj', 'v_proj']),
    /adapter_model\.safetensors: tensor base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight adapts no linear layer/,
  ],
  [
    'a wrong rank',
    (c) => (c.r = 8),
    /lora_A\.weight has shape \[4, 32\], expected \[8, 32\] \(adapter_config\.json "r": 8\)/,
  ],
  [
    'a base that is not a local folder',
    (c) => (c.base_model_name_or_path = 'meta-llama/Llama-3.2-1B'),
    /adapter_config\.json: "base_model_name_or_path" is "meta-llama\/Llama-3\.2-1B", not a local folder; pass the base model folder with --base/,
  ],
];

for (const [what, edit, message] of REFUSED)
  test(`LoRA: refuses ${what}, by name, in one line`, () => {
    const dir = variant(edit);
    assert.throws(
      () => Model.open(dir),
      (e: Error) => {
        assert.match(e.message, message);
        assert.ok(!e.message.includes('\n'), e.message);
        assert.ok(isUserError(e), `${e.constructor.name} is printed as a crash, not as the user's error`);
        return true;
      },
    );
  });

test('LoRA: initialisations that only set A and B (gaussian, orthogonal) open as the default does', () => {
  const plain = Model.open(variant(() => {})).modules();
  for (const init of ['gaussian', 'orthogonal'])
    assert.deepEqual(Model.open(variant((c) => (c.init_lora_weights = init))).modules(), plain);
});

test('LoRA: a target_modules regular expression (full match, as PEFT) selects the same layers as the list', () => {
  const list = Model.open(variant(() => {})).modules();
  const regex = Model.open(variant((c) => (c.target_modules = String.raw`.*\.(q_proj|v_proj|down_proj)`))).modules();
  assert.deepEqual(regex, list);
  // full match: a pattern that matches only part of the name selects nothing, and is refused
  assert.throws(
    () => Model.open(variant((c) => (c.target_modules = 'q_proj|v_proj|down_proj'))),
    /adapts no linear layer/,
  );
});

test('LoRA: --base overrides base_model_name_or_path; a plain model refuses a base', async () => {
  const dir = variant((c) => (c.base_model_name_or_path = 'meta-llama/Llama-3.2-1B'));
  const model = Model.open(dir, { base: `${FIX}/llama`, threads: 1 });
  assert.equal(model.modules().length, 12);
  assert.equal(model.modules()[0].name, 'base_model.model.model.layers.0.self_attn.q_proj.lora_A');
  assert.deepEqual(
    model
      .modules()
      .map((m) => [m.dIn, m.dOut])
      .slice(0, 2),
    [
      [32, 4],
      [4, 32],
    ],
  );
  assert.throws(() => Model.open(`${FIX}/llama`, { base: `${FIX}/gpt2` }), /has no adapter_config\.json/);
});
