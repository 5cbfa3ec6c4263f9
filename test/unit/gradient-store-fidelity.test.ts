// The gradient store may only pre-rank: on the embedded default, explaining through the store
// (default k and rerank) must show exactly the examples (and scores) the exact EK-FAC ranking
// shows, for the planted and backdoor queries, whose true sources are memorised examples the
// store resolves worst.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { Corpus, type ExplainSetup, explain } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { type OpenedStage, openStage } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { embeddedDefault } from '../../src/server/defaults';
import { GradientStore } from '../../src/server/index/gradient-store';
import { preconditionerFingerprint } from '../../src/server/index/store-projection';
import { Model } from '../../src/server/model/engine';
import { DEFAULTS } from '../../src/server/settings';
import { useTempHome } from './helpers/env';

const home = useTempHome();

describe('gradient store on the embedded default', () => {
  const d = embeddedDefault();
  let st: OpenedStage;
  let corpus: Corpus;
  let store: GradientStore;
  before(async () => {
    const model = Model.open(d.finetuned);
    const factors = join(home, 'factors');
    await runFitJob({
      modelDir: d.finetuned,
      model,
      dataPath: d.finetuneData,
      out: factors,
      modules: 'all',
      labels: 'sampled',
      seed: 0,
    });
    st = openStage(d.finetuned, factors, { model });
    corpus = new Corpus('finetune', loadDataset(d.finetuneData), model);
    store = await GradientStore.build(
      model,
      corpus.tokens,
      {
        modelFingerprint: 'm',
        dataFingerprint: 'd',
        k: DEFAULTS.store.k,
        seed: 0,
        modules: 'all',
        projection: 'eigen',
        factorsFingerprint: preconditionerFingerprint(st.preconditioners!),
      },
      { preconditioners: st.preconditioners },
    );
  });

  test('explaining through the store shows the exact top 10 of both signs', async () => {
    const setup: ExplainSetup = { model: st, modules: st.modules };
    const queries = (
      JSON.parse(readFileSync(d.queries, 'utf8')) as Array<{ prompt: string; completion: string; kind: string }>
    ).filter((q) => q.kind === 'planted' || q.kind === 'backdoor');
    assert.equal(queries.length, 6);
    const lines = (r: ExplainResult) => [r.supporting.map((e) => e.id.line), r.opposing.map((e) => e.id.line)];
    for (const q of queries) {
      const req = { prompt: q.prompt, completion: q.completion, method: 'ekfac' as const, topK: 10 };
      const exact = await explain(setup, corpus, req);
      const viaStore = await explain(setup, corpus, {
        ...req,
        store: { model: st.model, store },
        rerank: DEFAULTS.store.rerank,
      });
      assert.deepEqual(lines(viaStore), lines(exact), `${q.prompt} → ${q.completion}`);
    }
  });
});
