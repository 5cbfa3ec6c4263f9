// Developer experiment (why `bench corpus` finds no planted/backdoor sources in ekfac's top 10):
//   N=10000 node --import tsx tools/experiments/corpus-sources.ts   (CKPT=1: also the exact sum over checkpoints)
// On bench-corpus's generated file (corpusLines(N, 0)) and the embedded default's planted and
// backdoor queries, ranks each query's true sources under
//   bench   the server's path as the bench runs it (InfluenceService.explain: gradient store + exact rerank),
//   store   the store's estimate alone (before the rerank),
//   exact   exact EK-FAC on the final model over every example (no store),
//   ckpt    (CKPT=1) exact EK-FAC summed over the fine-tune's checkpoints (the product's default, checkpoints 'auto'),
//   bm25    BM25 of the rendered query,
// and the store's rank of exact EK-FAC's top 10. Writes the numbers to .cache/experiments/corpus-sources/.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fitCheckpoints, openCheckpointStages } from '../../src/server/attribution/checkpoints';
import { Corpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryGradients, scoreCandidates } from '../../src/server/attribution/influence';
import { SCORERS } from '../../src/server/attribution/methods';
import type { Stage } from '../../src/server/attribution/setup';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { embeddedDefault } from '../../src/server/defaults';
import type { Floats } from '../../src/server/linalg/matrix';
import { planCheckpoints } from '../../src/server/model/checkpoints';
import { parseConfig } from '../../src/server/service/config';
import { InfluenceService } from '../../src/server/service/influence-service';
import { corpusLines } from '../bench/bench-corpus';

type Query = { prompt: string; completion: string; kind: string; sources: Array<{ line: number; hash: string }> };
const n = Number(process.env.N ?? 10_000);
const d = embeddedDefault();
const work = resolve('.cache/experiments/corpus-sources');
mkdirSync(work, { recursive: true });
const data = join(work, `corpus-${n}.jsonl`);
if (!existsSync(data)) writeFileSync(data, `${corpusLines(n, 0).join('\n')}\n`);
const queries = (JSON.parse(readFileSync(d.queries, 'utf8')) as Query[]).filter((q) => q.kind !== 'fact_tracing');
const log = (s: string) => console.log(`[${new Date().toISOString().slice(11, 19)}] ${s}`);

// the factors, as the bench fits them
const fitArgs = { dataPath: d.finetuneData, modules: 'all' as const, labels: 'sampled' as const, seed: 0 };
await runFitJob({ modelDir: d.finetuned, out: d.finetunedFactors, ...fitArgs });

// the server as the bench configures it (checkpoints off: the final model's store)
const { service: cfg } = parseConfig(
  {
    models: { model: d.finetuned, factors: d.finetunedFactors, fitDataset: 'finetune', checkpoints: 'off' },
    datasets: { finetune: d.finetuneData, corpus: data },
    modules: 'all',
    damping: 'heuristic',
    cacheDir: join(work, 'cache'),
    store: {},
  },
  { baseDir: work },
);
const svc = new InfluenceService(cfg);
svc.open();
const bench: string[][] = [];
const rescored: number[] = [];
for (const q of queries) {
  const r = await svc.explain(
    { prompt: q.prompt, completion: q.completion, dataset: 'corpus', method: 'ekfac', topK: 10 },
    {
      progress: (m) => {
        const x = /exact recompute of (\d+)/.exec(m);
        if (x) rescored.push(Number(x[1]));
      },
    },
  );
  bench.push(r.supporting.map((e) => e.id.hash));
  log(`bench path: ${q.completion} done`);
}
const ft = svc.openedStages().finetuned;
const corpus = new Corpus('corpus', loadDataset(data), ft.model);
const store = (await svc.index('corpus')).stores[0].store;
if (store.size !== corpus.size) throw new Error(`store holds ${store.size} examples, corpus ${corpus.size}`);

/** Each query's row-0 EK-FAC matrix on `stage`. */
async function matrices(stage: Stage): Promise<Array<Map<string, Floats>>> {
  const out: Array<Map<string, Floats>> = [];
  for (const q of queries) {
    const t = tokenizeQuery(stage.model.tokenizer, q.prompt, q.completion, contextLength(stage.model.config));
    const qg = await queryGradients(stage.model, { ids: t.ids, weights: t.weights }, { modules: ft.modules });
    const scorer = SCORERS.ekfac;
    if (scorer.kind !== 'gradient') throw new Error('ekfac is a gradient scorer');
    const { M } = scorer.query({ model: stage, modules: ft.modules }, qg);
    out.push(new Map([...M].map(([m, rows]) => [m, rows[0]])));
  }
  return out;
}
/** Exact scores of every example for every query, in one pass over the corpus: [query][example]. */
async function exactAll(stage: Stage, Ms: Array<Map<string, Floats>>): Promise<Float64Array[]> {
  const all = new Map([...Ms[0].keys()].map((m) => [m, Ms.map((x) => x.get(m)!)]));
  let last = 0;
  const res = await scoreCandidates(stage.model, all, corpus.tokens, {
    modules: ft.modules,
    onProgress: (done, total) => {
      if (done - last >= 1000 || done === total) {
        last = done;
        log(`  exact ${done}/${total}`);
      }
    },
  });
  return Ms.map((_, j) => Float64Array.from(res.scores, (s) => s[j]));
}

const Ms = await matrices(ft);
const approx: Float64Array[] = [];
for (const M of Ms) approx.push((await store.estimate(M)).scores);
const bm25 = queries.map((q) =>
  corpus
    .bm25Index()
    .scores(tokenizeQuery(ft.model.tokenizer, q.prompt, q.completion, contextLength(ft.model.config)).text),
);
log('exact EK-FAC, final model');
const exact = await exactAll(ft, Ms);
let ckpt: Float64Array[] | undefined;
if (process.env.CKPT === '1') {
  const plan = planCheckpoints(d.finetuned, ft.model.checkpoint, 'auto')!;
  await fitCheckpoints(plan, { ...fitArgs, factorsDir: d.finetunedFactors });
  const over = openCheckpointStages(plan, {
    factorsDir: d.finetunedFactors,
    damping: cfg.damping,
    modules: ft.modules,
  });
  ckpt = queries.map(() => new Float64Array(corpus.size));
  for (const c of over.stages) {
    log(`exact EK-FAC @ ${c.name} (weight ${c.weight.toFixed(3)})`);
    const s = await exactAll(c.stage, await matrices(c.stage));
    s.forEach((x, j) => {
      for (let i = 0; i < x.length; i++) ckpt![j][i] += c.weight * x[i];
    });
  }
}

/** 1-based rank of each example, highest score first. */
const ranks = (s: Float64Array) => {
  const order = Array.from(s.keys()).sort((a, b) => s[b] - s[a] || a - b);
  const r = new Int32Array(s.length);
  order.forEach((i, k) => {
    r[i] = k + 1;
  });
  return { r, order };
};
const byHash = new Map(corpus.dataset.examples.map((e) => [e.hash, e.index]));
const original = new Set(loadDataset(d.finetuneData).examples.map((e) => e.hash));
const out: unknown[] = [];
for (const [j, q] of queries.entries()) {
  const ex = ranks(exact[j]);
  const st = ranks(approx[j]);
  const bm = ranks(bm25[j]);
  const ck = ckpt && ranks(ckpt[j]);
  const srcs = q.sources.map((s) => {
    const i = byHash.get(s.hash);
    if (i === undefined) throw new Error(`source ${s.hash} (finetune line ${s.line}) is not in the corpus`);
    const b = bench[j].indexOf(s.hash);
    return {
      line: corpus.dataset.examples[i].line,
      exact: ex.r[i],
      exactScore: exact[j][i],
      store: st.r[i],
      bench: b < 0 ? null : b + 1,
      ckpt: ck?.r[i],
      bm25: bm.r[i],
    };
  });
  const top = ex.order.slice(0, 10).map((i) => ({
    line: corpus.dataset.examples[i].line,
    score: exact[j][i],
    store: st.r[i],
    fineTuneLine: original.has(corpus.dataset.examples[i].hash),
    text: corpus.text(i).slice(-90),
  }));
  const benchTop = bench[j].map((h) => ex.r[byHash.get(h)!]);
  out.push({ query: `${q.prompt.split('\n').at(-2)} →${q.completion}`, kind: q.kind, srcs, top, benchTop });
  console.log(`\n${q.kind}: ${JSON.stringify(q.prompt.slice(-50))} →${q.completion}`);
  for (const s of srcs)
    console.log(
      `  source line ${s.line}: exact ${s.exact} (score ${s.exactScore.toExponential(2)}), store ${s.store}, bench ${s.bench ?? '-'}, ${ck ? `ckpt ${s.ckpt}, ` : ''}bm25 ${s.bm25}`,
    );
  console.log(
    `  exact top 10: store ranks ${top.map((t) => t.store).join(' ')}; from the fine-tuning file: ${top.filter((t) => t.fineTuneLine).length}`,
  );
  console.log(`  bench top 10: exact ranks ${benchTop.join(' ')}`);
  for (const t of top.slice(0, 3))
    console.log(`    ${t.score.toExponential(2)} line ${t.line}: ${JSON.stringify(t.text)}`);
}
console.log(`\nrescored per explain: ${rescored.join(' ')}`);
writeFileSync(join(work, `ranks-${n}${ckpt ? '-ckpt' : ''}.json`), `${JSON.stringify(out, null, 1)}\n`);
