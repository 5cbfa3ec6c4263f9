// Small fp64 dense helpers, row-major throughout. GEMM uses the system BLAS (dgemm_) for
// large products when native LAPACK is loaded, and a blocked JS loop otherwise.
import { nativeLapack } from './native';

export type Floats = Float32Array | Float64Array;

/** How EK-FAC factors are held in memory: 'fp32' for float32 graphs (as kronfluence), 'fp64' otherwise. */
export type Precision = 'fp32' | 'fp64';

/** `x` in the given precision: the same array when it already is, else a converted copy. */
export function inPrecision(x: Floats, p: Precision): Floats {
  if (p === 'fp64') return x instanceof Float64Array ? x : Float64Array.from(x);
  return x instanceof Float32Array ? x : Float32Array.from(x);
}

/** The precision an array is held in. */
export function precisionOf(x: Floats): Precision {
  return x instanceof Float32Array ? 'fp32' : 'fp64';
}

export interface GemmOptions {
  /** use Aᵀ: A is stored k×m */
  transA?: boolean;
  /** use Bᵀ: B is stored n×k */
  transB?: boolean;
  /** C = alpha·op(A)·op(B) + beta·C (beta needs `out`) */
  alpha?: number;
  beta?: number;
  out?: Float64Array;
  /** force the JS kernel (tests compare both) */
  js?: boolean;
}

// Below this many multiply-adds the FFI call and argument boxing cost more than they save.
const BLAS_MIN_FLOPS = 32 * 32 * 32;

/** C (m×n) = alpha·op(A)·op(B) + beta·C, where op(A) is m×k and op(B) is k×n. */
export function gemm(A: Float64Array, B: Float64Array, m: number, k: number, n: number, o: GemmOptions = {}) {
  const { transA = false, transB = false, alpha = 1, beta = 0 } = o;
  if (A.length < m * k) throw new Error(`gemm: A has ${A.length} values, needs ${m}×${k}`);
  if (B.length < k * n) throw new Error(`gemm: B has ${B.length} values, needs ${k}×${n}`);
  const C = o.out ?? new Float64Array(m * n);
  if (C.length < m * n) throw new Error(`gemm: out has ${C.length} values, needs ${m}×${n}`);
  if (m === 0 || n === 0) return C;
  const lib = o.js ? null : nativeLapack();
  if (lib?.dgemm && m * n * k >= BLAS_MIN_FLOPS) {
    // Row-major C is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so swap the operands.
    lib.dgemm(
      transB ? 'T' : 'N',
      transA ? 'T' : 'N',
      i32(n),
      i32(m),
      i32(k),
      new Float64Array([alpha]),
      B,
      i32(transB ? k : n),
      A,
      i32(transA ? m : k),
      new Float64Array([beta]),
      C,
      i32(n),
      1,
      1,
    );
    return C;
  }
  if (beta === 0) C.fill(0, 0, m * n);
  else if (beta !== 1) for (let i = 0; i < m * n; i++) C[i] *= beta;
  if (k === 0) return C;
  // The JS kernel wants B row-major k×n so that its inner loop runs over contiguous memory.
  const Bn = transB ? transpose(B, n, k) : B;
  gemmJs(A, Bn, C, m, k, n, transA, alpha);
  return C;
}

/**
 * C (m×n) = op(A)·op(B) in float32, for products whose inputs and result are float32 anyway
 * (query matrices fed to a float32 graph): the system's sgemm_ runs about twice dgemm's rate.
 * Without it, the fp64 kernel on widened copies (same result up to float32 rounding).
 */
export function gemm32(
  A: Float32Array,
  B: Float32Array,
  m: number,
  k: number,
  n: number,
  o: { transA?: boolean; transB?: boolean; out?: Float32Array } = {},
): Float32Array {
  const { transA = false, transB = false } = o;
  if (A.length < m * k) throw new Error(`gemm32: A has ${A.length} values, needs ${m}×${k}`);
  if (B.length < k * n) throw new Error(`gemm32: B has ${B.length} values, needs ${k}×${n}`);
  if (o.out && o.out.length < m * n) throw new Error(`gemm32: out has ${o.out.length} values, needs ${m}×${n}`);
  const lib = nativeLapack();
  if (!lib?.sgemm || m * n * k < BLAS_MIN_FLOPS) {
    const C64 = gemm(Float64Array.from(A), Float64Array.from(B), m, k, n, { transA, transB });
    if (!o.out) return Float32Array.from(C64);
    o.out.set(C64);
    return o.out;
  }
  const C = o.out ?? new Float32Array(m * n);
  if (m === 0 || n === 0) return C;
  // Row-major C is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so swap the operands (as gemm does).
  lib.sgemm(
    transB ? 'T' : 'N',
    transA ? 'T' : 'N',
    i32(n),
    i32(m),
    i32(k),
    new Float32Array([1]),
    B,
    i32(transB ? k : n),
    A,
    i32(transA ? m : k),
    new Float32Array([0]),
    C,
    i32(n),
    1,
    1,
  );
  return C;
}

/** syrkLower splits n >= SYRK_MIN_BLOCKED into column blocks about SYRK_BLOCK wide. */
export const SYRK_MIN_BLOCKED = 1024;
const SYRK_BLOCK = 384;

/**
 * C[0:n, 0:n] += Xᵀ X for X (rows × n, row-major). The LOWER triangle of C (C[i][j] with j <= i)
 * is always right; the upper one may or may not be written (mirror the lower one when the sum is
 * complete). C is row-major with leading dimension `ldc` >= n, so the block may sit inside a
 * larger matrix (the K-FAC activation factor with its bias row). X and C share one precision,
 * C's. Uses the system's sgemm_/dgemm_ (OpenBLAS's ssyrk, half the arithmetic, measured no
 * faster at n = 1536 and 4× slower at n = 576 with 128 rows); a JS loop over the lower triangle
 * otherwise. From n = 1024 on, the gemm is split into column blocks of the lower triangle
 * (SYRK_BLOCK wide, each block with the rows below it), which does (k+1)/(2k) of the full
 * product's arithmetic for k blocks: at n = 2049 and 768 rows, 1.3-1.7× faster than one gemm
 * (bench/results/2026-12-03-vm-engine-profile.md); each element is still one dot product over
 * all rows.
 */
export function syrkLower(X: Floats, rows: number, n: number, C: Floats, ldc = n): void {
  if (X.length < rows * n) throw new Error(`syrkLower: X has ${X.length} values, needs ${rows}×${n}`);
  if (ldc < n || C.length < (n - 1) * ldc + n) throw new Error(`syrkLower: C is too small for ${n}×${n} (ldc ${ldc})`);
  if (X instanceof Float32Array !== C instanceof Float32Array)
    throw new Error('syrkLower: X and C must have the same precision');
  if (rows === 0 || n === 0) return;
  const lib = nativeLapack();
  // Row-major X (rows × n) is column-major n × rows, so C_col += X_col X_colᵀ is ('N', 'T'); the
  // row-major lower triangle is the column-major upper one: column block [j0, j1) needs rows 0..j1.
  const blocks = n >= SYRK_MIN_BLOCKED ? Math.ceil(n / SYRK_BLOCK) : 1;
  const nb = Math.ceil(n / blocks);
  // sgemm for float32 sums, dgemm for fp64 ones: the same call with the other element type
  const single = C instanceof Float32Array;
  const native = (single ? lib?.sgemm : lib?.dgemm) as
    | ((...args: [string, string, ...Array<Int32Array | Floats>, number, number]) => void)
    | undefined;
  if (native) {
    const one = single ? new Float32Array([1]) : new Float64Array([1]);
    for (let j0 = 0; j0 < n; j0 += nb) {
      const j1 = Math.min(n, j0 + nb);
      const c = j0 === 0 ? C : C.subarray(j0 * ldc);
      native(
        'N',
        'T',
        i32(j1),
        i32(j1 - j0),
        i32(rows),
        one,
        X,
        i32(n),
        X.subarray(j0),
        i32(n),
        one,
        c,
        i32(ldc),
        1,
        1,
      );
    }
    return;
  }
  for (let t = 0; t < rows; t++) {
    const x = t * n;
    for (let i = 0; i < n; i++) {
      const xi = X[x + i];
      if (xi === 0) continue;
      const ci = i * ldc;
      for (let j = 0; j <= i; j++) C[ci + j] += xi * X[x + j];
    }
  }
}

/** Copies the lower triangle of a row-major n×n matrix (leading dimension ldc) onto the upper. */
export function mirrorLower(C: Floats, n: number, ldc = n): void {
  // in 32 × 32 tiles: the column walk of C[j][i] stays in cache (row by row it missed on every
  // read at n = 2048)
  const BS = 32;
  for (let i0 = 0; i0 < n; i0 += BS) {
    const i1 = Math.min(n, i0 + BS);
    for (let j0 = i0; j0 < n; j0 += BS) {
      const j1 = Math.min(n, j0 + BS);
      for (let i = i0; i < i1; i++) for (let j = Math.max(j0, i + 1); j < j1; j++) C[i * ldc + j] = C[j * ldc + i];
    }
  }
}

function i32(x: number): Int32Array {
  return new Int32Array([x]);
}

/** C += alpha·op(A)·B, B row-major k×n; blocked over k and n, inner loop unrolled over k. */
function gemmJs(
  A: Float64Array,
  B: Float64Array,
  C: Float64Array,
  m: number,
  k: number,
  n: number,
  transA: boolean,
  alpha: number,
) {
  const NB = 512;
  const KB = 128;
  // op(A)[i, p] is A[i*k + p] (no transpose) or A[p*m + i] (transpose)
  const si = transA ? 1 : k;
  const sp = transA ? m : 1;
  for (let j0 = 0; j0 < n; j0 += NB) {
    const j1 = Math.min(n, j0 + NB);
    for (let p0 = 0; p0 < k; p0 += KB) {
      const p1 = Math.min(k, p0 + KB);
      for (let i = 0; i < m; i++) {
        const ci = i * n;
        let p = p0;
        for (; p + 3 < p1; p += 4) {
          const a0 = alpha * A[i * si + p * sp];
          const a1 = alpha * A[i * si + (p + 1) * sp];
          const a2 = alpha * A[i * si + (p + 2) * sp];
          const a3 = alpha * A[i * si + (p + 3) * sp];
          if (a0 === 0 && a1 === 0 && a2 === 0 && a3 === 0) continue;
          const b0 = p * n;
          const b1 = b0 + n;
          const b2 = b1 + n;
          const b3 = b2 + n;
          for (let j = j0; j < j1; j++) {
            C[ci + j] += a0 * B[b0 + j] + a1 * B[b1 + j] + a2 * B[b2 + j] + a3 * B[b3 + j];
          }
        }
        for (; p < p1; p++) {
          const a = alpha * A[i * si + p * sp];
          if (a === 0) continue;
          const b = p * n;
          for (let j = j0; j < j1; j++) C[ci + j] += a * B[b + j];
        }
      }
    }
  }
}

/** Row-major transpose: A is rows×cols, the result cols×rows. */
export function transpose<T extends Floats = Float64Array>(
  A: Floats,
  rows: number,
  cols: number,
  out: T = new Float64Array(rows * cols) as T,
): T {
  transposeFinite(A, rows, cols, out);
  return out;
}

/** fp64 copy (or the same array when it already is fp64 and `copy` is false). */
export function toF64(x: Floats | ArrayLike<number>, copy = false): Float64Array {
  if (x instanceof Float64Array && !copy) return x;
  return Float64Array.from(x as ArrayLike<number>);
}

/** Index of the first NaN/±Inf, or -1. */
export function firstNonFinite(x: ArrayLike<number>): number {
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    // v - v is NaN exactly for NaN and ±Inf, and cheaper than Number.isFinite
    if (v - v !== 0) return i;
  }
  return -1;
}

/** Frobenius inner product Σ x_i y_i (fp64 accumulation). */
export function dot(x: ArrayLike<number>, y: ArrayLike<number>): number {
  if (x.length !== y.length) throw new Error(`dot: lengths ${x.length} and ${y.length} differ`);
  let s0 = 0;
  let s1 = 0;
  let i = 0;
  for (; i + 1 < x.length; i += 2) {
    s0 += x[i] * y[i];
    s1 += x[i + 1] * y[i + 1];
  }
  if (i < x.length) s0 += x[i] * y[i];
  return s0 + s1;
}

/**
 * (A + Aᵀ) / 2 of a square `n × n` matrix as a new fp64 array, in one pass over A (tiles of 32),
 * or -1 replaced by the index of a non-finite value of A when there is one (`bad`, row-major,
 * the first as `firstNonFinite` would find it). One pass instead of a copy, a scan and a
 * symmetrize: at SmolLM-135M's shape those three took 3.9 s of the eigendecomposition phase.
 * (Two finite entries whose sum overflows give ±Inf in the copy without being reported, as the
 * separate scan did not either; covariances are far from that range.)
 */
export function symmetrizedCopy(A: Floats, n: number): { a: Float64Array; bad: number } {
  const out = new Float64Array(n * n);
  const BS = 32;
  let nonFinite = false;
  for (let i0 = 0; i0 < n; i0 += BS) {
    const i1 = Math.min(n, i0 + BS);
    for (let j0 = i0; j0 < n; j0 += BS) {
      const j1 = Math.min(n, j0 + BS);
      for (let i = i0; i < i1; i++)
        for (let j = Math.max(j0, i); j < j1; j++) {
          // NaN or ±Inf in either entry makes v - v NaN
          const v = 0.5 * (A[i * n + j] + A[j * n + i]);
          if (v - v !== 0) nonFinite = true;
          out[i * n + j] = v;
          out[j * n + i] = v;
        }
    }
  }
  return { a: out, bad: nonFinite ? firstNonFinite(A) : -1 };
}

/**
 * scale × L as a full symmetric fp64 matrix, reading only the lower triangle of L (row-major,
 * L[i][j] with j <= i; the upper one may hold anything, as `syrkLower`'s sums do), in one pass of
 * tiles; `bad` is the row-major index of the first non-finite scaled entry of that triangle, or -1.
 * A covariance sum becomes its mean, symmetric and checked here: mirroring the sum, dividing it by
 * its count, checking it and symmetrizing a copy for the solver took four passes, 5.5 s of the
 * 39 s eigendecomposition phase at SmolLM-135M's shape. `mirror` false writes the upper triangle
 * alone (row-major; LAPACK's column-major lower one, all that its 'L' solvers read).
 */
export function symmetricFromLower(L: Floats, n: number, scale = 1, mirror = true): { a: Float64Array; bad: number } {
  if (L.length < n * n) throw new Error(`symmetricFromLower: expected ${n}×${n} values, got ${L.length}`);
  const out = new Float64Array(n * n);
  const BS = 32;
  let nonFinite = false;
  for (let i0 = 0; i0 < n; i0 += BS) {
    const i1 = Math.min(n, i0 + BS);
    for (let j0 = 0; j0 <= i0; j0 += BS) {
      const j1 = Math.min(n, j0 + BS);
      for (let i = i0; i < i1; i++) {
        const jEnd = Math.min(j1, i + 1);
        for (let j = j0; j < jEnd; j++) {
          const v = L[i * n + j] * scale;
          if (v - v !== 0) nonFinite = true;
          if (mirror) out[i * n + j] = v;
          out[j * n + i] = v;
        }
      }
    }
  }
  let bad = -1;
  if (nonFinite)
    for (let i = 0; i < n && bad < 0; i++)
      for (let j = 0; j <= i; j++) {
        const v = L[i * n + j] * scale;
        if (v - v !== 0) {
          bad = i * n + j;
          break;
        }
      }
  return { a: out, bad };
}

/**
 * Aᵀ (rows × cols in, cols × rows out, tiles of 32) into `out` of any float type, saying whether
 * every value was finite: a solver's column-major result is read back row-major, narrowed and
 * checked in one pass instead of three (`transpose` is this without the answer).
 */
export function transposeFinite(A: Floats, rows: number, cols: number, out: Floats): boolean {
  const BS = 32;
  let finite = true;
  for (let i0 = 0; i0 < rows; i0 += BS) {
    const i1 = Math.min(rows, i0 + BS);
    for (let j0 = 0; j0 < cols; j0 += BS) {
      const j1 = Math.min(cols, j0 + BS);
      for (let i = i0; i < i1; i++)
        for (let j = j0; j < j1; j++) {
          const v = A[i * cols + j];
          if (v - v !== 0) finite = false;
          out[j * rows + i] = v;
        }
    }
  }
  return finite;
}

/** A ← (A + Aᵀ)/2 in place for a square n×n matrix. */
export function symmetrize(A: Float64Array, n: number): Float64Array {
  // in 32 × 32 tiles, as mirrorLower
  const BS = 32;
  for (let i0 = 0; i0 < n; i0 += BS) {
    const i1 = Math.min(n, i0 + BS);
    for (let j0 = i0; j0 < n; j0 += BS) {
      const j1 = Math.min(n, j0 + BS);
      for (let i = i0; i < i1; i++)
        for (let j = Math.max(j0, i + 1); j < j1; j++) {
          const v = 0.5 * (A[i * n + j] + A[j * n + i]);
          A[i * n + j] = v;
          A[j * n + i] = v;
        }
    }
  }
  return A;
}

/** Identity n×n. */
export function eye(n: number): Float64Array {
  const I = new Float64Array(n * n);
  for (let i = 0; i < n; i++) I[i * n + i] = 1;
  return I;
}
