// Developer experiment (issue "true sources labelled opposing"): which of the embedded fine-tune's
// training checkpoints does the default (checkpoint-summed) influence need? Run with
//   nice -n 10 node --import tsx tools/experiments/checkpoint-subsets.ts
// Retrains the embedded fine-tune exactly as shipped with --save-steps 80 (as
// sources-over-checkpoints.ts does), checks the final weights are the shipped ones byte for byte,
// fits factors for the final model and every checkpoint through the product's fit
// (attribution/checkpoints.ts), scores the planted and backdoor queries with the product's
// explain path on each checkpoint alone, and reports every subset's lr-weighted sum (the product's
// weights: checkpointWeights) next to final-model EK-FAC and GDP; the all-checkpoint sum is also
// computed through explain's own checkpoint mechanism and must equal the offline sum.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fitCheckpoints, openCheckpointStages } from '../../src/server/attribution/checkpoints';
import { Corpus, type ExplainSetup, scoreCorpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { openStage } from '../../src/server/attribution/stage';
import { trainJob } from '../../src/server/cli/train';
import { loadDataset } from '../../src/server/data/dataset';
import { embeddedDefault } from '../../src/server/defaults';
import { checkpointWeights, planCheckpoints } from '../../src/server/model/checkpoints';
import { Model } from '../../src/server/model/engine';
import { EMBEDDED_FINETUNE } from './embedded-recipe';

type Query = { prompt: string; completion: string; kind: string; sources: Array<{ line: number }> };
const d = embeddedDefault();
const out = '.cache/experiments/retrain/with-checkpoints';
const t0 = Date.now();
const secs = () => `${((Date.now() - t0) / 1000).toFixed(0)} s`;
if (!existsSync(join(out, 'model.safetensors')))
  await trainJob({
    data: d.finetuneData,
    out,
    model: d.pretrained,
    ...EMBEDDED_FINETUNE,
    saveSteps: 80,
  });
const sha = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');
const same = sha(join(out, 'model.safetensors')) === sha(join(d.finetuned, 'model.safetensors'));
console.log(`trained (${secs()}); final weights identical to assets/default/finetuned: ${same}`);

const fit = { dataPath: d.finetuneData, modules: 'all' as const, labels: 'sampled' as const, seed: 0 };
const factors = join(out, 'factors');
const finalModel = Model.open(out);
await runFitJob({ ...fit, modelDir: out, model: finalModel, out: factors });
const plan = planCheckpoints(out, finalModel.checkpoint, 'auto')!;
await fitCheckpoints(plan, { ...fit, factorsDir: factors });
console.log(`factors fitted (${secs()}); checkpoints ${plan.checkpoints.map((c) => c.name).join(' ')}`);

const damping = { relative: 0.1 };
const final = openStage(out, factors, { damping, model: finalModel });
const opened = openCheckpointStages(plan, { factorsDir: factors, damping, modules: final.modules });
const corpus = new Corpus('finetune', loadDataset(d.finetuneData), finalModel);
const queries = (JSON.parse(readFileSync(d.queries, 'utf8')) as Query[]).filter((q) => q.kind !== 'fact_tracing');
const score = async (setup: ExplainSetup, method: 'ekfac' | 'gdp') => {
  const r: Float64Array[] = [];
  for (const q of queries)
    r.push(await scoreCorpus(setup, corpus, { prompt: q.prompt, completion: q.completion, method }));
  return r;
};
const finalE = await score({ model: final, modules: final.modules }, 'ekfac');
const finalG = await score({ model: final, modules: final.modules }, 'gdp');
// each checkpoint alone, through explain's checkpoint mechanism with one stage of weight 1
const perE: Float64Array[][] = [];
const perG: Float64Array[][] = [];
for (const s of opened.stages) {
  const one = { ...opened, stages: [{ ...s, weight: 1 }] };
  perE.push(await score({ model: final, modules: final.modules, checkpoints: one }, 'ekfac'));
  perG.push(await score({ model: final, modules: final.modules, checkpoints: one }, 'gdp'));
}
const allE = await score({ model: final, modules: final.modules, checkpoints: opened }, 'ekfac');
console.log(`scored (${secs()})`);

const rankOf = (s: Float64Array, i: number) => 1 + [...s].filter((x) => x > s[i]).length;
const report = (name: string, s: Float64Array[]) => {
  let bottom = 0;
  const rec: Record<string, number[]> = { planted: [], backdoor: [] };
  const ranks: string[] = [];
  for (const [qi, q] of queries.entries()) {
    const r = q.sources.map((x) => rankOf(s[qi], x.line - 1));
    ranks.push(`${q.kind[0]}:${r.join(',')}`);
    bottom += r.filter((x) => x > 0.9 * s[qi].length).length;
    rec[q.kind].push(r.filter((x) => x <= 10).length / Math.min(10, r.length));
  }
  const mean = (a: number[]) => (a.reduce((x, y) => x + y, 0) / a.length).toFixed(3);
  console.log(`| ${name} | ${ranks.join(' ')} | ${bottom} | ${mean(rec.planted)} | ${mean(rec.backdoor)} |`);
};
const sumOf = (per: Float64Array[][], idx: number[]) => {
  const w = checkpointWeights(idx.map((i) => plan.checkpoints[i])).weights;
  return queries.map((_, qi) => {
    const o = new Float64Array(corpus.size);
    idx.forEach((c, k) => {
      for (let j = 0; j < o.length; j++) o[j] += w[k] * per[c][qi][j];
    });
    return o;
  });
};
const all = plan.checkpoints.map((_, i) => i);
const off = sumOf(perE, all);
let worst = 0;
for (const [qi, s] of allE.entries())
  for (let j = 0; j < s.length; j++)
    worst = Math.max(worst, Math.abs(s[j] - off[qi][j]) / (Math.abs(off[qi][j]) + 1e-30));
console.log(
  `explain's own sum vs the offline sum of single-checkpoint scores: max relative difference ${worst.toExponential(2)}`,
);
console.log('| method | source ranks | in bottom 10% | planted R@10 | backdoor R@10 |\n|---|---|---|---|---|');
report('EK-FAC final', finalE);
report('GDP final', finalG);
report(`EK-FAC Σ all ${all.length} checkpoints (explain)`, allE);
report(`GDP Σ all ${all.length} checkpoints`, sumOf(perG, all));
const n = all.length;
const subsets: number[][] = [];
for (let mask = 1; mask < 1 << n; mask++) {
  const idx = all.filter((i) => mask & (1 << i));
  if (idx.length < n) subsets.push(idx);
}
for (const idx of subsets.sort((a, b) => a.length - b.length))
  report(`EK-FAC Σ ${idx.map((i) => plan.checkpoints[i].step).join('+')}`, sumOf(perE, idx));
