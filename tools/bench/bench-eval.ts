// bench eval: does each method find the training data that caused a completion? On the
// embedded default (whose ground truth is known by construction) it measures
//   - retrieval of the planted wrong facts' and the backdoor's sources (Recall@10, MRR);
//   - fact tracing: held-out questions whose facts appear only in pre-training (multi-stage, docs/ARCHITECTURE.md),
//     multi-stage vs single-stage vs baselines, across damping values;
//   - correlation with the exact damped Gauss-Newton influence (CG, from test/oracle, when
//     its golden file exists) — the multi-stage comparison;
//   - the linear datamodeling score (LDS): retrain on random halves of the fine-tuning set with
//     our trainer, correlate each method's predicted group effect with the measured losses;
// and writes bench/results/<date>-<machine>.{json,md}.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, hostname } from 'node:os';
import { dirname, join } from 'node:path';
import type { Method } from '../../src/protocol/types';
import { fitCheckpoints, openCheckpointStages } from '../../src/server/attribution/checkpoints';
import type { Damping } from '../../src/server/attribution/ekfac/precondition';
import { Corpus, type ExplainSetup, scoreCorpus } from '../../src/server/attribution/explain';
import { modelFingerprint } from '../../src/server/attribution/fingerprint';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { type OpenedStage, openStage } from '../../src/server/attribution/stage';
import { trainJob } from '../../src/server/cli/train';
import { Progress, parse } from '../../src/server/cli/util';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { embeddedDefault, packageRoot } from '../../src/server/defaults';
import { lds, mean, rankingOf } from '../../src/server/eval/metrics';
import { sourceRetrieval } from '../../src/server/eval/queries';
import { GradientStore } from '../../src/server/index/gradient-store';
import { planCheckpoints } from '../../src/server/model/checkpoints';
import { Model, makeBatch } from '../../src/server/model/engine';
import { DEFAULTS } from '../../src/server/settings';
import { Rng } from '../../src/server/util/random';
import { pearson, spearman } from '../../src/server/util/stats';
import { evalNonlexical, type NonlexicalResult, nonlexicalMarkdown, sayNonlexical } from './eval-nonlexical';

interface Query {
  prompt: string;
  completion: string;
  kind: 'fact_tracing' | 'planted' | 'backdoor';
  sources: Array<{ dataset: string; line: number; hash: string }>;
}

export type Row = Record<string, string | number>;

export async function benchEval(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    quick: { type: 'boolean' },
    'lds-subsets': { type: 'string' },
    report: { type: 'string' },
  });
  const quick = v.quick === true;
  const t0 = Date.now();
  const say = (s = '') => process.stdout.write(`${s}\n`);
  const d = embeddedDefault();
  const queries = JSON.parse(readFileSync(d.queries, 'utf8')) as Query[];
  const eval0 = join(d.cacheDir, 'eval');
  mkdirSync(eval0, { recursive: true });

  // factors: both stages (all modules), and the fine-tuned model with MLP modules only
  const fits = [
    { model: d.finetuned, data: d.finetuneData, out: d.finetunedFactors, modules: 'all' as const },
    { model: d.pretrained, data: d.pretrainData, out: d.pretrainedFactors, modules: 'all' as const },
    { model: d.finetuned, data: d.finetuneData, out: join(eval0, 'factors-finetuned-mlp'), modules: 'mlp' as const },
  ];
  for (const f of fits)
    await runFitJob({
      modelDir: f.model,
      dataPath: f.data,
      out: f.out,
      modules: f.modules,
      labels: 'sampled',
      seed: 0,
      replaceStale: true, // the embedded default's cache (an older version's factors are refitted)
    });
  const ft = Model.open(d.finetuned);
  const pt = Model.open(d.pretrained);
  const stage = (model: Model, dir: string, damping?: Damping) =>
    openStage(model.checkpoint.dir, dir, { model, damping });
  const ftAll = stage(ft, d.finetunedFactors);
  const ftMlp = stage(ft, join(eval0, 'factors-finetuned-mlp'));
  const ptAll = stage(pt, d.pretrainedFactors);
  const finetune = new Corpus('finetune', loadDataset(d.finetuneData), ft);
  const pretrain = new Corpus('pretrain', loadDataset(d.pretrainData), ft);
  const store = await GradientStore.build(ft, finetune.tokens, {
    modelFingerprint: modelFingerprint(ft.checkpoint),
    dataFingerprint: 'finetune',
    k: 16,
    seed: 0,
    modules: 'all',
  });

  type Variant = { name: string; method: Method; setup: ExplainSetup; store?: boolean; factors?: string };
  const single = (s: OpenedStage): ExplainSetup => ({ model: s, modules: s.modules });
  const variants: Variant[] = [
    { name: 'EK-FAC', method: 'ekfac', setup: single(ftAll), factors: d.finetunedFactors },
    { name: 'EK-FAC (MLP only)', method: 'ekfac', setup: single(ftMlp), factors: join(eval0, 'factors-finetuned-mlp') },
    {
      name: 'gradient store (k=16) + no rerank',
      method: 'ekfac',
      setup: single(ftAll),
      store: true,
      factors: d.finetunedFactors,
    },
    { name: 'gradient dot product', method: 'gdp', setup: single(ftAll) },
    { name: 'gradient cosine', method: 'cosine', setup: single(ftAll) },
    { name: 'RepSim', method: 'repsim', setup: single(ftAll) },
    { name: 'BM25', method: 'bm25', setup: single(ftAll) },
  ];
  const scores = (vr: Variant, corpus: Corpus, q: Query) =>
    scoreCorpus(vr.setup, corpus, {
      prompt: q.prompt,
      completion: q.completion,
      method: vr.method,
      store: vr.store ? { model: ft, store } : undefined,
    });
  const indexOf = (corpus: Corpus) => new Map(corpus.dataset.examples.map((e, i) => [e.hash, i]));

  // 1. planted wrong facts and the backdoor: their sources among the fine-tuning examples
  say('1. retrieval of planted wrong facts and the backdoor (fine-tuning set, 313 examples)');
  const ftIndex = indexOf(finetune);
  const retrieval: Row[] = [];
  // the default computation: EK-FAC (and GDP) summed over the shipped training checkpoints
  const plan = planCheckpoints(d.finetuned, ft.checkpoint, DEFAULTS.checkpoints);
  if (plan)
    await fitCheckpoints(plan, {
      factorsDir: d.finetunedFactors,
      dataPath: d.finetuneData,
      modules: 'all',
      labels: 'sampled',
      seed: 0,
    });
  const overCheckpoints = plan
    ? openCheckpointStages(plan, { factorsDir: d.finetunedFactors, modules: ftAll.modules })
    : undefined;
  const summed: Variant[] = overCheckpoints
    ? [
        {
          name: `EK-FAC Σ ${plan!.checkpoints.length} checkpoints (default)`,
          method: 'ekfac',
          setup: { ...single(ftAll), checkpoints: overCheckpoints },
        },
        {
          name: `GDP Σ ${plan!.checkpoints.length} checkpoints (default)`,
          method: 'gdp',
          setup: { ...single(ftAll), checkpoints: overCheckpoints },
        },
      ]
    : [];
  for (const kind of ['planted', 'backdoor'] as const) {
    const qs = queries.filter((q) => q.kind === kind);
    for (const vr of [...summed, ...variants]) {
      const m = await sourceRetrieval(
        qs,
        (q) => sourcesIn(q, 'finetune', ftIndex),
        (q) => scores(vr, finetune, q),
        10,
      );
      retrieval.push({
        task: kind,
        method: vr.name,
        queries: m.queries,
        'Recall@10': m.recall,
        MRR: m.mrr,
        'in bottom 10%': m.bottom10,
      });
    }
  }
  table(say, retrieval, ['task', 'method', 'queries', 'Recall@10', 'MRR', 'in bottom 10%']);

  // 2. fact tracing into pre-training data, across damping
  const nTrace = quick ? 12 : 80;
  say();
  say(`2. fact tracing: ${nTrace} held-out questions, sources in the pre-training corpus (582 examples)`);
  const ptIndex = indexOf(pretrain);
  const tracing: Row[] = [];
  const traceQs = queries.filter((q) => q.kind === 'fact_tracing').slice(0, nTrace);
  const dampings: Array<[string, Damping]> = quick
    ? [['0.1×mean Λ', { relative: 0.1 }]]
    : [
        ['0.01×mean Λ', { relative: 0.01 }],
        ['0.1×mean Λ', { relative: 0.1 }],
        ['1×mean Λ', { relative: 1 }],
      ];
  const traceVariants: Array<Variant & { damping?: string }> = [];
  for (const [label, damping] of dampings) {
    const f = stage(ft, d.finetunedFactors, damping);
    const p = stage(pt, d.pretrainedFactors, damping);
    traceVariants.push({
      name: 'multi-stage EK-FAC',
      damping: label,
      method: 'multistage',
      setup: { model: f, pretrained: p, modules: 'all' },
    });
    traceVariants.push({ name: 'single-stage EK-FAC', damping: label, method: 'ekfac', setup: single(f) });
  }
  traceVariants.push({ name: 'gradient dot product (fine-tuned)', method: 'gdp', setup: single(ftAll) });
  traceVariants.push({ name: 'gradient dot product (pre-trained)', method: 'gdp', setup: single(ptAll) });
  traceVariants.push({ name: 'RepSim', method: 'repsim', setup: single(ftAll) });
  traceVariants.push({ name: 'BM25', method: 'bm25', setup: single(ftAll) });
  for (const vr of traceVariants) {
    const m = await sourceRetrieval(
      traceQs,
      (q) => sourcesIn(q, 'pretrain', ptIndex),
      (q) => scores(vr, pretrain, q),
      10,
    );
    tracing.push({ method: vr.name, damping: vr.damping ?? '—', 'Recall@10': m.recall, MRR: m.mrr });
  }
  table(say, tracing, ['method', 'damping', 'Recall@10', 'MRR']);

  // 2b. planted facts whose sources share no distinctive word with the query (assets/nonlex)
  say();
  say('2b. non-lexical planted facts (assets/nonlex): taught under an alias + paraphrase, asked in the plain form');
  const nonlexical = await evalNonlexical(say);
  sayNonlexical(say, nonlexical, (rows, cols) => table(say, rows, cols));

  // 3. ground truth: exact damped Gauss-Newton influence (CG), computed by test/oracle
  say();
  const truthFile = join(packageRoot(), 'test/fixtures/ground-truth/default-ggn.json');
  const truth: Row[] = [];
  let truthNote = '';
  if (!existsSync(truthFile)) {
    truthNote = `no ${truthFile} (make it with test/oracle/make_ggn_truth.py)`;
    say(`3. correlation with the exact Gauss-Newton influence: skipped, ${truthNote}`);
  } else {
    const gt = JSON.parse(readFileSync(truthFile, 'utf8')) as {
      queries: Array<{ prompt: string; completion: string }>;
      train: { lines: number[] };
      scores: Record<string, number[][]>;
      cg?: { residuals?: Record<string, number[]> };
    };
    const lineToIndex = new Map(finetune.dataset.examples.map((e, i) => [e.line, i]));
    const order = gt.train.lines.map((l) => {
      const i = lineToIndex.get(l);
      if (i === undefined) throw new Error(`${truthFile} names line ${l}, which the fine-tuning data does not have`);
      return i;
    });
    say(
      `3. correlation with the exact damped Gauss-Newton influence (CG; ${quick ? Math.min(4, gt.queries.length) : gt.queries.length} queries × ${order.length} examples)`,
    );
    // each ground truth solves (G/N + m·λ₀) x = ∇L_q with λ₀ = 0.1·tr(G/N)/P, the GGN analogue of
    // EK-FAC's heuristic 0.1·mean Λ: EK-FAC is compared at the same multiple, 0.1·m·mean Λ
    // methods without factors do not depend on the damping: score them once for every label
    const undamped = new Map<string, Float64Array | number[]>();
    for (const [label, rows] of Object.entries(gt.scores)) {
      const m = label === 'lambda' ? 1 : Number(/^lambda_x([\d.e+-]+)$/.exec(label)?.[1]);
      if (!Number.isFinite(m)) throw new Error(`${truthFile}: unknown damping label "${label}"`);
      const damping: Damping = { relative: 0.1 * m };
      const res = gt.cg?.residuals?.[label];
      for (const vr of variants) {
        const v2 = vr.factors ? { ...vr, setup: single(stage(ft, vr.factors, damping)) } : vr;
        const sp: number[] = [];
        const pe: number[] = [];
        const top: number[] = [];
        for (const [qi, q] of gt.queries.slice(0, quick ? 4 : undefined).entries()) {
          const key = `${vr.name}\u0000${qi}`;
          let s = vr.factors ? undefined : undamped.get(key);
          if (!s) {
            s = await scores(v2, finetune, { ...q, kind: 'planted', sources: [] });
            if (!vr.factors) undamped.set(key, s);
          }
          const ours = order.map((i) => s[i]);
          sp.push(spearman(ours, rows[qi]));
          pe.push(pearson(ours, rows[qi]));
          // what a person looks at: the 10 most supporting examples
          const truthTop = new Set(rankingOf(rows[qi]).slice(0, 10));
          top.push(
            rankingOf(ours)
              .slice(0, 10)
              .filter((i) => truthTop.has(i)).length / 10,
          );
        }
        truth.push({
          method: vr.name,
          'GGN damping': `${m}×λ₀`,
          'CG residual (max)': res ? Math.max(...res).toExponential(1) : '—',
          Spearman: mean(sp),
          Pearson: mean(pe),
          'top-10 overlap': mean(top),
        });
      }
    }
    table(say, truth, ['method', 'GGN damping', 'CG residual (max)', 'Spearman', 'Pearson', 'top-10 overlap']);
  }

  // 4. LDS: retrain on random halves of the fine-tuning set
  const M = Number(v['lds-subsets'] ?? (quick ? 4 : 30));
  say();
  say(`4. linear datamodeling score: ${M} random halves of the fine-tuning set, fine-tuned from the pre-trained model`);
  const ldsQs = queries
    .filter((q) => q.kind !== 'fact_tracing')
    .concat(queries.filter((q) => q.kind === 'fact_tracing').slice(0, 6));
  const args = JSON.parse(readFileSync(join(d.finetuned, 'training_args.json'), 'utf8'));
  const epochs = quick ? 3 : args.epochs;
  const rng = new Rng(1234);
  const n = finetune.size;
  const subsets: number[][] = [];
  const losses: number[][] = []; // [subset][query]
  const bar = new Progress('   retraining', M);
  for (let j = 0; j < M; j++) {
    const keep = rng
      .shuffle([...Array(n).keys()])
      .slice(0, Math.floor(n / 2))
      .sort((a, b) => a - b);
    subsets.push(keep);
    const kept = new Set(keep);
    const dropped = finetune.dataset.examples.filter((_, i) => !kept.has(i)).map((e) => e.hash);
    const key = createHash('sha256')
      .update(JSON.stringify([args, epochs, dropped]))
      .digest('hex')
      .slice(0, 16);
    const dir = join(eval0, 'lds', key);
    if (!existsSync(join(dir, 'model.safetensors'))) {
      const sidecar = `${dir}.exclude.jsonl`;
      mkdirSync(join(eval0, 'lds'), { recursive: true });
      writeFileSync(sidecar, dropped.map((h) => JSON.stringify({ hash: h })).join('\n') + '\n');
      await trainJob({
        data: d.finetuneData,
        out: dir,
        model: d.pretrained,
        epochs,
        lr: args.lr,
        batchSize: args.batch_size,
        seed: args.seed,
        clip: args.clip,
        weightDecay: args.weight_decay,
        threads: args.threads,
        exclude: sidecar,
      });
    }
    losses.push(await queryLosses(Model.open(dir), ldsQs));
    bar.tick(j + 1);
  }
  bar.done();
  const ldsRows: Row[] = [];
  for (const vr of variants) {
    const per: number[] = [];
    for (const [qi, q] of ldsQs.entries()) {
      const s = await scores(vr, finetune, q);
      per.push(
        lds(
          s,
          subsets,
          losses.map((l) => l[qi]),
        ),
      );
    }
    ldsRows.push({ method: vr.name, LDS: mean(per) });
  }
  table(say, ldsRows, ['method', 'LDS']);

  const report = {
    suite: 'eval',
    quick,
    date: new Date().toISOString(),
    host: hostname(),
    cpus: cpus().length,
    node: process.version,
    seconds: (Date.now() - t0) / 1000,
    retrieval,
    fact_tracing: tracing,
    nonlexical,
    ground_truth: truth.length ? truth : truthNote,
    lds: { subsets: M, epochs, queries: ldsQs.length, rows: ldsRows },
  };
  const base = v.report
    ? v.report.replace(/\.json$/, '')
    : join('bench/results', `${report.date.slice(0, 10)}-${hostname()}-eval${quick ? '-quick' : ''}`);
  mkdirSync(dirname(base), { recursive: true });
  writeFileSync(`${base}.json`, `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(`${base}.md`, evalMarkdown(report));
  say();
  say(`done in ${report.seconds.toFixed(0)} s; report: ${base}.json, ${base}.md`);
}

/** A query's sources in one dataset, as indices; a source missing from the data is an error, not a miss. */
function sourcesIn(q: Query, dataset: string, index: Map<string, number>): Set<number> {
  const out = new Set<number>();
  for (const x of q.sources.filter((s) => s.dataset === dataset)) {
    const i = index.get(x.hash);
    if (i === undefined) throw new Error(`queries.json: source ${dataset}:${x.line} (${x.hash}) is not in the data`);
    out.add(i);
  }
  return out;
}

async function queryLosses(model: Model, qs: Query[]): Promise<number[]> {
  const graph = await model.compile({ tokenLoss: true });
  const seqs = qs.map((q) => {
    const t = tokenizeQuery(model.tokenizer, q.prompt, q.completion, contextLength(model.config));
    return { ids: t.ids, weights: t.weights };
  });
  const r = await graph.run(makeBatch(seqs, model.tokenizer.padTokenId ?? 0));
  return Array.from(r.loss.data as Float32Array);
}

export function fmt(x: string | number): string {
  return typeof x === 'number' ? (Number.isInteger(x) ? String(x) : x.toFixed(3)) : x;
}

function table(say: (s: string) => void, rows: Row[], cols: string[]) {
  const w = cols.map((c) => Math.max(c.length, ...rows.map((r) => fmt(r[c]).length)));
  say(`   ${cols.map((c, i) => c.padEnd(w[i])).join('  ')}`);
  for (const r of rows) say(`   ${cols.map((c, i) => fmt(r[c]).padEnd(w[i])).join('  ')}`);
}

export function mdTable(rows: Row[], cols: string[]): string {
  return [
    `| ${cols.join(' | ')} |`,
    `|${cols.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${cols.map((c) => fmt(r[c])).join(' | ')} |`),
  ].join('\n');
}

/** The evaluation's sections in markdown (also used by `bench`'s combined report). */
export function evalMarkdown(r: {
  date: string;
  host: string;
  cpus: number;
  node: string;
  seconds: number;
  quick: boolean;
  retrieval: Row[];
  fact_tracing: Row[];
  nonlexical?: NonlexicalResult;
  ground_truth: Row[] | string;
  lds: { subsets: number; epochs: number; queries: number; rows: Row[] };
}): string {
  const truth = r.ground_truth;
  return `## Accuracy (\`bench eval${r.quick ? ' --quick' : ''}\`, ${r.seconds.toFixed(0)} s)

Model and data: the embedded default (assets/default); the true sources are known by construction.

### Planted wrong facts and backdoor: their sources in the fine-tuning set
${mdTable(r.retrieval, ['task', 'method', 'queries', 'Recall@10', 'MRR'])}

### Fact tracing into pre-training data
${mdTable(r.fact_tracing, ['method', 'damping', 'Recall@10', 'MRR'])}

${r.nonlexical ? nonlexicalMarkdown(r.nonlexical, mdTable) : '### Non-lexical planted facts\nnot in this report (made before the task existed)\n'}

### Correlation with the exact damped Gauss-Newton influence (CG, test/oracle/make_ggn_truth.py)
${typeof truth === 'string' ? `skipped: ${truth}` : mdTable(truth, ['method', 'GGN damping', 'CG residual (max)', 'Spearman', 'Pearson', 'top-10 overlap'])}

### Linear datamodeling score (${r.lds.subsets} random halves, ${r.lds.epochs} epochs, ${r.lds.queries} queries)
${mdTable(r.lds.rows, ['method', 'LDS'])}
`;
}
