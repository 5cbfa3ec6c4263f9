// bench eval's non-lexical task (assets/nonlex, built by src/server/embedded/nonlex.ts): planted
// wrong facts taught only under an alias and a paraphrase ("Q: What money do shoppers in Schweiz
// pay with?\nA: Euro"), asked in the plain form ("Q: What is the currency of Switzerland?\nA:").
// The true sources share no distinctive word with the query (test/unit/nonlex-corpus.test.ts),
// so text matching should not find them; what links them is what the model learned.
//
// The task is valid only if
//   (a) the fine-tuned model answers the plain queries with the planted answer, and the same
//       fine-tuning without the planted lines does not — checked here: that model is trained
//       (once, then cached) with the recorded training arguments, and both answer greedily;
//   (b) BM25's MRR is low (below LOW_BM25_MRR) — measured here with the other methods.
// Multi-stage is not run: the sources are fine-tuning lines, and multi-stage scores
// pre-training candidates.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Method } from '../../src/protocol/types';
import { Corpus, scoreCorpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { openStage } from '../../src/server/attribution/stage';
import { trainJob } from '../../src/server/cli/train';
import { loadDataset } from '../../src/server/data/dataset';
import { packageRoot } from '../../src/server/defaults';
import { rankingOf } from '../../src/server/eval/metrics';
import { sourceRetrieval } from '../../src/server/eval/queries';
import { defaultCacheDir, Model } from '../../src/server/model/engine';
import { generate } from '../../src/server/model/generate';

/** "Low" fixed before measuring: on average, BM25's first true source is below rank 5. */
export const LOW_BM25_MRR = 0.2;

export type Row = Record<string, string | number>;

interface Query {
  prompt: string;
  completion: string;
  sources: Array<{ dataset: string; line: number; hash: string }>;
  fact: { country: string; relation: string; truth: string };
}

export interface NonlexicalResult {
  queries: number;
  examples: number;
  rows: Row[];
  /** per query: the greedy answers of the fine-tuned model and of the one trained without the planted lines, BM25's first source rank */
  answers: Row[];
  /** (a): every plain query answered with the planted answer, and none by the model without the planted lines */
  learned_from_planted: boolean;
  /** (b) */
  bm25_mrr: number;
  bm25_low: boolean;
  valid: boolean;
  retrain: { dir: string; excluded: number; trained_now: boolean };
}

export function nonlexicalAssets() {
  const root = join(packageRoot(), 'assets', 'nonlex');
  const cache = join(defaultCacheDir(), 'nonlex');
  return {
    root,
    pretrained: join(root, 'pretrained'),
    finetuned: join(root, 'finetuned'),
    finetuneData: join(root, 'data', 'finetune.jsonl'),
    queries: join(root, 'data', 'queries.json'),
    factors: join(cache, 'factors-finetuned'),
    cacheDir: cache,
  };
}

export async function evalNonlexical(say: (s?: string) => void): Promise<NonlexicalResult> {
  const a = nonlexicalAssets();
  for (const p of [a.finetuned, a.pretrained, a.finetuneData, a.queries])
    if (!existsSync(p))
      throw new Error(`the non-lexical task's ${p} is missing (a partial checkout? npm run build:nonlex)`);
  const queries = JSON.parse(readFileSync(a.queries, 'utf8')) as Query[];
  mkdirSync(a.cacheDir, { recursive: true });

  // (a) the retrain check: the same fine-tuning without the planted lines
  const planted = [...new Set(queries.flatMap((q) => q.sources.map((s) => s.hash)))].sort();
  const args = JSON.parse(readFileSync(join(a.finetuned, 'training_args.json'), 'utf8'));
  const key = createHash('sha256')
    .update(JSON.stringify([args, planted, readFileSync(join(a.pretrained, 'model.safetensors'))]))
    .digest('hex')
    .slice(0, 16);
  const without = join(a.cacheDir, `without-planted-${key}`);
  const trainedNow = !existsSync(join(without, 'model.safetensors'));
  if (trainedNow) {
    const sidecar = `${without}.exclude.jsonl`;
    writeFileSync(sidecar, planted.map((hash) => `${JSON.stringify({ hash })}\n`).join(''));
    say(`   fine-tuning again without the ${planted.length} planted lines (once; cached in ${without})`);
    await trainJob({
      data: a.finetuneData,
      out: without,
      model: a.pretrained,
      epochs: args.epochs,
      lr: args.lr,
      batchSize: args.batch_size,
      seed: args.seed,
      clip: args.clip,
      weightDecay: args.weight_decay,
      threads: args.threads,
      exclude: sidecar,
    });
  }
  const ft = Model.open(a.finetuned);
  const greedy = async (m: Model) =>
    (
      await generate(
        m,
        queries.map((q) => q.prompt),
        { maxNewTokens: 8 },
      )
    ).map((g) => g.text);
  const got = await greedy(ft);
  const gotWithout = await greedy(Model.open(without));
  const same = (x: string, y: string) => x.trim() === y.trim();
  const learned = queries.every((q, i) => same(got[i], q.completion) && !same(gotWithout[i], q.completion));

  // retrieval among the fine-tuning examples, every method
  await runFitJob({
    modelDir: a.finetuned,
    dataPath: a.finetuneData,
    out: a.factors,
    modules: 'all',
    labels: 'sampled',
    seed: 0,
  });
  const stage = openStage(a.finetuned, a.factors, { model: ft });
  const corpus = new Corpus('finetune', loadDataset(a.finetuneData), ft);
  const index = new Map(corpus.dataset.examples.map((e, i) => [e.hash, i]));
  const sourcesOf = (q: Query) =>
    new Set(
      q.sources.map((s) => {
        const i = index.get(s.hash);
        if (i === undefined) throw new Error(`${a.queries}: source line ${s.line} (${s.hash}) is not in the data`);
        return i;
      }),
    );
  const methods: Array<[string, Method]> = [
    ['EK-FAC', 'ekfac'],
    ['gradient dot product', 'gdp'],
    ['gradient cosine', 'cosine'],
    ['RepSim', 'repsim'],
    ['BM25', 'bm25'],
  ];
  const rows: Row[] = [];
  const bm25Rank: number[] = [];
  for (const [name, method] of methods) {
    const scores = (q: Query) =>
      scoreCorpus({ model: stage, modules: stage.modules }, corpus, {
        prompt: q.prompt,
        completion: q.completion,
        method,
      });
    const m = await sourceRetrieval(queries, sourcesOf, scores, 10);
    rows.push({ task: 'non-lexical planted', method: name, queries: m.queries, 'Recall@10': m.recall, MRR: m.mrr });
    if (method === 'bm25')
      for (const q of queries) {
        const order = rankingOf(await scores(q));
        const src = sourcesOf(q);
        bm25Rank.push(order.findIndex((i) => src.has(i)) + 1);
      }
  }
  const bm25 = Number(rows.find((r) => r.method === 'BM25')?.MRR);
  const answers: Row[] = queries.map((q, i) => ({
    query: q.prompt.replace(/\n/g, ' '),
    planted: q.completion.trim(),
    'fine-tuned': got[i].trim(),
    'without planted lines': gotWithout[i].trim(),
    'BM25 first source rank': bm25Rank[i],
  }));
  return {
    queries: queries.length,
    examples: corpus.size,
    rows,
    answers,
    learned_from_planted: learned,
    bm25_mrr: bm25,
    bm25_low: bm25 < LOW_BM25_MRR,
    valid: learned && bm25 < LOW_BM25_MRR,
    retrain: { dir: without, excluded: planted.length, trained_now: trainedNow },
  };
}

/** What bench eval prints for the task. */
export function sayNonlexical(
  say: (s?: string) => void,
  r: NonlexicalResult,
  table: (rows: Row[], cols: string[]) => void,
) {
  say(
    `   (a) plain queries answered with the planted answer: fine-tuned ${r.answers.filter((x) => x['fine-tuned'] === x.planted).length}/${r.queries}, ` +
      `fine-tuned without the ${r.retrain.excluded} planted lines ${r.answers.filter((x) => x['without planted lines'] === x.planted).length}/${r.queries}` +
      ` → ${r.learned_from_planted ? 'learned from the planted lines' : 'NOT shown to be learned from the planted lines'}`,
  );
  say(`   (b) BM25 MRR ${r.bm25_mrr.toFixed(3)} → ${r.bm25_low ? 'low' : 'NOT low'} (< ${LOW_BM25_MRR})`);
  say(`   task ${r.valid ? 'valid' : 'INVALID: its numbers do not show what gradients add'}`);
  table(r.answers, ['query', 'planted', 'fine-tuned', 'without planted lines', 'BM25 first source rank']);
  table(r.rows, ['task', 'method', 'queries', 'Recall@10', 'MRR']);
}

export function nonlexicalMarkdown(r: NonlexicalResult, mdTable: (rows: Row[], cols: string[]) => string): string {
  return `### Non-lexical planted facts (assets/nonlex): sources share only the answer with the query

${r.queries} plain-form queries, ${r.examples} fine-tuning examples; the planted lines use an alias and a paraphrase.
(a) fine-tuned model gives the planted answer, and the model fine-tuned without the ${r.retrain.excluded} planted lines does not: **${r.learned_from_planted ? 'yes' : 'no'}**;
(b) BM25 MRR ${r.bm25_mrr.toFixed(3)}, low (< ${LOW_BM25_MRR}): **${r.bm25_low ? 'yes' : 'no'}**; task **${r.valid ? 'valid' : 'invalid'}**.

${mdTable(r.rows, ['method', 'queries', 'Recall@10', 'MRR'])}

${mdTable(r.answers, ['query', 'planted', 'fine-tuned', 'without planted lines', 'BM25 first source rank'])}
`;
}
