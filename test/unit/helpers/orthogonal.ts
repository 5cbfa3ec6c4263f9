// Random orthogonal matrices for tests that need arbitrary eigenbases (not references: they use eigh).
import { eigh } from '../../../src/server/linalg/eigh';
import { gemm } from '../../../src/server/linalg/matrix';
import type { Rng } from '../../../src/server/util/random';

/** A random n × n orthogonal matrix (the eigenvectors of XᵀX, X Gaussian). */
export function orthogonal(n: number, rng: Rng): Float64Array {
  const X = new Float64Array(n * n);
  for (let i = 0; i < X.length; i++) X[i] = rng.normal();
  return eigh(gemm(X, X, n, n, n, { transA: true }), n).vectors;
}
