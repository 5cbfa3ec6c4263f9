// Influence summed over training checkpoints (TracIn, Pruthi et al. 2020) on a tiny fp64 Llama:
// explain's ekfac and gdp scores must equal Σ_c w_c · (the dense score at checkpoint c), each term
// computed independently from the checkpoint's own gradients and its own dense EK-FAC inverse;
// heatmaps still sum to the score; the result names the checkpoints and weights.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { checkpointFactorsDir, fitCheckpoints, openCheckpointStages } from '../../src/server/attribution/checkpoints';
import {
  Corpus,
  ExplainError,
  type ExplainSetup,
  explain,
  explainMany,
  type StoreRef,
  scoreCorpus,
} from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryGradients, queryMatrices } from '../../src/server/attribution/influence';
import { type OpenedStage, openStage } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { parseTraining } from '../../src/server/data/training';
import { GradientStore } from '../../src/server/index/gradient-store';
import { preconditionerFingerprint } from '../../src/server/index/store-projection';
import { planCheckpoints } from '../../src/server/model/checkpoints';
import { Model, makeBatch } from '../../src/server/model/engine';
import { gaussJordanInverse, kron, matVec } from './helpers/dense';
import { useTempHome } from './helpers/env';
import { makeTinyLlama } from './helpers/tiny-llama';

const home = useTempHome();
const fp64 = { precision: 'fp64' as const };
const makeModel = makeTinyLlama;

const RECORDS = [
  { text: 'The capital of France is Paris.' },
  { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
  { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
  { text: 'Berlin is the capital of Germany.' },
  { text: 'Tokyo is large.' },
];
const QUERY = { prompt: 'Q: capital of France?\nA:', completion: ' Paris is' };
const rel = (x: number, y: number) => Math.abs(x - y) / Math.max(Math.abs(y), 1e-12);
const dot = (a: Float64Array, b: Float64Array) => a.reduce((s, v, i) => s + v * b[i], 0);

/** Per-module G = Σ_t g_t ãᵀ_t, formed in JS from the engine's per-token outputs. */
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

describe('explain summed over training checkpoints (tiny fp64 Llama)', () => {
  const dir = join(home, 'run');
  const data = join(home, 'train.jsonl');
  const factors = join(home, 'factors');
  let final: OpenedStage;
  let corpus: Corpus;
  let setup: ExplainSetup;
  // checkpoint-1 at lr 3e-3, checkpoint-2 at lr 1e-3: weights 0.75 and 0.25
  const LR = [3e-3, 1e-3];

  before(async () => {
    mkdirSync(home, { recursive: true });
    makeModel(dir, 2);
    makeModel(join(dir, 'checkpoint-1'), 3, { global_step: 1, learning_rate: LR[0] });
    makeModel(join(dir, 'checkpoint-2'), 4, { global_step: 2, learning_rate: LR[1] });
    writeFileSync(data, `${RECORDS.map((r) => JSON.stringify(r)).join('\n')}\n`);
    const fit = { dataPath: data, modules: 'all' as const, labels: 'empirical' as const, seed: 0, batchSize: 3 };
    await runFitJob({ ...fit, modelDir: dir, out: factors, model: Model.open(dir, fp64) });
    const damping = { relative: 0.1 };
    final = openStage(dir, factors, { damping, engine: fp64 });
    const plan = planCheckpoints(dir, final.model.checkpoint, 'auto')!;
    const results = await fitCheckpoints(plan, { ...fit, factorsDir: factors, engine: fp64 });
    assert.deepEqual(
      results.map((r) => r.result.status),
      ['done', 'done'],
    );
    const opened = openCheckpointStages(plan, { factorsDir: factors, damping, engine: fp64, modules: 'all' });
    assert.deepEqual(opened.unfitted, []);
    setup = { model: final, modules: 'all', checkpoints: opened };
    corpus = new Corpus(data, loadDataset(data), final.model);
  });

  const all = (r: ExplainResult) => [...r.supporting, ...r.opposing];

  test("checkpoints' factor folders are found through the configured cache folder, not the default one", (t) => {
    // digests are remembered only for files last changed over a minute ago (content-digest.ts):
    // a fresh clone's fixtures are not, so the clock is moved on
    const now = Date.now();
    t.mock.method(Date, 'now', () => now + 120_000);
    const plan = planCheckpoints(dir, final.model.checkpoint, 'auto')!;
    const own = join(home, 'own-cache');
    const folders = plan.checkpoints.map((ck) => checkpointFactorsDir(factors, ck, own));
    // the same folders (named by the weights' content), their weight digests remembered in `own`
    assert.deepEqual(
      folders,
      plan.checkpoints.map((ck) => checkpointFactorsDir(factors, ck)),
    );
    assert.ok(existsSync(join(own, 'digests')) && readdirSync(join(own, 'digests')).length >= 2);
  });

  /** Σ_c w_c · score_c for every example, from dense gradients at each checkpoint. */
  async function denseSum(method: 'ekfac' | 'gdp') {
    const total = new Float64Array(RECORDS.length);
    for (const c of setup.checkpoints!.stages) {
      const m = c.stage.model;
      const q = tokenizeQuery(m.tokenizer, QUERY.prompt, QUERY.completion, contextLength(m.config));
      const Gq = await denseGradient(m, q.ids, q.weights);
      for (let k = 0; k < RECORDS.length; k++) {
        const Gz = await denseGradient(m, corpus.tokens[k].ids, corpus.tokens[k].weights);
        for (const [name, gq] of Gq) {
          const M = method === 'ekfac' ? denseInverse(c.stage as OpenedStage, name, gq) : gq;
          total[k] += c.weight * dot(M, Gz.get(name)!);
        }
      }
    }
    return total;
  }

  for (const method of ['ekfac', 'gdp'] as const)
    test(`${method}: each score is Σ_c w_c · score(θ_c) with the dense reference (≤ 1e-6); heatmaps sum to it`, async () => {
      const r = await explain(setup, corpus, { ...QUERY, method, topK: RECORDS.length });
      const want = await denseSum(method);
      const finalOnly = await explain({ model: final, modules: 'all' }, corpus, { ...QUERY, method, topK: 5 });
      assert.equal(all(r).length, RECORDS.length);
      for (const e of all(r)) {
        const k = corpus.dataset.examples.findIndex((x) => x.line === e.id.line);
        assert.ok(rel(e.score, want[k]) < 1e-6, `line ${e.id.line}: ${e.score} vs dense Σ ${want[k]}`);
        const f = all(finalOnly).find((x) => x.id.line === e.id.line)!;
        assert.ok(rel(e.score, f.score) > 1e-3, 'the sum is not the final model score');
        const tokens = e.tokenScores!.values.reduce((s, v) => s + v, 0);
        assert.ok(rel(tokens, e.score) < 1e-5, `training tokens sum ${tokens} vs ${e.score}`);
        const completion = e.completionTokenScores!.reduce((s, v) => s + v, 0);
        assert.ok(rel(completion, e.score) < 1e-5, `completion tokens sum ${completion} vs ${e.score}`);
        const modules = Object.values(e.perModule!).reduce((s, v) => s + v, 0);
        assert.ok(rel(modules, e.score) < 1e-9);
      }
      assert.deepEqual(r.attribution, {
        method,
        over: 'checkpoints',
        checkpoints: [
          { name: 'checkpoint-1', step: 1, weight: 0.75, learningRate: 0.003 },
          { name: 'checkpoint-2', step: 2, weight: 0.25, learningRate: 0.001 },
        ],
        weighting: 'learning-rate',
      });
      assert.deepEqual(finalOnly.attribution, { method, over: 'final-model' });
    });

  test('explainMany over checkpoints gives what explain gives for each query', async () => {
    const q2 = { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' };
    const many = await explainMany(setup, corpus, [
      { ...QUERY, method: 'ekfac', topK: 5 },
      { ...q2, method: 'ekfac', topK: 5 },
    ]);
    const one = await explain(setup, corpus, { ...q2, method: 'ekfac', topK: 5 });
    assert.deepEqual(
      all(many[1]).map((e) => [e.id.line, e.score]),
      all(one).map((e) => [e.id.line, e.score]),
    );
  });

  test('a low-rank query over checkpoints shows only examples recomputed exactly in every term, with their exact sums', async () => {
    const exact = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK: RECORDS.length });
    const want = new Map(all(exact).map((e) => [e.id.line, e.score]));
    const r = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK: 2, rank: 1 });
    assert.ok(all(r).length > 0);
    for (const e of all(r)) assert.ok(rel(e.score, want.get(e.id.line)!) < 1e-9, `line ${e.id.line}`);
  });

  test('a low-rank query over checkpoints shows the lists of the exact sum: the rescoring is chosen on the sum, not per term', async () => {
    // a full-rank query bounds every term tightly, so each term alone rescores only its own top and
    // bottom k: an example in the sum's top k but not in every term's was left out of the lists
    const lines = (x: ExplainResult) => [x.supporting.map((e) => e.id.line), x.opposing.map((e) => e.id.line)];
    for (const topK of [1, 2]) {
      const exact = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK });
      for (const rank of [1, 64]) {
        const r = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK, rank });
        assert.deepEqual(lines(r), lines(exact), `top ${topK}, rank ${rank}`);
        for (const e of all(r)) {
          const x = all(exact).find((y) => y.id.line === e.id.line)!;
          assert.ok(rel(e.score, x.score) < 1e-9, `line ${e.id.line}`);
          assert.equal(e.rank, x.rank, `line ${e.id.line}: rank`);
        }
      }
    }
  });

  test("checkpoints' factors fitted under another training convention are stale (to refit), not used and not fatal", () => {
    const plan = planCheckpoints(dir, final.model.checkpoint, 'auto')!;
    const other = { ...fp64, training: parseTraining({ maxLength: 64 }) };
    const opened = openCheckpointStages(plan, { factorsDir: factors, engine: other, modules: 'all' });
    assert.deepEqual(opened.unfitted, ['checkpoint-1', 'checkpoint-2']);
    assert.ok(opened.stages.every((c) => !c.stage.preconditioners));
    // the final model's factors are refused with the value to pass
    assert.throws(() => openStage(dir, factors, { engine: other }), /training convention default .*--training default/);
  });

  test('a method that does not sum over checkpoints says so', async () => {
    const r = await explain(setup, corpus, { ...QUERY, method: 'cosine', topK: 3 });
    assert.equal(r.attribution?.over, 'final-model');
    assert.match(r.attribution!.note!, /cosine does not sum over checkpoints/);
  });

  test('ekfac over a checkpoint without factors is refused, naming it', async () => {
    const plan = planCheckpoints(dir, final.model.checkpoint, 'auto')!;
    const bare = openCheckpointStages(plan, { engine: fp64, modules: 'all' });
    assert.deepEqual(bare.unfitted, ['checkpoint-1', 'checkpoint-2']);
    await assert.rejects(
      explain({ ...setup, checkpoints: bare }, corpus, { ...QUERY, method: 'ekfac', topK: 3 }),
      (e: Error) => e instanceof ExplainError && /factors for checkpoint-1 \(step 1\)/.test(e.message),
    );
  });
  /** One eigen-pair store per checkpoint, each on that checkpoint's model and eigenbases, in its own file. */
  async function checkpointStores(k: number): Promise<StoreRef[]> {
    const refs: StoreRef[] = [];
    for (const c of setup.checkpoints!.stages) {
      const pre = c.stage.preconditioners!;
      const identity = {
        modelFingerprint: c.name,
        dataFingerprint: 'd',
        k,
        seed: 0,
        modules: 'all' as const,
        projection: 'eigen' as const,
        factorsFingerprint: preconditionerFingerprint(pre),
        pilot: RECORDS.length,
      };
      const dir = join(home, 'stores', `${c.name}-k${k}`);
      const store = await GradientStore.build(c.stage.model, corpus.tokens, identity, {
        preconditioners: pre,
        batchSize: 2,
        dir,
      });
      refs.push({ model: c.stage.model, store });
    }
    return refs;
  }

  test('one store per checkpoint: the estimates are summed with the checkpoint weights, the rerank is chosen on the sum, and every shown score is the exact sum', async () => {
    const refs = await checkpointStores(1);
    // the weighted sum of the terms' estimates, formed here: each store queried with its own checkpoint's EK-FAC query
    const want = new Float64Array(RECORDS.length);
    for (const [c, st] of setup.checkpoints!.stages.entries()) {
      const m = st.stage.model;
      const q = tokenizeQuery(m.tokenizer, QUERY.prompt, QUERY.completion, contextLength(m.config));
      const { G } = await queryGradients(m, { ids: q.ids, weights: q.weights }, { modules: 'all' });
      const M = queryMatrices(G, [st.stage.preconditioners!]);
      const s = await refs[c].store.scores(new Map([...M].map(([name, rows]) => [name, rows[0]])));
      s.forEach((x, k) => {
        want[k] += st.weight * x;
      });
    }
    const approx = await scoreCorpus(setup, corpus, { ...QUERY, method: 'ekfac', store: refs });
    for (let k = 0; k < want.length; k++) assert.ok(rel(approx[k], want[k]) < 1e-9, `example ${k}`);
    const dense = await denseSum('ekfac');
    assert.ok(
      [...want.keys()].some((k) => rel(want[k], dense[k]) > 1e-3),
      'k = 1 keeps few pairs: the estimate is not exact',
    );
    // rerank 1, top 1: only the sum's top and bottom are recomputed, and they are shown with their exact sums
    const r = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK: 1, store: refs, rerank: 1 });
    const order = [...want.keys()].sort((a, b) => want[b] - want[a]);
    const chosen = new Map([order[0], order[order.length - 1]].map((k) => [corpus.dataset.examples[k].line, k]));
    assert.ok(all(r).length > 0);
    for (const e of all(r)) {
      assert.ok(chosen.has(e.id.line), `line ${e.id.line} was not in the sum's rerank set`);
      const k = chosen.get(e.id.line)!;
      assert.ok(rel(e.score, dense[k]) < 1e-6, `line ${e.id.line}: ${e.score} vs dense Σ ${dense[k]}`);
    }
    assert.equal(r.attribution?.over, 'checkpoints');
    // every example reranked: the same lists and scores as the exact sum
    const exact = await explain(setup, corpus, { ...QUERY, method: 'ekfac', topK: 3 });
    const full = await explain(setup, corpus, {
      ...QUERY,
      method: 'ekfac',
      topK: 3,
      store: refs,
      rerank: RECORDS.length,
    });
    const lines = (x: ExplainResult) => [x.supporting.map((e) => e.id.line), x.opposing.map((e) => e.id.line)];
    assert.deepEqual(lines(full), lines(exact));
    for (const e of all(full)) assert.ok(rel(e.score, all(exact).find((x) => x.id.line === e.id.line)!.score) < 1e-9);
    // every pair kept (k² · modules ≥ d_out · d_A of each module): the summed estimate is the exact sum up to fp16 rounding
    const fullRank = await scoreCorpus(setup, corpus, { ...QUERY, method: 'ekfac', store: await checkpointStores(16) });
    const top = Math.max(...dense.map(Math.abs));
    for (let k = 0; k < dense.length; k++)
      assert.ok(Math.abs(fullRank[k] - dense[k]) < 2e-3 * top, `example ${k}: ${fullRank[k]} vs dense Σ ${dense[k]}`);
    // a store for one checkpoint only cannot be summed
    await assert.rejects(
      explain(setup, corpus, { ...QUERY, method: 'ekfac', topK: 1, store: refs.slice(0, 1), rerank: 1 }),
      (e: Error) => e instanceof ExplainError && /checkpoint-2/.test(e.message),
    );
  });
});
