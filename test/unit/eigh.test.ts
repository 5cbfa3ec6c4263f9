import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { eigh, eighAsync, eighBackend, JS_MAX_N } from '../../src/server/linalg/eigh';
import { firstNonFinite, gemm, gemm32, symmetrize, symmetrizedCopy, transpose } from '../../src/server/linalg/matrix';
import { nativeLapack, resetNativeLapackForTests } from '../../src/server/linalg/native';
import { Rng } from '../../src/server/util/random';

function randomSymmetric(n: number, seed: number): Float64Array {
  const rng = new Rng(seed);
  const A = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j <= i; j++) {
      const v = rng.normal();
      A[i * n + j] = v;
      A[j * n + i] = v;
    }
  }
  return A;
}

function maxAbsDiff(x: ArrayLike<number>, y: ArrayLike<number>): number {
  assert.equal(x.length, y.length);
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i] - y[i]));
  return m;
}

/** max |Q diag(w) Qᵀ − A| / max|A| and max |QᵀQ − I| */
function residuals(A: Float64Array, n: number, values: Float64Array, Q: Float64Array) {
  const QD = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) QD[i * n + j] = Q[i * n + j] * values[j];
  const R = gemm(QD, Q, n, n, n, { transB: true, js: true });
  let scale = 0;
  for (const v of A) scale = Math.max(scale, Math.abs(v));
  const QtQ = gemm(Q, Q, n, n, n, { transA: true, js: true });
  let orth = 0;
  for (let i = 0; i < n; i++)
    for (let j = 0; j < n; j++) orth = Math.max(orth, Math.abs(QtQ[i * n + j] - (i === j ? 1 : 0)));
  return { recon: maxAbsDiff(R, A) / (scale || 1), orth };
}

function ascending(v: Float64Array): boolean {
  for (let i = 1; i < v.length; i++) if (v[i] < v[i - 1]) return false;
  return true;
}

const lapack = nativeLapack();
const backends = [
  { name: 'js' as const, skip: false },
  { name: 'lapack' as const, skip: lapack ? false : `no LAPACK library: ${eighBackend().reason}` },
];

describe('eigh', () => {
  for (const b of backends) {
    for (const n of [1, 2, 7, 64, 300]) {
      test(`${b.name}: reconstructs and is orthonormal at n=${n}`, { skip: b.skip }, () => {
        const A = randomSymmetric(n, 17 + n);
        const copy = Float64Array.from(A);
        const { values, vectors } = eigh(A, n, { backend: b.name });
        assert.deepEqual(A, copy, 'input must not be modified');
        assert.ok(ascending(values), 'eigenvalues ascending');
        const { recon, orth } = residuals(A, n, values, vectors);
        assert.ok(recon <= 1e-10, `reconstruction ${recon}`);
        assert.ok(orth <= 1e-10, `orthogonality ${orth}`);
      });
    }
  }

  test('LAPACK and JS agree (values, and eigenvectors up to sign)', { skip: backends[1].skip }, () => {
    const n = 120;
    const A = randomSymmetric(n, 5);
    const j = eigh(A, n, { backend: 'js' });
    const l = eigh(A, n, { backend: 'lapack' });
    let scale = 0;
    for (const v of l.values) scale = Math.max(scale, Math.abs(v));
    assert.ok(maxAbsDiff(j.values, l.values) <= 1e-12 * scale * n);
    // random Gaussian matrices have well-separated eigenvalues, so vectors match up to sign
    for (let c = 0; c < n; c++) {
      let d = 0;
      for (let i = 0; i < n; i++) d += j.vectors[i * n + c] * l.vectors[i * n + c];
      assert.ok(Math.abs(Math.abs(d) - 1) <= 1e-9, `column ${c}: |<v_js, v_lapack>| = ${Math.abs(d)}`);
    }
  });

  for (const b of backends) {
    test(`${b.name}: identity and repeated eigenvalues`, { skip: b.skip }, () => {
      const n = 9;
      const I = new Float64Array(n * n);
      for (let i = 0; i < n; i++) I[i * n + i] = 1;
      const e = eigh(I, n, { backend: b.name });
      assert.ok(maxAbsDiff(e.values, new Float64Array(n).fill(1)) <= 1e-14);
      assert.ok(residuals(I, n, e.values, e.vectors).orth <= 1e-12);

      // A = Q diag(w) Qᵀ with a random orthogonal Q and multiplicities 3, 2, 1, 3
      const w = [-2, -2, -2, 0.5, 0.5, 1, 4, 4, 4];
      const Q = eigh(randomSymmetric(n, 99), n, { backend: 'js' }).vectors;
      const QD = new Float64Array(n * n);
      for (let i = 0; i < n; i++) for (let k = 0; k < n; k++) QD[i * n + k] = Q[i * n + k] * w[k];
      const A = gemm(QD, Q, n, n, n, { transB: true });
      const r = eigh(A, n, { backend: b.name });
      assert.ok(maxAbsDiff(r.values, w) <= 1e-13, `values ${r.values}`);
      const { recon, orth } = residuals(A, n, r.values, r.vectors);
      assert.ok(recon <= 1e-13 && orth <= 1e-13, `recon ${recon} orth ${orth}`);
    });
  }

  test('float32 (ssyevd): float32 vectors, float32-level residuals, the same decomposition as float64', {
    skip: lapack?.ssyevd ? false : 'no LAPACK ssyevd',
  }, async () => {
    // a covariance-like matrix: XᵀX of 400 samples over 150 features with decaying scales
    const n = 150;
    const N = 400;
    const rng = new Rng(11);
    const X = new Float64Array(N * n);
    for (let i = 0; i < N; i++) for (let j = 0; j < n; j++) X[i * n + j] = rng.normal() * Math.exp(-j / 40);
    const A = gemm(X, X, n, N, n, { transA: true, js: true });
    const f64 = eigh(A, n);
    for (const r of [eigh(A, n, { dtype: 'float32' }), await eighAsync(A, n, { dtype: 'float32' })]) {
      assert.ok(r.vectors instanceof Float32Array, 'float32 vectors');
      assert.ok(ascending(r.values));
      const { recon, orth } = residuals(A, n, r.values, Float64Array.from(r.vectors));
      // float32 rounding (2^-24 ≈ 6e-8) times a modest factor of n; float64 gives ~1e-14
      assert.ok(recon <= 1e-5 && orth <= 1e-5, `recon ${recon} orth ${orth}`);
      assert.ok(recon > 1e-12, `recon ${recon}: not decomposed in float32`);
      assert.ok(maxAbsDiff(r.values, f64.values) <= 1e-5 * f64.values[n - 1], 'eigenvalues as in float64');
      // the leading eigenvectors (well separated) match float64's up to sign
      for (let c = n - 5; c < n; c++) {
        let d = 0;
        for (let i = 0; i < n; i++) d += r.vectors[i * n + c] * f64.vectors[i * n + c];
        assert.ok(Math.abs(Math.abs(d) - 1) <= 1e-5, `column ${c}: |<v32, v64>| = ${Math.abs(d)}`);
      }
    }
    // the JS fallback has no float32 solver: it decomposes in float64 and returns float32 vectors
    const js = eigh(A, n, { dtype: 'float32', backend: 'js' });
    assert.ok(js.vectors instanceof Float32Array);
    assert.ok(residuals(A, n, js.values, Float64Array.from(js.vectors)).recon <= 1e-6);
  });

  test('uses only the symmetric part', () => {
    const n = 3;
    const A = new Float64Array([2, 1, 0, 3, 2, 0, 0, 0, 5]); // symmetric part has off-diagonal 2
    const r = eigh(A, n, { backend: 'js' });
    assert.ok(maxAbsDiff(r.values, [0, 4, 5]) <= 1e-14, `${r.values}`);
  });

  for (const b of backends) {
    test(`${b.name}: a lower triangle (upper ignored) times a scale is the symmetric matrix, bit for bit, vectors in the type asked for`, {
      skip: b.skip,
    }, async () => {
      for (const n of [5, 70]) {
        const M = randomSymmetric(n, 40 + n);
        const scale = 1 / 3;
        const scaled = M.map((v) => v * scale);
        // a float32 sum with junk (NaN included) above the diagonal, as syrkLower may leave it
        const L32 = Float32Array.from(M);
        const M32 = Float64Array.from(L32).map((v) => v * scale);
        for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) L32[i * n + j] = (i + j) % 3 ? Number.NaN : 1e30;
        const want = eigh(M32, n, { backend: b.name });
        for (const run of [eigh, eighAsync]) {
          const got = await run(L32, n, { backend: b.name, lower: true, scale });
          assert.deepEqual(got.values, want.values, `${run.name} n=${n}: values`);
          assert.deepEqual(got.vectors, want.vectors, `${run.name} n=${n}: vectors`);
          const narrow = await run(L32, n, { backend: b.name, lower: true, scale, vectors: 'float32' });
          assert.ok(narrow.vectors instanceof Float32Array);
          assert.deepEqual(narrow.vectors, Float32Array.from(want.vectors), `${run.name} n=${n}: float32 vectors`);
        }
        const full = eigh(scaled, n, { backend: b.name });
        assert.ok(maxAbsDiff(full.values, want.values) < 1e-5 * n, 'the float32 sum is the matrix to float32 rounding');
        // a NaN in the lower triangle is named by row and column
        const bad = Float32Array.from(L32);
        bad[(n - 1) * n + 1] = Number.NaN;
        assert.throws(
          () => eigh(bad, n, { backend: b.name, lower: true, scale, label: 'S of m' }),
          new RegExp(`NaN in S of m at \\[${n - 1}, 1\\]`),
        );
      }
      assert.throws(() => eigh(new Float64Array(4), 2, { scale: 2 }), /scale applies to a lower triangle/);
    });
  }

  test('NaN and Inf are rejected with the caller-provided label', () => {
    const A = randomSymmetric(4, 1);
    A[6] = Number.NaN;
    assert.throws(
      () => eigh(A, 4, { label: 'activation covariance of module m.fc1' }),
      /NaN in activation covariance of module m\.fc1 at \[1, 2\]/,
    );
    A[6] = Number.POSITIVE_INFINITY;
    assert.throws(() => eigh(A, 4, { label: 'S of m.fc2', backend: 'js' }), /Infinity in S of m\.fc2/);
    assert.throws(() => eigh(new Float64Array(5), 2), /expected 2×2/);
  });

  test('INFLUENCE_LENS_LAPACK=off forces JS and caps its size with an install hint', () => {
    const saved = process.env.INFLUENCE_LENS_LAPACK;
    process.env.INFLUENCE_LENS_LAPACK = 'off';
    try {
      assert.equal(eighBackend().kind, 'js');
      const n = 40;
      const A = randomSymmetric(n, 3);
      const r = eigh(A, n);
      assert.ok(residuals(A, n, r.values, r.vectors).recon <= 1e-12);
      const big = JS_MAX_N + 1;
      assert.throws(
        () => eigh(new Float64Array(big * big), big, { label: 'A of x' }),
        /apt-get install libopenblas0-pthread/,
      );
      assert.throws(() => eigh(A, n, { backend: 'lapack' }), /LAPACK backend requested but not available/);
    } finally {
      if (saved === undefined) delete process.env.INFLUENCE_LENS_LAPACK;
      else process.env.INFLUENCE_LENS_LAPACK = saved;
    }
    if (lapack) assert.equal(eighBackend().kind, 'lapack');
  });
});

test('symmetrizedCopy: (A + Aᵀ)/2 as symmetrize gives it, the input untouched, the first non-finite index found', () => {
  const rng = new Rng(7);
  for (const n of [1, 5, 31, 32, 33, 70]) {
    const A = Float64Array.from({ length: n * n }, () => rng.normal());
    const before = Float64Array.from(A);
    const { a, bad } = symmetrizedCopy(A, n);
    assert.equal(bad, -1);
    assert.deepEqual(a, symmetrize(Float64Array.from(A), n));
    assert.deepEqual(A, before);
    for (const [at, v] of [
      [n * n - 1, Number.NaN],
      [Math.floor((n * n) / 2), Number.POSITIVE_INFINITY],
      [0, Number.NEGATIVE_INFINITY],
    ] as const) {
      const B = Float64Array.from(A);
      B[at] = v;
      if (at !== n * n - 1) B[n * n - 1] = Number.NaN; // a later one too: the first is reported
      assert.equal(symmetrizedCopy(B, n).bad, firstNonFinite(B));
      assert.equal(symmetrizedCopy(B, n).bad, at);
    }
  }
});

describe('gemm', () => {
  const rng = new Rng(7);
  const rand = (n: number) => Float64Array.from({ length: n }, () => rng.normal());
  function naive(A: Float64Array, B: Float64Array, m: number, k: number, n: number, tA: boolean, tB: boolean) {
    const C = new Float64Array(m * n);
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let p = 0; p < k; p++) s += (tA ? A[p * m + i] : A[i * k + p]) * (tB ? B[j * k + p] : B[p * n + j]);
        C[i * n + j] = s;
      }
    }
    return C;
  }
  for (const [m, k, n] of [
    [1, 1, 1],
    [3, 5, 2],
    [37, 70, 45],
    [130, 9, 600],
  ]) {
    for (const tA of [false, true]) {
      for (const tB of [false, true]) {
        test(`${m}×${k}·${k}×${n} transA=${tA} transB=${tB}: JS and BLAS match the naive product`, () => {
          const A = rand(m * k);
          const B = rand(k * n);
          const ref = naive(A, B, m, k, n, tA, tB);
          const tol = 1e-12 * k;
          assert.ok(maxAbsDiff(gemm(A, B, m, k, n, { transA: tA, transB: tB, js: true }), ref) <= tol);
          assert.ok(maxAbsDiff(gemm(A, B, m, k, n, { transA: tA, transB: tB }), ref) <= tol);
          // alpha/beta accumulate into out
          const C0 = rand(m * n);
          for (const js of [true, false]) {
            const C = gemm(A, B, m, k, n, {
              transA: tA,
              transB: tB,
              alpha: 2,
              beta: 0.5,
              out: Float64Array.from(C0),
              js,
            });
            const want = ref.map((v, i) => 2 * v + 0.5 * C0[i]);
            assert.ok(maxAbsDiff(C, want) <= 2 * tol, `js=${js}`);
          }
        });
      }
    }
  }

  test('gemm32 (sgemm, or the fp64 kernel without BLAS) matches the fp64 product to float32 rounding', () => {
    for (const [m, k, n] of [
      [3, 5, 2],
      [64, 70, 45],
      [130, 40, 200],
    ])
      for (const tA of [false, true])
        for (const tB of [false, true]) {
          const A = rand(m * k);
          const B = rand(k * n);
          const ref = naive(A, B, m, k, n, tA, tB);
          const C = gemm32(Float32Array.from(A), Float32Array.from(B), m, k, n, { transA: tA, transB: tB });
          assert.ok(C instanceof Float32Array && C.length === m * n);
          assert.ok(maxAbsDiff(Float64Array.from(C), ref) <= 1e-5 * k, `${m}×${k}×${n} ${tA} ${tB}`);
        }
  });

  test('BLAS path reads subarray views at their offset', { skip: lapack?.dgemm ? false : 'no BLAS' }, () => {
    const m = 40;
    const buf = rand(10 + m * m);
    const A = buf.subarray(10);
    const ref = naive(A, A, m, m, m, false, true);
    assert.ok(maxAbsDiff(gemm(A, A, m, m, m, { transB: true }), ref) <= 1e-11);
  });

  test('transpose', () => {
    const A = Float64Array.from({ length: 6 }, (_, i) => i);
    assert.deepEqual(Array.from(transpose(A, 2, 3)), [0, 3, 1, 4, 2, 5]);
  });
});

test('INFLUENCE_LENS_LAPACK_LIBRARY naming a library that cannot be loaded is refused by name, not passed over for the system one', () => {
  const saved = process.env.INFLUENCE_LENS_LAPACK_LIBRARY;
  try {
    for (const name of ['/nonexistent/libmkl_rt.so', 'libc.so.6']) {
      process.env.INFLUENCE_LENS_LAPACK_LIBRARY = name;
      resetNativeLapackForTests();
      assert.throws(
        () => nativeLapack(),
        (e: Error) =>
          e.name === 'EnvSettingError' &&
          e.message.startsWith(`INFLUENCE_LENS_LAPACK_LIBRARY="${name}" could not be used: `) &&
          // libc loads, but has no dsyevd_
          (name !== 'libc.so.6' || /no dsyevd_/.test(e.message)),
      );
    }
  } finally {
    if (saved === undefined) delete process.env.INFLUENCE_LENS_LAPACK_LIBRARY;
    else process.env.INFLUENCE_LENS_LAPACK_LIBRARY = saved;
    resetNativeLapackForTests();
  }
  // unset again: the system's library, as before (where one is installed)
  assert.doesNotThrow(() => nativeLapack());
});
