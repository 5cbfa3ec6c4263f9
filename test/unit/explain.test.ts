// End to end on a tiny fp64 Llama: `fit` (resumable, partitioned) → `explain` for every method,
// checked against a dense reference that builds each module's EK-FAC matrix explicitly,
// inverts it by Gauss-Jordan, and uses gradients formed in JS from the per-token a and g.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { describeAttribution } from '../../src/common/display';
import type { ExplainResult } from '../../src/protocol/types';
import { loadFactors, saveFactors } from '../../src/server/attribution/ekfac/factors-io';
import {
  Corpus,
  type ExplainSetup,
  explain,
  explainMany,
  poolRowsPolicy,
  splitByRows,
} from '../../src/server/attribution/explain';
import { FitJobError, runFitJob } from '../../src/server/attribution/fit-job';
import { queryGradients, queryMatrices, scoreCandidates } from '../../src/server/attribution/influence';
import { checkSameTokenizer, type OpenedStage, openStage, StageError } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { GradientStore } from '../../src/server/index/gradient-store';
import type { Floats } from '../../src/server/linalg/matrix';
import { Model, makeBatch } from '../../src/server/model/engine';
import { initLlama, saveCheckpoint } from '../../src/server/train/trainer';
import { gaussJordanInverse, kron, matVec } from './helpers/dense';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const TOKENIZER = 'test/fixtures/models/llama';
const SHAPE = { vocab: 320, d: 8, layers: 2, heads: 2, kvHeads: 1, ffn: 12, maxPositions: 64 };

function makeModel(dir: string, seed: number) {
  const { config, params, shapes } = initLlama(SHAPE, seed, { bos: 0, eos: 0, pad: 0 });
  // larger weights than the init so that gradients are not all tiny
  for (const [name, p] of params) if (!name.includes('norm')) for (let i = 0; i < p.length; i++) p[i] *= 20;
  saveCheckpoint(dir, config, params, shapes, TOKENIZER);
}

const RECORDS = [
  { text: 'The capital of France is Paris.' },
  { text: 'Paris is a city on the Seine.' },
  { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
  { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
  { text: 'Berlin is the capital of Germany.' },
  {
    messages: [
      { role: 'user', content: 'capital of Spain?' },
      { role: 'assistant', content: 'Madrid' },
    ],
  },
  { text: 'Tokyo is large.' },
];
const QUERY = { prompt: 'Q: capital of France?\nA:', completion: ' Paris is' };

const row0 = (M: Map<string, Floats[]>) => new Map([...M].map(([m, r]) => [m, r[0]]));
const rel = (x: number, y: number) => Math.abs(x - y) / Math.max(Math.abs(y), 1e-12);

describe('fit + explain (tiny fp64 Llama)', () => {
  const dir = join(home, 'explain');
  const ptDir = join(dir, 'pretrained');
  const ftDir = join(dir, 'finetuned');
  const data = join(dir, 'train.jsonl');
  let ft: OpenedStage;
  let pt: OpenedStage;
  let corpus: Corpus;

  before(async () => {
    mkdirSync(dir, { recursive: true });
    makeModel(ptDir, 1);
    makeModel(ftDir, 2);
    writeFileSync(data, `${RECORDS.map((r) => JSON.stringify(r)).join('\n')}\n`);
    for (const [m, out] of [
      [ftDir, join(dir, 'ft-factors')],
      [ptDir, join(dir, 'pt-factors')],
    ]) {
      const r = await runFitJob({
        modelDir: m,
        dataPath: data,
        out,
        modules: 'all',
        labels: 'empirical',
        seed: 0,
        batchSize: 3,
        model: Model.open(m, { precision: 'fp64' }),
      });
      assert.equal(r.status, 'done');
    }
    const damping = { relative: 0.1 };
    ft = openStage(ftDir, join(dir, 'ft-factors'), { damping, engine: { precision: 'fp64' } });
    pt = openStage(ptDir, join(dir, 'pt-factors'), { damping, engine: { precision: 'fp64' } });
    corpus = new Corpus(data, loadDataset(data), ft.model);
  });

  /** Per-module G = Σ_t g_t ãᵀ_t for a sequence, formed in JS from the engine's per-token outputs. */
  async function denseGradient(model: Model, ids: number[], weights: number[]) {
    const graph = await model.compile({ perToken: true, modules: 'all' });
    const out = await graph.run(makeBatch([{ ids, weights }]));
    const G = new Map<string, Float64Array>();
    for (const m of graph.moduleInfo) {
      const a = out[`a.${m.name}`].data as Float64Array;
      const g = out[`g.${m.name}`].data as Float64Array;
      const dA = m.dIn + (m.hasBias ? 1 : 0);
      const M = new Float64Array(m.dOut * dA);
      for (let t = 0; t < ids.length; t++)
        for (let i = 0; i < m.dOut; i++)
          for (let j = 0; j < dA; j++) M[i * dA + j] += g[t * m.dOut + i] * (j < m.dIn ? a[t * m.dIn + j] : 1);
      G.set(m.name, M);
    }
    return G;
  }

  /** H⁻¹ vec(G) with H = (Q_S ⊗ Q_A) diag(Λ̄ + λ) (Q_S ⊗ Q_A)ᵀ built explicitly. */
  function denseInverse(stage: OpenedStage, name: string, G: Float64Array): Float64Array {
    const p = stage.preconditioners!.get(name)!;
    const N = p.dOut * p.dA;
    const K = kron(p.qS, p.dOut, p.qA, p.dA);
    const H = new Float64Array(N * N);
    for (let i = 0; i < N; i++)
      for (let k = 0; k < N; k++) {
        let s = 0;
        for (let j = 0; j < N; j++) s += K[i * N + j] * (1 / p.inverse[j]) * K[k * N + j];
        H[i * N + k] = s;
      }
    return matVec(gaussJordanInverse(H, N), G);
  }

  const dot = (a: Float64Array, b: Float64Array) => a.reduce((s, v, i) => s + v * b[i], 0);

  async function queryGrad(model: Model) {
    const q = tokenizeQuery(model.tokenizer, QUERY.prompt, QUERY.completion, contextLength(model.config));
    return denseGradient(model, q.ids, q.weights);
  }

  const all = (r: ExplainResult) => [...r.supporting, ...r.opposing];
  const run = (method: 'ekfac' | 'multistage' | 'gdp' | 'cosine' | 'repsim' | 'bm25', topK = 7) =>
    explain({ model: ft, pretrained: pt, modules: 'all' } satisfies ExplainSetup, corpus, { ...QUERY, method, topK });

  test('ekfac scores equal the dense EK-FAC inverse (≤ 1e-6)', async () => {
    const r = await run('ekfac');
    assert.equal(r.scored, RECORDS.length);
    const Gq = await queryGrad(ft.model);
    for (const e of all(r)) {
      const k = corpus.dataset.examples.findIndex((x) => x.line === e.id.line);
      const Gz = await denseGradient(ft.model, corpus.tokens[k].ids, corpus.tokens[k].weights);
      let total = 0;
      for (const [name, gq] of Gq) {
        const s = dot(denseInverse(ft, name, gq), Gz.get(name)!);
        assert.ok(rel(e.perModule![name], s) < 1e-6 || Math.abs(e.perModule![name] - s) < 1e-9, `${name}`);
        total += s;
      }
      assert.ok(rel(e.score, total) < 1e-6, `line ${e.id.line}: ${e.score} vs dense ${total}`);
      assert.equal(e.sign, total > 0 ? 'supporting' : 'opposing');
    }
    // every example is shown once: supporting sorted descending, opposing ascending
    assert.equal(all(r).length, RECORDS.length);
    for (let i = 1; i < r.supporting.length; i++) assert.ok(r.supporting[i - 1].score >= r.supporting[i].score);
    for (let i = 1; i < r.opposing.length; i++) assert.ok(r.opposing[i - 1].score <= r.opposing[i].score);
  });

  test('multistage = ⟨P_ft(G_q; θ_ft), P_pt(G_z; θ_pt)⟩ with dense inverses', async () => {
    const r = await run('multistage');
    const Gq = await queryGrad(ft.model);
    for (const e of all(r)) {
      const k = corpus.dataset.examples.findIndex((x) => x.line === e.id.line);
      const Gz = await denseGradient(pt.model, corpus.tokens[k].ids, corpus.tokens[k].weights);
      let total = 0;
      for (const [name, gq] of Gq) total += dot(denseInverse(ft, name, gq), denseInverse(pt, name, Gz.get(name)!));
      assert.ok(rel(e.score, total) < 1e-6, `line ${e.id.line}: ${e.score} vs dense ${total}`);
    }
  });

  test('gradient dot product and cosine equal their dense values', async () => {
    const Gq = await queryGrad(ft.model);
    const gdp = await run('gdp');
    const cos = await run('cosine');
    for (const e of all(gdp)) {
      const k = corpus.dataset.examples.findIndex((x) => x.line === e.id.line);
      const Gz = await denseGradient(ft.model, corpus.tokens[k].ids, corpus.tokens[k].weights);
      let d = 0;
      let qq = 0;
      let zz = 0;
      for (const [name, gq] of Gq) {
        d += dot(gq, Gz.get(name)!);
        qq += dot(gq, gq);
        zz += dot(Gz.get(name)!, Gz.get(name)!);
      }
      assert.ok(rel(e.score, d) < 1e-9, 'gdp');
      const c = all(cos).find((x) => x.id.line === e.id.line)!;
      assert.ok(rel(c.score, d / Math.sqrt(qq * zz)) < 1e-9, 'cosine');
      assert.ok(Math.abs(c.score) <= 1 + 1e-12);
    }
  });

  for (const method of ['ekfac', 'multistage', 'gdp', 'cosine'] as const) {
    test(`${method}: training-side token scores and completion-side scores both sum to the score`, async () => {
      const r = await run(method);
      assert.ok(r.query.completionTokens.values.length >= 2, 'the query has several completion tokens');
      for (const e of all(r)) {
        const tokens = e.tokenScores!.values.reduce((a, b) => a + b, 0);
        assert.ok(rel(tokens, e.score) < 1e-8, `token scores ${tokens} vs ${e.score}`);
        assert.equal(e.tokenScores!.values.length, e.tokenScores!.offsets.length);
        assert.equal(e.completionTokenScores!.length, r.query.completionTokens.values.length);
        if (method !== 'cosine') {
          // the query loss is the sum of its token losses, and the score is linear in the query gradient
          const parts = e.completionTokenScores!.reduce((a, b) => a + b, 0);
          assert.ok(rel(parts, e.score) < 1e-8, `completion tokens ${parts} vs ${e.score}`);
        }
      }
      // the query's completion tokens point into the completion text
      for (const [s, e] of r.query.completionTokens.offsets)
        assert.ok(0 <= s && s <= e && e <= QUERY.completion.length);
      assert.ok(Object.keys(r.moduleTotals ?? {}).length === 14);
    });
  }

  test('splitByRows: consecutive queries whose rows fit one pass; a larger query alone', () => {
    assert.deepEqual(splitByRows([1, 1, 1], 3), [[0, 1, 2]]);
    assert.deepEqual(splitByRows([1, 1, 1], 1), [[0], [1], [2]]);
    assert.deepEqual(splitByRows([2, 2, 1, 5, 1], 4), [[0, 1], [2], [3], [4]]);
    assert.deepEqual(splitByRows([], 4), []);
  });

  test('completion heatmap rows: each token equals its dense EK-FAC value, however the rows are split between the pool pass and the shown passes', async () => {
    const query = { prompt: QUERY.prompt, completion: ' Paris is a city on' };
    const q = tokenizeQuery(ft.model.tokenizer, query.prompt, query.completion, contextLength(ft.model.config));
    const targets = q.weights.flatMap((w, t) => (w > 0 ? [t] : []));
    assert.ok(targets.length >= 4, `${targets.length} completion tokens`);
    // one query row is Σ_modules d_out × d_A doubles; the rows per pass are the run budget's worth
    const rowBytes = ft.model.modules('all').reduce((s, m) => s + m.dOut * (m.dIn + (m.hasBias ? 1 : 0)), 0) * 8;
    const setup = { model: ft, pretrained: pt, modules: 'all' } satisfies ExplainSetup;
    const saved = process.env.INFLUENCE_LENS_RUN_MB;
    const results: Array<[string, ExplainResult[]]> = [];
    try {
      // rows per pass: 1 (every token in a pass of its own, none with the pool), 3 (two with the
      // pool, the rest two at a time), and all (every row with the pool, as before the split)
      for (const rows of [1, 3, 1000]) {
        process.env.INFLUENCE_LENS_RUN_MB = String((rows * rowBytes + 1) / 2 ** 20);
        poolRowsPolicy.maxPoolRows = rows === 1 ? 1 : undefined;
        // the heatmap passes say how many there are: one with row 0, then `rows` token rows each
        const heatmap: Array<[number, number]> = [];
        const onProgress = (s: string, d: number, t: number) => {
          if (s === 'token heatmaps (ekfac)') heatmap.push([d, t]);
        };
        const ek = await explain(setup, corpus, { ...query, method: 'ekfac', topK: 7, onProgress });
        const rest = Math.max(0, targets.length - (rows - 1));
        const passes = 1 + Math.max(0, Math.ceil((rest - (rows - 1)) / rows));
        assert.deepEqual(
          heatmap,
          Array.from({ length: passes + 1 }, (_, i) => [i, passes]),
          `${rows} rows per pass`,
        );
        results.push([
          `${rows} rows per pass`,
          [
            ek,
            await explain(setup, corpus, { ...query, method: 'cosine', topK: 7 }),
            // two queries in one pool pass (one row each when a pass holds three), or, with one
            // row per pass, in a pass each
            ...(await explainMany(setup, corpus, [
              { ...query, method: 'gdp', topK: 7 },
              { ...QUERY, method: 'gdp', topK: 7 },
            ])),
          ],
        ]);
      }
    } finally {
      poolRowsPolicy.maxPoolRows = undefined;
      if (saved === undefined) delete process.env.INFLUENCE_LENS_RUN_MB;
      else process.env.INFLUENCE_LENS_RUN_MB = saved;
    }
    // dense references: each completion token's own gradient, its EK-FAC inverse, met by G(z)
    const Gt = await Promise.all(
      targets.map((t) =>
        denseGradient(
          ft.model,
          q.ids,
          q.weights.map((_, u) => (u === t ? 1 : 0)),
        ),
      ),
    );
    // ⟨H⁻¹ G_t, G_z⟩ = ⟨G_t, H⁻¹ G_z⟩ (H symmetric): one dense inverse per example and module
    const want = new Map<number, number[]>();
    for (const [k, ex] of corpus.dataset.examples.entries()) {
      const Gz = await denseGradient(ft.model, corpus.tokens[k].ids, corpus.tokens[k].weights);
      const per = targets.map(() => 0);
      for (const [name, gz] of Gz) {
        const inv = denseInverse(ft, name, gz);
        Gt.forEach((g, i) => {
          per[i] += dot(g.get(name)!, inv);
        });
      }
      want.set(ex.line, per);
    }
    for (const [label, [ek, cos, gdp, gdp2]] of results) {
      assert.equal(all(ek).length, RECORDS.length);
      for (const e of all(ek)) {
        assert.equal(e.completionTokenScores!.length, targets.length, label);
        want.get(e.id.line)!.forEach((s, i) => {
          const got = e.completionTokenScores![i];
          assert.ok(
            rel(got, s) < 1e-6 || Math.abs(got - s) < 1e-9,
            `${label}, line ${e.id.line}, token ${i}: ${got} vs ${s}`,
          );
        });
        const tokens = e.tokenScores!.values.reduce((a, b) => a + b, 0);
        assert.ok(rel(tokens, e.score) < 1e-8, `${label}: training token scores sum to the score`);
      }
      // the other methods and the second query equal the run with every row in the pool's pass
      const ref = results[results.length - 1][1];
      for (const [r, same] of [cos, gdp, gdp2].map((r, i) => [r, ref[i + 1]] as const))
        for (const e of all(r)) {
          const w = all(same).find((x) => x.id.line === e.id.line)!;
          assert.ok(rel(e.score, w.score) < 1e-10, `${label} ${r.method}: score`);
          for (const [i, v] of e.completionTokenScores!.entries())
            assert.ok(
              Math.abs(v - w.completionTokenScores![i]) <=
                1e-10 * (Math.abs(w.completionTokenScores![i]) + Math.abs(w.score)),
              `${label} ${r.method}: completion token ${i}`,
            );
          for (const [i, v] of e.tokenScores!.values.entries())
            assert.ok(
              Math.abs(v - w.tokenScores!.values[i]) <= 1e-10 * (Math.abs(v) + Math.abs(w.score)),
              `${label} ${r.method}: training token ${i}`,
            );
        }
    }
  });

  test('low-rank query: full rank reproduces the exact scores in-graph; rank 1 is recomputed exactly at the top', async () => {
    const q = tokenizeQuery(ft.model.tokenizer, QUERY.prompt, QUERY.completion, contextLength(ft.model.config));
    const { tokens } = await queryGradients(
      ft.model,
      { ids: q.ids, weights: q.weights },
      { modules: 'all', perCompletionToken: true },
    );
    const M = queryMatrices(tokens, [ft.preconditioners!]);
    const exact = await scoreCandidates(ft.model, M, corpus.tokens, { modules: 'all', tokenScores: true });
    const full = await scoreCandidates(ft.model, M, corpus.tokens, { modules: 'all', tokenScores: true, rank: 1000 });
    const one = await scoreCandidates(ft.model, M, corpus.tokens, { modules: 'all', rank: 1 });
    let differs = 0;
    for (let k = 0; k < corpus.size; k++) {
      for (let r = 0; r < exact.scores[k].length; r++) {
        assert.ok(rel(full.scores[k][r], exact.scores[k][r]) < 1e-8, `full rank, example ${k} row ${r}`);
        if (rel(one.scores[k][r], exact.scores[k][r]) > 1e-3) differs++;
      }
      for (let t = 0; t < exact.tokenScores![k].length; t++)
        assert.ok(
          Math.abs(full.tokenScores![k][t] - exact.tokenScores![k][t]) <=
            1e-8 * (1 + Math.abs(exact.tokenScores![k][t])),
        );
    }
    assert.ok(differs > 0, 'rank 1 is an approximation on this model');
    // in explain, every shown example is recomputed exactly
    const ranked = await explain({ model: ft, modules: 'all' }, corpus, {
      ...QUERY,
      method: 'ekfac',
      topK: 3,
      rank: 1,
    });
    const ref = await run('ekfac');
    for (const e of all(ranked)) {
      const x = all(ref).find((y) => y.id.line === e.id.line)!;
      assert.ok(rel(e.score, x.score) < 1e-12);
    }
  });

  test('gradient store: exact when k covers every dimension, approximate but reranked exactly otherwise', async () => {
    const q = tokenizeQuery(ft.model.tokenizer, QUERY.prompt, QUERY.completion, contextLength(ft.model.config));
    const { tokens } = await queryGradients(ft.model, { ids: q.ids, weights: q.weights }, { modules: 'all' });
    const M = queryMatrices(tokens, [ft.preconditioners!]);
    const exact = await scoreCandidates(ft.model, M, corpus.tokens, { modules: 'all' });
    const identity = { modelFingerprint: 'm', dataFingerprint: 'd', k: 64, seed: 3, modules: 'all' as const };
    const full = await GradientStore.build(ft.model, corpus.tokens, identity, { batchSize: 3 });
    const s = await full.scores(row0(M));
    // exact up to the rows' fp16 rounding (11 significant bits per stored value)
    for (let k = 0; k < corpus.size; k++)
      assert.ok(rel(s[k], exact.scores[k][0]) < 2e-3, `example ${k}: ${s[k]} vs ${exact.scores[k][0]}`);
    // save / load; a store for other data or settings is not reused
    const sdir = join(dir, 'store');
    full.save(sdir);
    const back = GradientStore.load(sdir, identity)!;
    assert.deepEqual(Array.from(await back.scores(row0(M))), Array.from(s));
    assert.equal(GradientStore.load(sdir, { ...identity, dataFingerprint: 'other' }), null);
    // k = 2: an approximation; explain reranks the shown examples exactly
    const small = await GradientStore.build(ft.model, corpus.tokens, { ...identity, k: 2 });
    const approx = await small.scores(row0(M));
    assert.ok(approx.some((x, k) => rel(x, exact.scores[k][0]) > 1e-3));
    const r = await explain({ model: ft, modules: 'all' }, corpus, {
      ...QUERY,
      method: 'ekfac',
      topK: 2,
      store: { model: ft.model, store: small },
      rerank: 2,
    });
    const ref = await run('ekfac');
    for (const e of all(r)) {
      const x = all(ref).find((y) => y.id.line === e.id.line)!;
      assert.ok(rel(e.score, x.score) < 1e-12, 'shown examples carry exact scores');
    }
    // and the result says the pool was pre-ranked by the store (the other ranks are estimates)
    assert.equal(r.attribution?.preranked?.by, 'gradient-store');
    assert.ok((r.attribution?.preranked?.exact ?? 0) >= all(r).length);
    // the store's estimates have no error bound: the line does not claim the lists are exact
    assert.match(
      describeAttribution(r.attribution!),
      /one it placed far off can be missing: turn "store" off for exact lists/,
    );
    assert.equal(ref.attribution?.preranked, undefined);
  });

  test('partial results stream while candidates are scored, and end at the final ranking', async () => {
    const seen: number[] = [];
    let lastTop: string | undefined;
    const r = await explain({ model: ft, modules: 'all' }, corpus, {
      ...QUERY,
      method: 'ekfac',
      topK: 2,
      batchSize: 2,
      partialEveryMs: 0,
      onPartial: (p) => {
        seen.push(p.scored);
        lastTop = p.supporting[0]?.id.hash;
        assert.equal(p.total, RECORDS.length);
      },
    });
    assert.deepEqual(seen, [2, 4, 6, 7]);
    assert.equal(lastTop, r.supporting[0]?.id.hash);
  });

  test('a batch whose last query is refused is refused before any query gradient is taken, naming that query', async () => {
    let compiled = 0;
    const model = new Proxy(ft.model, {
      get(target, key, receiver) {
        if (key === 'compile') compiled++;
        return Reflect.get(target, key, receiver);
      },
    });
    const setup = { model: { ...ft, model }, modules: 'all' } satisfies ExplainSetup;
    const long = { prompt: 'word '.repeat(400), completion: ' x' };
    await assert.rejects(
      explainMany(
        setup,
        corpus,
        [QUERY, QUERY, long].map((q) => ({ ...q, method: 'ekfac' as const, topK: 3 })),
      ),
      /^QueryError: query 3 of 3: prompt \+ completion is \d+ tokens; the model takes/,
    );
    assert.equal(compiled, 0, 'no graph was compiled for the good queries before the bad one was seen');
    await assert.rejects(
      explainMany(
        setup,
        corpus,
        [QUERY, { ...QUERY, completion: '' }].map((q) => ({ ...q, method: 'gdp' as const, topK: 0 })),
      ),
      /query 1 of 2: top-k must be a positive integer/,
    );
    assert.equal(compiled, 0);
  });

  test('several queries in one scoring pass give each query the single-query result exactly, each handed over once final', async () => {
    const queries = [
      QUERY,
      { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
      { prompt: 'Tokyo', completion: ' is large.' },
    ];
    for (const method of ['ekfac', 'multistage', 'cosine'] as const) {
      const setup = { model: ft, pretrained: pt, modules: 'all' } satisfies ExplainSetup;
      // each result is handed over as soon as it is final, in order, before the batch returns
      const streamed: Array<[number, ExplainResult]> = [];
      let returned = false;
      const many = await explainMany(
        setup,
        corpus,
        queries.map((q) => ({ ...q, method, topK: 7 })),
        (r, i) => {
          assert.equal(returned, false);
          streamed.push([i, r]);
        },
      );
      returned = true;
      assert.equal(many.length, queries.length);
      assert.deepEqual(
        streamed,
        many.map((r, i) => [i, r]),
      );
      // the multistage regime is on the streamed results too
      if (method === 'multistage') assert.ok(streamed.every(([, r]) => r.multiStage));
      for (const [i, q] of queries.entries()) {
        const one = await explain(setup, corpus, { ...q, method, topK: 7 });
        const strip = (r: ExplainResult) => ({ ...r, timings: {} });
        assert.deepEqual(strip(many[i]), strip(one), `${method}, query ${i}`);
      }
    }
  });

  test('repsim and bm25 rank by similarity, without a sign', async () => {
    const rep = await explain({ model: ft, modules: 'all' }, corpus, {
      prompt: 'Q: capital of France?\nA:',
      completion: ' Paris',
      method: 'repsim',
      topK: 3,
    });
    // the query is exactly example line 4, so its hidden state matches best
    assert.equal(rep.supporting[0].id.line, 4);
    assert.ok(rel(rep.supporting[0].score, 1) < 1e-9);
    assert.equal(rep.opposing.length, 0);
    assert.ok(rep.supporting.every((e) => e.sign === 'neutral'));
    const bm = await explain({ model: ft, modules: 'all' }, corpus, {
      prompt: 'Which city is on the Seine?',
      completion: ' Paris',
      method: 'bm25',
      topK: 2,
      compare: ['repsim', 'gdp'],
    });
    assert.equal(bm.supporting[0].id.line, 2);
    assert.ok(bm.supporting[0].otherRanks!.repsim! >= 1 && bm.supporting[0].otherRanks!.gdp! >= 1);
    // the badges' count of each signed method's opposing examples: GDP's own scores below 0; RepSim has none
    const gdp = await explain({ model: ft, modules: 'all' }, corpus, {
      prompt: 'Which city is on the Seine?',
      completion: ' Paris',
      method: 'gdp',
      topK: 100,
    });
    assert.deepEqual(bm.otherOpposing, { gdp: gdp.opposing.length });
  });

  test('retrieved candidates: only the BM25 ∪ RepSim top-R are scored, with the same scores', async () => {
    const full = await run('gdp');
    const r = await explain({ model: ft, modules: 'all' }, corpus, {
      ...QUERY,
      method: 'gdp',
      topK: 2,
      candidates: 'retrieved',
      retrieve: 2,
    });
    assert.ok(r.scored >= 2 && r.scored <= 4);
    for (const e of all(r)) {
      const f = all(full).find((x) => x.id.line === e.id.line)!;
      assert.ok(rel(e.score, f.score) < 1e-12);
    }
    // the result says the lists are of the retrieved examples only (ranks within them), not of the dataset
    assert.deepEqual(r.attribution?.retrieved, { scored: r.scored, of: full.scored });
    assert.match(
      describeAttribution(r.attribution!),
      new RegExp(`only the ${r.scored} of ${full.scored} examples BM25 and RepSim retrieved were scored`),
    );
    assert.equal(full.attribution?.retrieved, undefined);
  });

  test('fit in 2 partitions (resumable) equals one fit; reruns are no-ops; a foreign --out is refused', async () => {
    const out = join(dir, 'partitioned');
    const common = {
      modelDir: ftDir,
      dataPath: data,
      out,
      modules: 'all' as const,
      labels: 'empirical' as const,
      seed: 0,
      batchSize: 2,
      model: ft.model,
    };
    let r = await runFitJob({ ...common, partition: { index: 1, count: 2 } });
    assert.equal(r.status, 'waiting');
    assert.match(r.message, /partitions 0 still need their covariance/);
    r = await runFitJob({ ...common, partition: { index: 0, count: 2 } });
    assert.equal(r.status, 'waiting'); // did covariance 0 + eigen + lambda 0; lambda 1 missing
    assert.ok(existsSync(join(out, 'partials', 'eigen')));
    r = await runFitJob({ ...common, partition: { index: 1, count: 2 } });
    assert.equal(r.status, 'done');
    assert.ok(!existsSync(join(out, 'partials')));
    const a = loadFactors(out);
    const b = loadFactors(join(dir, 'ft-factors'));
    for (const [name, m] of Object.entries(b.modules)) {
      const p = a.modules[name];
      assert.equal(p.lambda!.count, m.lambda!.count);
      assert.equal(p.covariance!.activationCount, m.covariance!.activationCount);
      for (let i = 0; i < m.lambda!.sum.length; i++)
        assert.ok(Math.abs(p.lambda!.sum[i] - m.lambda!.sum[i]) <= 1e-9 * (1 + Math.abs(m.lambda!.sum[i])));
    }
    assert.equal((await runFitJob({ ...common, partition: { index: 1, count: 2 } })).status, 'up-to-date');
    await assert.rejects(
      runFitJob({ ...common, modelDir: ptDir, model: pt.model }),
      (e: Error) => e instanceof FitJobError && /another model/.test(e.message),
    );
    // an unfinished fit with other settings is not silently mixed in
    const out2 = join(dir, 'mixed');
    await runFitJob({ ...common, out: out2, partition: { index: 0, count: 2 } });
    await assert.rejects(
      runFitJob({ ...common, out: out2, labels: 'sampled', partition: { index: 1, count: 2 } }),
      /unfinished fit with other settings \(labels/,
    );
    // other data (or the same data tokenized another way) is named as such, not as a bare fingerprint key
    const other = join(dir, 'other-data.jsonl');
    writeFileSync(other, `${readFileSync(data, 'utf8')}{"text": "one more line"}\n`);
    await assert.rejects(
      runFitJob({ ...common, out: out2, dataPath: other, partition: { index: 1, count: 2 } }),
      /unfinished fit with other settings \(the data or how it is tokenized \(--training, the tokenizer\): fingerprint \S+ → \S+\)/,
    );
  });

  test('bad factors are refused with a clear message', async () => {
    assert.throws(
      () => openStage(ptDir, join(dir, 'ft-factors')),
      (e: Error) => e instanceof StageError && /fitted on another model/.test(e.message),
    );
    // NaN in Λ names the file and the module
    const f = loadFactors(join(dir, 'ft-factors'));
    const name = Object.keys(f.modules)[3];
    f.modules[name].lambda!.sum[5] = Number.NaN;
    const bad = join(dir, 'nan-factors');
    saveFactors(bad, f);
    assert.throws(
      () => openStage(ftDir, bad),
      (e: Error) =>
        e.message.includes(join(bad, 'lambda_matrix.safetensors')) && e.message.includes(`"${name}" holds NaN`),
    );
    // ekfac without factors
    await assert.rejects(
      explain({ model: { model: ft.model }, modules: 'all' }, corpus, { ...QUERY, method: 'ekfac', topK: 3 }),
      /ekfac needs EK-FAC factors/,
    );
    await assert.rejects(
      explain({ model: ft, modules: 'all' }, corpus, { ...QUERY, completion: '', method: 'gdp', topK: 3 }),
      /completion is empty/,
    );
    checkSameTokenizer(ft.model, pt.model);
  });
});

test('multistage: a tokenizer re-saved by transformers (its bookkeeping keys, a chat template added) is the same tokenizer; one that encodes otherwise is refused, naming the key', () => {
  const dir = join(home, 'resaved');
  const { config, params, shapes } = initLlama(SHAPE, 3, { bos: 0, eos: 0, pad: 0 });
  const save = (name: string, edit: (c: Record<string, unknown>) => void) => {
    saveCheckpoint(join(dir, name), config, params, shapes, TOKENIZER);
    const file = join(dir, name, 'tokenizer_config.json');
    const c = JSON.parse(readFileSync(file, 'utf8'));
    edit(c);
    writeFileSync(file, `${JSON.stringify(c, null, 2)}\n`);
    return Model.open(join(dir, name));
  };
  const base = save('base', () => {});
  // what transformers 5's save_pretrained writes, plus a template the fine-tune brought
  const resaved = save('resaved', (c) => {
    Object.assign(c, { is_local: true, local_files_only: false, padding_side: 'left' });
    Object.assign(c, { backend: 'tokenizers', tokenizer_class: 'PreTrainedTokenizerFast' });
    c.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
  });
  assert.notEqual(base.tokenizer.sha256, resaved.tokenizer.sha256);
  checkSameTokenizer(resaved, base);
  // a LlamaTokenizer class is one transformers 5 rebuilds (other ids for some texts)
  const llama = save('llama-class', (c) => {
    c.tokenizer_class = 'LlamaTokenizerFast';
  });
  assert.throws(() => checkSameTokenizer(llama, base), /tokenizer_config\.json: "tokenizer_class" differ/);
  // a lowercasing normalizer: other ids for any capital letter
  saveCheckpoint(join(dir, 'other'), config, params, shapes, TOKENIZER);
  const tj = join(dir, 'other', 'tokenizer.json');
  writeFileSync(tj, JSON.stringify({ ...JSON.parse(readFileSync(tj, 'utf8')), normalizer: { type: 'Lowercase' } }));
  assert.throws(
    () => checkSameTokenizer(Model.open(join(dir, 'other')), base),
    (e: Error) =>
      e instanceof StageError && /different tokenizers \(tokenizer\.json: "normalizer" differ\)/.test(e.message),
  );
});
