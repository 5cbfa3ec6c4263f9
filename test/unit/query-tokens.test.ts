// Query gradients kept as tokens (g, ã) and preconditioned from them must equal the old path:
// the full per-example gradient G formed by the graph (`exampleGrads`), then `precondition`.
//  - synthetic: `preconditionTokens`/`preconditionTokens32` against `precondition` of G = gᵀ ã
//    formed densely, on shapes where the token rotation is chosen and where forming G is;
//  - tiny models: `queryGradients` (with per-completion-token rows) and `queryBatchGradients`
//    (queries of different lengths, so padding) against the exampleGrads graph's G, in fp64 to
//    ~1e-10 and in fp32 to float rounding, single-stage and multi-stage.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  makePreconditioner,
  type Preconditioner,
  precondition,
  preconditionTokens,
  preconditionTokens32,
  rotateBack32,
  singlePrecision,
  type TokenRows,
} from '../../src/server/attribution/ekfac/precondition';
import {
  denseGradients,
  queryBatchGradients,
  queryGradients,
  queryMatrices,
} from '../../src/server/attribution/influence';
import { type Floats, gemm } from '../../src/server/linalg/matrix';
import { Model, makeBatch } from '../../src/server/model/engine';
import { Rng } from '../../src/server/util/random';
import { maxRel } from './helpers/dense';
import { useTempHome } from './helpers/env';
import { orthogonal } from './helpers/orthogonal';

useTempHome();

const relErr = maxRel;

/** A preconditioner with random eigenbases and a random positive Λ spread over four decades. */
function randomPreconditioner(module: string, dOut: number, dA: number, rng: Rng): Preconditioner {
  const lambda = new Float64Array(dOut * dA);
  for (let i = 0; i < lambda.length; i++) lambda[i] = 10 ** (4 * rng.next() - 2);
  const basis = {
    module,
    dOut,
    dA,
    qA: orthogonal(dA, rng),
    eigA: new Float64Array(dA),
    qS: orthogonal(dOut, rng),
    eigS: new Float64Array(dOut),
  };
  return makePreconditioner(basis, lambda, { relative: 0.1 });
}

function randomRows(n: number, rng: Rng): Float64Array {
  const x = new Float64Array(n);
  for (let i = 0; i < n; i++) x[i] = rng.normal();
  return x;
}

/** G_r = g_rᵀ ã_{src[r]} (first T_r rows), formed densely in fp64. */
function denseRow(t: TokenRows, r: number): Float64Array {
  const g = Float64Array.from(t.g[r]);
  const a = Float64Array.from(t.a[t.src[r]]);
  const T = g.length / t.dOut;
  return gemm(g, a.subarray(0, T * t.dA), t.dOut, T, t.dA, { transA: true });
}

describe('preconditioning from tokens (synthetic)', () => {
  // [dOut, dA, T]: the first two rotate from the tokens, the last forms G (T > d)
  const shapes: Array<[number, number, number]> = [
    [48, 41, 6],
    [20, 65, 9],
    [6, 5, 40],
  ];
  for (const [dOut, dA, T] of shapes) {
    test(`${dOut}×${dA}, ${T} tokens: two forwards, rows of different lengths, as precondition(gᵀã)`, () => {
      const rng = new Rng(dOut * 1000 + dA);
      const p = randomPreconditioner(`m${dOut}x${dA}`, dOut, dA, rng);
      // forward 0 has T tokens and three rows (one trimmed to 2 tokens); forward 1 has T - 1 tokens
      const lens = [T, 2, T - 1, T - 1];
      const src = [0, 0, 1, 0];
      const t: TokenRows = {
        dOut,
        dA,
        a: [randomRows(T * dA, rng), randomRows((T - 1) * dA, rng)],
        g: lens.map((L) => randomRows(L * dOut, rng)),
        src,
      };
      const want = t.g.map((_, r) => precondition(p, denseRow(t, r)));
      const got = preconditionTokens(p, t);
      assert.ok(got instanceof Float64Array);
      assert.equal(got.length, lens.length * dOut * dA);
      const size = dOut * dA;
      for (const [r, w] of want.entries()) {
        const e = relErr(got.subarray(r * size, (r + 1) * size), w);
        assert.ok(e <= 1e-10, `fp64 row ${r}: ${e}`);
      }
      const t32: TokenRows = { ...t, a: t.a.map((x) => Float32Array.from(x)), g: t.g.map((x) => Float32Array.from(x)) };
      const got32 = preconditionTokens32(p, t32);
      assert.ok(got32 instanceof Float32Array);
      for (const [r, w] of want.entries()) {
        const e = relErr(got32.subarray(r * size, (r + 1) * size), w);
        assert.ok(e <= 1e-4, `fp32 row ${r}: ${e}`);
      }
      // left in the eigenbasis (each row written in place), every row rotates back to the same P(G_r)
      const f = singlePrecision(p);
      const eig32 = preconditionTokens32(p, t32, f, false);
      for (const [r, w] of want.entries()) {
        const e = relErr(rotateBack32(p, eig32.subarray(r * size, (r + 1) * size), f), w);
        assert.ok(e <= 1e-4, `fp32 eigenbasis row ${r}: ${e}`);
      }
    });
  }

  test('refuses tokens that do not fit the preconditioner', () => {
    const rng = new Rng(7);
    const p = randomPreconditioner('m', 4, 3, rng);
    const ok: TokenRows = { dOut: 4, dA: 3, a: [randomRows(6, rng)], g: [randomRows(8, rng)], src: [0] };
    assert.throws(() => preconditionTokens(p, { ...ok, dA: 5 }), /tokens of a 4×5 module/);
    assert.throws(() => preconditionTokens(p, { ...ok, g: [randomRows(12, rng)] }), /T_r <= 2/);
    assert.throws(() => preconditionTokens(p, { ...ok, src: [1] }), /names forward 1 of 1/);
    assert.throws(() => preconditionTokens(p, { ...ok, a: [randomRows(7, rng)] }), /not T × 3/);
    assert.throws(() => preconditionTokens32(p, ok), /must be float32/);
  });
});

/** The old path's input: G of every row from the exampleGrads graph, one run per row. */
async function graphGradients(model: Model, rows: Array<{ ids: number[]; weights: number[] }>) {
  const graph = await model.compile({ labels: 'data', exampleGrads: true, modules: 'all' });
  const G = new Map<string, Floats[]>(graph.moduleInfo.map((m) => [m.name, []]));
  for (const row of rows) {
    const out = await graph.run(makeBatch([row], model.tokenizer.padTokenId ?? 0));
    for (const m of graph.moduleInfo) G.get(m.name)!.push(out[`G.${m.name}`].data as Floats);
  }
  return G;
}

function preconditionersFor(model: Model, seed: number): Map<string, Preconditioner> {
  const rng = new Rng(seed);
  return new Map(
    model.modules('all').map((m) => [m.name, randomPreconditioner(m.name, m.dOut, m.dIn + (m.hasBias ? 1 : 0), rng)]),
  );
}

function compare(got: Map<string, Floats[]>, want: Map<string, Floats[]>, tol: number, what: string) {
  assert.deepEqual([...got.keys()], [...want.keys()]);
  for (const [name, rows] of want) {
    const mine = got.get(name)!;
    assert.equal(mine.length, rows.length, `${what} ${name}: rows`);
    for (const [r, w] of rows.entries()) {
      const e = relErr(mine[r], w);
      assert.ok(e <= tol, `${what} ${name} row ${r}: relative error ${e}`);
    }
  }
}

for (const [fixture, precision] of [
  ['gpt2', 'fp64'],
  ['llama', 'fp64'],
  ['gpt2', 'fp32'],
] as const) {
  describe(`query gradients as tokens (${fixture}, ${precision})`, () => {
    const model = Model.open(join('test/fixtures/models', fixture), { precision });
    const tol = precision === 'fp64' ? 1e-10 : 2e-4;
    const ids = [5, 17, 3, 22, 9, 14, 30, 2, 11, 7, 19];
    // loss on positions 6..9 (tokens 7..10); the last position carries no loss
    const query = { ids, weights: ids.map((_, t) => (t >= 6 && t < ids.length - 1 ? 1 : 0)) };
    const pre = preconditionersFor(model, 1);
    const pre2 = preconditionersFor(model, 2);

    test('per-completion-token rows: G and P(G) equal the exampleGrads graph and precondition', async () => {
      const qg = await queryGradients(model, query, { modules: 'all', perCompletionToken: true });
      const targets = qg.targetPositions;
      assert.equal(qg.rows, 1 + targets.length);
      const rows = [query, ...targets.map((t) => ({ ids, weights: ids.map((_, u) => (u === t ? 1 : 0)) }))];
      const want = await graphGradients(model, rows);
      // one forward's ã serves every row
      for (const t of qg.tokens.values()) {
        assert.equal(t.a.length, 1);
        assert.deepEqual(t.src, new Array(rows.length).fill(0));
        // row k's gradient stops at its completion token: later tokens carry none
        for (const [k, target] of targets.entries()) assert.ok(t.g[k + 1].length / t.dOut <= target + 1);
      }
      compare(qg.G, want, tol, 'G');
      compare(queryMatrices(qg.tokens, [pre]), queryMatrices(want, [pre]), tol, 'P(G)');
      compare(queryMatrices(qg.tokens, [pre, pre2]), queryMatrices(want, [pre, pre2]), tol, 'P2(P1(G))');
    });

    test('a batch of queries of different lengths (padding): each row equals its own graph run', async () => {
      const queries = [
        query,
        { ids: ids.slice(0, 5), weights: [0, 0, 1, 1, 0] },
        { ids: ids.slice(2, 9), weights: [0, 1, 0, 1, 1, 1, 0] },
      ];
      const tokens = await queryBatchGradients(model, queries, { modules: 'all' });
      for (const t of tokens.values()) {
        assert.deepEqual(t.src, [0, 1, 2]);
        // padding never enters ã
        for (const [q, a] of t.a.entries()) assert.equal(a.length, queries[q].ids.length * t.dA);
      }
      const want = await graphGradients(model, queries);
      compare(denseGradients(tokens), want, tol, 'G');
      compare(queryMatrices(tokens, [pre]), queryMatrices(want, [pre]), tol, 'P(G)');
      compare(queryMatrices(tokens, [pre2, pre]), queryMatrices(want, [pre2, pre]), tol, 'P1(P2(G))');
    });
  });
}
