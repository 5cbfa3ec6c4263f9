// PEFT LoRA adapters: the engine's forward and the LoRA A/B layers' a_t, g_t against PyTorch +
// PEFT in float64 (goldens from test/oracle/make_lora.py), and every adapter_config.json
// setting we do not implement refused by name.
import assert from 'node:assert/strict';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, test } from 'node:test';
import { modelFingerprint } from '../../src/server/attribution/fingerprint';
import { pythonAnchors, readAdapter, targets } from '../../src/server/model/adapter';
import { Model } from '../../src/server/model/engine';
import { readSafetensorsHeader, readTensorF32, writeSafetensors } from '../../src/server/model/safetensors';
import { isUserError } from '../../src/server/user-errors';
import { useTempHome } from './helpers/env';
import { loadGolden, relErr } from './helpers/golden';

const FIX = 'test/fixtures/models';

useTempHome();

// float64 graphs and float32 graphs (what users run) against the float64 goldens, both at 1e-5
for (const [name, precision, TOL] of ['llama_lora', 'llama_rslora', 'gpt2_lora', 'phi3_lora'].flatMap((n) => [
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
    'target_modules none of whose entries is in the base',
    (c) => (c.target_modules = ['c_attn', 'query_key_value']),
    /adapter_config\.json: "target_modules" entries "c_attn", "query_key_value" match no linear layer of the base model \(llama/,
  ],
  [
    'LoRA on the output head',
    (c) => (c.target_modules = ['q_proj', 'v_proj', 'down_proj', 'lm_head']),
    /adapter_config\.json: "target_modules" selects lm_head: LoRA on the embeddings or the output head is not supported$/,
  ],
  [
    'LoRA on the embeddings',
    (c) => (c.target_modules = ['q_proj', 'v_proj', 'down_proj', 'embed_tokens']),
    /adapter_config\.json: "target_modules" selects model\.embed_tokens: LoRA on the embeddings or the output head is not supported$/,
  ],
  [
    'a regular expression that selects the head',
    (c) => (c.target_modules = `.*(q_proj|v_proj|down_proj|lm_head)`),
    /"target_modules" selects lm_head: LoRA on the embeddings or the output head/,
  ],
  [
    'a regular expression that matches no module name',
    (c) => (c.target_modules = String.raw`.*\.(query_key_value|c_attn)`),
    /adapter_config\.json: "target_modules" regular expression ".*\\\\.\(query_key_value\|c_attn\)" matches no module name of the base model \(read as a JavaScript regular expression/,
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

test('LoRA: a base of another family than the class PEFT recorded (auto_mapping.base_model_class) is said in a notice naming both; the same family is not', () => {
  const notices: string[] = [];
  const open = (auto_mapping: unknown) =>
    Model.open(
      variant((c) => (c.auto_mapping = auto_mapping)),
      { notice: (l) => notices.push(l) },
    ).modules().length;
  // a Qwen3 adapter on this Llama (same module names and shapes) ran without a word
  assert.ok(open({ base_model_class: 'Qwen3ForCausalLM', parent_library: 'transformers.models.qwen3' }) > 0);
  assert.equal(notices.length, 1, notices.join('\n'));
  assert.match(
    notices[0],
    /adapter_config\.json says the adapter was trained on a Qwen3ForCausalLM \(auto_mapping\.base_model_class\), but its base .* is a LlamaForCausalLM \(config\.json "architectures"\): .* pass that one with --base/,
  );
  // the family's other classes (what AutoModel or a text-only load records), or none recorded
  for (const m of [
    { base_model_class: 'LlamaForCausalLM', parent_library: 'transformers.models.llama.modeling_llama' },
    { base_model_class: 'LlamaModel' },
    null,
  ])
    assert.ok(open(m) > 0);
  assert.equal(notices.length, 1, notices.join('\n'));
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
    /"target_modules" regular expression "q_proj\|v_proj\|down_proj" matches no module name of the base model/,
  );
});

test("LoRA: Python's \\A and \\Z anchors in a target_modules regular expression mean ^ and $, as in PEFT", () => {
  const list = Model.open(variant(() => {})).modules();
  const regex = String.raw`\A.*\.(q_proj|v_proj|down_proj)\Z`;
  assert.deepEqual(Model.open(variant((c) => (c.target_modules = regex))).modules(), list);
  assert.equal(pythonAnchors(regex), String.raw`^.*\.(q_proj|v_proj|down_proj)$`);
  // only the anchors: an escaped backslash before Z, and anything in a character class, stay as written
  for (const kept of [String.raw`a\\Z`, String.raw`[\Z]`, String.raw`[]\Z]`, String.raw`[^]\A]x`, String.raw`\.q_proj`])
    assert.equal(pythonAnchors(kept), kept);
  assert.equal(pythonAnchors(String.raw`[a]\Z`), '[a]$');
});

test("LoRA: Python's regex spellings PEFT reads ({,n}, (?P<name>…), (?P=name)) select what PEFT selects", () => {
  const list = Model.open(variant(() => {})).modules();
  // {,1} is a quantifier in Python; JavaScript read it as text, and down_proj was not selected
  const braces = String.raw`.*\.(q|v)_proj|.*dow{,1}n_proj`;
  assert.deepEqual(Model.open(variant((c) => (c.target_modules = braces))).modules(), list);
  const named = String.raw`.*\.(?P<p>q|v)_proj|.*\.(?P<d>down)_proj`;
  assert.deepEqual(Model.open(variant((c) => (c.target_modules = named))).modules(), list);
  assert.equal(pythonAnchors('(?P<x>a)(?P=x)b{,2}'), String.raw`(?<x>a)\k<x>b{0,2}`);
  // a leading (?i): case-insensitive, as Python reads it
  const caseless = String.raw`(?i).*\.(Q|V)_PROJ|.*\.DOWN_proj`;
  assert.deepEqual(Model.open(variant((c) => (c.target_modules = caseless))).modules(), list);
  // inside a character class they stay as written
  assert.equal(pythonAnchors('[{,1}]'), '[{,1}]');
});

test("LoRA: tensor names that carry the adapter's name (a state_dict saved without save_pretrained) are refused saying so", () => {
  const dir = variant(() => {});
  const file = join(dir, 'adapter_model.safetensors');
  const b = readFileSync(file);
  const n = Number(b.readBigUInt64LE(0));
  const h = JSON.parse(b.subarray(8, 8 + n).toString('utf8'));
  const renamed = Object.fromEntries(
    Object.entries(h).map(([k, v]) => [k === '__metadata__' ? k : k.replace(/\.weight$/, '.default.weight'), v]),
  );
  const json = Buffer.from(JSON.stringify(renamed));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, b.subarray(8 + n)]));
  assert.throws(
    () => Model.open(dir),
    /carries the adapter's name \("default"\) inside its own, as a model's state_dict does: PEFT's save_pretrained .* drop it/,
  );
});

test('LoRA: use_rslora and lora_bias of null read as false, as PEFT reads them', () => {
  const plain = Model.open(variant(() => {}));
  const nulls = Model.open(variant((c) => Object.assign(c, { use_rslora: null, lora_bias: null })));
  assert.deepEqual(nulls.modules(), plain.modules());
  assert.equal(nulls.checkpoint.adapter!.scaling, plain.checkpoint.adapter!.scaling);
});

test("LoRA: the adapter's layout, PEFT version and dropout do not change its fingerprint; its rank settings do", () => {
  const fp = (edit: (c: Record<string, unknown>) => void, reorder = false) => {
    const dir = variant(edit);
    if (reorder) {
      const file = join(dir, 'adapter_config.json');
      const c = JSON.parse(readFileSync(file, 'utf8'));
      writeFileSync(file, JSON.stringify(Object.fromEntries(Object.entries(c).reverse()), null, 4));
    }
    return modelFingerprint(Model.open(dir).checkpoint, join(tmp, 'fp-cache'));
  };
  const base = fp(() => {});
  assert.equal(
    fp(() => {}, true),
    base,
    'key order and indentation',
  );
  assert.equal(
    fp((c) => Object.assign(c, { peft_version: '9.9.9', lora_dropout: 0.37 })),
    base,
  );
  assert.notEqual(
    fp((c) => (c.lora_alpha = (c.lora_alpha as number) * 2)),
    base,
  );
});

test('LoRA: target_modules entries that match nothing are fine (PEFT needs one to match); overlapping entries all count', () => {
  const list = Model.open(variant(() => {})).modules();
  // a generic cross-architecture list: GPT-2's c_attn and GPT-NeoX's query_key_value select nothing in a Llama
  const generic = variant((c) => (c.target_modules = ['c_attn', 'q_proj', 'v_proj', 'query_key_value', 'down_proj']));
  assert.deepEqual(Model.open(generic).modules(), list);
  const overlap = variant((c) => (c.target_modules = ['q_proj', 'self_attn.q_proj', 'v_proj', 'mlp.down_proj']));
  assert.deepEqual(Model.open(overlap).modules(), list);
  const adapter = readAdapter(overlap);
  assert.deepEqual(targets(adapter, 'model.layers.0.self_attn.q_proj'), ['q_proj', 'self_attn.q_proj']);
  assert.deepEqual(targets(adapter, 'model.layers.0.mlp.down_proj'), ['mlp.down_proj']);
  assert.deepEqual(targets(adapter, 'model.layers.0.self_attn.k_proj'), []);
});

/** the llama adapter with `extra` tensors added to adapter_model.safetensors (config as is) */
function withTensors(extra: Record<string, number[]>): string {
  const dir = variant(() => {});
  const file = join(dir, 'adapter_model.safetensors');
  const h = readSafetensorsHeader(file);
  const tensors = Object.fromEntries(
    [...h.tensors.values()].map((t) => [
      t.name,
      { dtype: 'F32' as const, shape: t.shape, data: readTensorF32(h, t.name) },
    ]),
  );
  for (const [name, shape] of Object.entries(extra))
    tensors[name] = { dtype: 'F32', shape, data: new Float32Array(shape[0] * shape[1]) };
  writeSafetensors(file, tensors);
  return dir;
}

test('LoRA: tensors of LoRA on the embeddings or the head (lora_A, lora_embedding_A, base_layer copies) are refused as such', () => {
  const cases: Array<[Record<string, number[]>, RegExp]> = [
    [
      { 'base_model.model.lm_head.lora_A.weight': [4, 32], 'base_model.model.lm_head.lora_B.weight': [320, 4] },
      /tensor "base_model\.model\.lm_head\.lora_A\.weight" adapts lm_head: LoRA on the embeddings or the output head is not supported$/,
    ],
    [
      { 'base_model.model.lm_head.base_layer.weight': [320, 32] },
      /tensor "base_model\.model\.lm_head\.base_layer\.weight" adapts lm_head: LoRA on the embeddings or the output head/,
    ],
    [
      { 'base_model.model.model.embed_tokens.lora_embedding_A': [4, 320] },
      /tensor "base_model\.model\.model\.embed_tokens\.lora_embedding_A" adapts model\.embed_tokens: LoRA on the embeddings/,
    ],
    [
      { 'base_model.model.model.embed_tokens.weight': [336, 32] },
      /tensor "base_model\.model\.model\.embed_tokens\.weight" replaces model\.embed_tokens \(save_embedding_layers/,
    ],
  ];
  for (const [extra, message] of cases)
    assert.throws(
      () => Model.open(withTensors(extra)),
      (e: Error) => {
        assert.match(e.message, /adapter_model\.safetensors: tensor /);
        assert.match(e.message, message);
        assert.ok(!e.message.includes('\n'), e.message);
        assert.ok(isUserError(e), e.constructor.name);
        return true;
      },
    );
});

test('LoRA: an adapter_model.safetensors that is a directory is refused in one line, naming it', () => {
  const dir = variant(() => {});
  const weights = join(dir, 'adapter_model.safetensors');
  rmSync(weights);
  mkdirSync(weights);
  assert.throws(
    () => Model.open(dir),
    (e: Error) => {
      assert.match(e.message, /adapter_model\.safetensors: not a file/);
      assert.ok(e.message.startsWith(weights), e.message);
      assert.ok(isUserError(e), e.constructor.name);
      return true;
    },
  );
  // and any safetensors path that is a directory, read directly
  assert.throws(
    () => readSafetensorsHeader(dir),
    (e: Error) => isUserError(e) && /not a safetensors file \(a directory\)/.test(e.message),
  );
});

test('LoRA: --base overrides base_model_name_or_path; a plain model refuses a base', async () => {
  const dir = variant((c) => (c.base_model_name_or_path = 'meta-llama/Llama-3.2-1B'));
  const notices: string[] = [];
  const model = Model.open(dir, { base: `${FIX}/llama`, threads: 1, notice: (l) => notices.push(l) });
  assert.equal(notices.length, 0, 'the adapter names no local folder: nothing replaced');
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
  // a --base other than the local folder the adapter names is said, once, naming both
  const other = join(tmp, 'other-base');
  cpSync(`${FIX}/llama`, other, { recursive: true });
  const named = variant(() => {});
  Model.open(named, { base: other, notice: (l) => notices.push(l) });
  assert.equal(notices.length, 1);
  assert.ok(
    notices[0].startsWith(`the base ${other} (--base, or "base" in influence-lens.json) replaces the one `) &&
      notices[0].includes(resolve(`${FIX}/llama`)),
    notices[0],
  );
  // the same folder by another path (a symlink) is no replacement
  const link = join(tmp, 'llama-link');
  symlinkSync(resolve(`${FIX}/llama`), link);
  Model.open(named, { base: link, notice: (l) => notices.push(l) });
  Model.open(named, { base: `${FIX}/llama`, notice: (l) => notices.push(l) });
  assert.equal(notices.length, 1, notices.join('\n'));
});

test("LoRA: an adapter folder's own chat template or tokenizer settings without tokenizer.json are refused, not ignored for the base's", async () => {
  // an audit's adapter held chat_template.jinja and no tokenizer.json: its chats were rendered with
  // the base's template, without a word
  const base = resolve(`${FIX}/llama`);
  const template = variant(() => {});
  writeFileSync(join(template, 'chat_template.jinja'), "{% for m in messages %}{{ m['content'] }}{% endfor %}");
  assert.throws(
    () => Model.open(template),
    (e: Error) =>
      isUserError(e) &&
      e.message.includes(`${template} holds chat_template.jinja of its own (not the base's) but no tokenizer.json`) &&
      e.message.includes(`ignored for the base's in ${base}`) &&
      /tokenizer\.save_pretrained/.test(e.message),
  );
  // a tokenizer_config.json that differs from the base's (here: another chat template)
  const config = variant(() => {});
  const tc = JSON.parse(readFileSync(join(base, 'tokenizer_config.json'), 'utf8'));
  writeFileSync(join(config, 'tokenizer_config.json'), JSON.stringify({ ...tc, chat_template: '{{ messages }}' }));
  assert.throws(() => Model.open(config), /holds tokenizer_config\.json of its own \(not the base's\)/);
  // the base's own files copied beside the adapter change nothing: read from the base
  const copied = variant(() => {});
  cpSync(join(base, 'tokenizer_config.json'), join(copied, 'tokenizer_config.json'));
  assert.equal(Model.open(copied).checkpoint.tokenizerDir, base);
  // with tokenizer.json the adapter's folder is the tokenizer's (template included)
  cpSync(join(base, 'tokenizer.json'), join(template, 'tokenizer.json'));
  cpSync(join(base, 'tokenizer_config.json'), join(template, 'tokenizer_config.json'));
  const own = Model.open(template);
  assert.equal(own.checkpoint.tokenizerDir, template);
});
