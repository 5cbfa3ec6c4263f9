// Multi-stage influence's regime check: the relative distance ‖W_ft − W_pt‖_F / ‖W_pt‖_F of
// each tracked linear module, against a fine-tune whose weight changes are known; the in-regime
// threshold; and the `multiStage` field on multistage results only.
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { Corpus, explain } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { multiStageRegime, relativeWeightDistance } from '../../src/server/attribution/multistage-regime';
import { type OpenedStage, openStage } from '../../src/server/attribution/stage';
import { formatResult } from '../../src/server/cli/explain';
import { loadDataset } from '../../src/server/data/dataset';
import { Model } from '../../src/server/model/engine';
import { DEFAULTS } from '../../src/server/settings';
import { initLlama, saveCheckpoint } from '../../src/server/train/trainer';
import { Rng } from '../../src/server/util/random';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const TOKENIZER = 'test/fixtures/models/llama';
const SHAPE = { vocab: 320, d: 8, layers: 2, heads: 2, kvHeads: 1, ffn: 12, maxPositions: 64 };
const LINEAR = /(q|k|v|o|gate|up|down)_proj\.weight$/;

/** A pre-trained model, and a "fine-tune" of it with known changes per module. */
function makePair(dir: string, change: (name: string, w: Float32Array) => Float32Array) {
  const { config, params, shapes } = initLlama(SHAPE, 3, { bos: 0, eos: 0, pad: 0 });
  saveCheckpoint(join(dir, 'pretrained'), config, params, shapes, TOKENIZER);
  const ft = new Map([...params].map(([n, w]) => [n, change(n, w)]));
  saveCheckpoint(join(dir, 'finetuned'), config, ft, shapes, TOKENIZER);
  return { pt: params, ft };
}

describe('relative weight distance', () => {
  const dir = join(home, 'distance');
  const rng = new Rng(7);
  let pair: ReturnType<typeof makePair>;
  before(() => {
    pair = makePair(dir, (name, w) => {
      // layer 0's linear weights are scaled by 1 + c (distance |c| exactly); layer 1's get random
      // noise; every norm and the embeddings change a lot, which the distance must not see
      if (!LINEAR.test(name)) return w.map((x) => x * 3 + 1);
      if (name.includes('layers.0.')) return w.map((x) => x * (1 + scale(name)));
      return w.map((x) => x + 0.05 * (rng.next() - 0.5));
    });
  });
  const scale = (name: string) =>
    0.01 * (1 + ['q', 'k', 'v', 'o', 'gate', 'up', 'down'].indexOf(/(\w+)_proj/.exec(name)![1]));

  test('equals ‖W_ft − W_pt‖_F / ‖W_pt‖_F computed from the saved tensors, per tracked linear module', () => {
    const ft = Model.open(join(dir, 'finetuned'));
    const pt = Model.open(join(dir, 'pretrained'));
    const d = relativeWeightDistance(ft, pt, 'all');
    assert.deepEqual(
      [...d.keys()],
      pt.modules('all').map((m) => m.name),
    );
    assert.equal(d.size, 14);
    for (const [module, value] of d) {
      const w = `${module}.weight`;
      const a = pair.ft.get(w)!;
      const b = pair.pt.get(w)!;
      let num = 0;
      let den = 0;
      for (let i = 0; i < b.length; i++) {
        num += (a[i] - b[i]) ** 2;
        den += b[i] ** 2;
      }
      const expected = Math.sqrt(num / den);
      assert.ok(Math.abs(value - expected) <= 1e-9 * Math.max(expected, 1), `${module}: ${value} vs ${expected}`);
      // the scaled modules moved by exactly |c| (up to float32 rounding of the saved weights)
      if (module.includes('layers.0.'))
        assert.ok(Math.abs(value - scale(w)) < 1e-5, `${module}: ${value} vs ${scale(w)}`);
      else assert.ok(value > 0.05, `${module}: the noise moved it (${value})`);
    }
    // MLP-only selection: the MLP modules' values
    const mlp = relativeWeightDistance(ft, pt, 'mlp');
    assert.deepEqual(
      [...mlp.keys()],
      pt.modules('mlp').map((m) => m.name),
    );
    for (const [m, v] of mlp) assert.equal(v, d.get(m));
  });

  test('a model against itself is at distance 0; remembered values follow the weights, not the path', () => {
    const pt = Model.open(join(dir, 'pretrained'));
    for (const v of relativeWeightDistance(pt, pt, 'all').values()) assert.equal(v, 0);
    // rewrite the fine-tune in place with other changes: the distance must be recomputed
    const before = relativeWeightDistance(Model.open(join(dir, 'finetuned')), pt, 'all');
    const { config, params, shapes } = initLlama(SHAPE, 3, { bos: 0, eos: 0, pad: 0 });
    const doubled = new Map([...params].map(([n, w]) => [n, LINEAR.test(n) ? w.map((x) => x * 1.5) : w]));
    saveCheckpoint(join(dir, 'finetuned'), config, doubled, shapes, TOKENIZER);
    const after = relativeWeightDistance(Model.open(join(dir, 'finetuned')), pt, 'all');
    for (const [m, v] of after) {
      assert.ok(Math.abs(v - 0.5) < 1e-6, `${m}: ${v}`);
      assert.notEqual(v, before.get(m));
    }
  });
});

describe('the regime summary and its threshold', () => {
  const t = DEFAULTS.multiStage.maxRelativeDistance;
  test('in the regime up to the threshold (max over modules), no warning', () => {
    const r = multiStageRegime(
      new Map([
        ['a', t / 4],
        ['b', t],
        ['c', t / 2],
        ['d', 0],
      ]),
    );
    assert.equal(r.inRegime, true);
    assert.equal(r.warning, undefined);
    assert.equal(r.threshold, t);
    assert.equal(r.distance.max, t);
    assert.equal(r.distance.median, (t / 4 + t / 2) / 2);
    assert.deepEqual(r.distance.perModule, { a: t / 4, b: t, c: t / 2, d: 0 });
  });

  test('one module beyond the threshold puts the pair outside, with a warning naming it', () => {
    const r = multiStageRegime(
      new Map([
        ['model.layers.0.mlp.up_proj', t / 10],
        ['model.layers.1.self_attn.o_proj', t * 1.01],
        ['model.layers.1.mlp.up_proj', t / 10],
      ]),
    );
    assert.equal(r.inRegime, false);
    assert.equal(r.distance.median, t / 10);
    assert.match(r.warning!, /model\.layers\.1\.self_attn\.o_proj/);
    assert.match(r.warning!, /single-stage/);
    // an explicit threshold overrides the default
    assert.equal(multiStageRegime(new Map([['x', 0.2]]), 0.3).inRegime, true);
    assert.equal(multiStageRegime(new Map([['x', 0.2]]), 0.1).inRegime, false);
  });
});

describe('explain: multistage results carry the regime, others do not', () => {
  const dir = join(home, 'explain');
  let ft: OpenedStage;
  let pt: OpenedStage;
  let corpus: Corpus;
  before(async () => {
    mkdirSync(dir, { recursive: true });
    // a fine-tune far from its pre-trained model: every linear weight scaled by 1.5
    makePair(dir, (name, w) => (LINEAR.test(name) ? w.map((x) => x * 1.5) : w));
    const data = join(dir, 'train.jsonl');
    writeFileSync(
      data,
      `${[
        { text: 'The capital of France is Paris.' },
        { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
        { text: 'Berlin is the capital of Germany.' },
      ]
        .map((r) => JSON.stringify(r))
        .join('\n')}\n`,
    );
    for (const stage of ['finetuned', 'pretrained'])
      await runFitJob({
        modelDir: join(dir, stage),
        dataPath: data,
        out: join(dir, `${stage}-factors`),
        modules: 'all',
        labels: 'empirical',
        seed: 0,
      });
    ft = openStage(join(dir, 'finetuned'), join(dir, 'finetuned-factors'));
    pt = openStage(join(dir, 'pretrained'), join(dir, 'pretrained-factors'));
    corpus = new Corpus(data, loadDataset(data), ft.model);
  });

  test('a pair of other modules (one more layer, either side) is refused in one line before any scoring', async () => {
    const deep = join(dir, 'deeper');
    const { config, params, shapes } = initLlama({ ...SHAPE, layers: 3 }, 5, { bos: 0, eos: 0, pad: 0 });
    saveCheckpoint(deep, config, params, shapes, TOKENIZER);
    await runFitJob({
      modelDir: deep,
      dataPath: join(dir, 'train.jsonl'),
      out: join(dir, 'deeper-factors'),
      modules: 'all',
      labels: 'empirical',
      seed: 0,
    });
    const other = openStage(deep, join(dir, 'deeper-factors'));
    const q = { prompt: 'Q: capital of France?\nA:', completion: ' Paris', method: 'multistage' as const, topK: 2 };
    await assert.rejects(
      explain({ model: other, pretrained: pt, modules: 'all' }, corpus, q),
      (e: Error) =>
        e.name === 'ExplainError' &&
        /multistage needs the same linear modules in both models: .*deeper has 7 the pre-trained .* lacks \(e\.g\. model\.layers\.2\./.test(
          e.message,
        ),
    );
    await assert.rejects(
      explain({ model: ft, pretrained: other, modules: 'all' }, corpus, q),
      (e: Error) => e.name === 'ExplainError' && /finetuned lacks model\.layers\.2\..*deeper has it as/.test(e.message),
    );
  });

  test('multistage: the distance of every tracked module, outside the regime here', async () => {
    const r = await explain({ model: ft, pretrained: pt, modules: 'all' }, corpus, {
      prompt: 'Q: capital of France?\nA:',
      completion: ' Paris',
      method: 'multistage',
      topK: 3,
    });
    assert.ok(r.multiStage, 'multistage result has the regime');
    assert.deepEqual(Object.keys(r.multiStage.distance.perModule), r.modules);
    for (const v of Object.values(r.multiStage.distance.perModule)) assert.ok(Math.abs(v - 0.5) < 1e-6, `${v}`);
    assert.ok(DEFAULTS.multiStage.maxRelativeDistance < 0.5);
    assert.equal(r.multiStage.inRegime, false);
    assert.match(r.multiStage.warning!, /moved up to 50%/);
  });

  for (const method of ['ekfac', 'gdp', 'bm25'] as const)
    test(`${method}: no multiStage field, even with a pre-trained stage (and multistage compared)`, async () => {
      const r = await explain({ model: ft, pretrained: pt, modules: 'all' }, corpus, {
        prompt: 'Q: capital of France?\nA:',
        completion: ' Paris',
        method,
        topK: 3,
        compare: ['multistage'],
      });
      assert.equal('multiStage' in r, false);
    });
});

describe('CLI explain output', () => {
  const base = {
    query: { prompt: 'p', completion: ' c', loss: 1, completionTokens: { offsets: [], values: [] } },
    model: 'm',
    scored: 0,
    supporting: [],
    opposing: [],
    histogram: { edges: [], counts: [] },
    modules: [],
    timings: { total_ms: 1 },
  } satisfies Omit<ExplainResult, 'method'>;
  test('prints the distance with a multistage result, and its warning outside the regime', () => {
    const far = multiStageRegime(new Map([['model.layers.0.mlp.up_proj', 0.45]]));
    const text = formatResult({ ...base, method: 'multistage', multiStage: far }, false);
    assert.match(text, /median 0\.450, max 0\.450/);
    assert.match(text, /^warning: .*model\.layers\.0\.mlp\.up_proj/m);
    const near = multiStageRegime(new Map([['model.layers.0.mlp.up_proj', 0.01]]));
    const ok = formatResult({ ...base, method: 'multistage', multiStage: near }, false);
    assert.match(ok, /max 0\.010/);
    assert.doesNotMatch(ok, /warning/);
    assert.doesNotMatch(formatResult({ ...base, method: 'ekfac' }, false), /W_ft/);
  });
});

test('a pre-trained model whose config.json describes another architecture is named in a warning (the regime check sees weights only)', async () => {
  const { cpSync, mkdtempSync, readFileSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const { stagesConfigWarning } = await import('../../src/server/attribution/stage');
  const dir = join(mkdtempSync(join(tmpdir(), 'il-stages-')), 'pt');
  cpSync('test/fixtures/models/llama', dir, { recursive: true });
  const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...config, rope_theta: 500000 }));
  const ft = Model.open('test/fixtures/models/llama');
  assert.equal(stagesConfigWarning(ft, Model.open('test/fixtures/models/llama')), undefined);
  assert.match(
    stagesConfigWarning(ft, Model.open(dir)) ?? '',
    /has another config\.json than the fine-tuned .* \(rope_theta: 500000 vs \(absent\)\): multi-stage influence takes the fine-tune to continue the same architecture/,
  );
});
