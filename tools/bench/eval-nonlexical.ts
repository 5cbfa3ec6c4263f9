// bench eval's non-lexical task (assets/nonlex, built by src/server/embedded/nonlex.ts): planted
// wrong facts taught only under an alias and a paraphrase ("Q: What money do shoppers in Schweiz
// pay with?\nA: Euro"), asked in the plain form ("Q: What is the currency of Switzerland?\nA:").
// The true sources share no distinctive word with the query (test/unit/nonlex-corpus.test.ts),
// so text matching should not find them; what links them is what the model learned.
//
// A query's planted lines are its proven sources only if
//   (a) the fine-tuned model answers it with the planted answer, and the same fine-tuning
//       without the planted lines does not — checked here: that model is trained (once, then
//       cached) with the recorded training arguments, and both answer greedily.
// The task's Recall@10 / MRR are over the queries that pass (a) ("verified"; the numbers over
// all queries are reported beside them), and the task is valid if at least half the queries
// pass (a) and (b) BM25's MRR on the verified queries is low (below LOW_BM25_MRR).
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
  /** (a) holds for every query: each answered with the planted answer, and none by the model without the planted lines */
  learned_from_planted: boolean;
  /** how many queries pass (a): the ones the task's Recall@10 / MRR are over */
  verified: number;
  /** (b) */
  bm25_mrr: number;
  bm25_low: boolean;
  valid: boolean;
  retrain: { dir: string; excluded: number; trained_now: boolean };
}

export function nonlexicalAssets(root = join(packageRoot(), 'assets', 'nonlex')) {
  const cache = join(defaultCacheDir(), 'nonlex');
  return {
    root,
    pretrained: join(root, 'pretrained'),
    finetuned: join(root, 'finetuned'),
    finetuneData: join(root, 'data', 'finetune.jsonl'),
    queries: join(root, 'data', 'queries.json'),
    cacheDir: cache,
  };
}

export async function evalNonlexical(say: (s?: string) => void, root?: string): Promise<NonlexicalResult> {
  const a = nonlexicalAssets(root);
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
  const proven = queries.map((q, i) => same(got[i], q.completion) && !same(gotWithout[i], q.completion));
  const verified = queries.filter((_, i) => proven[i]);

  // retrieval among the fine-tuning examples, every method (factors keyed by the model and data:
  // a fit refuses to overwrite another model's factors)
  const factors = join(
    a.cacheDir,
    `factors-finetuned-${createHash('sha256')
      .update(readFileSync(join(a.finetuned, 'model.safetensors')))
      .update(readFileSync(a.finetuneData))
      .digest('hex')
      .slice(0, 16)}`,
  );
  await runFitJob({
    modelDir: a.finetuned,
    dataPath: a.finetuneData,
    out: factors,
    modules: 'all',
    labels: 'sampled',
    seed: 0,
  });
  const stage = openStage(a.finetuned, factors, { model: ft });
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
    for (const [set, qs] of [
      ['verified', verified],
      ['all', queries],
    ] as const) {
      const m = await sourceRetrieval(qs, sourcesOf, scores, 10);
      rows.push({
        task: 'non-lexical planted',
        queries: set,
        method: name,
        n: m.queries,
        'Recall@10': m.recall,
        MRR: m.mrr,
      });
    }
    if (method === 'bm25')
      for (const q of queries) {
        const order = rankingOf(await scores(q));
        const src = sourcesOf(q);
        bm25Rank.push(order.findIndex((i) => src.has(i)) + 1);
      }
  }
  const bm25 = Number(rows.find((r) => r.method === 'BM25' && r.queries === 'verified')?.MRR);
  const answers: Row[] = queries.map((q, i) => ({
    query: q.prompt.replace(/\n/g, ' '),
    planted: q.completion.trim(),
    'fine-tuned': got[i].trim(),
    'without planted lines': gotWithout[i].trim(),
    '(a)': proven[i] ? 'yes' : 'no',
    'BM25 first source rank': bm25Rank[i],
  }));
  return {
    queries: queries.length,
    examples: corpus.size,
    rows,
    answers,
    learned_from_planted: verified.length === queries.length,
    verified: verified.length,
    bm25_mrr: bm25,
    bm25_low: bm25 < LOW_BM25_MRR,
    valid: verified.length >= queries.length / 2 && bm25 < LOW_BM25_MRR,
    retrain: { dir: without, excluded: planted.length, trained_now: trainedNow },
  };
}

const ANSWER_COLS = ['query', 'planted', 'fine-tuned', 'without planted lines', '(a)', 'BM25 first source rank'];

/** What bench eval prints for the task. */
export function sayNonlexical(
  say: (s?: string) => void,
  r: NonlexicalResult,
  table: (rows: Row[], cols: string[]) => void,
) {
  say(
    `   (a) the planted answer to the plain query from the fine-tuned model and not from the one fine-tuned without ` +
      `the ${r.retrain.excluded} planted lines: ${r.verified}/${r.queries} queries (the "verified" ones)`,
  );
  say(
    `   (b) BM25 MRR on the verified queries ${r.bm25_mrr.toFixed(3)}: ${r.bm25_low ? 'low' : 'NOT low'} (< ${LOW_BM25_MRR})`,
  );
  say(
    `   task ${r.valid ? 'valid' : 'INVALID (needs (a) for at least half the queries and (b)): its numbers do not show what gradients add'}`,
  );
  table(r.answers, ANSWER_COLS);
  table(r.rows, ['queries', 'method', 'n', 'Recall@10', 'MRR']);
}

export function nonlexicalMarkdown(r: NonlexicalResult, mdTable: (rows: Row[], cols: string[]) => string): string {
  return `### Non-lexical planted facts (assets/nonlex): the sources share only the answer with the query

${r.queries} plain-form queries over ${r.examples} fine-tuning examples; the planted lines name the country only by an
alias (ISO code, native name) in a paraphrase. (a) the fine-tuned model gives the planted answer and the model
fine-tuned without the ${r.retrain.excluded} planted lines does not: **${r.verified}/${r.queries}** queries (verified);
(b) BM25 MRR on them ${r.bm25_mrr.toFixed(3)}, low (< ${LOW_BM25_MRR}): **${r.bm25_low ? 'yes' : 'no'}**; task **${r.valid ? 'valid' : 'invalid'}**.

${mdTable(r.rows, ['queries', 'method', 'n', 'Recall@10', 'MRR'])}

${mdTable(r.answers, ANSWER_COLS)}
`;
}
