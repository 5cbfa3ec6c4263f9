// With empirical labels the fit keeps the covariance pass's per-token rows and computes the
// eigenvalue correction Λ from them (ekfac/lambda-rows.ts) instead of a second forward and
// backward. The sums must be those of the Λ graph's own pass over the data, on padded batches, in
// fp64 and fp32, with and without a bias column, with sequences split across runs, and exactly
// those of the rows computed again (a resumed fit); the rows must never be kept for sampled labels
// (fresh labels in the correction) or over the budget.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  covarianceBytes,
  planBlocks,
  type RowModule,
  rowsBudgetBytes,
  sharedRotations,
} from '../../src/server/attribution/ekfac/lambda-rows';
import {
  type FitOptions,
  fitCovariances,
  fitEigenbases,
  fitLambdas,
  type TokenizedExample,
} from '../../src/server/attribution/fit';
import { Model } from '../../src/server/model/engine';
import { l2Rel as relErr } from './helpers/dense';

// different lengths: right-padded batches (of 3: lengths 2–5, 10–11, 12–12), the last two kept in
// one block of 12 (the 11-token batch padded again); prompt-like zero weights on some first tokens
const examples: TokenizedExample[] = [5, 11, 3, 12, 10, 12, 2, 11].map((n, k) => {
  const ids = Array.from({ length: n }, (_, t) => (7 * k + 13 * t + 1) % 100);
  return { ids, weights: ids.map((_, t) => (t < n - 1 && (k % 2 === 0 || t >= 2) ? 1 : 0)) };
});
const opts: FitOptions = { modules: 'all', labels: 'empirical', seed: 0, batchSize: 3 };

async function withEnv<T>(vars: Record<string, string | undefined>, f: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  for (const [k, v] of Object.entries(vars)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  try {
    return await f();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

for (const arch of ['llama', 'gpt2', 'gpt_neox']) {
  describe(`eigenvalue correction from kept rows (${arch})`, () => {
    const dir = join('test/fixtures/models', arch);
    for (const precision of ['fp64', 'fp32'] as const) {
      for (const runMb of [undefined, '0.001']) {
        test(`${precision}${runMb ? ', one sequence per run' : ''}: equals the Λ graph's pass over the data`, async () => {
          const model = Model.open(dir, { precision });
          const { covariances, rows } = await fitCovariances(model, examples, opts, { rows: true });
          assert.ok(rows, 'rows kept for empirical labels within the budget');
          assert.equal(rows.examples, examples.length);
          assert.deepEqual(
            rows.blocks.map((b) => [b!.B, b!.T]),
            [
              [3, 5],
              [5, 12],
            ],
          );
          const bases = await fitEigenbases(new Map(covariances), { precision: model.precision });
          const fromRows = await withEnv({ INFLUENCE_LENS_RUN_MB: runMb }, () =>
            fitLambdas(model, examples, bases, opts, rows),
          );
          assert.equal(rows.blocks.length, 0, 'the rows are consumed');
          // the Λ graph's own pass: what sampled labels, or rows over the budget, take
          const fromGraph = await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: '0' }, () =>
            fitLambdas(model, examples, bases, opts),
          );
          // without kept rows (a resumed fit, under the same settings) the same rows are computed
          // again: the same sums, bit for bit
          if (!runMb) {
            const again = await fitLambdas(model, examples, bases, opts);
            for (const [name, want] of fromRows) {
              assert.equal(again.get(name)!.count, want.count, name);
              assert.deepEqual(again.get(name)!.sum, want.sum, `${name}: rows computed again`);
            }
          }
          assert.equal(fromRows.size, fromGraph.size);
          for (const [name, want] of fromGraph) {
            const got = fromRows.get(name)!;
            assert.equal(got.count, want.count, name);
            const err = relErr(got.sum, want.sum);
            assert.ok(err < (precision === 'fp64' ? 1e-12 : 2e-6), `${name}: relative error ${err}`);
          }
          // a second use would be over nothing: refused
          await assert.rejects(
            fitLambdas(model, examples, bases, opts, { ...rows, blocks: [undefined] }),
            /already used/,
          );
        });
      }
    }
  });
}

test('blocks: runs join while the padding stays within the allowance, sorted runs only grow T', () => {
  const plan = planBlocks([
    { B: 3, T: 5 },
    { B: 3, T: 11 },
    { B: 2, T: 12 },
    { B: 8, T: 12 },
    { B: 1, T: 40 },
  ]);
  assert.deepEqual(plan.blocks, [
    { B: 3, T: 5 },
    { B: 13, T: 12 },
    { B: 1, T: 40 },
  ]);
  assert.deepEqual(plan.at, [
    { block: 0, offset: 0 },
    { block: 1, offset: 0 },
    { block: 1, offset: 3 },
    { block: 1, offset: 5 },
    { block: 2, offset: 0 },
  ]);
  // no allowance: only equal lengths join
  assert.deepEqual(
    planBlocks(
      [
        { B: 2, T: 7 },
        { B: 2, T: 7 },
        { B: 2, T: 8 },
      ],
      1,
    ).blocks,
    [
      { B: 4, T: 7 },
      { B: 2, T: 8 },
    ],
  );
});

test('the rows budget: twice the covariance sums, at most an eighth of the machine; the variable overrides it', async () => {
  const mods: RowModule[] = [
    { name: 'q', leader: 'q', dIn: 4, dOut: 4, hasBias: true },
    { name: 'k', leader: 'q', dIn: 4, dOut: 2, hasBias: true },
    { name: 'o', leader: 'o', dIn: 4, dOut: 3, hasBias: false },
  ];
  // A: 5² (q, shared by k) + 4² (o); S: 4² + 2² + 3²
  assert.equal(covarianceBytes(mods, false), (25 + 16 + 16 + 4 + 9) * 4);
  assert.equal(covarianceBytes(mods, true), (25 + 16 + 16 + 4 + 9) * 8);
  await withEnv({ INFLUENCE_LENS_MEMORY_MB: '8', INFLUENCE_LENS_FIT_ROWS_MB: undefined }, async () => {
    assert.equal(rowsBudgetBytes(100), 200);
    assert.equal(rowsBudgetBytes(2 ** 30), 2 ** 20);
  });
  await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: '3' }, async () => assert.equal(rowsBudgetBytes(100), 3 * 2 ** 20));
  await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: '0' }, async () => assert.equal(rowsBudgetBytes(2 ** 30), 0));
});

test('rows are not kept for sampled labels, over the budget, or when turned off', async () => {
  const model = Model.open('test/fixtures/models/llama');
  const sampled = await fitCovariances(model, examples, { ...opts, labels: 'sampled' }, { rows: true });
  assert.equal(sampled.rows, undefined);
  assert.equal((await fitCovariances(model, examples, opts)).rows, undefined, 'only when asked');
  for (const mb of ['0', '0.0001']) {
    const r = await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: mb }, () =>
      fitCovariances(model, examples, opts, { rows: true }),
    );
    assert.equal(r.rows, undefined, `INFLUENCE_LENS_FIT_ROWS_MB=${mb}`);
  }
  await assert.rejects(
    withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: 'lots' }, () => fitCovariances(model, examples, opts, { rows: true })),
    /INFLUENCE_LENS_FIT_ROWS_MB="lots"/,
  );
});

test('kept rows serve only the same examples with empirical labels', async () => {
  const model = Model.open('test/fixtures/models/gpt2');
  const { covariances, rows } = await fitCovariances(model, examples, opts, { rows: true });
  assert.ok(rows);
  const bases = await fitEigenbases(new Map(covariances), { precision: model.precision });
  await assert.rejects(
    fitLambdas(model, examples, bases, { ...opts, labels: 'sampled' }, rows),
    /only with empirical labels/,
  );
  await assert.rejects(fitLambdas(model, examples.slice(1), bases, opts, rows), /cover 8 examples.*7/);
});

test('q/k/v and gate/up rotate their shared rows once; modules with other rows or bases do not share', async () => {
  const model = Model.open('test/fixtures/models/llama');
  const { covariances, rows } = await fitCovariances(model, examples, opts, { rows: true });
  assert.ok(rows);
  const bases = await fitEigenbases(new Map(covariances), { precision: model.precision });
  const owner = sharedRotations(rows.modules, (n) => bases.get(n)!.qA);
  const find = (suffix: string) => rows.modules.find((m) => m.name.endsWith(suffix))!.name;
  assert.equal(owner.get(find('layers.0.self_attn.k_proj')), find('layers.0.self_attn.q_proj'));
  assert.equal(owner.get(find('layers.0.self_attn.v_proj')), find('layers.0.self_attn.q_proj'));
  assert.equal(owner.get(find('layers.0.mlp.up_proj')), find('layers.0.mlp.gate_proj'));
  assert.equal(owner.has(find('layers.0.self_attn.o_proj')), false);
  assert.equal(owner.has(find('layers.0.mlp.down_proj')), false);
  // equal rows but a different basis (as after a change to one module's factors): not shared
  const q = find('layers.0.self_attn.q_proj');
  const k = find('layers.0.self_attn.k_proj');
  const other = sharedRotations(rows.modules, (n) => {
    if (n !== k) return bases.get(n)!.qA;
    const x = Float64Array.from(bases.get(n)!.qA);
    x[0] += 1e-9;
    return x;
  });
  assert.equal(other.has(k), false);
  assert.equal(other.get(find('layers.0.self_attn.v_proj')), q);
});
