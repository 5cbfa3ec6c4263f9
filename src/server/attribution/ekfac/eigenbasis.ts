// Eigenbases of the K-FAC factors (Grosse et al. 2023, eq. 20): A = Q_A diag(λ_A) Q_Aᵀ and
// S = Q_S diag(λ_S) Q_Sᵀ, decomposed in fp64. EK-FAC keeps Q_A, Q_S and replaces λ_S λ_Aᵀ by the
// fitted Λ (lambda.ts); the eigenvalues are kept for K-FAC and for diagnostics. For a float32
// model the eigenvectors are then stored in float32, as kronfluence does (eigendecomposition in
// float64, factors in float32): at the Qwen2.5-0.5B shape fp64 bases alone would not fit in 24 GB.
import { type EighBackend, eigh } from '../../linalg/eigh';
import { type Floats, gemm, inPrecision, type Precision, toF64 } from '../../linalg/matrix';
import type { Covariances } from './covariance';

export interface Eigenbasis {
  module: string;
  dA: number;
  dOut: number;
  /** d_A × d_A row-major; column j is the eigenvector of eigA[j] (kronfluence's orientation);
   * Float32Array for a float32 model, Float64Array for an fp64 one */
  qA: Floats;
  /** ascending, tiny negatives clamped to 0 */
  eigA: Float64Array;
  /** d_out × d_out, column j = eigenvector of eigS[j] (same type as qA) */
  qS: Floats;
  eigS: Float64Array;
}

export interface EigenbasisOptions {
  backend?: EighBackend;
  /**
   * A covariance is positive semidefinite, so negative eigenvalues are rounding error
   * (kronfluence accumulates in fp32): they are clamped to 0 when |λ| <= tolerance·max λ,
   * and larger ones are reported as an error. Default 1e-3.
   */
  negativeTolerance?: number;
  /** the type the eigenvectors are stored in (the decomposition itself is always fp64). Default fp64. */
  precision?: Precision;
}

export function computeEigenbasis(
  module: string,
  cov: Covariances,
  options: EigenbasisOptions & {
    /** the eigendecomposition of an activation covariance equal to `cov.A`, when already known */
    knownA?: { values: Float64Array; vectors: Floats };
  } = {},
): Eigenbasis {
  const tol = options.negativeTolerance ?? 1e-3;
  const precision = options.precision ?? 'fp64';
  // One matrix at a time: each fp64 result is narrowed (when fp32) before the next is decomposed.
  const decompose = (M: Float64Array, n: number, what: string) => {
    const r = eigh(M, n, { label: `${what} covariance of module ${module}`, backend: options.backend });
    checkVectors(r.vectors, `${what} eigenvectors of module ${module}`);
    return { values: r.values, vectors: inPrecision(r.vectors, precision) };
  };
  // a known decomposition is copied, so that no two bases share an array
  const a = options.knownA
    ? {
        values: Float64Array.from(options.knownA.values),
        vectors: precision === 'fp32' ? Float32Array.from(options.knownA.vectors) : toF64(options.knownA.vectors, true),
      }
    : decompose(cov.A, cov.dA, 'activation');
  const s = decompose(cov.S, cov.dOut, 'gradient');
  return {
    module,
    dA: cov.dA,
    dOut: cov.dOut,
    qA: a.vectors,
    eigA: clampNegatives(a.values, tol, `activation covariance of module ${module}`),
    qS: s.vectors,
    eigS: clampNegatives(s.values, tol, `gradient covariance of module ${module}`),
  };
}

/** Sets eigenvalues in [-tol·max, 0) to 0 (in place); throws for more negative ones. */
export function clampNegatives(values: Float64Array, tol: number, what: string): Float64Array {
  let max = 0;
  for (const v of values) max = Math.max(max, Math.abs(v));
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (Number.isNaN(v)) throw new Error(`NaN in eigenvalues of ${what} (eigendecomposition step)`);
    if (v >= 0) continue;
    if (-v > tol * max) {
      throw new Error(
        `${what} is not positive semidefinite: eigenvalue ${v.toExponential(3)} vs largest ${max.toExponential(3)} ` +
          '(corrupt or non-finite inputs?)',
      );
    }
    values[i] = 0;
  }
  return values;
}

function checkVectors(q: Floats, what: string) {
  for (let i = 0; i < q.length; i++) {
    if (!Number.isFinite(q[i])) throw new Error(`${q[i]} in ${what} (eigendecomposition step)`);
  }
}

export type Basis = Pick<Eigenbasis, 'qA' | 'qS' | 'dA' | 'dOut'>;

/** Rotates a d_out × d_A matrix into the eigenbasis: Q_Sᵀ V Q_A. */
export function toEigenbasis(b: Basis, V: Floats): Float64Array {
  checkShape(b, V, 'toEigenbasis');
  const T = gemm(toF64(b.qS), toF64(V), b.dOut, b.dOut, b.dA, { transA: true });
  return gemm(T, toF64(b.qA), b.dOut, b.dA, b.dA);
}

/** Rotates back from the eigenbasis: Q_S Vt Q_Aᵀ. */
export function fromEigenbasis(b: Basis, Vt: Floats): Float64Array {
  checkShape(b, Vt, 'fromEigenbasis');
  const T = gemm(toF64(b.qS), toF64(Vt), b.dOut, b.dOut, b.dA);
  return gemm(T, toF64(b.qA), b.dOut, b.dA, b.dA, { transB: true });
}

function checkShape(b: Basis, V: Floats, what: string) {
  if (V.length !== b.dOut * b.dA) {
    throw new Error(`${what}: expected a ${b.dOut}×${b.dA} matrix (${b.dOut * b.dA} values), got ${V.length}`);
  }
}
