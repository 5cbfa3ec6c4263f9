// Scoring in the EK-FAC eigenbasis must equal today's path. Today: P(G_q) = Q_S R_q Q_Aᵀ with
// R_q = (Q_Sᵀ G_q Q_A) ⊘ (Λ + λ), scored as ⟨P(G_q), G_z⟩ in the graph. New: R_q scored against
// the candidate rotated in the graph, ⟨R_q, Q_Sᵀ G_z Q_A⟩. Checked in fp64 to 1e-10 relative:
//  - scoreCandidates on fixtures with biases (gpt2) and GQA (llama), per-completion-token query
//    rows, candidates of different lengths batched together (padding): scores, per-module scores,
//    training-token scores;
//  - explain (tiny fp64 Llama, fitted factors) on the final model and summed over two
//    checkpoints, one query and a batch of two: scores, per-module scores, completion and
//    training-token heatmaps;
//  - the cost rule picks each path where its flop counts say.
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { fitCheckpoints, openCheckpointStages } from '../../src/server/attribution/checkpoints';
import { makePreconditioner, type Preconditioner } from '../../src/server/attribution/ekfac/precondition';
import {
  Corpus,
  type ExplainSetup,
  explain,
  explainMany,
  heatmapRowsPolicy,
} from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import {
  type CandidateScores,
  denseRows,
  eigenbasisCheaper,
  eigenbasisPolicy,
  eigenTokenRows,
  queryBatchGradients,
  queryGradients,
  queryMatrices,
  scoreCandidates,
  scoreQuery,
  tokenCount,
  tokenRowsPerPass,
} from '../../src/server/attribution/influence';
import { ekfac } from '../../src/server/attribution/methods/ekfac';
import { type OpenedStage, openStage } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { planCheckpoints } from '../../src/server/model/checkpoints';
import { Model } from '../../src/server/model/engine';
import { Rng } from '../../src/server/util/random';
import { maxRel } from './helpers/dense';
import { useTempHome } from './helpers/env';
import { orthogonal } from './helpers/orthogonal';
import { makeTinyLlama } from './helpers/tiny-llama';

const home = useTempHome();

const relErr = maxRel;

const flat = (rows: ArrayLike<number>[]) => rows.flatMap((r) => Array.from(r));

/** Random eigenbases and a random positive Λ over four decades, for every module of `model`. */
function randomPreconditioners(model: Model, seed: number): Map<string, Preconditioner> {
  const rng = new Rng(seed);
  return new Map(
    model.modules('all').map((m) => {
      const dA = m.dIn + (m.hasBias ? 1 : 0);
      const lambda = new Float64Array(m.dOut * dA);
      for (let i = 0; i < lambda.length; i++) lambda[i] = 10 ** (4 * rng.next() - 2);
      const basis = {
        module: m.name,
        dOut: m.dOut,
        dA,
        qA: orthogonal(dA, rng),
        eigA: new Float64Array(dA),
        qS: orthogonal(m.dOut, rng),
        eigS: new Float64Array(m.dOut),
      };
      return [m.name, makePreconditioner(basis, lambda, { relative: 0.1 })];
    }),
  );
}

function sameScores(got: CandidateScores, want: CandidateScores, tol: number, what: string) {
  const e = relErr(flat(got.scores), flat(want.scores));
  assert.ok(e <= tol, `${what} scores: ${e}`);
  for (const [m, s] of want.perModule) {
    const em = relErr(flat(got.perModule.get(m)!), flat(s));
    assert.ok(em <= tol, `${what} score.${m}: ${em}`);
  }
  if (want.tokenScores) {
    assert.deepEqual(
      got.tokenScores!.map((t) => t.length),
      want.tokenScores.map((t) => t.length),
    );
    const et = relErr(flat(got.tokenScores!), flat(want.tokenScores));
    assert.ok(et <= tol, `${what} token scores: ${et}`);
  }
}

for (const [fixture, precision] of [
  ['gpt2', 'fp64'],
  ['llama', 'fp64'],
  ['gpt2', 'fp32'],
] as const) {
  describe(`scoring in the eigenbasis (${fixture}, ${precision})`, () => {
    const model = Model.open(join('test/fixtures/models', fixture), { precision });
    const tol = precision === 'fp64' ? 1e-10 : 1e-3;
    const ids = [5, 17, 3, 22, 9, 14, 30, 2, 11, 7, 19];
    const query = { ids, weights: ids.map((_, t) => (t >= 6 && t < ids.length - 1 ? 1 : 0)) };
    // lengths 11, 4, 8, 6 and 2 in batches of 3: padded rows
    const candidates = [
      { ids: [4, 8, 15, 16, 23, 42, 1, 9, 27, 3, 6], weights: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0] },
      { ids: [12, 7, 31, 5], weights: [0, 1, 1, 0] },
      { ids: [2, 9, 9, 18, 25, 6, 13, 8], weights: [1, 1, 1, 1, 1, 1, 1, 0] },
      { ids: [21, 3, 14, 1, 29, 10], weights: [0, 0, 1, 1, 1, 0] },
      { ids: [11, 24], weights: [1, 0] },
    ];
    const pre = randomPreconditioners(model, 3);
    const opts = { modules: 'all' as const, tokenScores: true, batchSize: 3 };

    test('per-completion-token rows: scores, per-module and token scores equal the rotated-back path', async () => {
      const qg = await queryGradients(model, query, { modules: 'all', perCompletionToken: true });
      assert.equal(qg.rows, 5);
      const P = queryMatrices(qg.tokens, [pre]);
      const R = queryMatrices(qg.tokens, [pre], { eigenbasis: true });
      const want = await scoreCandidates(model, P, candidates, opts);
      const got = await scoreCandidates(model, R, candidates, { ...opts, eigenbasis: pre });
      sameScores(got, want, tol, 'eigenbasis');
      // the rows as they are differ from P(G): the test cannot pass by feeding P twice
      const name = [...P.keys()][0];
      assert.ok(relErr(R.get(name)![0], P.get(name)![0]) > 1e-3);
      // R from the dense rows equals R from the tokens; rotating R back gives P(G)
      const Rdense = queryMatrices(qg.G, [pre], { eigenbasis: true });
      for (const [m, rows] of R)
        for (const [r, row] of rows.entries()) {
          assert.ok(relErr(Rdense.get(m)![r], row) <= tol, `R from G, ${m} row ${r}`);
          assert.ok(relErr(denseRows({ M: R, eigen: pre }).get(m)![r], P.get(m)![r]) <= tol, `Q_S R Q_Aᵀ, ${m}`);
        }
      // scoreQuery: either choice gives the same scores
      for (const force of ['eigenbasis', 'rotate-back'] as const) {
        eigenbasisPolicy.force = force;
        try {
          sameScores(await scoreQuery(model, { M: R, eigen: pre }, candidates, opts), want, tol, force);
        } finally {
          eigenbasisPolicy.force = undefined;
        }
      }
    });

    test('rows as rotated tokens, formed by the graph one module at a time, equal the rows held whole', async () => {
      const qg = await queryGradients(model, query, { modules: 'all', perCompletionToken: true });
      const eigenTokens = eigenTokenRows(qg.tokens, pre);
      if (precision === 'fp64') {
        // ground-truth graphs keep their rows whole
        assert.equal(eigenTokens, null);
        return;
      }
      assert.ok(eigenTokens);
      const R = queryMatrices(qg.tokens, [pre], { eigenbasis: true });
      const want = await scoreCandidates(model, R, candidates, { ...opts, eigenbasis: pre });
      const got = await scoreCandidates(model, new Map(), candidates, { ...opts, eigenbasis: pre, eigenTokens });
      sameScores(got, want, 1e-5, 'rotated tokens');
      // rows of different lengths are zero-padded to the longest: the padding adds nothing
      const first = [...qg.tokens.values()][0];
      const lengths = first.g.map((g) => g.length / first.dOut);
      assert.ok(new Set(lengths).size > 1, `row lengths ${lengths}`);
      await assert.rejects(
        scoreCandidates(model, new Map(), candidates, { ...opts, eigenTokens }),
        /need the eigenbasis/,
      );
    });
  });
}

describe('the cost rule', () => {
  // only the shapes matter to the rule
  const shaped = (dims: Array<[number, number]>) =>
    new Map(dims.map(([dOut, dA], i) => [`m${i}`, { dOut, dA } as Preconditioner]));
  // Pythia-70M's modules of one layer: qkv 1536×513, dense 512×513, up 2048×513, down 512×2049
  const pythia = shaped([
    [1536, 513],
    [512, 513],
    [2048, 513],
    [512, 2049],
  ]);
  const perToken = [...pythia.values()].reduce((s, p) => s + p.dOut ** 2 + p.dA ** 2, 0);
  const perRow = [...pythia.values()].reduce((s, p) => s + p.dOut ** 2 * p.dA + p.dOut * p.dA ** 2, 0);

  test('eigenbasis for a 17-row query over 16 × 128 tokens, rotate-back for 10k candidates', () => {
    assert.equal(eigenbasisCheaper(pythia, pythia.keys(), 17, 16 * 128), true);
    assert.equal(eigenbasisCheaper(pythia, pythia.keys(), 17, 10_000 * 128), false);
    // one row (the training-token pass) over 20 shown examples of 128 tokens: rotate back
    assert.equal(eigenbasisCheaper(pythia, pythia.keys(), 1, 20 * 128), false);
  });

  test('the switch sits where the flop counts cross', () => {
    const rows = 17;
    const edge = (rows * perRow) / perToken; // candidate tokens at which both cost the same
    assert.equal(eigenbasisCheaper(pythia, pythia.keys(), rows, Math.floor(edge - 1)), true);
    assert.equal(eigenbasisCheaper(pythia, pythia.keys(), rows, Math.ceil(edge + 1)), false);
    assert.throws(() => eigenbasisCheaper(pythia, ['m0', 'nope'], 1, 1), /no module nope/);
  });

  test('the ekfac scorer returns eigenbasis rows only when told the pool and it is cheaper', async () => {
    const model = Model.open('test/fixtures/models/gpt2', { precision: 'fp64' });
    const pre = randomPreconditioners(model, 5);
    const ids = [5, 17, 3, 22, 9, 14];
    const qg = await queryGradients(model, { ids, weights: [0, 0, 1, 1, 1, 0] }, { modules: 'all' });
    const setup = { model: { model, preconditioners: pre }, modules: 'all' } as unknown as ExplainSetup;
    assert.equal(ekfac.query(setup, qg).eigen, undefined);
    assert.equal(ekfac.query(setup, qg, { candidateTokens: 1 }).eigen, pre);
    assert.equal(ekfac.query(setup, qg, { candidateTokens: 1e9 }).eigen, undefined);
  });

  test('rows per pass as rotated tokens: 14 at Qwen2.5-0.5B for a 16-token query, 1 GiB budget', () => {
    const saved = process.env.INFLUENCE_LENS_RUN_MB;
    delete process.env.INFLUENCE_LENS_RUN_MB;
    try {
      // one layer: q, k, v (bias), o, gate, up, down; 24 layers
      const layer: Array<[number, number]> = [
        [896, 897],
        [128, 897],
        [128, 897],
        [896, 896],
        [4864, 896],
        [4864, 896],
        [896, 4864],
      ];
      const qwen = shaped(Array.from({ length: 24 }, () => layer).flat());
      // Σ 16·d_out + 2·4864·16 floats = 20.1 MB a row beside 15.7 MB of shared ã Q_A; half of
      // 1 GiB holds 25
      assert.equal(tokenRowsPerPass(qwen, qwen.keys(), 16), 25);
      // a 256-token query's row is 321 MB of tokens beside 252 MB shared, over half the budget:
      // one row a pass, no better than whole rows, so heatmapRows keeps whole rows
      assert.equal(tokenRowsPerPass(qwen, qwen.keys(), 256), 1);
    } finally {
      if (saved !== undefined) process.env.INFLUENCE_LENS_RUN_MB = saved;
    }
  });

  test('refusals: two stages, a low-rank query of eigenbasis rows', async () => {
    const model = Model.open('test/fixtures/models/gpt2', { precision: 'fp64' });
    const pre = randomPreconditioners(model, 5);
    const qg = await queryGradients(model, { ids: [5, 17, 3], weights: [0, 1, 0] }, { modules: 'all' });
    assert.throws(() => queryMatrices(qg.tokens, [pre, pre], { eigenbasis: true }), /exactly one preconditioner/);
    const R = queryMatrices(qg.tokens, [pre], { eigenbasis: true });
    await assert.rejects(
      scoreCandidates(model, R, [{ ids: [1, 2, 3], weights: [1, 1, 0] }], { modules: 'all', rank: 2, eigenbasis: pre }),
      /low-rank query/,
    );
  });

  test('rows as rotated tokens share one forward’s activations: rows of several forwards are refused', async () => {
    const model = Model.open('test/fixtures/models/gpt2');
    const pre = randomPreconditioners(model, 6);
    // one row per query, each its own forward
    const tokens = await queryBatchGradients(
      model,
      [
        { ids: [5, 17, 3], weights: [0, 1, 0] },
        { ids: [4, 2, 9], weights: [0, 1, 0] },
      ],
      { modules: 'all' },
    );
    assert.throws(() => eigenTokenRows(tokens, pre), /the rows come from 2 forwards; they must share one/);
    // one query's rows share one forward
    const qg = await queryGradients(
      model,
      { ids: [5, 17, 3, 8], weights: [0, 1, 1, 0] },
      { modules: 'all', completionRows: [1, 2] },
    );
    const rows = eigenTokenRows(qg.tokens, pre)!;
    for (const [name, r] of rows) assert.equal(r.as.length, r.T * pre.get(name)!.dA, name);
  });
});

// explain end to end: a tiny fp64 Llama (GQA), fitted factors, two training checkpoints
const fp64 = { precision: 'fp64' as const };
const makeModel = makeTinyLlama;

const RECORDS = [
  { text: 'The capital of France is Paris.' },
  { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
  { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
  { text: 'Berlin is the capital of Germany, a large city.' },
  { text: 'Tokyo is large.' },
];
const QUERIES = [
  { prompt: 'Q: capital of France?\nA:', completion: ' Paris is the capital' },
  { prompt: 'Where is Rome?', completion: ' Italy' },
];

describe('explain in the eigenbasis equals explain rotated back (tiny fp64 Llama)', () => {
  const dir = join(home, 'run');
  const data = join(home, 'train.jsonl');
  const factors = join(home, 'factors');
  let final: OpenedStage;
  let corpus: Corpus;
  let withCheckpoints: ExplainSetup;

  before(async () => {
    mkdirSync(home, { recursive: true });
    makeModel(dir, 2);
    makeModel(join(dir, 'checkpoint-1'), 3, { global_step: 1, learning_rate: 3e-3 });
    makeModel(join(dir, 'checkpoint-2'), 4, { global_step: 2, learning_rate: 1e-3 });
    writeFileSync(data, `${RECORDS.map((r) => JSON.stringify(r)).join('\n')}\n`);
    const fit = { dataPath: data, modules: 'all' as const, labels: 'empirical' as const, seed: 0, batchSize: 3 };
    await runFitJob({ ...fit, modelDir: dir, out: factors, model: Model.open(dir, fp64) });
    const damping = { relative: 0.1 };
    final = openStage(dir, factors, { damping, engine: fp64 });
    const plan = planCheckpoints(dir, final.model.checkpoint, 'auto')!;
    await fitCheckpoints(plan, { ...fit, factorsDir: factors, engine: fp64 });
    const opened = openCheckpointStages(plan, { factorsDir: factors, damping, engine: fp64, modules: 'all' });
    assert.deepEqual(opened.unfitted, []);
    withCheckpoints = { model: final, modules: 'all', checkpoints: opened };
    corpus = new Corpus(data, loadDataset(data), final.model);
  });
  after(() => {
    eigenbasisPolicy.force = undefined;
  });

  test('float32: the heatmap passes score rows given as rotated tokens as they score whole rows', async () => {
    const damping = { relative: 0.1 };
    const f32 = openStage(dir, factors, { damping, engine: {} });
    // the fp64-fitted factors, read into float32; the sum over the two training checkpoints too
    const plan = planCheckpoints(dir, f32.model.checkpoint, 'auto')!;
    const checkpoints = openCheckpointStages(plan, { factorsDir: factors, damping, engine: {}, modules: 'all' });
    assert.deepEqual(checkpoints.unfitted, []);
    const setups: Array<[string, ExplainSetup]> = [
      ['final model', { model: f32, modules: 'all' }],
      ['over checkpoints', { model: f32, modules: 'all', checkpoints }],
    ];
    const corpus32 = new Corpus(data, loadDataset(data), f32.model);
    const rowBytes = f32.model.modules('all').reduce((s, m) => s + m.dOut * (m.dIn + (m.hasBias ? 1 : 0)), 0) * 4;
    const saved = process.env.INFLUENCE_LENS_RUN_MB;
    try {
      // one whole row per pass (the pool's pass carries row 0 only, every completion token is in
      // the heatmap passes), and three (whole: the pool's pass carries two completion rows; as
      // tokens: none, since the heatmap passes take them all)
      for (const [label, setup] of setups)
        for (const wholeRows of [1, 3]) {
          process.env.INFLUENCE_LENS_RUN_MB = String((wholeRows * rowBytes + 1) / 2 ** 20);
          const run = () => explain(setup, corpus32, { ...QUERIES[0], method: 'ekfac', topK: RECORDS.length });
          heatmapRowsPolicy.force = 'whole';
          const want = await run();
          // at this tiny shape a row's tokens are no smaller than the row: forced
          heatmapRowsPolicy.force = 'tokens';
          const got = await run();
          const shown = (r: ExplainResult) => [...r.supporting, ...r.opposing].sort((a, b) => a.id.line - b.id.line);
          const [g, w] = [shown(got), shown(want)];
          assert.equal(g.length, RECORDS.length);
          assert.ok(w[0].completionTokenScores!.length >= 4);
          const what = `${label}, ${wholeRows} whole rows per pass`;
          const ec = relErr(flat(g.map((x) => x.completionTokenScores!)), flat(w.map((x) => x.completionTokenScores!)));
          assert.ok(ec <= 1e-4, `${what}: completion heatmap: ${ec}`);
          const et = relErr(flat(g.map((x) => x.tokenScores!.values)), flat(w.map((x) => x.tokenScores!.values)));
          assert.ok(et <= 1e-4, `${what}: training-token heatmap: ${et}`);
          assert.ok(
            relErr(
              g.map((x) => x.score),
              w.map((x) => x.score),
            ) <= 1e-5,
            `${what}: scores`,
          );
          for (const e of g) {
            const sum = e.completionTokenScores!.reduce((a, b) => a + b, 0);
            assert.ok(
              Math.abs(sum - e.score) <= 1e-4 * (Math.abs(e.score) + 1e-6),
              `${what}, line ${e.id.line}: ${sum} vs ${e.score}`,
            );
          }
        }
    } finally {
      heatmapRowsPolicy.force = undefined;
      if (saved === undefined) delete process.env.INFLUENCE_LENS_RUN_MB;
      else process.env.INFLUENCE_LENS_RUN_MB = saved;
    }
  });

  async function both(run: () => Promise<ExplainResult[]>) {
    eigenbasisPolicy.force = 'rotate-back';
    const want = await run();
    eigenbasisPolicy.force = 'eigenbasis';
    const got = await run();
    eigenbasisPolicy.force = undefined;
    return { got, want };
  }

  function sameResult(got: ExplainResult, want: ExplainResult, what: string) {
    const shown = (r: ExplainResult) => [...r.supporting, ...r.opposing];
    const g = shown(got);
    const w = shown(want);
    assert.ok(w.length === RECORDS.length, `${what}: every example shown`);
    assert.deepEqual(
      g.map((e) => e.id.line),
      w.map((e) => e.id.line),
      `${what}: order`,
    );
    const tol = 1e-10;
    const e = relErr(
      g.map((x) => x.score),
      w.map((x) => x.score),
    );
    assert.ok(e <= tol, `${what} scores: ${e}`);
    for (const m of want.modules) {
      const em = relErr(
        g.map((x) => x.perModule![m]),
        w.map((x) => x.perModule![m]),
      );
      assert.ok(em <= tol, `${what} ${m}: ${em}`);
    }
    const ec = relErr(flat(g.map((x) => x.completionTokenScores!)), flat(w.map((x) => x.completionTokenScores!)));
    assert.ok(ec <= tol, `${what} completion heatmap: ${ec}`);
    assert.ok(w[0].completionTokenScores!.length >= 1);
    const et = relErr(flat(g.map((x) => x.tokenScores!.values)), flat(w.map((x) => x.tokenScores!.values)));
    assert.ok(et <= tol, `${what} training-token heatmap: ${et}`);
  }

  const req = (q: (typeof QUERIES)[number]) => ({ ...q, method: 'ekfac' as const, topK: RECORDS.length, batchSize: 2 });

  test('final model: one query, and a batch of two', async () => {
    const setup: ExplainSetup = { model: final, modules: 'all' };
    const one = await both(async () => [await explain(setup, corpus, req(QUERIES[0]))]);
    sameResult(one.got[0], one.want[0], 'one query');
    const many = await both(() => explainMany(setup, corpus, QUERIES.map(req)));
    for (const i of [0, 1]) sameResult(many.got[i], many.want[i], `batch, query ${i}`);
  });

  test('summed over two checkpoints, each term in its own eigenbasis', async () => {
    const sum = await both(async () => [await explain(withCheckpoints, corpus, req(QUERIES[0]))]);
    assert.equal(sum.want[0].attribution?.over, 'checkpoints');
    sameResult(sum.got[0], sum.want[0], 'checkpoint sum');
  });

  test('a batch whose queries the rule splits (one in the eigenbasis, one rotated back) equals each query alone', async () => {
    const m = final.model;
    const pre = final.preconditioners!;
    const rows = QUERIES.map(
      (q) =>
        1 +
        tokenizeQuery(m.tokenizer, q.prompt, q.completion, contextLength(m.config)).weights.filter((w) => w > 0).length,
    );
    const decisions = rows.map((r) => eigenbasisCheaper(pre, pre.keys(), r, tokenCount(corpus.tokens)));
    assert.deepEqual(decisions, [true, false], `rows ${rows}`);
    const setup: ExplainSetup = { model: final, modules: 'all' };
    const many = await explainMany(setup, corpus, QUERIES.map(req));
    for (const [i, q] of QUERIES.entries()) {
      const alone = await explain(setup, corpus, req(q));
      assert.deepEqual(many[i].supporting, alone.supporting, `query ${i}`);
      assert.deepEqual(many[i].opposing, alone.opposing, `query ${i}`);
    }
  });

  test('the rule left alone gives the same result', async () => {
    const setup: ExplainSetup = { model: final, modules: 'all' };
    const natural = await explain(setup, corpus, req(QUERIES[0]));
    eigenbasisPolicy.force = 'rotate-back';
    const want = await explain(setup, corpus, req(QUERIES[0]));
    eigenbasisPolicy.force = undefined;
    sameResult(natural, want, 'natural');
  });
});
