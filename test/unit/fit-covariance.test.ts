// The covariance pass accumulates Σ ã ãᵀ and Σ g gᵀ from the graph's per-token rows with BLAS
// syrk (lower triangle, mirrored on read), sharing one activation sum between modules that read
// the same input. Checked against the graph's own in-graph reduction (`covariance: true`, a
// separate Gemm per module over masked rows) on padded batches, in fp64 and fp32, with and
// without native BLAS.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { memoryBoundedBatches, runShape } from '../../src/server/attribution/chunking';
import { CovarianceAccumulator } from '../../src/server/attribution/ekfac/covariance';
import { fitCovariances, moduleShape, type TokenizedExample } from '../../src/server/attribution/fit';
import { mirrorLower, SYRK_MIN_BLOCKED, syrkLower } from '../../src/server/linalg/matrix';
import { resetNativeLapackForTests } from '../../src/server/linalg/native';
import { Model } from '../../src/server/model/engine';
import { l2Rel as relErr } from './helpers/dense';

// lengths differ so batches are right-padded; the pad rows carry real activations that must not count
const examples: TokenizedExample[] = [5, 9, 3, 12, 7, 12, 2].map((n, k) => {
  const ids = Array.from({ length: n }, (_, t) => (7 * k + 13 * t + 1) % 100);
  return { ids, weights: ids.map((_, t) => (t < n - 1 ? 1 : 0)) };
});

/** The reference: the graph's in-graph sums, batch by batch. */
async function inGraphSums(model: Model) {
  const graph = await model.compile({ labels: 'data', covariance: true, modules: 'all' });
  // modules that read one input share one in-graph Σ a aᵀ: one output, the other names alias it
  const sharing = graph.moduleInfo.filter((m) => /(k_proj|v_proj|up_proj)$/.test(m.name));
  for (const m of sharing) {
    const owner = m.name.replace(/(k_proj|v_proj)$/, 'q_proj').replace(/up_proj$/, 'gate_proj');
    assert.equal(graph.aliases.get(`A.${m.name}`), `A.${owner}`);
  }
  assert.equal(graph.aliases.size, sharing.length);
  assert.equal(graph.session.outputNames.length + graph.aliases.size, graph.outputNames.length);
  const accs = new Map(graph.moduleInfo.map((m) => [m.name, new CovarianceAccumulator(moduleShape(m))]));
  const bs = memoryBoundedBatches(examples, 3, 0, runShape(graph.moduleInfo, model.config, false, graph.fp64));
  for (const { batch } of bs) {
    const out = await graph.run(batch);
    const n = Number((out.token_count.data as Float32Array)[0]);
    for (const m of graph.moduleInfo)
      accs.get(m.name)!.addSums(out[`A.${m.name}`].data as Float64Array, n, out[`S.${m.name}`].data as Float64Array, n);
  }
  return accs;
}

for (const arch of ['llama', 'gpt2', 'gpt_neox']) {
  describe(`covariance pass from per-token rows (${arch})`, () => {
    const dir = join('test/fixtures/models', arch);
    for (const lapack of ['on', 'off']) {
      test(`fp64 equals the in-graph reduction on padded batches (native BLAS ${lapack})`, async () => {
        const saved = process.env.INFLUENCE_LENS_LAPACK;
        process.env.INFLUENCE_LENS_LAPACK = lapack;
        resetNativeLapackForTests();
        try {
          const model = Model.open(dir, { precision: 'fp64' });
          const want = await inGraphSums(model);
          const { covariances } = await fitCovariances(model, examples, {
            modules: 'all',
            labels: 'empirical',
            seed: 0,
            batchSize: 3,
          });
          assert.deepEqual([...covariances.keys()], [...want.keys()]);
          for (const [name, acc] of covariances) {
            const ref = want.get(name)!;
            assert.equal(acc.precision, 'fp64');
            assert.equal(acc.activationCount, ref.activationCount, `${name} token count`);
            assert.equal(acc.gradientCount, ref.gradientCount);
            assert.ok(relErr(acc.activationSum, ref.activationSum) < 1e-12, `${name} A`);
            assert.ok(relErr(acc.gradientSum, ref.gradientSum) < 1e-12, `${name} S`);
          }
        } finally {
          if (saved === undefined) delete process.env.INFLUENCE_LENS_LAPACK;
          else process.env.INFLUENCE_LENS_LAPACK = saved;
          resetNativeLapackForTests();
        }
      });
    }

    test('fp32 keeps float32 sums within float32 rounding of the fp64 ones; same-input modules share one', async () => {
      const { covariances: c32 } = await fitCovariances(Model.open(dir), examples, {
        modules: 'all',
        labels: 'empirical',
        seed: 0,
        batchSize: 3,
      });
      const { covariances: c64 } = await fitCovariances(Model.open(dir, { precision: 'fp64' }), examples, {
        modules: 'all',
        labels: 'empirical',
        seed: 0,
        batchSize: 3,
      });
      for (const [name, acc] of c32) {
        assert.ok(acc.activationSum instanceof Float32Array && acc.gradientSum instanceof Float32Array, name);
        assert.ok(relErr(acc.activationSum, c64.get(name)!.activationSum) < 1e-5, `${name} A`);
        assert.ok(relErr(acc.gradientSum, c64.get(name)!.gradientSum) < 1e-5, `${name} S`);
      }
      if (arch === 'llama') {
        const q = c32.get('model.layers.0.self_attn.q_proj')!;
        const k = c32.get('model.layers.0.self_attn.k_proj')!;
        const o = c32.get('model.layers.0.self_attn.o_proj')!;
        assert.ok(q.sharesActivationsWith(k) && !q.sharesActivationsWith(o));
        assert.ok(
          c32.get('model.layers.0.mlp.gate_proj')!.sharesActivationsWith(c32.get('model.layers.0.mlp.up_proj')!),
        );
      }
    });
  });
}

test('syrkLower adds XᵀX to the lower triangle of a block inside a larger matrix and nothing outside the block', () => {
  const n = 5;
  const ldc = 7;
  const rows = 4;
  const X = Float64Array.from({ length: rows * n }, (_, i) => Math.sin(i + 1));
  const C = new Float64Array(ldc * ldc).fill(0.5);
  syrkLower(X, rows, n, C, ldc);
  for (let i = 0; i < ldc; i++)
    for (let j = 0; j < ldc; j++) {
      let want = 0.5;
      if (i < n && j < n) for (let t = 0; t < rows; t++) want += X[t * n + i] * X[t * n + j];
      // the upper triangle inside the block may be left as it was (JS) or written (BLAS)
      if (i < n && j > i && C[i * ldc + j] === 0.5) continue;
      assert.ok(Math.abs(C[i * ldc + j] - want) < 1e-12, `C[${i}][${j}]`);
    }
  mirrorLower(C, n, ldc);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) assert.equal(C[i * ldc + j], C[j * ldc + i]);
  assert.throws(() => syrkLower(Float32Array.from(X), rows, n, C, ldc), /same precision/);
});

test('syrkLower in column blocks (n >= SYRK_MIN_BLOCKED) matches a plain fp64 sum in fp32 and fp64, block inside a larger matrix', () => {
  const n = SYRK_MIN_BLOCKED + 37; // blocks that do not divide n evenly
  const ldc = n + 3;
  const rows = 9;
  const X = Float64Array.from({ length: rows * n }, (_, i) => Math.sin(0.37 * i + 1));
  const want = new Float64Array(n * n);
  for (let t = 0; t < rows; t++)
    for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) want[i * n + j] += X[t * n + i] * X[t * n + j];
  for (const [Ctor, tol] of [
    [Float64Array, 1e-12],
    [Float32Array, 1e-5],
  ] as const) {
    const C = new Ctor(ldc * ldc).fill(0.25);
    syrkLower(Ctor.from(X), rows, n, C, ldc);
    let worst = 0;
    for (let i = 0; i < ldc; i++)
      for (let j = 0; j < ldc; j++) {
        const v = C[i * ldc + j];
        if (i >= n || j >= n) assert.equal(v, 0.25, `${Ctor.name} C[${i}][${j}] outside the block`);
        else if (j <= i) worst = Math.max(worst, Math.abs(v - 0.25 - want[i * n + j]));
      }
    assert.ok(worst < tol * rows, `${Ctor.name}: max error ${worst}`);
  }
});

test('unweighted rows: Σ a aᵀ with the bias row and corner (Σ a and the count)', () => {
  const acc = new CovarianceAccumulator({ name: 'm', dIn: 3, dOut: 2, appendOne: true }, { precision: 'fp32' });
  acc.addActivationRows(new Float32Array([1, 2, 3, 4, 5, 6]), 2);
  const A = acc.activationSum;
  assert.deepEqual(Array.from(A.subarray(12, 16)), [5, 7, 9, 2]);
  assert.deepEqual(Array.from([A[3], A[7], A[11]]), [5, 7, 9]);
  assert.deepEqual(Array.from(A.subarray(0, 3)), [17, 22, 27]);
});

for (const precision of ['fp32', 'fp64'] as const) {
  const Ctor = precision === 'fp32' ? Float32Array : Float64Array;
  test(`${precision}: a NaN or Inf in unweighted rows is refused, naming module, batch, row and column, and the sum is refused after`, () => {
    // n = 1,100 takes syrkLower's blocked path: the check must see every column block's diagonal
    for (const n of [3, 1100]) {
      for (const [bad, label] of [
        [Number.NaN, 'NaN'],
        [Number.POSITIVE_INFINITY, 'Inf'],
        [Number.NEGATIVE_INFINITY, 'Inf'],
      ] as const) {
        for (const col of [0, n - 1]) {
          const acc = new CovarianceAccumulator({ name: 'm', dIn: n, dOut: n, appendOne: false }, { precision });
          const rows = Ctor.from(Array.from({ length: 4 * n }, (_, i) => ((i * 7) % 5) - 2));
          acc.addActivationRows(rows, 4).addGradientRows(rows, 4);
          const x = Ctor.from(rows);
          x[2 * n + col] = bad;
          assert.throws(
            () => acc.addActivationRows(x, 4),
            new RegExp(`${label} in activations of module m in batch 1 at row 2, column ${col}$`),
          );
          assert.throws(
            () => acc.addGradientRows(x, 4),
            new RegExp(`${label} in output gradients of module m in batch 1 at row 2, column ${col}$`),
          );
          assert.throws(() => acc.finalize(), /(NaN|Inf) in activation covariance of module m/);
        }
      }
    }
  });
}

test('fp32: finite rows whose squares overflow the sum are refused as an overflow', () => {
  const acc = new CovarianceAccumulator({ name: 'm', dIn: 2, dOut: 2, appendOne: false }, { precision: 'fp32' });
  assert.throws(
    () => acc.addGradientRows(new Float32Array([1, 3e19, 2, 1]), 2),
    /output gradients of module m in batch 1: Σ x xᵀ overflowed float32 in column 1 \(values up to 3\.00e\+19\)/,
  );
});

test('sampled labels are drawn per example: batch size and partitions change the sums only by rounding, the seed changes them', async () => {
  // --batch-size 2 against 16 moved a covariance by up to 109% (a label stream per batch), as another seed does
  const model = Model.open('test/fixtures/models/llama', { precision: 'fp64' });
  const fit = (batchSize: number, seed = 5, partition?: { index: number; count: number }) =>
    fitCovariances(model, examples, { modules: 'all', labels: 'sampled', seed, batchSize, partition }).then(
      (r) => r.covariances,
    );
  const [b16, b2, other] = await Promise.all([fit(16), fit(2), fit(16, 6)]);
  // two partitions' sums add up to the whole fit's (what the fit job does)
  const [p0, p1] = await Promise.all([fit(3, 5, { index: 0, count: 2 }), fit(3, 5, { index: 1, count: 2 })]);
  let moved = 0;
  for (const [name, acc] of b16) {
    assert.ok(relErr(b2.get(name)!.gradientSum, acc.gradientSum) < 1e-12, `${name}: batch size 2 vs 16`);
    const halves = Float64Array.from(p0.get(name)!.gradientSum, (x, i) => x + p1.get(name)!.gradientSum[i]);
    assert.ok(relErr(halves, acc.gradientSum) < 1e-12, `${name}: partitions`);
    moved = Math.max(moved, relErr(other.get(name)!.gradientSum, acc.gradientSum));
  }
  assert.ok(moved > 1e-3, `another seed draws other labels (largest change ${moved})`);
});
