// Symmetric eigendecomposition in fp64, for the EK-FAC bases Q_A, Q_S (Grosse et al. 2023,
// eq. 20). LAPACK dsyevd (divide and conquer) through koffi when a system library is
// present; otherwise Householder tridiagonalisation + implicit QL in JS, capped at
// JS_MAX_N because it is O(n³) in JS (~10 s at n = 1024). `dtype: 'float32'` (kronfluence's
// eigendecomposition_dtype=float32) runs LAPACK's ssyevd instead: about half the time of dsyevd
// at n = 1,536–2,048 on the development VM, with float32's rounding in the result.
import { availableParallelism } from 'node:os';
import { positiveEnv } from '../util/env';
import { type Floats, firstNonFinite, symmetricFromLower, symmetrizedCopy, transpose, transposeFinite } from './matrix';
import { lapackAllowed, nativeLapack, nativeLoadErrors } from './native';

export interface Eigh<V extends Floats = Float64Array> {
  /** ascending */
  values: Float64Array;
  /** row-major n×n; column j is the unit eigenvector of values[j]; Float32Array when decomposed in float32 */
  vectors: V;
}

/** The precision the decomposition runs in (kronfluence's `eigendecomposition_dtype`). */
export type EighDtype = 'float64' | 'float32';

export type EighBackend = 'auto' | 'lapack' | 'js';

export interface EighOptions {
  /** names the matrix in error messages, e.g. "activation covariance of model.layers.0.mlp.up_proj" */
  label?: string;
  /** 'auto' (default): LAPACK when loaded, else JS up to JS_MAX_N. 'js' has no size cap. */
  backend?: EighBackend;
  /**
   * 'float64' (default) or 'float32' (LAPACK's ssyevd; where the library has none, or on the
   * JS fallback, the decomposition runs in fp64 and only its vectors are returned as float32)
   */
  dtype?: EighDtype;
  /**
   * true: only the lower triangle of the (row-major) matrix is read, and the upper one may hold
   * anything (a covariance sum as `syrkLower` leaves it); false (default): its symmetric part.
   */
  lower?: boolean;
  /** decompose scale × matrix (a sum divided by its count), applied while the input is copied; lower triangles only */
  scale?: number;
  /** the type of the returned vectors, converted while they are read back; default: the decomposition's */
  vectors?: EighDtype;
}

/** Largest n the automatic JS fallback accepts. */
export const JS_MAX_N = 512;

export const INSTALL_HINT =
  'install OpenBLAS/LAPACK (Debian/Ubuntu: apt-get install libopenblas0-pthread; ' +
  'Fedora: dnf install openblas; macOS uses Accelerate)';

/** Which backend `eigh` uses now: 'lapack (<library>)' or 'js'. */
export function eighBackend(): { kind: 'lapack' | 'js'; library?: string; reason?: string } {
  const lib = nativeLapack();
  if (lib) return { kind: 'lapack', library: lib.library };
  if (!lapackAllowed()) return { kind: 'js', reason: 'INFLUENCE_LENS_LAPACK=off' };
  return { kind: 'js', reason: `no LAPACK library found (${nativeLoadErrors().join('; ')})` };
}

/**
 * Eigendecomposition of a symmetric n×n matrix (row-major; only its symmetric part is used).
 * The input is not modified. Throws on NaN/Inf, naming `label`.
 */
export function eigh(
  matrix: Float64Array,
  n: number,
  options?: EighOptions & { dtype?: 'float64'; vectors?: 'float64' },
): Eigh;
export function eigh(matrix: Floats, n: number, options: EighOptions): Eigh<Floats>;
export function eigh(matrix: Floats, n: number, options: EighOptions = {}): Eigh<Floats> {
  const job = prepare(matrix, n, options);
  if ('done' in job) return job.done;
  const ssyevd = job.lapack?.ssyevd;
  if (ssyevd && options.dtype === 'float32') {
    const call = lapackCall(Float32Array.from(job.a), n, job.label, ssyevd, vectorsType(options));
    ssyevd(...call.args);
    return call.result();
  }
  if (job.lapack) {
    const call = lapackCall(job.a, n, job.label, job.lapack.dsyevd, vectorsType(options));
    job.lapack.dsyevd(...call.args);
    return call.result();
  }
  return narrowed(eighJs(job.a, n, job.label), options, job.label);
}

/** The vectors' type: asked for, or the decomposition's (float32 also where it ran in fp64). */
function vectorsType(options: EighOptions): EighDtype {
  return options.vectors ?? options.dtype ?? 'float64';
}

/** The JS fallback's fp64 result, its vectors checked and in the type asked for (n <= JS_MAX_N: not a hot path). */
function narrowed(r: Eigh, options: EighOptions, label = 'matrix'): Eigh<Floats> {
  if (firstNonFinite(r.vectors) >= 0)
    throw new Error(`eigh(${label}): non-finite eigenvectors (the JS solver diverged)`);
  return vectorsType(options) === 'float32' ? { values: r.values, vectors: Float32Array.from(r.vectors) } : r;
}

/**
 * `eigh` with LAPACK's work on libuv's thread pool, so that several decompositions run at once
 * (see `parallelEigh`) while the JS thread stays free. The JS fallback runs inline. Same checks,
 * same results as `eigh` under the same BLAS thread count.
 */
export async function eighAsync(matrix: Floats, n: number, options: EighOptions = {}): Promise<Eigh<Floats>> {
  const job = prepare(matrix, n, options);
  if ('done' in job) return job.done;
  if (!job.lapack) return narrowed(eighJs(job.a, n, job.label), options, job.label);
  const lib = job.lapack;
  if (lib.ssyevd && lib.ssyevdAsync && options.dtype === 'float32') {
    const call = lapackCall(Float32Array.from(job.a), n, job.label, lib.ssyevd, vectorsType(options));
    const run = lib.ssyevdAsync;
    await new Promise<void>((resolve, reject) => run(...call.args, (err) => (err ? reject(err) : resolve())));
    return call.result();
  }
  const call = lapackCall(job.a, n, job.label, job.lapack.dsyevd, vectorsType(options));
  await new Promise<void>((resolve, reject) => lib.dsyevdAsync(...call.args, (err) => (err ? reject(err) : resolve())));
  return call.result();
}

type Prepared =
  | { done: Eigh }
  | { a: Float64Array; label: string; lapack: NonNullable<ReturnType<typeof nativeLapack>> | null };

/** Checks the input and picks the backend; `a` is a symmetrized copy for the solver to overwrite. */
function prepare(matrix: Floats, n: number, options: EighOptions): Prepared {
  const label = options.label ?? 'matrix';
  if (!Number.isInteger(n) || n < 0) throw new Error(`eigh(${label}): bad size ${n}`);
  if (matrix.length !== n * n)
    throw new Error(`eigh(${label}): expected ${n}×${n} = ${n * n} values, got ${matrix.length}`);
  if (options.scale !== undefined && !options.lower)
    throw new Error(`eigh(${label}): scale applies to a lower triangle (lower: true)`);
  const backend = options.backend ?? 'auto';
  const lib = backend === 'js' ? null : nativeLapack();
  // a symmetric copy for the solver to overwrite, checked for NaN/Inf in the same pass; LAPACK's
  // 'L' solvers read one triangle of it, the JS one both
  const { a, bad } = options.lower ? symmetricFromLower(matrix, n, options.scale, !lib) : symmetrizedCopy(matrix, n);
  if (bad >= 0) {
    const i = Math.floor(bad / n);
    const v = options.lower ? matrix[bad] * (options.scale ?? 1) : matrix[bad];
    throw new Error(`eigh: ${Number.isNaN(v) ? 'NaN' : v} in ${label} at [${i}, ${bad - i * n}] (n=${n})`);
  }
  if (n === 0) return { done: { values: new Float64Array(0), vectors: new Float64Array(0) } };
  if (lib) return { a, label, lapack: lib };
  if (backend === 'lapack') {
    throw new Error(
      `eigh(${label}): LAPACK backend requested but not available: ${eighBackend().reason}; ${INSTALL_HINT}`,
    );
  }
  if (backend === 'auto' && n > JS_MAX_N) {
    throw new Error(
      `eigh(${label}): n=${n} is too large for the pure-JS eigensolver (limit ${JS_MAX_N}; ` +
        `${eighBackend().reason}). To fit factors for this model, ${INSTALL_HINT}`,
    );
  }
  return { a, label, lapack: null };
}

type Lapack = NonNullable<ReturnType<typeof nativeLapack>>;
type Dsyevd = Lapack['dsyevd'];
type Ssyevd = NonNullable<Lapack['ssyevd']>;

/**
 * dsyevd's (Float64Array `a`) or ssyevd's (Float32Array `a`) arguments after the workspace query,
 * and the reading of its result; `solver` runs the query.
 */
function lapackCall<A extends Float64Array | Float32Array>(
  a: A,
  n: number,
  label: string,
  solver: (...args: Parameters<A extends Float32Array ? Ssyevd : Dsyevd>) => void,
  vectors: EighDtype,
) {
  const name = a instanceof Float32Array ? 'ssyevd' : 'dsyevd';
  const floats = (len: number) => (a instanceof Float32Array ? new Float32Array(len) : new Float64Array(len)) as A;
  const N = new Int32Array([n]);
  const w = floats(n);
  const info = new Int32Array(1);
  const wq = floats(1);
  const iq = new Int32Array(1);
  type Args = Parameters<A extends Float32Array ? Ssyevd : Dsyevd>;
  // Workspace query (lwork = liwork = -1): LAPACK writes the optimal sizes into work[0], iwork[0].
  solver(
    ...(['V', 'L', N, a, N, w, wq, new Int32Array([-1]), iq, new Int32Array([-1]), info, 1, 1] as unknown as Args),
  );
  if (info[0] !== 0) throw new Error(`eigh(${label}): ${name} workspace query failed (info=${info[0]})`);
  // Reference LAPACK minimums for jobz='V', as a floor in case a library under-reports: ssyevd
  // returns the size as a float32, rounded above 2^24, down as often as not (18,018,000 for the
  // 18,018,001 that n = 3,000 needs, with OpenBLAS 0.3.21)
  const lwork = Math.max(Math.ceil(wq[0]), 1 + 6 * n + 2 * n * n);
  const liwork = Math.max(iq[0], 3 + 5 * n);
  const args = [
    'V',
    'L',
    N,
    a,
    N,
    w,
    floats(lwork),
    new Int32Array([lwork]),
    new Int32Array(liwork),
    new Int32Array([liwork]),
    info,
    1,
    1,
  ] as unknown as Args;
  const result = (): Eigh<Floats> => {
    if (info[0] < 0) throw new Error(`eigh(${label}): ${name} argument ${-info[0]} was illegal`);
    if (info[0] > 0) throw new Error(`eigh(${label}): ${name} failed to converge (info=${info[0]}, n=${n})`);
    // LAPACK returns eigenvectors column-major (a[j*n + i] = V[i][j]); we return row-major V, in
    // the type asked for, checked in the same pass
    const out = vectors === 'float32' ? new Float32Array(n * n) : new Float64Array(n * n);
    if (!transposeFinite(a, n, n, out)) throw new Error(`eigh(${label}): ${name} returned non-finite eigenvectors`);
    return { values: Float64Array.from(w), vectors: out };
  };
  return { args, result };
}

/** Bytes one LAPACK decomposition of size n holds while it runs: input copy, 2n² workspace, transposed result. */
export function eighBytes(n: number): number {
  return 8 * (4 * n * n + 12 * n);
}

let parallelUsers = 0;
let savedThreads = 0;

/** INFLUENCE_LENS_EIGH_PARALLEL: the most eigendecompositions at once, when set. */
export function eighParallelCap(): number | undefined {
  return positiveEnv('INFLUENCE_LENS_EIGH_PARALLEL', 'eigendecompositions at once', true);
}

/**
 * How many decompositions may run at once, each on one BLAS thread, for matrices up to
 * `largestN` within `memoryBytes`. On 2 cores, two single-threaded dsyevd at once took 1.38 s for
 * two n = 2048 covariances where one after the other with two OpenBLAS threads each took 1.71 s
 * (divide and conquer spends much of its time in memory-bound level-2 BLAS that does not scale
 * with threads). One BLAS thread per call also makes the results independent of how many run at
 * once: the same bits whether 1 or 4 run. Only OpenBLAS, whose thread count we can set, runs in
 * parallel; other libraries keep one call at a time. Call `end()` when the decompositions are done.
 * INFLUENCE_LENS_EIGH_PARALLEL=<n> caps the count (1 = one at a time, still single-threaded).
 */
export function parallelEigh(largestN: number, memoryBytes: number): { parallel: number; end(): void } {
  const lib = nativeLapack();
  if (!lib?.threads) return { parallel: 1, end() {} };
  const pool = Number(process.env.UV_THREADPOOL_SIZE) || 4; // libuv's default pool: koffi's async calls run there
  const cap = eighParallelCap();
  let parallel = Math.min(availableParallelism(), pool, Math.floor(memoryBytes / eighBytes(largestN)));
  if (cap !== undefined) parallel = Math.min(parallel, cap);
  parallel = Math.max(1, parallel);
  // Nested users share one setting: the first saves the library's count, the last restores it.
  if (parallelUsers++ === 0) {
    savedThreads = lib.threads.get();
    lib.threads.set(1);
  }
  let ended = false;
  return {
    parallel,
    end() {
      if (ended) return;
      ended = true;
      if (--parallelUsers === 0) lib.threads?.set(savedThreads);
    },
  };
}

/**
 * Householder reduction to tridiagonal form, then the implicit QL algorithm with shifts
 * (the classic EISPACK tred2/tql2 pair). W holds Vᵀ so every hot loop walks contiguous rows:
 * W[j*n + k] = V[k][j].
 */
export function eighJs(a: Float64Array, n: number, label = 'matrix'): Eigh {
  const W = a; // symmetric, so the input is its own transpose
  const d = new Float64Array(n);
  const e = new Float64Array(n);
  tred2(W, d, e, n);
  tql2(W, d, e, n, label);
  return { values: d, vectors: transpose(W, n, n) };
}

function tred2(W: Float64Array, d: Float64Array, e: Float64Array, n: number) {
  for (let j = 0; j < n; j++) d[j] = W[j * n + n - 1];
  for (let i = n - 1; i > 0; i--) {
    let scale = 0;
    let h = 0;
    for (let k = 0; k < i; k++) scale += Math.abs(d[k]);
    if (scale === 0) {
      e[i] = d[i - 1];
      for (let j = 0; j < i; j++) {
        d[j] = W[j * n + i - 1];
        W[j * n + i] = 0;
        W[i * n + j] = 0;
      }
    } else {
      // Householder vector for row i, scaled to avoid under/overflow
      for (let k = 0; k < i; k++) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      let f = d[i - 1];
      let g = Math.sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (let j = 0; j < i; j++) e[j] = 0;
      // e = A·u on the leading i×i block (lower triangle stored in W rows)
      for (let j = 0; j < i; j++) {
        const rj = j * n;
        f = d[j];
        W[i * n + j] = f;
        g = e[j] + W[rj + j] * f;
        for (let k = j + 1; k < i; k++) {
          g += W[rj + k] * d[k];
          e[k] += W[rj + k] * f;
        }
        e[j] = g;
      }
      f = 0;
      for (let j = 0; j < i; j++) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const hh = f / (h + h);
      for (let j = 0; j < i; j++) e[j] -= hh * d[j];
      // rank-2 update of the leading block
      for (let j = 0; j < i; j++) {
        const rj = j * n;
        f = d[j];
        g = e[j];
        for (let k = j; k < i; k++) W[rj + k] -= f * e[k] + g * d[k];
        d[j] = W[rj + i - 1];
        W[rj + i] = 0;
      }
    }
    d[i] = h;
  }
  // accumulate the transformations
  for (let i = 0; i < n - 1; i++) {
    const ri = i * n;
    const ri1 = (i + 1) * n;
    W[ri + n - 1] = W[ri + i];
    W[ri + i] = 1;
    const h = d[i + 1];
    if (h !== 0) {
      for (let k = 0; k <= i; k++) d[k] = W[ri1 + k] / h;
      for (let j = 0; j <= i; j++) {
        const rj = j * n;
        let g = 0;
        for (let k = 0; k <= i; k++) g += W[ri1 + k] * W[rj + k];
        for (let k = 0; k <= i; k++) W[rj + k] -= g * d[k];
      }
    }
    for (let k = 0; k <= i; k++) W[ri1 + k] = 0;
  }
  for (let j = 0; j < n; j++) {
    d[j] = W[j * n + n - 1];
    W[j * n + n - 1] = 0;
  }
  W[n * n - 1] = 1;
  e[0] = 0;
}

function hypot(a: number, b: number): number {
  const x = Math.abs(a);
  const y = Math.abs(b);
  if (x > y) {
    const r = y / x;
    return x * Math.sqrt(1 + r * r);
  }
  if (y === 0) return 0;
  const r = x / y;
  return y * Math.sqrt(1 + r * r);
}

function tql2(W: Float64Array, d: Float64Array, e: Float64Array, n: number, label: string) {
  for (let i = 1; i < n; i++) e[i - 1] = e[i];
  e[n - 1] = 0;
  let f = 0;
  let tst1 = 0;
  const eps = 2 ** -52;
  for (let l = 0; l < n; l++) {
    tst1 = Math.max(tst1, Math.abs(d[l]) + Math.abs(e[l]));
    let m = l;
    while (m < n - 1 && Math.abs(e[m]) > eps * tst1) m++;
    if (m > l) {
      let iter = 0;
      do {
        if (++iter > 60) throw new Error(`eigh(${label}): QL iteration did not converge (n=${n})`);
        // Wilkinson-style shift from the leading 2×2 block
        let g = d[l];
        let p = (d[l + 1] - g) / (2 * e[l]);
        let r = hypot(p, 1);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const dl1 = d[l + 1];
        let h = g - d[l];
        for (let i = l + 2; i < n; i++) d[i] -= h;
        f += h;
        // implicit QL sweep from m back to l, applying each Givens rotation to rows of W
        p = d[m];
        let c = 1;
        let c2 = c;
        let c3 = c;
        const el1 = e[l + 1];
        let s = 0;
        let s2 = 0;
        for (let i = m - 1; i >= l; i--) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          const ri = i * n;
          const ri1 = ri + n;
          for (let k = 0; k < n; k++) {
            const hk = W[ri1 + k];
            const vk = W[ri + k];
            W[ri1 + k] = s * vk + c * hk;
            W[ri + k] = c * vk - s * hk;
          }
        }
        p = (-s * s2 * c3 * el1 * e[l]) / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (Math.abs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0;
  }
  // ascending order, moving eigenvector rows along
  const tmp = new Float64Array(n);
  for (let i = 0; i < n - 1; i++) {
    let k = i;
    let p = d[i];
    for (let j = i + 1; j < n; j++) {
      if (d[j] < p) {
        k = j;
        p = d[j];
      }
    }
    if (k !== i) {
      d[k] = d[i];
      d[i] = p;
      tmp.set(W.subarray(i * n, i * n + n));
      W.copyWithin(i * n, k * n, k * n + n);
      W.set(tmp, k * n);
    }
  }
}
