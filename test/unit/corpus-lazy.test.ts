// A Corpus tokenizes nothing before a method needs it: BM25 and getExample (the server's light
// lane) work from rendered texts and single examples, and give exactly what the fully tokenized
// corpus gives; across the server's two worker threads the same line has the same id, text and tokens.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { Corpus, explain, scoreCorpus } from '../../src/server/attribution/explain';
import { loadDataset } from '../../src/server/data/dataset';
import { defaultServiceConfig, embeddedDefault } from '../../src/server/defaults';
import { Model } from '../../src/server/model/engine';
import { WorkerService } from '../../src/server/service/worker-service';
import { useTempHome } from './helpers/env';

useTempHome();

const d = embeddedDefault();
const query = { prompt: 'Q: What is the capital of Australia?\nA:', completion: ' Sydney' };

/** The model, with its tokenizer's encode calls counted. */
function countingModel() {
  const model = Model.open(d.finetuned);
  const tok = model.tokenizer;
  const encode = tok.encode;
  const counter = { calls: 0 };
  tok.encode = (...args) => {
    counter.calls++;
    return encode(...args);
  };
  return { model, counter };
}

describe('Corpus: tokens on demand', () => {
  test('a BM25 explain tokenizes the query and the shown examples, not the dataset', async () => {
    const { model, counter } = countingModel();
    const dataset = loadDataset(d.finetuneData);
    const corpus = new Corpus('finetune', dataset, model);
    assert.equal(counter.calls, 0, 'constructing the corpus tokenizes nothing');
    const r = await explain({ model: { model }, modules: 'all' }, corpus, {
      ...query,
      method: 'bm25',
      topK: 3,
    });
    assert.equal(r.scored, dataset.examples.length);
    assert.equal(r.supporting.length, 3);
    assert.ok(counter.calls <= 1 + 3, `${counter.calls} encode calls for a top-3 BM25 explain over ${corpus.size}`);
    corpus.token(7);
    assert.ok(counter.calls <= 5);
  });

  test('texts, single tokens, BM25 scores and results equal those of the fully tokenized corpus', async () => {
    const model = Model.open(d.finetuned);
    const dataset = loadDataset(d.finetuneData);
    const lazy = new Corpus('finetune', dataset, model);
    const eager = new Corpus('finetune', dataset, model);
    const all = eager.tokens;
    const bmLazy = lazy.bm25Index().scores(query.prompt + query.completion);
    for (let i = 0; i < lazy.size; i++) {
      assert.equal(lazy.text(i), all[i].text, `text of example ${i}`);
      assert.deepEqual(lazy.token(i), all[i], `tokens of example ${i}`);
    }
    assert.deepEqual(bmLazy, eager.bm25Index().scores(query.prompt + query.completion));
    const setup = { model: { model }, modules: 'all' as const };
    const strip = (r: ExplainResult) => ({ ...r, timings: {} });
    const req = { ...query, method: 'bm25' as const, topK: 5 };
    assert.deepEqual(strip(await explain(setup, lazy, req)), strip(await explain(setup, eager, req)));
    assert.equal(lazy.truncated, eager.truncated);
  });
});

describe('explain: ranks and percentiles', () => {
  test('equal their definitions over every score (1 + how many score higher; % of the others scoring lower)', async () => {
    const model = Model.open(d.finetuned);
    const corpus = new Corpus('finetune', loadDataset(d.finetuneData), model);
    const setup = { model: { model }, modules: 'all' as const };
    const q = { prompt: 'Q: What is the capital of France?\nA:', completion: ' Paris' };
    const all = await scoreCorpus(setup, corpus, { ...q, method: 'bm25' });
    const r = await explain(setup, corpus, { ...q, method: 'bm25', topK: 40 });
    assert.equal(r.supporting.length, 40);
    const n = all.length;
    let tied = 0;
    for (const e of r.supporting) {
      const higher = all.filter((s) => s > e.score).length;
      const lower = all.filter((s) => s < e.score).length;
      if (all.filter((s) => s === e.score).length > 1) tied++;
      assert.equal(e.rank, 1 + higher, `rank of line ${e.id.line}`);
      assert.equal(e.percentile, (100 * lower) / (n - 1), `percentile of line ${e.id.line}`);
    }
    assert.ok(tied > 0, 'some shown scores are tied (the tie rule is exercised)');
  });
});

describe('the server lanes see one dataset', () => {
  let service: WorkerService;
  before(async () => {
    service = await WorkerService.start(defaultServiceConfig());
  });
  after(() => service.close());

  test('getExample (light lane) and a gradient explain (heavy lane) agree on ids, texts and tokens', async () => {
    const r = await service.explain({ ...query, dataset: 'finetune', method: 'gdp', topK: 3 });
    assert.equal(r.supporting.length, 3);
    for (const e of r.supporting) {
      const ex = await service.getExample('finetune', e.id.line, e.id.hash);
      assert.deepEqual(ex.id, e.id);
      assert.equal(ex.text, e.text);
      assert.deepEqual(ex.tokens.offsets, e.tokenScores!.offsets);
    }
  });
});
