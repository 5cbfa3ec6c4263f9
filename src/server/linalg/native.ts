// System LAPACK/BLAS through koffi (FFI), loaded lazily on first use. Nothing here is
// required: when no library is found, or INFLUENCE_LENS_LAPACK=off, callers use pure JS.
//
// Fortran calling convention: every argument by pointer, column-major matrices, and
// (gfortran) one hidden size_t length per character argument appended at the end.
// Passing those lengths is harmless for libraries that do not expect them.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { EnvSettingError, switchEnv } from '../util/env';

/** LAPACK's ?syevd_: dsyevd over Float64Array, ssyevd (kronfluence's eigendecomposition_dtype=float32) over Float32Array */
type SyevdFn<F extends Float64Array | Float32Array> = (
  jobz: string,
  uplo: string,
  n: Int32Array,
  a: F,
  lda: Int32Array,
  w: F,
  work: F,
  lwork: Int32Array,
  iwork: Int32Array,
  liwork: Int32Array,
  info: Int32Array,
  jobzLen: number,
  uploLen: number,
) => void;
type DsyevdFn = SyevdFn<Float64Array>;
type SsyevdFn = SyevdFn<Float32Array>;

type DgemmFn = (
  transa: string,
  transb: string,
  m: Int32Array,
  n: Int32Array,
  k: Int32Array,
  alpha: Float64Array,
  a: Float64Array,
  lda: Int32Array,
  b: Float64Array,
  ldb: Int32Array,
  beta: Float64Array,
  c: Float64Array,
  ldc: Int32Array,
  transaLen: number,
  transbLen: number,
) => void;

/** sgemm_: dgemm's signature in float32 */
type SgemmFn = (
  transa: string,
  transb: string,
  m: Int32Array,
  n: Int32Array,
  k: Int32Array,
  alpha: Float32Array,
  a: Float32Array,
  lda: Int32Array,
  b: Float32Array,
  ldb: Int32Array,
  beta: Float32Array,
  c: Float32Array,
  ldc: Int32Array,
  transaLen: number,
  transbLen: number,
) => void;

export interface NativeLapack {
  /** the library file that was opened */
  library: string;
  /** OpenBLAS's kernel set for this CPU (openblas_get_corename), absent for other libraries */
  core?: string;
  dsyevd: DsyevdFn;
  /** the same call on libuv's thread pool (koffi's async calls): the JS thread stays free */
  dsyevdAsync: (...args: [...Parameters<DsyevdFn>, (err: unknown) => void]) => void;
  /** absent when the library lacks it: float32 decompositions then run in fp64 (eigh.ts) */
  ssyevd?: SsyevdFn;
  ssyevdAsync?: (...args: [...Parameters<SsyevdFn>, (err: unknown) => void]) => void;
  /**
   * OpenBLAS's own thread count (openblas_set_num_threads / openblas_get_num_threads), absent for
   * other libraries. Several single-threaded calls at once need it: without it, a library's own
   * threads would compete with ours, and not every library is safe to call from several threads.
   */
  threads?: { get(): number; set(n: number): void };
  /** absent when the library exports LAPACK but not BLAS level 3 */
  dgemm?: DgemmFn;
  sgemm?: SgemmFn;
}

const CANDIDATES: Record<string, string[]> = {
  linux: ['libopenblas.so.0', 'libopenblasp.so.0', 'libopenblas.so', 'liblapack.so.3', 'liblapack.so'],
  darwin: [
    '/System/Library/Frameworks/Accelerate.framework/Accelerate',
    '/opt/homebrew/opt/openblas/lib/libopenblas.dylib',
    '/usr/local/opt/openblas/lib/libopenblas.dylib',
  ],
  win32: ['libopenblas.dll', 'openblas.dll', 'liblapack.dll'],
};

let cached: NativeLapack | null | undefined;
let loadErrors: string[] = [];

/** True unless the user turned native LAPACK off (INFLUENCE_LENS_LAPACK=off|0|false). */
export function lapackAllowed(): boolean {
  return switchEnv('INFLUENCE_LENS_LAPACK') ?? true;
}

/** The loaded library, or null (LAPACK off, koffi missing, or no library found). */
export function nativeLapack(): NativeLapack | null {
  if (!lapackAllowed()) return null;
  if (cached !== undefined) return cached;
  cached = load();
  return cached;
}

/** Why no native library could be loaded (for error messages). */
export function nativeLoadErrors(): string[] {
  return loadErrors.slice();
}

/**
 * The OPENBLAS_CORETYPE to ask for on this CPU, or undefined to leave OpenBLAS's own choice.
 * OpenBLAS before 0.3.22 (Debian 12 ships 0.3.21) does not know AMD's AVX-512 cores (Zen 4, Zen 5)
 * and runs them on its AVX2 kernels: on the 2-core Zen 5 development VM its sgemm ran at 185–190
 * GFLOP/s with them and 370–377 with its SkylakeX (AVX-512) kernels, which later versions pick for
 * these cores. Asked for only on an AMD CPU whose flags list every AVX-512 subset those kernels
 * use (Linux lists them only when the kernel saves the AVX-512 state), and never over the user's own
 * OPENBLAS_CORETYPE.
 */
export function openblasCoreFor(cpuinfo: string, env: NodeJS.ProcessEnv): string | undefined {
  if (env.OPENBLAS_CORETYPE !== undefined) return undefined;
  const vendor = /^vendor_id\s*:\s*(\S+)/m.exec(cpuinfo)?.[1];
  if (vendor !== 'AuthenticAMD') return undefined;
  const flags = new Set((/^flags\s*:(.*)$/m.exec(cpuinfo)?.[1] ?? '').trim().split(/\s+/));
  const needed = ['avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl'];
  return needed.every((f) => flags.has(f)) ? 'SkylakeX' : undefined;
}

function chooseOpenblasCore(): void {
  if (process.platform !== 'linux' || process.arch !== 'x64') return;
  let cpuinfo: string;
  try {
    cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    return;
  }
  const core = openblasCoreFor(cpuinfo, process.env);
  // read by OpenBLAS when the library loads (below), from this process's environment
  if (core) process.env.OPENBLAS_CORETYPE = core;
}

function load(): NativeLapack | null {
  loadErrors = [];
  chooseOpenblasCore();
  // koffi is an optional native dependency: require it lazily so a missing prebuilt
  // binary only disables the fast path.
  let koffi: typeof import('koffi');
  try {
    koffi = createRequire(import.meta.url)('koffi');
  } catch (e) {
    loadErrors.push(`koffi: ${(e as Error).message}`);
    return null;
  }
  const extra = process.env.INFLUENCE_LENS_LAPACK_LIBRARY;
  const names = [...(extra ? [extra] : []), ...(CANDIDATES[process.platform] ?? CANDIDATES.linux)];
  for (const name of names) {
    let lib: ReturnType<typeof koffi.load>;
    try {
      lib = koffi.load(name);
    } catch (e) {
      const why = (e as Error).message.split('\n')[0];
      // the library the user named (for MKL's speed, say) is not one to pass over without a word
      if (name === extra) throw namedLibraryError(extra, why);
      loadErrors.push(`${name}: ${why}`);
      continue;
    }
    try {
      const dsyevd = lib.func(
        'void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda, double *w, ' +
          'double *work, const int *lwork, int *iwork, const int *liwork, int *info, size_t l1, size_t l2)',
      ) as DsyevdFn;
      let dgemm: DgemmFn | undefined;
      try {
        dgemm = lib.func(
          'void dgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k, ' +
            'const double *alpha, const double *a, const int *lda, const double *b, const int *ldb, ' +
            'const double *beta, double *c, const int *ldc, size_t l1, size_t l2)',
        ) as DgemmFn;
      } catch {
        dgemm = undefined;
      }
      let ssyevd: SsyevdFn | undefined;
      try {
        ssyevd = lib.func(
          'void ssyevd_(const char *jobz, const char *uplo, const int *n, float *a, const int *lda, float *w, ' +
            'float *work, const int *lwork, int *iwork, const int *liwork, int *info, size_t l1, size_t l2)',
        ) as SsyevdFn;
      } catch {
        ssyevd = undefined;
      }
      let sgemm: SgemmFn | undefined;
      try {
        sgemm = lib.func(
          'void sgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k, ' +
            'const float *alpha, const float *a, const int *lda, const float *b, const int *ldb, ' +
            'const float *beta, float *c, const int *ldc, size_t l1, size_t l2)',
        ) as SgemmFn;
      } catch {
        sgemm = undefined;
      }
      let core: string | undefined;
      try {
        core = (lib.func('const char *openblas_get_corename()') as () => string)();
      } catch {
        core = undefined;
      }
      let threads: NativeLapack['threads'];
      try {
        const get = lib.func('int openblas_get_num_threads()') as () => number;
        const set = lib.func('void openblas_set_num_threads(int n)') as (n: number) => void;
        threads = { get, set };
      } catch {
        threads = undefined;
      }
      const withAsync = dsyevd as unknown as { async: NativeLapack['dsyevdAsync'] };
      const dsyevdAsync: NativeLapack['dsyevdAsync'] = (...args) => withAsync.async(...args);
      const ssyevdAsync: NativeLapack['ssyevdAsync'] = ssyevd
        ? (...args) => (ssyevd as unknown as { async: NonNullable<NativeLapack['ssyevdAsync']> }).async(...args)
        : undefined;
      return { library: name, core, dsyevd, dsyevdAsync, ssyevd, ssyevdAsync, dgemm, sgemm, threads };
    } catch (e) {
      const why = `no dsyevd_ (${(e as Error).message.split('\n')[0]})`;
      if (name === extra) throw namedLibraryError(extra, why);
      loadErrors.push(`${name}: ${why}`);
    }
  }
  return null;
}

function namedLibraryError(name: string, why: string): EnvSettingError {
  return new EnvSettingError(
    `INFLUENCE_LENS_LAPACK_LIBRARY="${name}" could not be used: ${why}; name a LAPACK library that exports dsyevd_ (a path or a soname the loader finds), or unset it to use the system's`,
  );
}

/** Test hook: forget the loaded library so the next call loads again. */
export function resetNativeLapackForTests(): void {
  cached = undefined;
}
