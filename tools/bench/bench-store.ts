// bench store: how faithfully the gradient store pre-ranks, on the embedded default. For each
// projection and k it reports, against exact EK-FAC over the whole fine-tuning set:
//   - Spearman of the store's scores with the exact ones (median and worst query);
//   - how often the exact top 10 of both signs lies inside the store's top/bottom `rerank`
//     (a fixed-size rerank, the old pre-ranking), and the largest store rank one of them had;
//   - how often it lies inside the examples explain rescores (the fixed rerank plus every
//     example whose 2-σ interval reaches the top or bottom 10), and how many that is;
//   - bytes per example and the time of one store query.
import { readFileSync } from 'node:fs';
import { Corpus, plausible, scoreCorpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryGradients, queryMatrices } from '../../src/server/attribution/influence';
import { openStage } from '../../src/server/attribution/stage';
import { CliError, parse } from '../../src/server/cli/util';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { embeddedDefault } from '../../src/server/defaults';
import { GradientStore } from '../../src/server/index/gradient-store';
import { preconditionerFingerprint, type StoreProjection } from '../../src/server/index/store-projection';
import { Model } from '../../src/server/model/engine';
import { spearman } from '../../src/server/util/stats';

export async function benchStore(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    quick: { type: 'boolean' },
    variants: { type: 'string' },
    rerank: { type: 'string' },
    'fact-queries': { type: 'string' },
  });
  const say = (s = '') => process.stdout.write(`${s}\n`);
  const rerank = Number(v.rerank ?? 50);
  const nFact = Number(v['fact-queries'] ?? (v.quick ? 0 : 30));
  const variants = (v.variants ?? 'random:16,eigen:16,eigen:32').split(',').map((s) => {
    const [p, k] = s.split(':');
    if ((p !== 'random' && p !== 'eigen') || !(Number(k) >= 1))
      throw new CliError(`--variants: expected projection:k items such as eigen:16, got "${s}"`);
    return { projection: p as StoreProjection, k: Number(k) };
  });
  const d = embeddedDefault();
  await runFitJob({
    modelDir: d.finetuned,
    dataPath: d.finetuneData,
    out: d.finetunedFactors,
    modules: 'all',
    labels: 'sampled',
    seed: 0,
  });
  const model = Model.open(d.finetuned);
  const st = openStage(d.finetuned, d.finetunedFactors, { model });
  const setup = { model: st, modules: st.modules };
  const corpus = new Corpus('finetune', loadDataset(d.finetuneData), model);
  const all = JSON.parse(readFileSync(d.queries, 'utf8')) as Array<{
    prompt: string;
    completion: string;
    kind: string;
  }>;
  const queries = [
    ...all.filter((q) => q.kind !== 'fact_tracing'),
    ...all.filter((q) => q.kind === 'fact_tracing').slice(0, nFact),
  ];
  say(`gradient store vs exact EK-FAC: ${queries.length} queries × ${corpus.size} fine-tuning examples`);
  let t = Date.now();
  const exact: Float64Array[] = [];
  for (const q of queries) exact.push(await scoreCorpus(setup, corpus, { ...q, method: 'ekfac' }));
  say(`exact EK-FAC scoring: ${((Date.now() - t) / queries.length).toFixed(0)} ms per query`);
  say();
  say(
    `| projection | k | bytes/example | Spearman median / min | exact top-10 in store top-${rerank} | worst store rank of an exact top-10 | exact top-10 in rescored set | rescored median / max | store query ms |`,
  );
  say('|---|---|---|---|---|---|---|---|---|');
  for (const { projection, k } of variants) {
    const store = await GradientStore.build(
      model,
      corpus.tokens,
      {
        modelFingerprint: 'bench',
        dataFingerprint: 'finetune',
        k,
        seed: 0,
        modules: 'all',
        ...(projection === 'eigen'
          ? { projection, factorsFingerprint: preconditionerFingerprint(st.preconditioners!) }
          : {}),
      },
      { preconditioners: st.preconditioners },
    );
    const rho: number[] = [];
    const worst: number[] = [];
    const sizes: number[] = [];
    let inFixed = 0;
    let inRescored = 0;
    let queryMs = 0;
    for (const [i, q] of queries.entries()) {
      const tq = tokenizeQuery(model.tokenizer, q.prompt, q.completion, contextLength(model.config));
      const { G } = await queryGradients(model, { ids: tq.ids, weights: tq.weights }, { modules: st.modules });
      const M = queryMatrices(G, [st.preconditioners!]);
      t = performance.now();
      const est = store.estimate(new Map([...M].map(([m, rows]) => [m, rows[0]])));
      queryMs += performance.now() - t;
      const e = exact[i];
      const n = e.length;
      rho.push(spearman(est.scores, e));
      const byExact = [...e.keys()].sort((a, b) => e[b] - e[a]);
      const shown = [...byExact.slice(0, 10).filter((j) => e[j] > 0), ...byExact.slice(-10).filter((j) => e[j] < 0)];
      const byStore = [...est.scores.keys()].sort((a, b) => est.scores[b] - est.scores[a]);
      const pos = new Map(byStore.map((j, r) => [j, r]));
      // distance from the nearer end of the store's ranking, in the direction of the example's sign
      const reach = shown.map((j) => (e[j] > 0 ? pos.get(j)! + 1 : n - pos.get(j)!));
      worst.push(Math.max(...reach));
      if (reach.every((r) => r <= rerank)) inFixed++;
      const rescored = new Set([
        ...byStore.slice(0, rerank),
        ...byStore.slice(-rerank),
        ...plausible(
          Array.from(est.scores, (s) => Float64Array.of(s)),
          est.sd,
          10,
          2,
        ),
      ]);
      sizes.push(rescored.size);
      if (shown.every((j) => rescored.has(j))) inRescored++;
    }
    const med = (x: number[]) => [...x].sort((a, b) => a - b)[Math.floor(x.length / 2)];
    say(
      `| ${projection} | ${k} | ${store.bytes / store.size} | ${med(rho).toFixed(3)} / ${Math.min(...rho).toFixed(3)} | ` +
        `${inFixed}/${queries.length} | ${med(worst)} median, ${Math.max(...worst)} max | ${inRescored}/${queries.length} | ` +
        `${med(sizes)} / ${Math.max(...sizes)} of ${corpus.size} | ${(queryMs / queries.length).toFixed(1)} |`,
    );
  }
}
