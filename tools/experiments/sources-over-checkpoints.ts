// Developer experiment (issue "true sources labelled opposing"): run with
// `node --import tsx tools/experiments/sources-over-checkpoints.ts` (EKFAC=1 also fits factors per checkpoint).
// Retrains the embedded fine-tune with --save-steps 80, then ranks the planted/backdoor sources by
// GDP and EK-FAC on the final model and summed over the checkpoints (TracIn, Pruthi et al. 2020).
// TracIn-style influence over the fine-tune's checkpoints vs final-model EK-FAC / GDP: ranks of the true sources
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Corpus, scoreCorpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { openStage } from '../../src/server/attribution/stage';
import { trainJob } from '../../src/server/cli/train';
import { loadDataset } from '../../src/server/data/dataset';
import { embeddedDefault } from '../../src/server/defaults';
import { Model } from '../../src/server/model/engine';
import { EMBEDDED_FINETUNE } from './embedded-recipe';

type Query = { prompt: string; completion: string; kind: string; sources: Array<{ line: number; hash: string }> };
const d = embeddedDefault();
const out = '.cache/experiments/retrain/with-checkpoints';
const t = Date.now();
if (!existsSync(join(out, 'model.safetensors')))
  await trainJob({
    data: d.finetuneData,
    out,
    model: d.pretrained,
    ...EMBEDDED_FINETUNE,
    saveSteps: 80,
  });
console.log(`train ${((Date.now() - t) / 1000).toFixed(0)} s`);
const queries = (JSON.parse(readFileSync(d.queries, 'utf8')) as Query[]).filter((q) => q.kind !== 'fact_tracing');
const ckpts = readdirSync(out)
  .filter((n) => n.startsWith('checkpoint-'))
  .sort((a, b) => Number(a.split('-')[1]) - Number(b.split('-')[1]));
const dirs = [...ckpts.map((c) => join(out, c)), out];
const lrs = dirs.map((p) => {
  const a = JSON.parse(readFileSync(join(p, 'training_args.json'), 'utf8'));
  return a.learning_rate ?? 0;
});
console.log('checkpoints', dirs.join(' '), 'lr', lrs.join(' '));
const withFactors = process.env.EKFAC === '1';
const per: Float64Array[][] = []; // [ckpt][query]
const perE: Float64Array[][] = [];
for (const dir of dirs) {
  const m = Model.open(dir);
  const corpus = new Corpus('finetune', loadDataset(d.finetuneData), m);
  const st = openStage(dir, undefined, { model: m });
  const row: Float64Array[] = [];
  for (const q of queries)
    row.push(
      await scoreCorpus({ model: st, modules: 'all' }, corpus, {
        prompt: q.prompt,
        completion: q.completion,
        method: 'gdp',
      }),
    );
  per.push(row);
  if (withFactors) {
    const f = join(dir, 'factors');
    await runFitJob({
      modelDir: dir,
      model: m,
      dataPath: d.finetuneData,
      out: f,
      modules: 'all',
      labels: 'sampled',
      seed: 0,
    });
    const se = openStage(dir, f, { model: m });
    const rowE: Float64Array[] = [];
    for (const q of queries)
      rowE.push(
        await scoreCorpus({ model: se, modules: 'all' }, corpus, {
          prompt: q.prompt,
          completion: q.completion,
          method: 'ekfac',
        }),
      );
    perE.push(rowE);
  }
  console.log('scored', dir, `${((Date.now() - t) / 1000).toFixed(0)} s`);
}
const rankOf = (s: Float64Array, i: number) => 1 + [...s].filter((x) => x > s[i]).length;
const report = (name: string, score: (qi: number) => Float64Array) => {
  const ranks: string[] = [];
  let bottom = 0,
    rec = 0,
    nrel = 0;
  for (const [qi, q] of queries.entries()) {
    const s = score(qi);
    const r = q.sources.map((x: { line: number }) => rankOf(s, x.line - 1));
    ranks.push(`${q.kind[0]}:${r.join(',')}`);
    bottom += r.filter((x: number) => x > 0.9 * s.length).length;
    rec += r.filter((x: number) => x <= 10).length / Math.min(10, r.length) / 1;
    nrel++;
  }
  console.log(
    `${name}: ranks ${ranks.join(' ')} | in bottom 10%: ${bottom} | mean recall@10 ${(rec / nrel).toFixed(3)}`,
  );
};
const sum = (arr: Float64Array[][], w: number[]) => (qi: number) => {
  const o = new Float64Array(arr[0][qi].length);
  for (const [c, row] of arr.entries()) for (const [j, v] of row[qi].entries()) o[j] += w[c] * v;
  return o;
};
report('GDP final', (qi) => per[per.length - 1][qi]);
report('TracIn-GDP (lr-weighted, checkpoints)', sum(per.slice(0, -1), lrs.slice(0, -1)));
report(
  'TracIn-GDP (uniform, all incl final)',
  sum(
    per,
    dirs.map(() => 1),
  ),
);
for (const [c, dir] of dirs.entries()) report(`GDP @ ${dir.split('/').pop()}`, (qi) => per[c][qi]);
if (withFactors) {
  report('EK-FAC final', (qi) => perE[perE.length - 1][qi]);
  report('TracIn-EK-FAC (lr-weighted, checkpoints)', sum(perE.slice(0, -1), lrs.slice(0, -1)));
  for (const [c, dir] of dirs.entries()) report(`EK-FAC @ ${dir.split('/').pop()}`, (qi) => perE[c][qi]);
}
