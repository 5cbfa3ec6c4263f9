// Eigenbases of the K-FAC factors (Grosse et al. 2023, eq. 20): A = Q_A diag(λ_A) Q_Aᵀ and
// S = Q_S diag(λ_S) Q_Sᵀ, decomposed in fp64. EK-FAC keeps Q_A, Q_S and replaces λ_S λ_Aᵀ by the
// fitted Λ (lambda.ts); the eigenvalues are kept for K-FAC and for diagnostics. For a float32
// model the eigenvectors are then stored in float32, as kronfluence does (eigendecomposition in
// float64, factors in float32): at the Qwen2.5-0.5B shape fp64 bases alone would not fit in 24 GB.
// `dtype: 'float32'` decomposes in float32 too (kronfluence's eigendecomposition_dtype option).
import { type EighBackend, type EighDtype, eigh, eighAsync } from '../../linalg/eigh';
import { type Floats, gemm, type Precision, toF64 } from '../../linalg/matrix';
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
  /** the type the eigenvectors are stored in. Default fp64. */
  precision?: Precision;
  /** the precision the decomposition runs in (kronfluence's eigendecomposition_dtype). Default float64. */
  dtype?: EighDtype;
}

export function computeEigenbasis(
  module: string,
  cov: Covariances,
  options: EigenbasisOptions & {
    /** the eigendecomposition of an activation covariance equal to `cov.A`, when already known */
    knownA?: Decomposition;
  } = {},
): Eigenbasis {
  // One matrix at a time: each fp64 result is narrowed (when fp32) before the next is decomposed.
  const decompose = (M: Float64Array, n: number, what: string) =>
    eigh(M, n, {
      label: `${what} covariance of module ${module}`,
      backend: options.backend,
      dtype: options.dtype,
      vectors: vectorsIn(options),
    });
  const a = options.knownA ? copyOf(options.knownA, options) : decompose(cov.A, cov.dA, 'activation');
  const s = decompose(cov.S, cov.dOut, 'gradient');
  return assembleEigenbasis(module, cov, a, s, options);
}

/** One covariance's eigendecomposition: ascending values (fp64) and column eigenvectors. */
export interface Decomposition {
  values: Float64Array;
  vectors: Floats;
}

/**
 * `computeEigenbasis`'s decomposition of one covariance (`what`: 'activation' or 'gradient') on
 * libuv's thread pool (`eighAsync`), so that a fit decomposes several at once; narrowed to the
 * options' precision as soon as it is done.
 */
export async function decomposeCovariance(
  module: string,
  what: 'activation' | 'gradient',
  M: Floats,
  n: number,
  options: EigenbasisOptions & {
    /** M is a sum whose lower triangle alone is right (`CovarianceAccumulator.lowerSums`); decompose scale × M */
    lowerSum?: { scale: number };
  } = {},
): Promise<Decomposition> {
  // finite vectors in the storage type (eigh checks and narrows them as it reads them back)
  return eighAsync(M, n, {
    label: `${what} covariance of module ${module}`,
    backend: options.backend,
    dtype: options.dtype,
    vectors: vectorsIn(options),
    ...(options.lowerSum ? { lower: true, scale: options.lowerSum.scale } : {}),
  });
}

/** The eigenvectors' storage type: the basis's precision (eigh narrows them while reading them back). */
function vectorsIn(options: EigenbasisOptions): EighDtype {
  return (options.precision ?? 'fp64') === 'fp32' ? 'float32' : 'float64';
}

/** The basis from its two decompositions; a shared activation decomposition is copied (no two bases share an array). */
export function assembleEigenbasis(
  module: string,
  dims: { dA: number; dOut: number },
  a: Decomposition,
  s: Decomposition,
  options: EigenbasisOptions & { shared?: boolean } = {},
): Eigenbasis {
  const tol = options.negativeTolerance ?? 1e-3;
  const act = options.shared ? copyOf(a, options) : a;
  return {
    module,
    dA: dims.dA,
    dOut: dims.dOut,
    qA: act.vectors,
    eigA: clampNegatives(act.values, tol, `activation covariance of module ${module}`),
    qS: s.vectors,
    eigS: clampNegatives(s.values, tol, `gradient covariance of module ${module}`),
  };
}

function copyOf(d: Decomposition, options: EigenbasisOptions): Decomposition {
  return {
    values: Float64Array.from(d.values),
    vectors: (options.precision ?? 'fp64') === 'fp32' ? Float32Array.from(d.vectors) : toF64(d.vectors, true),
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
