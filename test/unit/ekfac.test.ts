// EK-FAC against a dense fp64 reference: the Kronecker-factored matrix is built explicitly,
// inverted by Gauss-Jordan, and must give the same scores as the fast path.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { CovarianceAccumulator } from '../../src/server/attribution/ekfac/covariance';
import { computeEigenbasis, type Eigenbasis } from '../../src/server/attribution/ekfac/eigenbasis';
import { factorDim, type ModuleShape } from '../../src/server/attribution/ekfac/gradient';
import { LambdaAccumulator } from '../../src/server/attribution/ekfac/lambda';
import {
  lowRank,
  lowRankToDense,
  makePreconditioner,
  type Preconditioner,
  precondition,
  precondition32,
  resolveDamping,
} from '../../src/server/attribution/ekfac/precondition';
import { eigh } from '../../src/server/linalg/eigh';
import { Rng } from '../../src/server/util/random';
import { gaussJordanInverse, kron, matVec, maxRel } from './helpers/dense';
import {
  exampleGradient,
  gradientCosine,
  gradientDot,
  innerProduct,
  kfacLambda,
  type ModuleGradients,
  pairwiseScores,
  perTokenScores,
  preconditionQuery,
  selfInfluence,
} from './helpers/ekfac-reference';

const MODULES: ModuleShape[] = [
  { name: 'h.0.mlp.fc', dIn: 5, dOut: 4, appendOne: true },
  { name: 'h.0.mlp.proj', dIn: 5, dOut: 4, appendOne: false },
  { name: 'h.1.attn.qkv', dIn: 3, dOut: 6, appendOne: true },
];

interface Example {
  rows: number;
  a: Record<string, Float32Array>;
  g: Record<string, Float32Array>;
}

function makeExamples(count: number, seed: number): Example[] {
  const rng = new Rng(seed);
  const out: Example[] = [];
  for (let e = 0; e < count; e++) {
    const rows = 2 + rng.int(6);
    const ex: Example = { rows, a: {}, g: {} };
    for (const m of MODULES) {
      // correlated, non-zero-mean activations make A and S far from the identity
      const mix = Float32Array.from({ length: m.dIn }, () => rng.normal());
      ex.a[m.name] = Float32Array.from({ length: rows * m.dIn }, (_, i) => rng.normal() + 0.7 * mix[i % m.dIn] + 0.3);
      ex.g[m.name] = Float32Array.from({ length: rows * m.dOut }, (_, i) => rng.normal() * (1 + (i % m.dOut)));
    }
    out.push(ex);
  }
  return out;
}

/** G = Σ_t g_t ã_tᵀ with plain loops (reference). */
function naiveGradient(m: ModuleShape, a: Float32Array, g: Float32Array, rows: number): Float64Array {
  const dA = factorDim(m);
  const G = new Float64Array(m.dOut * dA);
  for (let t = 0; t < rows; t++) {
    for (let i = 0; i < m.dOut; i++) {
      for (let j = 0; j < dA; j++) G[i * dA + j] += g[t * m.dOut + i] * (j < m.dIn ? a[t * m.dIn + j] : 1);
    }
  }
  return G;
}

function relErr(x: number, y: number) {
  return Math.abs(x - y) / Math.max(Math.abs(y), 1e-300);
}

/** The fast path end to end: covariances → eigenbases → Λ → preconditioners. */
function fit(fitSet: Example[]) {
  const bases: Record<string, Eigenbasis> = {};
  const lambdas: Record<string, Float64Array> = {};
  const pre: Record<string, Preconditioner> = {};
  for (const m of MODULES) {
    const cov = new CovarianceAccumulator(m);
    for (const ex of fitSet) cov.add(ex.a[m.name], ex.g[m.name], ex.rows);
    bases[m.name] = computeEigenbasis(m.name, cov.finalize());
    const lam = new LambdaAccumulator(bases[m.name]);
    for (const ex of fitSet) lam.addTokens(ex.a[m.name], ex.g[m.name], ex.rows, m.appendOne);
    lambdas[m.name] = lam.mean();
    pre[m.name] = makePreconditioner(bases[m.name], lambdas[m.name]);
  }
  return { bases, lambdas, pre };
}

function gradientsOf(ex: Example): ModuleGradients {
  const G: ModuleGradients = {};
  for (const m of MODULES) G[m.name] = exampleGradient(m, ex.a[m.name], ex.g[m.name], ex.rows);
  return G;
}

describe('EK-FAC against a dense reference', () => {
  const fitSet = makeExamples(12, 1);
  const queries = makeExamples(3, 2);
  const candidates = makeExamples(5, 3);
  const { bases, lambdas, pre } = fit(fitSet);

  test('per-example gradients match Σ_t g_t ã_tᵀ', () => {
    for (const m of MODULES) {
      const ex = fitSet[0];
      const G = exampleGradient(m, ex.a[m.name], ex.g[m.name], ex.rows);
      assert.ok(maxRel(G, naiveGradient(m, ex.a[m.name], ex.g[m.name], ex.rows)) <= 1e-12);
    }
  });

  test('Λ is the diagonal of the gradient second moment in the Kronecker eigenbasis', () => {
    for (const m of MODULES) {
      const { qA, qS, dA, dOut } = bases[m.name];
      const N = dOut * dA;
      // F = mean vec(G) vec(G)ᵀ over the fitting examples; Λ = diag(Kᵀ F K)
      const F = new Float64Array(N * N);
      for (const ex of fitSet) {
        const g = naiveGradient(m, ex.a[m.name], ex.g[m.name], ex.rows);
        for (let i = 0; i < N; i++) for (let j = 0; j < N; j++) F[i * N + j] += (g[i] * g[j]) / fitSet.length;
      }
      const K = kron(qS, dOut, qA, dA);
      for (let c = 0; c < N; c++) {
        let d = 0;
        for (let i = 0; i < N; i++) for (let j = 0; j < N; j++) d += K[i * N + c] * F[i * N + j] * K[j * N + c];
        assert.ok(relErr(lambdas[m.name][c], d) <= 1e-9, `${m.name}[${c}]: ${lambdas[m.name][c]} vs ${d}`);
      }
    }
  });

  test('pairwise scores equal vec(G_q)ᵀ H⁻¹ vec(G_z) with H = K diag(Λ + λ) Kᵀ inverted densely', () => {
    const Pq = queries.map((q) => preconditionQuery(pre, gradientsOf(q)));
    const scores = pairwiseScores(Pq, candidates.map(gradientsOf));
    assert.equal(scores.total.length, queries.length * candidates.length);
    const total = new Float64Array(scores.total.length);
    for (const m of MODULES) {
      const dA = factorDim(m);
      const N = m.dOut * dA;
      // reference: A, S from plain loops over all fitting tokens, their eigenbases, Λ via K
      const A = new Float64Array(dA * dA);
      const S = new Float64Array(m.dOut * m.dOut);
      let tokens = 0;
      for (const ex of fitSet) {
        for (let t = 0; t < ex.rows; t++) {
          const at = (j: number) => (j < m.dIn ? ex.a[m.name][t * m.dIn + j] : 1);
          for (let i = 0; i < dA; i++) for (let j = 0; j < dA; j++) A[i * dA + j] += at(i) * at(j);
          for (let i = 0; i < m.dOut; i++)
            for (let j = 0; j < m.dOut; j++)
              S[i * m.dOut + j] += ex.g[m.name][t * m.dOut + i] * ex.g[m.name][t * m.dOut + j];
          tokens++;
        }
      }
      const eA = eigh(
        A.map((v) => v / tokens),
        dA,
        { backend: 'js' },
      );
      const eS = eigh(
        S.map((v) => v / tokens),
        m.dOut,
        { backend: 'js' },
      );
      const K = kron(eS.vectors, m.dOut, eA.vectors, dA);
      const lam = new Float64Array(N);
      for (const ex of fitSet) {
        const g = naiveGradient(m, ex.a[m.name], ex.g[m.name], ex.rows);
        for (let c = 0; c < N; c++) {
          let s = 0;
          for (let i = 0; i < N; i++) s += K[i * N + c] * g[i];
          lam[c] += (s * s) / fitSet.length;
        }
      }
      const damping = (0.1 * lam.reduce((x, y) => x + y, 0)) / N;
      const H = new Float64Array(N * N);
      for (let i = 0; i < N; i++)
        for (let j = 0; j < N; j++) {
          let s = 0;
          for (let c = 0; c < N; c++) s += K[i * N + c] * (lam[c] + damping) * K[j * N + c];
          H[i * N + j] = s;
        }
      const Hinv = gaussJordanInverse(H, N);
      assert.ok(relErr(pre[m.name].damping, damping) <= 1e-9, `damping ${pre[m.name].damping} vs ${damping}`);
      for (let q = 0; q < queries.length; q++) {
        const x = matVec(Hinv, naiveGradient(m, queries[q].a[m.name], queries[q].g[m.name], queries[q].rows));
        for (let c = 0; c < candidates.length; c++) {
          const gz = naiveGradient(m, candidates[c].a[m.name], candidates[c].g[m.name], candidates[c].rows);
          let ref = 0;
          for (let i = 0; i < N; i++) ref += x[i] * gz[i];
          const got = scores.perModule[m.name][q * candidates.length + c];
          assert.ok(relErr(got, ref) <= 1e-6, `${m.name} q${q} c${c}: ${got} vs ${ref}`);
          total[q * candidates.length + c] += ref;
        }
      }
    }
    for (let i = 0; i < total.length; i++) assert.ok(relErr(scores.total[i], total[i]) <= 1e-6, `total ${i}`);
  });

  test('with Λ = λ_S λ_Aᵀ the preconditioner is (S ⊗ A + λI)⁻¹ (K-FAC)', () => {
    for (const m of MODULES) {
      const cov = new CovarianceAccumulator(m);
      for (const ex of fitSet) cov.add(ex.a[m.name], ex.g[m.name], ex.rows);
      const { A, S, dA, dOut } = cov.finalize();
      const basis = computeEigenbasis(m.name, { A, S, dA, dOut });
      const p = makePreconditioner(basis, kfacLambda(basis), { relative: 0.1 });
      const N = dOut * dA;
      // row-major vec: vec(S X A) = (S ⊗ A) vec(X)
      const H = new Float64Array(N * N);
      for (let i = 0; i < dOut; i++)
        for (let j = 0; j < dA; j++)
          for (let k = 0; k < dOut; k++)
            for (let l = 0; l < dA; l++) H[(i * dA + j) * N + k * dA + l] = S[i * dOut + k] * A[j * dA + l];
      for (let i = 0; i < N; i++) H[i * N + i] += p.damping;
      const V = naiveGradient(m, queries[0].a[m.name], queries[0].g[m.name], queries[0].rows);
      const want = matVec(gaussJordanInverse(H, N), V);
      assert.ok(maxRel(precondition(p, V), want) <= 1e-9, m.name);
      // the float32 path (query rows for float32 graphs) is the same map up to float32 rounding
      const single = precondition32(p, Float32Array.from(V));
      assert.ok(single instanceof Float32Array);
      assert.ok(maxRel(Float64Array.from(single), want) <= 1e-4, `${m.name} (float32)`);
    }
  });

  test('training-side token scores sum to the total score (dense and low-rank queries)', () => {
    const Gq = gradientsOf(queries[0]);
    for (const rank of [0, 2]) {
      const M = preconditionQuery(pre, Gq, rank ? { rank } : {});
      for (const z of candidates) {
        const perToken = new Float64Array(z.rows);
        for (const m of MODULES) {
          const c = perTokenScores(M[m.name], z.a[m.name], z.g[m.name], z.rows, m);
          assert.equal(c.length, z.rows);
          for (let t = 0; t < z.rows; t++) perToken[t] += c[t];
        }
        const sum = perToken.reduce((x, y) => x + y, 0);
        const total = pairwiseScores([M], [gradientsOf(z)]).total[0];
        assert.ok(relErr(sum, total) <= 1e-10, `rank ${rank}: Σ c_t = ${sum}, score = ${total}`);
      }
    }
  });

  test('full-rank low-rank queries reproduce the exact scores', () => {
    const exact = pairwiseScores(
      queries.map((q) => preconditionQuery(pre, gradientsOf(q))),
      candidates.map(gradientsOf),
    );
    const full = pairwiseScores(
      queries.map((q) => preconditionQuery(pre, gradientsOf(q), { rank: 100 })),
      candidates.map(gradientsOf),
    );
    assert.ok(maxRel(full.total, exact.total) <= 1e-10);
    // and a truncated rank changes them (the comparison above can fail)
    const r1 = pairwiseScores(
      queries.map((q) => preconditionQuery(pre, gradientsOf(q), { rank: 1 })),
      candidates.map(gradientsOf),
    );
    assert.ok(maxRel(r1.total, exact.total) > 1e-3);
  });

  test('self-influence is positive and equals the pairwise score of an example with itself', () => {
    for (const z of candidates) {
      const G = gradientsOf(z);
      const s = selfInfluence(pre, G);
      assert.ok(s.total > 0);
      for (const m of MODULES) assert.ok(s.perModule[m.name] > 0);
      const pair = pairwiseScores([preconditionQuery(pre, G)], [G]).total[0];
      assert.ok(relErr(s.total, pair) <= 1e-10, `${s.total} vs ${pair}`);
    }
  });

  test('gradient dot product and cosine baselines', () => {
    const Gq = gradientsOf(queries[0]);
    const Gz = gradientsOf(candidates[0]);
    let ref = 0;
    for (const m of MODULES) for (let i = 0; i < Gq[m.name].length; i++) ref += Gq[m.name][i] * Gz[m.name][i];
    assert.ok(relErr(gradientDot(Gq, Gz).total, ref) <= 1e-12);
    assert.ok(Math.abs(gradientCosine(Gq, Gq) - 1) <= 1e-12);
    const neg: ModuleGradients = {};
    for (const m of MODULES) neg[m.name] = Gq[m.name].map((v) => -2 * v);
    assert.ok(Math.abs(gradientCosine(Gq, neg) + 1) <= 1e-12);
    const c = gradientCosine(Gq, Gz);
    assert.ok(
      Math.abs(c) < 1 && relErr(c * Math.sqrt(gradientDot(Gq, Gq).total * gradientDot(Gz, Gz).total), ref) <= 1e-10,
    );
  });
});

describe('EK-FAC building blocks', () => {
  const m = MODULES[0];
  const examples = makeExamples(6, 11);

  test('covariance: masked rows count as absent, and partitions merge by addition', () => {
    const all = new CovarianceAccumulator(m);
    const masked = new CovarianceAccumulator(m);
    const kept = new CovarianceAccumulator(m);
    const p1 = new CovarianceAccumulator(m);
    const p2 = new CovarianceAccumulator(m);
    examples.forEach((ex, e) => {
      const mask = Uint8Array.from({ length: ex.rows }, (_, t) => (t % 3 === 1 ? 0 : 1));
      masked.add(ex.a[m.name], ex.g[m.name], ex.rows, mask);
      const rows = [...mask.keys()].filter((t) => mask[t]);
      kept.add(
        Float32Array.from(rows.flatMap((t) => Array.from(ex.a[m.name].subarray(t * m.dIn, (t + 1) * m.dIn)))),
        Float32Array.from(rows.flatMap((t) => Array.from(ex.g[m.name].subarray(t * m.dOut, (t + 1) * m.dOut)))),
        rows.length,
      );
      all.add(ex.a[m.name], ex.g[m.name], ex.rows);
      (e < 2 ? p1 : p2).add(ex.a[m.name], ex.g[m.name], ex.rows);
    });
    const fm = masked.finalize();
    const fk = kept.finalize();
    assert.equal(masked.activationCount, kept.activationCount);
    assert.ok(maxRel(fm.A, fk.A) <= 1e-12 && maxRel(fm.S, fk.S) <= 1e-12);
    assert.ok(maxRel(fm.A, all.finalize().A) > 1e-3, 'the mask must matter');
    const merged = p1.merge(p2).finalize();
    const whole = all.finalize();
    assert.ok(maxRel(merged.A, whole.A) <= 1e-12 && maxRel(merged.S, whole.S) <= 1e-12);
    // the appended 1: A's last diagonal entry is 1 and its last row is the mean activation
    assert.ok(Math.abs(whole.A[whole.dA * whole.dA - 1] - 1) <= 1e-12);
  });

  test('covariance: NaN stops with the module and batch', () => {
    const acc = new CovarianceAccumulator(m);
    acc.add(examples[0].a[m.name], examples[0].g[m.name], examples[0].rows);
    const g = Float32Array.from(examples[1].g[m.name]);
    g[m.dOut + 2] = Number.NaN;
    assert.throws(
      () => acc.add(examples[1].a[m.name], g, examples[1].rows),
      /NaN in output gradients of module h\.0\.mlp\.fc in batch 2 at row 1, column 2/,
    );
    const bad = CovarianceAccumulator.fromSums(m, new Float64Array(36).fill(Number.NaN), 3, new Float64Array(16), 3);
    assert.throws(() => bad.finalize(), /NaN in activation covariance of module h\.0\.mlp\.fc after 1 batch\b/);
    assert.throws(() => new CovarianceAccumulator(m).finalize(), /no activation rows/);
  });

  test('lambda: token path, gradient path and merged partitions agree', () => {
    const cov = new CovarianceAccumulator(m);
    for (const ex of examples) cov.add(ex.a[m.name], ex.g[m.name], ex.rows);
    const basis = computeEigenbasis(m.name, cov.finalize());
    const viaTokens = new LambdaAccumulator(basis);
    const viaG = new LambdaAccumulator(basis);
    const p1 = new LambdaAccumulator(basis);
    const p2 = new LambdaAccumulator(basis);
    examples.forEach((ex, e) => {
      viaTokens.addTokens(ex.a[m.name], ex.g[m.name], ex.rows, true);
      viaG.addGradient(Float32Array.from(naiveGradient(m, ex.a[m.name], ex.g[m.name], ex.rows)));
      (e % 2 ? p1 : p2).addGradient(naiveGradient(m, ex.a[m.name], ex.g[m.name], ex.rows));
    });
    assert.equal(viaTokens.count, examples.length);
    assert.ok(maxRel(viaTokens.mean(), viaG.mean()) <= 1e-6); // fp32 copy of G above
    assert.ok(maxRel(p1.merge(p2).mean(), viaTokens.mean()) <= 1e-12);
    const G = new Float64Array(basis.dOut * basis.dA);
    G[3] = Number.POSITIVE_INFINITY;
    assert.throws(() => viaG.addGradient(G), /Infinity in gradient of example 7 for module h\.0\.mlp\.fc/);
  });

  test('damping: relative is a fraction of mean Λ, absolute is used as is', () => {
    const L = new Float64Array([1, 2, 3, 6]);
    assert.equal(resolveDamping(L), 0.1 * 3);
    assert.equal(resolveDamping(L, { relative: 0.5 }), 1.5);
    assert.equal(resolveDamping(L, { absolute: 1e-8 }), 1e-8);
    assert.throws(() => resolveDamping(L, { absolute: -1 }), />= 0/);
  });

  test('low-rank SVD: gram and randomized methods find the top singular triplets', () => {
    const rng = new Rng(4);
    const dOut = 40;
    const dA = 30;
    // M = U diag(s) Vᵀ with known, fast-decaying singular values
    const orth = (n: number) => {
      const X = new Float64Array(n * n);
      for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) X[i * n + j] = X[j * n + i] = rng.normal();
      return eigh(X, n).vectors;
    };
    const U = orth(dOut);
    const V = orth(dA);
    const s = Array.from({ length: dA }, (_, i) => 10 * 0.5 ** i);
    const M = new Float64Array(dOut * dA);
    for (let i = 0; i < dOut; i++)
      for (let j = 0; j < dA; j++) for (let k = 0; k < dA; k++) M[i * dA + j] += U[i * dOut + k] * s[k] * V[j * dA + k];
    for (const method of ['gram', 'randomized'] as const) {
      const f = lowRank(M, dOut, dA, 4, { method });
      assert.equal(f.rank, 4);
      for (let k = 0; k < 4; k++) assert.ok(relErr(f.sigma[k], s[k]) <= 1e-9, `${method} σ${k} = ${f.sigma[k]}`);
      // rank-4 error is governed by σ_5 = 10/32
      const D = lowRankToDense(f);
      let err = 0;
      for (let i = 0; i < D.length; i++) err += (D[i] - M[i]) ** 2;
      assert.ok(Math.abs(Math.sqrt(err) - Math.sqrt(s.slice(4).reduce((x, y) => x + y * y, 0))) <= 1e-8, method);
      // ⟨M_r, G⟩ evaluated from the factors equals the dense product
      const G = Float64Array.from({ length: dOut * dA }, () => rng.normal());
      let ref = 0;
      for (let i = 0; i < G.length; i++) ref += D[i] * G[i];
      assert.ok(relErr(innerProduct(f, G), ref) <= 1e-10);
    }
    const full = lowRank(M, dOut, dA, dA, { method: 'gram' });
    assert.ok(maxRel(lowRankToDense(full), M) <= 1e-10);
    const fullT = lowRank(
      Float64Array.from({ length: dA * dOut }, (_, i) => M[(i % dOut) * dA + Math.floor(i / dOut)]),
      dA,
      dOut,
      dA,
    );
    assert.equal(fullT.rank, dA);
  });
});

test('in-graph batch sums: NaN/Inf are caught at the batch, naming the module', () => {
  const shape = { name: 'model.layers.0.mlp.up_proj', dIn: 2, dOut: 2, appendOne: false };
  const acc = new CovarianceAccumulator(shape);
  acc.addSums(new Float32Array([1, 0, 0, 1]), 1, new Float32Array([2, 0, 0, 2]), 1);
  assert.throws(
    () => acc.addSums(new Float32Array([1, Number.NaN, 0, 1]), 1, new Float32Array(4), 1),
    /NaN in the activation covariance .* of module model\.layers\.0\.mlp\.up_proj in batch 2/,
  );
  assert.throws(
    () => acc.addSums(new Float32Array(4), 1, new Float32Array([Number.POSITIVE_INFINITY, 0, 0, 0]), 1),
    /Inf in the gradient covariance/,
  );
  const basis = computeEigenbasis(
    shape.name,
    new CovarianceAccumulator(shape)
      .addSums(new Float32Array([2, 0, 0, 1]), 1, new Float32Array([1, 0, 0, 3]), 1)
      .finalize(),
  );
  const lam = new LambdaAccumulator(basis);
  lam.addSum(new Float32Array([1, 2, 3, 4]), 2);
  assert.equal(lam.count, 2);
  assert.throws(
    () => lam.addSum(new Float32Array([1, Number.NaN, 3, 4]), 2),
    /NaN in the eigenvalue correction \(lambda\) of module model\.layers\.0\.mlp\.up_proj/,
  );
});
