// influence-lens.json: the loader validates with influence-lens.schema.json itself, so the two
// cannot drift; these tests pin the messages (each names its field), the defaults the schema
// documents, path resolution, file checks, and the device probe (no silent CPU fallback).
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { assertSupportedSchema, formatPath, type JsonSchema, validateSchema } from '../../src/common/json-schema';
import { LIMITS } from '../../src/protocol/limits';
import { arenaFor, CompiledGraph, makeBatch } from '../../src/server/model/engine';
import { arenaPolicy, DEVICES, ort } from '../../src/server/model/onnx/session';
import {
  CONFIG_SCHEMA,
  ConfigFileError,
  loadConfig,
  parseConfig,
  readConfigFile,
} from '../../src/server/service/config';
import { checkDevice, DeviceUnavailableError } from '../../src/server/service/device';
import { DEFAULT_MODULES } from '../../src/server/service/influence-service';
import { DEFAULT_LIMITS } from '../../src/transport/server';

const tmp = mkdtempSync(join(tmpdir(), 'il-config-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const schema = CONFIG_SCHEMA as {
  properties: Record<string, { default?: unknown; enum?: unknown[]; description?: string }>;
  definitions: Record<string, { properties: Record<string, { description?: string }> }>;
};
const minimal = { models: { model: 'm' }, datasets: { train: 'train.jsonl' } };
const parse = (v: unknown) => parseConfig(v, { baseDir: '/base' });

describe('config schema', () => {
  test('uses only keywords the validator implements, and documents every field', () => {
    assertSupportedSchema(CONFIG_SCHEMA);
    for (const [k, p] of Object.entries(schema.properties))
      if (k !== '$schema') assert.ok(p.description, `${k} has no description`);
    for (const [d, def] of Object.entries(schema.definitions))
      for (const [k, p] of Object.entries(def.properties)) assert.ok(p.description || d === 'stagePair', `${d}.${k}`);
  });

  test('its defaults and enums are what the loader and the engine use', () => {
    const c = parse(minimal);
    const p = schema.properties;
    // unset: the factors' modules, else the default (the service's DEFAULT_MODULES)
    assert.equal(c.service.modules, undefined);
    assert.equal(DEFAULT_MODULES, p.modules.default);
    assert.equal(c.service.device, p.device.default);
    assert.deepEqual(c.service.damping, parse({ ...minimal, damping: p.damping.default }).service.damping);
    assert.equal(c.server.host, p.host.default);
    assert.equal(c.server.port, p.port.default);
    assert.equal(c.server.maxConcurrent, p.maxConcurrent.default);
    assert.equal(c.server.maxQueued, p.maxQueued.default);
    assert.equal(c.server.maxFrameBytes, p.maxFrameBytes.default);
    assert.deepEqual(DEFAULT_LIMITS, {
      maxConcurrent: p.maxConcurrent.default,
      maxQueued: p.maxQueued.default,
      maxFrameBytes: p.maxFrameBytes.default,
    });
    assert.deepEqual(p.device.enum, [...DEVICES]);
    assert.deepEqual(p.modules.enum, ['mlp', 'all']);
    // a configured limit can only lower the protocol's own
    const lp = (CONFIG_SCHEMA as { properties: { limits: { properties: Record<string, { maximum: number }> } } })
      .properties.limits.properties;
    assert.equal(lp.maxTextChars.maximum, LIMITS.explainTextMaxChars);
    assert.equal(lp.maxTopK.maximum, LIMITS.topK.max);
    const store = parse({ ...minimal, store: {} }).service.store!;
    const sp = (
      CONFIG_SCHEMA as { properties: { store: { properties: Record<string, { default: number | boolean }> } } }
    ).properties.store.properties;
    assert.deepEqual(store, {
      k: sp.k.default,
      minExamples: sp.minExamples.default,
      rerank: sp.rerank.default,
      checkpoints: sp.checkpoints.default,
    });
    assert.equal(store.checkpoints, false);
  });
});

describe('config loader', () => {
  test('one model: paths resolve against the file, defaults fill in', () => {
    const c = parse({ ...minimal, cacheDir: 'cache', discoveryFile: '/abs/server.json' });
    assert.deepEqual(c.service.finetuned, { model: '/base/m' });
    assert.equal(c.service.pretrained, undefined);
    assert.deepEqual(c.service.datasets, { train: '/base/train.jsonl' });
    assert.equal(c.service.cacheDir, '/base/cache');
    assert.equal(c.server.discoveryFile, '/abs/server.json');
    assert.deepEqual(c.service.damping, { relative: 0.1 });
  });

  test('a pre-trained + fine-tuned pair, and every field', () => {
    const c = parse({
      $schema: './influence-lens.schema.json',
      models: {
        pretrained: { model: 'base', factors: 'f/base', fitDataset: 'web' },
        finetuned: { model: 'ft', factors: 'f/ft' },
      },
      datasets: { web: 'web.jsonl', 'sft.v2': '/data/sft.jsonl' },
      datasetStage: { web: 'pretrained' },
      modules: 'all',
      damping: 0.001,
      device: 'cpu',
      threads: 4,
      host: '::1',
      port: 7450,
      maxConcurrent: 4,
      maxQueued: 0,
      maxFrameBytes: 1024,
      store: { k: 32 },
      limits: { maxTopK: 50 },
    });
    assert.deepEqual(c.service.pretrained, { model: '/base/base', factors: '/base/f/base', fitDataset: 'web' });
    assert.deepEqual(c.service.finetuned, { model: '/base/ft', factors: '/base/f/ft' });
    assert.deepEqual(c.service.datasets, { web: '/base/web.jsonl', 'sft.v2': '/data/sft.jsonl' });
    assert.deepEqual(c.service.datasetStage, { web: 'pretrained' });
    assert.equal(c.service.modules, 'all');
    assert.deepEqual(c.service.damping, { absolute: 0.001 });
    assert.equal(c.service.threads, 4);
    assert.deepEqual(c.service.store, { k: 32, minExamples: 512, rerank: 50, checkpoints: false });
    assert.deepEqual(c.service.limits, { maxTopK: 50 });
    assert.deepEqual(
      { ...c.server, discoveryFile: undefined },
      { host: '::1', port: 7450, maxConcurrent: 4, maxQueued: 0, maxFrameBytes: 1024, discoveryFile: undefined },
    );
    assert.deepEqual(parse({ ...minimal, damping: '0.05x' }).service.damping, { relative: 0.05 });
    assert.deepEqual(parse({ ...minimal, damping: 0 }).service.damping, { absolute: 0 });
  });

  const bad: Array<[string, unknown, RegExp]> = [
    ['not an object', [], /^influence-lens\.json: \(the whole file\): must be an object \(got array/],
    ['no models', { datasets: { a: 'a' } }, /models: is required/],
    ['no datasets', { models: { model: 'm' } }, /datasets: is required/],
    ['empty datasets', { ...minimal, datasets: {} }, /datasets: must have at least one entry/],
    [
      'a dataset path that is not a string',
      { ...minimal, datasets: { a: 3 } },
      /datasets\.a: must be a string \(got integer 3\)/,
    ],
    [
      'a bad dataset id',
      { ...minimal, datasets: { '../x': 'a' } },
      /datasets\["\.\.\/x"\]: \(the name\) a dataset id is 1-64/,
    ],
    ['a model without a path', { ...minimal, models: { factors: 'f' } }, /models\.model: is required/],
    ['an empty model path', { ...minimal, models: { model: '' } }, /models\.model: must not be empty/],
    [
      'a pair without finetuned',
      { ...minimal, models: { pretrained: { model: 'p' } } },
      /models\.finetuned: is required/,
    ],
    [
      'a typo in a stage',
      { ...minimal, models: { finetuned: { model: 'm', factor: 'f' } } },
      /models\.finetuned\.factor: is not a known field; did you mean "factors"\?/,
    ],
    [
      'a typo at the top',
      { ...minimal, maxConcurent: 2 },
      /maxConcurent: is not a known field; did you mean "maxConcurrent"\?/,
    ],
    ['modules', { ...minimal, modules: 'attention' }, /modules: must be one of "mlp", "all" \(got "attention"\)/],
    ['device', { ...minimal, device: 'gpu' }, /device: must be one of "cpu", "webgpu", "cuda" \(got "gpu"\)/],
    ['negative damping', { ...minimal, damping: -1 }, /damping: must be a number ≥ 0 \(absolute λ\), "heuristic"/],
    ['damping words', { ...minimal, damping: 'big' }, /damping: must be a number ≥ 0/],
    ['port range', { ...minimal, port: 70000 }, /port: must be ≤ 65535 \(got 70000\)/],
    ['port type', { ...minimal, port: '8080' }, /port: must be an integer \(got string "8080"\)/],
    ['maxConcurrent', { ...minimal, maxConcurrent: 0 }, /maxConcurrent: must be ≥ 1 \(got 0\)/],
    ['maxFrameBytes', { ...minimal, maxFrameBytes: 1.5 }, /maxFrameBytes: must be an integer \(got number 1.5\)/],
    ['store', { ...minimal, store: { k: 0 } }, /store\.k: must be ≥ 1/],
    // a rerank of 0 would show the store's estimates as scores
    ['store rerank 0', { ...minimal, store: { rerank: 0 } }, /store\.rerank: must be ≥ 1/],
    // the protocol checks every request against its own 20,000 first: a larger limit could never apply
    [
      'maxTextChars above the protocol',
      { ...minimal, limits: { maxTextChars: 30000 } },
      /limits\.maxTextChars: must be ≤ 20000/,
    ],
    ['maxTopK above the protocol', { ...minimal, limits: { maxTopK: 5000 } }, /limits\.maxTopK: must be ≤ 1000/],
    [
      'damping that flushes 1/(Λ+λ) to zero',
      { ...minimal, damping: 1e300 },
      /damping must be a non-negative number up to 1e\+30/,
    ],
    [
      'relative damping overflowing',
      { ...minimal, damping: '1e400x' },
      /damping must be a non-negative number up to 1e\+30/,
    ],
    [
      'fitDataset not a dataset',
      { ...minimal, models: { model: 'm', fitDataset: 'nope' } },
      /models\.fitDataset: "nope" is not a dataset id in "datasets" \(train\)/,
    ],
    [
      'datasetStage of an unknown dataset',
      { ...minimal, datasetStage: { other: 'finetuned' } },
      /datasetStage\.other: "other" is not a dataset id/,
    ],
    [
      'datasetStage pretrained without a pre-trained model',
      { ...minimal, datasetStage: { train: 'pretrained' } },
      /datasetStage\.train: "pretrained" needs a pre-trained model in models\.pretrained/,
    ],
  ];
  for (const [what, value, message] of bad)
    test(`refuses ${what}`, () => {
      assert.throws(
        () => parse(value),
        (e: unknown) => e instanceof ConfigFileError && message.test(e.message),
      );
    });

  test('several problems are all reported, one per line', () => {
    assert.throws(
      () => parse({ ...minimal, port: -1, modules: 'x', host: '' }),
      (e: Error) =>
        e.message.split('\n').length === 3 && e.message.split('\n').every((l) => l.startsWith('influence-lens.json: ')),
    );
  });
});

describe('config files', () => {
  const dir = join(tmp, 'project');
  mkdirSync(join(dir, 'models', 'ft'), { recursive: true });
  writeFileSync(join(dir, 'models', 'ft', 'config.json'), '{}');
  mkdirSync(join(dir, 'models', 'empty'), { recursive: true });
  writeFileSync(join(dir, 'train.jsonl'), '{"text":"a"}\n');
  const write = (name: string, v: unknown) => {
    const f = join(dir, name);
    writeFileSync(f, typeof v === 'string' ? v : JSON.stringify(v, null, 2));
    return f;
  };

  test('a good file loads, relative to its own directory', async () => {
    const f = write('influence-lens.json', {
      models: { model: 'models/ft', factors: 'factors' },
      datasets: { train: 'train.jsonl' },
    });
    const c = await loadConfig(f);
    assert.equal(c.file, f);
    assert.equal(c.service.finetuned.model, join(dir, 'models', 'ft'));
    assert.equal(c.service.finetuned.factors, join(dir, 'factors'));
    assert.equal(c.service.datasets.train, join(dir, 'train.jsonl'));
  });

  test('missing files, a directory that is no checkpoint, bad JSON: each named', () => {
    const f = write('a.json', {
      models: { pretrained: { model: 'models/none' }, finetuned: { model: 'models/empty', factors: 'train.jsonl' } },
      datasets: { train: 'train.jsonl', gone: 'gone.jsonl', dir: 'models' },
    });
    assert.throws(
      () => readConfigFile(f),
      (e: Error) =>
        /a\.json: models\.finetuned\.model: .*models\/empty has no config\.json/.test(e.message) &&
        /models\.finetuned\.factors: .*train\.jsonl is a file/.test(e.message) &&
        /models\.pretrained\.model: .*models\/none does not exist/.test(e.message) &&
        /datasets\.gone: .*gone\.jsonl does not exist/.test(e.message) &&
        /datasets\.dir: .*models is not a file/.test(e.message),
    );
    // a fine-tuned model written as models.finetuned with no pre-trained one is named where it is written
    const h = write('c.json', { models: { finetuned: { model: 'models/none' } }, datasets: { train: 'train.jsonl' } });
    assert.throws(() => readConfigFile(h), /c\.json: models\.finetuned\.model: .*models\/none does not exist/);
    const g = write('b.json', '{\n  "models": {"model": "m"},\n  "datasets": {"a": "b"},,\n}');
    assert.throws(() => readConfigFile(g), /b\.json: not valid JSON: .* at line 3, column 2[0-9]/);
    assert.throws(
      () => readConfigFile(join(dir, 'missing.json')),
      /cannot read the configuration .*missing\.json: ENOENT/,
    );
  });

  test('a key written twice is refused with both lines (JSON.parse kept the last without a word)', () => {
    const f = write(
      'twice.json',
      '{\n  "models": {"model": "models/ft", "factors": "a",\n    "factors": "b"},\n  "damping": 0.001,\n  "datasets": {"train": "train.jsonl"},\n  "damping": "heuristic",\n  "datasets": {"other": "train.jsonl"}\n}',
    );
    assert.throws(
      () => readConfigFile(f),
      (e: Error) =>
        e.message ===
        [
          'twice.json: "models.factors" is given twice (lines 2 and 3); JSON would keep the last one without a word: remove one',
          'twice.json: "damping" is given twice (lines 4 and 6); JSON would keep the last one without a word: remove one',
          'twice.json: "datasets" is given twice (lines 5 and 7); JSON would keep the last one without a word: remove one',
        ].join('\n'),
    );
  });

  test('a GPU device that is not available is an error, never a silent CPU fallback', async () => {
    const cudaBundled = ort.listSupportedBackends().some((b) => b.name === 'cuda' && b.bundled);
    const f = write('cuda.json', {
      models: { model: 'models/ft' },
      datasets: { train: 'train.jsonl' },
      device: 'cuda',
    });
    if (!cudaBundled)
      await assert.rejects(
        loadConfig(f),
        /cuda\.json: device: "cuda" is not available here: .*CUDA provider libraries/,
      );
    await checkDevice('cpu');
    // webgpu works only with a real GPU's Vulkan driver; either it runs the probe or says why not
    try {
      await checkDevice('webgpu');
    } catch (e) {
      assert.ok(e instanceof DeviceUnavailableError);
      assert.match(e.message, /^device: "webgpu" is not available here: .+ "cpu"/);
    }
  });
});

describe('schema validator', () => {
  const s: JsonSchema = {
    definitions: { pos: { type: 'integer', minimum: 1 } },
    type: 'object',
    properties: {
      a: { $ref: '#/definitions/pos' },
      b: { anyOf: [{ type: 'string' }, { type: 'array', items: { $ref: '#/definitions/pos' }, minItems: 1 }] },
      c: { oneOf: [{ type: 'integer' }, { type: 'number' }] },
      d: { type: 'string', pattern: '^x', patternErrorMessage: 'must start with x' },
      // biome-ignore lint/suspicious/noThenProperty: JSON Schema's if/then/else
      e: { if: { type: 'string' }, then: { minLength: 2 }, else: { type: 'integer' } },
      f: { const: 3, errorMessage: 'must be three' },
    },
  };
  const msgs = (v: unknown) => validateSchema(v, s).map((i) => `${formatPath(i.path)}: ${i.message}`);
  test('keywords', () => {
    assert.deepEqual(msgs({ a: 1, b: 'x', c: 1.5, d: 'xy', e: 'ab', f: 3 }), []);
    assert.deepEqual(msgs({ a: 0 }), ['a: must be ≥ 1 (got 0)']);
    assert.deepEqual(msgs({ b: [1, 0] }), ['b[1]: must be ≥ 1 (got 0)']);
    assert.deepEqual(msgs({ b: [] }), ['b: must have at least 1 item']);
    assert.deepEqual(msgs({ b: 5 }), ['b: must be a string or an array (got integer 5)']);
    assert.deepEqual(msgs({ c: 2 }), ['c: matches more than one of the allowed forms']);
    assert.deepEqual(msgs({ d: 'y' }), ['d: must start with x (got "y")']);
    assert.deepEqual(msgs({ e: 'a' }), ['e: must be at least 2 characters long']);
    assert.deepEqual(msgs({ e: true }), ['e: must be an integer (got boolean true)']);
    assert.deepEqual(msgs({ f: 4 }), ['f: must be three']);
    assert.deepEqual(msgs(null), ['(root): must be an object (got null null)']);
  });
  test('unknown keywords, formats and refs are refused up front (Ajv strict mode)', () => {
    assert.throws(() => assertSupportedSchema({ type: 'string', format: 'email' }), /unknown format "email"/);
    assert.throws(() => assertSupportedSchema({ $ref: 'http://x/y' }), /can't resolve reference/);
    assert.throws(() => assertSupportedSchema({ properties: { a: { minimun: 1 } } }), /unknown keyword: "minimun"/);
  });
});

test('ONNX Runtime CPU arena: the candidate-scoring graphs only, unless INFLUENCE_LENS_ORT_ARENA says on or off', () => {
  const saved = process.env.INFLUENCE_LENS_ORT_ARENA;
  const scores = { labels: 'data' as const, scores: true };
  const heatmap = { labels: 'data' as const, scores: true, tokenScores: true };
  const covariance = { perToken: true };
  const lambda = { lambda: true };
  try {
    for (const v of [undefined, 'scores', ' Scores ']) {
      if (v === undefined) delete process.env.INFLUENCE_LENS_ORT_ARENA;
      else process.env.INFLUENCE_LENS_ORT_ARENA = v;
      assert.equal(arenaPolicy(), 'scores', String(v));
      assert.equal(arenaFor(scores), true);
      assert.equal(arenaFor({ ...scores, eigenbasis: true }), true);
      assert.equal(arenaFor(heatmap), false);
      assert.equal(arenaFor(covariance), false);
      assert.equal(arenaFor(lambda), false);
    }
    for (const on of ['on', '1', 'TRUE', ' yes ']) {
      process.env.INFLUENCE_LENS_ORT_ARENA = on;
      assert.equal(arenaPolicy(), 'on', on);
      assert.equal(arenaFor(covariance), true);
      assert.equal(arenaFor(heatmap), true);
    }
    process.env.INFLUENCE_LENS_ORT_ARENA = 'off';
    assert.equal(arenaPolicy(), 'off');
    assert.equal(arenaFor(scores), false);
    process.env.INFLUENCE_LENS_ORT_ARENA = 'enable';
    assert.throws(() => arenaPolicy(), /INFLUENCE_LENS_ORT_ARENA="enable": use scores \(default/);
  } finally {
    if (saved === undefined) delete process.env.INFLUENCE_LENS_ORT_ARENA;
    else process.env.INFLUENCE_LENS_ORT_ARENA = saved;
  }
});

test('a run of one long sequence (Batch.alone) goes to the session without the arena; others to the arena one', async () => {
  const calls: string[] = [];
  const fake = (name: string) =>
    ({
      inputNames: ['input_ids', 'attention_mask', 'target_weights'],
      run: async () => {
        calls.push(name);
        return {};
      },
    }) as unknown as ort.InferenceSession;
  let opened = 0;
  const lean = fake('lean');
  const graph = new CompiledGraph(fake('arena'), [], [], null, false, async () => {
    opened++;
    return lean;
  });
  const short = makeBatch([{ ids: [1, 2, 3] }, { ids: [4, 5] }]);
  const long = makeBatch([{ ids: [1, 2, 3, 4] }]);
  long.alone = true;
  await graph.run(short);
  await graph.run(long);
  await graph.run(short);
  await graph.run(long);
  assert.deepEqual(calls, ['arena', 'lean', 'arena', 'lean']);
  assert.equal(opened, 2, 'the engine memoizes the lean session; the graph asks for it per long run');
  // without a lean session (no arena), every run uses the one session
  const plain = new CompiledGraph(fake('plain'), [], [], null, false);
  await plain.run(long);
  assert.deepEqual(calls.slice(-1), ['plain']);
});
