// Developer experiment (issue 16 §3, "multi-stage in the regime it assumes"): run with
//   nice -n 10 node --import tsx tools/experiments/multistage-regime.ts [--fine-tunes shipped,near,mid] [--queries 80]
// Multi-stage influence assumes the fine-tuned weights stay close to the pre-trained ones. For the
// embedded pair and for fine-tunes of the same pre-trained model with a smaller learning rate, it
// measures each tracked linear module's relative distance ‖W_ft − W_pt‖_F / ‖W_pt‖_F (the product's
// function), the fine-tune's accuracy on its own questions and on the held-out facts (the embedded
// default's evaluation), and fact tracing into pre-training data — the held-out questions' sources
// are pre-training lines — by multi-stage EK-FAC, single-stage EK-FAC, gradient dot product and
// BM25, across damping. Prints a markdown report (bench/results/2026-12-02-vm-multistage.md).
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Damping } from '../../src/server/attribution/ekfac/precondition';
import { Corpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import {
  denseGradients,
  queryBatchGradients,
  queryMatrices,
  scoreCandidates,
} from '../../src/server/attribution/influence';
import { multiStageRegime, relativeWeightDistance } from '../../src/server/attribution/multistage-regime';
import { openStage } from '../../src/server/attribution/stage';
import { trainJob } from '../../src/server/cli/train';
import { parse } from '../../src/server/cli/util';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { embeddedDefault } from '../../src/server/defaults';
import { evaluateCorpusModel } from '../../src/server/embedded/evaluate';
import { mean, rankingOf, recallAtK, reciprocalRank } from '../../src/server/eval/metrics';
import type { Floats } from '../../src/server/linalg/matrix';
import { Model, makeBatch } from '../../src/server/model/engine';

const { values: v } = parse(process.argv.slice(2), {
  'fine-tunes': { type: 'string' },
  queries: { type: 'string' },
  // only the distances, accuracies, losses and chance levels (minutes less)
  'skip-tracing': { type: 'boolean' },
  // pre-train a new model for this many epochs (the shipped recipe otherwise) instead of using
  // assets/default/pretrained; "shipped" then means the shipped fine-tuning recipe from it
  'pretrain-epochs': { type: 'string' },
});
const d = embeddedDefault();
const root = '.cache/experiments/multistage';
// the shipped fine-tune (assets/default/README.md: 12 epochs, lr 5e-4, batch 8) and the same
// recipe with a smaller learning rate; lr 2e-5 was tried too and answers only 53% of its questions
const FINE_TUNES: Record<string, { lr: number; epochs: number } | 'shipped'> = {
  shipped: 'shipped',
  mid: { lr: 1e-4, epochs: 12 },
  near: { lr: 5e-5, epochs: 12 },
};
const names = (v['fine-tunes'] ?? 'shipped,near').split(',');
const DAMPINGS: Array<[string, Damping]> = [
  ['0.001×', { relative: 0.001 }],
  ['0.01×', { relative: 0.01 }],
  ['0.1×', { relative: 0.1 }],
  ['1×', { relative: 1 }],
];
const say = (s = '') => process.stdout.write(`${s}\n`);
const t0 = Date.now();
const secs = () => `${((Date.now() - t0) / 1000).toFixed(0)} s`;

interface Query {
  prompt: string;
  completion: string;
  kind: string;
  sources: Array<{ dataset: string; line: number; hash: string }>;
}
const queries = (JSON.parse(readFileSync(d.queries, 'utf8')) as Query[])
  .filter((q) => q.kind === 'fact_tracing')
  .slice(0, Number(v.queries ?? 80));

const ptEpochs = v['pretrain-epochs'] === undefined ? undefined : Number(v['pretrain-epochs']);
const tag = ptEpochs === undefined ? '' : `-pt${ptEpochs}`;
const ptDir = ptEpochs === undefined ? d.pretrained : join(root, `pt-e${ptEpochs}`);
const ptFactors = ptEpochs === undefined ? d.pretrainedFactors : join(root, `factors-pt-e${ptEpochs}`);
if (ptEpochs !== undefined && !existsSync(join(ptDir, 'model.safetensors')))
  // assets/default/README.md: the shipped pre-training recipe, 60 epochs
  await trainJob({
    data: d.pretrainData,
    out: ptDir,
    init: { tokenizer: join(d.root, 'data', 'tokenizer'), d: 128, layers: 2, heads: 4, ffn: 512, context: 128 },
    epochs: ptEpochs,
    lr: 2e-3,
    batchSize: 16,
    seed: 0,
    clip: 1,
    weightDecay: 0.01,
    threads: 2,
  });
await runFitJob({
  modelDir: ptDir,
  dataPath: d.pretrainData,
  out: ptFactors,
  modules: 'all',
  labels: 'sampled',
  seed: 0,
});
const pt = Model.open(ptDir);
const pretrain = new Corpus('pretrain', loadDataset(d.pretrainData), pt);
const byHash = new Map(pretrain.dataset.examples.map((e, i) => [e.hash, i]));
const relevant = queries.map(
  (q) => new Set(q.sources.flatMap((s) => (byHash.has(s.hash) ? [byHash.get(s.hash)!] : []))),
);
const bm25 = queries.map((q) => pretrain.bm25Index().scores(q.prompt + q.completion));

type Row = { fineTune: string; method: string; damping: string; recall: number; mrr: number };
const rows: Row[] = [];
const losses: string[] = [];
const regimes: string[] = [];
const accuracy: string[] = [];
const metrics = (scores: ArrayLike<number>[]) => {
  const r = scores.map((s) => rankingOf(s));
  return {
    recall: mean(r.map((x, i) => recallAtK(x, relevant[i], 10))),
    mrr: mean(r.map((x, i) => reciprocalRank(x, relevant[i]))),
  };
};

/** Mean summed −log p per line, and per scored token, of pre-training lines under `model`. */
async function meanLoss(model: Model, lines: number[]): Promise<string> {
  const graph = await model.compile({ tokenLoss: true });
  let sum = 0;
  let tokens = 0;
  for (let i = 0; i < lines.length; i += 32) {
    const seqs = lines
      .slice(i, i + 32)
      .map((k) => ({ ids: pretrain.tokens[k].ids, weights: pretrain.tokens[k].weights }));
    const r = await graph.run(makeBatch(seqs, model.tokenizer.padTokenId ?? 0));
    for (const x of r.loss.data as Float32Array) sum += x;
    for (const q of seqs) for (const w of q.weights) tokens += w;
  }
  return `${(sum / lines.length).toFixed(3)} (${(sum / tokens).toFixed(3)} per token)`;
}
const sourceLines = [...new Set(relevant.flatMap((r) => [...r]))];
const allLines = pretrain.tokens.map((_, i) => i);
// chance: E[1/rank of the first source] and E[Recall@10] under a uniformly random ranking
const chance = relevant.map((rel) => {
  const N = pretrain.size;
  const k = rel.size;
  let rr = 0;
  let p = 1; // P(none of the first r−1 is a source)
  for (let r = 1; r <= N - k + 1; r++) {
    const first = (p * k) / (N - r + 1);
    rr += first / r;
    p *= (N - r + 1 - k) / (N - r + 1);
  }
  return { rr, recall: Math.min(10, N) / N };
});
losses.push(`| pre-trained | ${await meanLoss(pt, sourceLines)} | ${await meanLoss(pt, allLines)} |`);

for (const name of names) {
  const spec = FINE_TUNES[name];
  if (!spec) throw new Error(`unknown fine-tune ${name} (${Object.keys(FINE_TUNES).join(', ')})`);
  const recipe = spec === 'shipped' ? { lr: 5e-4, epochs: 12 } : spec;
  const own = spec !== 'shipped' || ptEpochs !== undefined;
  const dir = own ? join(root, `ft-${name}${tag}`) : d.finetuned;
  if (own && !existsSync(join(dir, 'model.safetensors')))
    await trainJob({
      data: d.finetuneData,
      out: dir,
      model: ptDir,
      epochs: recipe.epochs,
      lr: recipe.lr,
      batchSize: 8,
      seed: 0,
      clip: 1,
      weightDecay: 0.01,
      threads: 2,
    });
  const factors = own ? join(root, `factors-${name}${tag}`) : d.finetunedFactors;
  await runFitJob({
    modelDir: dir,
    dataPath: d.finetuneData,
    out: factors,
    modules: 'all',
    labels: 'sampled',
    seed: 0,
  });
  const ft = Model.open(dir);
  const ev = await evaluateCorpusModel(ft, join(d.root, 'data'));
  accuracy.push(
    `| ${name} | lr ${recipe.lr}, ${recipe.epochs} epochs | ${ev.finetune.correct}/${ev.finetune.total} | ${ev.heldOut.correct}/${ev.heldOut.total} |`,
  );
  const dist = relativeWeightDistance(ft, pt, 'all');
  const reg = multiStageRegime(dist);
  regimes.push(
    `| ${name} | ${reg.distance.median.toFixed(3)} | ${reg.distance.max.toFixed(3)} | ${[...dist.values()].map((x) => x.toFixed(3)).join(' ')} |`,
  );
  say(`${name}: trained, fitted, evaluated (${secs()}); distance median ${reg.distance.median.toFixed(3)}`);

  // how well each model fits the pre-training lines: a candidate's gradient carries the fact only
  // while the model still has loss to lose on it
  losses.push(`| ${name} | ${await meanLoss(ft, sourceLines)} | ${await meanLoss(ft, allLines)} |`);
  if (v['skip-tracing']) continue;
  // all queries' gradients on the fine-tuned model, one row each
  const toks = queries.map((q) => tokenizeQuery(ft.tokenizer, q.prompt, q.completion, contextLength(ft.config)));
  const tokens = await queryBatchGradients(
    ft,
    toks.map((t) => ({ ids: t.ids, weights: t.weights })),
    { modules: 'all' },
  );
  const G = denseGradients(tokens);
  const pass = async (model: Model, M: Map<string, Floats[]>) => {
    const r = await scoreCandidates(model, M, pretrain.tokens, { modules: 'all' });
    return queries.map((_, qi) => Float64Array.from(r.scores, (row) => row[qi]));
  };
  for (const [label, damping] of DAMPINGS) {
    const ftStage = openStage(dir, factors, { model: ft, damping });
    const ptStage = openStage(ptDir, ptFactors, { model: pt, damping });
    const ms = await pass(pt, queryMatrices(tokens, [ftStage.preconditioners!, ptStage.preconditioners!]));
    rows.push({ fineTune: name, method: 'multi-stage EK-FAC', damping: label, ...metrics(ms) });
    const ss = await pass(ft, queryMatrices(tokens, [ftStage.preconditioners!]));
    rows.push({ fineTune: name, method: 'single-stage EK-FAC', damping: label, ...metrics(ss) });
    const [a, b] = rows.slice(-2);
    say(`  damping ${label}: MRR multi-stage ${a.mrr.toFixed(3)}, single-stage ${b.mrr.toFixed(3)} (${secs()})`);
  }
  rows.push({
    fineTune: name,
    method: 'gradient dot product (fine-tuned)',
    damping: '—',
    ...metrics(await pass(ft, G)),
  });
  rows.push({
    fineTune: name,
    method: 'gradient dot product (pre-trained)',
    damping: '—',
    ...metrics(await pass(pt, G)),
  });
  rows.push({ fineTune: name, method: 'BM25', damping: '—', ...metrics(bm25) });
  say(`  baselines scored (${secs()})`);
}

say();
say(`pre-trained model: ${ptDir}`);
say();
say('## Fine-tunes');
say();
say('| fine-tune | recipe | fine-tuning questions answered | held-out facts answered |');
say('|---|---|---|---|');
for (const a of accuracy) say(a);
say();
say('## Relative distance ‖W_ft − W_pt‖_F / ‖W_pt‖_F of the tracked linear modules');
say();
say(
  `modules in order: ${pt
    .modules('all')
    .map((m) => m.name.replace('model.layers.', 'L').replace('self_attn.', '').replace('mlp.', ''))
    .join(' ')}`,
);
say();
say('| fine-tune | median | max | per module |');
say('|---|---|---|---|');
for (const r of regimes) say(r);
say();
say('## Loss on the pre-training lines (mean summed −log p per line, and per scored token)');
say();
say(`| model | the ${sourceLines.length} source lines of the queries | all ${pretrain.size} lines |`);
say('|---|---|---|');
for (const l of losses) say(l);
say();
say(
  `Chance (uniformly random ranking): MRR ${mean(chance.map((c) => c.rr)).toFixed(3)}, Recall@10 ${mean(chance.map((c) => c.recall)).toFixed(3)}`,
);
say();
say(`## Fact tracing: ${queries.length} held-out questions, sources among the ${pretrain.size} pre-training lines`);
say();
say('| fine-tune | method | damping (× mean Λ) | Recall@10 | MRR |');
say('|---|---|---|---|---|');
for (const r of rows)
  say(`| ${r.fineTune} | ${r.method} | ${r.damping} | ${r.recall.toFixed(3)} | ${r.mrr.toFixed(3)} |`);
say();
say(`total ${secs()}`);
