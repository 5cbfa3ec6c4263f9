// Dense fp64 reference helpers: explicit matrices, inverted by Gauss-Jordan, independent of
// the eigendecomposition code they check.
import assert from 'node:assert/strict';

export function gaussJordanInverse(H: Float64Array, n: number): Float64Array {
  const M = Float64Array.from(H);
  const inv = new Float64Array(n * n);
  for (let i = 0; i < n; i++) inv[i * n + i] = 1;
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(M[r * n + c]) > Math.abs(M[p * n + c])) p = r;
    for (let j = 0; j < n; j++) {
      [M[c * n + j], M[p * n + j]] = [M[p * n + j], M[c * n + j]];
      [inv[c * n + j], inv[p * n + j]] = [inv[p * n + j], inv[c * n + j]];
    }
    const d = M[c * n + c];
    for (let j = 0; j < n; j++) {
      M[c * n + j] /= d;
      inv[c * n + j] /= d;
    }
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const f = M[r * n + c];
      if (f === 0) continue;
      for (let j = 0; j < n; j++) {
        M[r * n + j] -= f * M[c * n + j];
        inv[r * n + j] -= f * inv[c * n + j];
      }
    }
  }
  return inv;
}

export function matVec(M: Float64Array, x: Float64Array): Float64Array {
  const n = x.length;
  const y = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (let j = 0; j < n; j++) s += M[i * n + j] * x[j];
    y[i] = s;
  }
  return y;
}

/** K = Q_S ⊗ Q_A, so that K vec(X) = vec(Q_S X Q_Aᵀ) for row-major vec. */
export function kron(QS: ArrayLike<number>, dOut: number, QA: ArrayLike<number>, dA: number): Float64Array {
  const N = dOut * dA;
  const K = new Float64Array(N * N);
  for (let i = 0; i < dOut; i++)
    for (let j = 0; j < dA; j++)
      for (let k = 0; k < dOut; k++)
        for (let l = 0; l < dA; l++) K[(i * dA + j) * N + k * dA + l] = QS[i * dOut + k] * QA[j * dA + l];
  return K;
}

/** max |x − y| / max |y|: the relative error of a whole vector (equal lengths, a non-zero reference) */
export function maxRel(x: ArrayLike<number>, y: ArrayLike<number>) {
  assert.equal(x.length, y.length, 'maxRel: lengths differ');
  let scale = 0;
  let d = 0;
  for (let i = 0; i < y.length; i++) {
    scale = Math.max(scale, Math.abs(y[i]));
    d = Math.max(d, Math.abs(x[i] - y[i]));
  }
  assert.ok(scale > 0, 'maxRel: the reference is all zeros');
  return d / scale;
}

/** ‖x − y‖₂ / ‖y‖₂: the relative error of a whole vector in the Euclidean norm (equal lengths) */
export function l2Rel(x: ArrayLike<number>, y: ArrayLike<number>): number {
  assert.equal(x.length, y.length, 'l2Rel: lengths differ');
  let num = 0;
  let den = 0;
  for (let i = 0; i < y.length; i++) {
    num += (x[i] - y[i]) ** 2;
    den += y[i] ** 2;
  }
  return Math.sqrt(num / den);
}
