// `explain --rank R` scores the pool with a rank-R query and recomputes exactly only the examples
// that can reach the shown lists. The set must come from a bound on |exact − low-rank|, not from
// a fixed margin: here the corpus is built so that the exact #1 sits in the middle of the
// low-rank order, beyond any margin of 20.
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { describeAttribution } from '../../src/common/display';
import { Corpus, explain, reachable } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryGradients, queryMatrices, scoreCandidates } from '../../src/server/attribution/influence';
import { type OpenedStage, openStage } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { Model } from '../../src/server/model/engine';
import { initLlama, saveCheckpoint } from '../../src/server/train/trainer';
import { Rng } from '../../src/server/util/random';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const TOKENIZER = 'test/fixtures/models/llama';
const SHAPE = { vocab: 320, d: 8, layers: 2, heads: 2, kvHeads: 1, ffn: 12, maxPositions: 64 };
const WORDS =
  'the capital of France is Paris a city on Seine river Berlin Germany Rome Italy Madrid Spain Tokyo large small old new north south'.split(
    ' ',
  );
const QUERY = { prompt: 'Q: capital of France?\nA:', completion: ' Paris is' };

describe('reachable(): candidates whose interval can enter the top-k or bottom-k', () => {
  test('a wide interval far down the approximate order is kept; a narrow one that cannot reach is not', () => {
    // approximate scores 10, 9, 8, 1 (radius 10: could be 11), 0.5 (radius 0.1), -3, -4
    const approx = Float64Array.from([10, 9, 8, 1, 0.5, -3, -4]);
    const radius = Float64Array.from([0, 0, 0, 10, 0.1, 0, 0]);
    assert.deepEqual(reachable(approx, radius, 2), [0, 1, 3, 5, 6]);
    // exact scores (radius 0): just the top and bottom k
    assert.deepEqual(reachable(approx, new Float64Array(7), 1), [0, 6]);
  });
});

describe('explain --rank: the shown lists equal exact scoring', () => {
  const dir = join(home, 'lowrank');
  let stage: OpenedStage;
  let texts: string[];

  before(async () => {
    mkdirSync(dir, { recursive: true });
    const { config, params, shapes } = initLlama(SHAPE, 2, { bos: 0, eos: 0, pad: 0 });
    for (const [name, p] of params) if (!name.includes('norm')) for (let i = 0; i < p.length; i++) p[i] *= 20;
    saveCheckpoint(join(dir, 'model'), config, params, shapes, TOKENIZER);
    const rng = new Rng(7);
    texts = Array.from({ length: 160 }, () =>
      Array.from({ length: 3 + Math.floor(rng.next() * 8) }, () => WORDS[Math.floor(rng.next() * WORDS.length)]).join(
        ' ',
      ),
    );
    writeFileSync(join(dir, 'all.jsonl'), texts.map((text) => JSON.stringify({ text })).join('\n'));
    const model = Model.open(join(dir, 'model'), { precision: 'fp64' });
    const r = await runFitJob({
      modelDir: join(dir, 'model'),
      dataPath: join(dir, 'all.jsonl'),
      out: join(dir, 'factors'),
      modules: 'all',
      labels: 'empirical',
      seed: 0,
      batchSize: 16,
      model,
    });
    assert.equal(r.status, 'done');
    stage = openStage(join(dir, 'model'), join(dir, 'factors'), {
      damping: { relative: 0.1 },
      engine: { precision: 'fp64' },
    });
  });

  test('the exact #1 is shown although 21 examples outrank it at rank 1', async () => {
    const model = stage.model;
    const all = new Corpus('all', loadDataset(join(dir, 'all.jsonl')), model);
    const q = tokenizeQuery(model.tokenizer, QUERY.prompt, QUERY.completion, contextLength(model.config));
    const { tokens } = await queryGradients(model, { ids: q.ids, weights: q.weights }, { modules: 'all' });
    const M = queryMatrices(tokens, [stage.preconditioners!]);
    const full = await scoreCandidates(model, M, all.tokens, { modules: 'all', gradNorms: true });
    const lowRes = await scoreCandidates(model, M, all.tokens, { modules: 'all', rank: 1 });
    // the low-rank graph's ‖G(z)‖² (from token Gram matrices) equals the one from the formed G
    lowRes.gradSqNorm!.forEach((x, k) => {
      assert.ok(Math.abs(x - full.gradSqNorm![k]) <= 1e-10 * full.gradSqNorm![k], `‖G‖² of example ${k}`);
    });
    const exact = full.scores.map((s) => s[0]);
    const low = lowRes.scores.map((s) => s[0]);
    // the bound holds for every candidate
    low.forEach((x, k) => {
      const bound = lowRes.lowRankResidual! * Math.sqrt(lowRes.gradSqNorm![k]);
      assert.ok(Math.abs(x - exact[k]) <= bound * (1 + 1e-9), `|exact − low-rank| ≤ ‖R‖‖G‖ for example ${k}`);
    });
    // a positive example with ≥ 21 lower-scoring examples above it and ≥ 21 below it in the rank-1 order
    const pick = exact
      .map((_, e) => {
        const lower = exact.flatMap((x, j) => (x < exact[e] ? [j] : []));
        return {
          e,
          above: lower.filter((j) => low[j] > low[e]),
          below: lower.filter((j) => low[j] < low[e]),
        };
      })
      .find((c) => exact[c.e] > 0 && c.above.length >= 21 && c.below.length >= 21);
    assert.ok(pick, 'the rank-1 order differs enough from the exact one on this model');
    const chosen = [pick.e, ...pick.above.slice(0, 21), ...pick.below.slice(0, 21)];
    const path = join(dir, 'chosen.jsonl');
    writeFileSync(path, chosen.map((i) => JSON.stringify({ text: texts[i] })).join('\n'));
    const corpus = new Corpus('chosen', loadDataset(path), model);
    const setup = { model: stage, modules: 'all' as const };
    const ref = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK: 1 });
    assert.equal(ref.supporting[0].text, texts[pick.e], 'the chosen example is the exact #1');
    const ranked = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK: 1, rank: 1 });
    assert.equal(ranked.supporting[0].text, texts[pick.e]);
    assert.ok(
      Math.abs(ranked.supporting[0].score - ref.supporting[0].score) <= 1e-12 * Math.abs(ref.supporting[0].score),
    );
    assert.equal(ranked.opposing[0]?.text, ref.opposing[0]?.text);
    // the result says that the rest of the pool carries estimates; the exact one says nothing
    assert.equal(ranked.attribution?.preranked?.by, 'low-rank');
    assert.ok((ranked.attribution?.preranked?.exact ?? 0) >= 2);
    assert.equal(ref.attribution?.preranked, undefined);
    assert.match(
      describeAttribution(ranked.attribution!),
      /pre-ranked by a low-rank query, \d+ rescored exactly \(every example whose error bound reaches the shown lists, so these are the exact lists/,
    );
  });
});
