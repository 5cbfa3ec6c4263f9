// Factors on disk in kronfluence's layout, so either tool can read the other's factors:
//   factors_<name>/activation_covariance.safetensors         Σ_t ã_t ã_tᵀ   [d_A, d_A]  (a SUM)
//                  gradient_covariance.safetensors           Σ_t g_t g_tᵀ   [d_out, d_out]
//                  num_activation_covariance_processed        tokens (I64 [1])
//                  num_gradient_covariance_processed          tokens (I64 [1])
//                  activation_eigenvectors / gradient_eigenvectors   Q [d, d], column j = eigenvector j
//                  activation_eigenvalues / gradient_eigenvalues     ascending, of the MEAN covariance
//                  lambda_matrix.safetensors                 Σ_z (Q_Sᵀ G Q_A)²  [d_out, d_A]  (a SUM)
//                  num_lambda_processed                       examples (I64 [1])
//                  factor_arguments.json                      kronfluence's FactorArguments
//                  influence_lens_arguments.json              ours: labels, damping, modules, ... fingerprint
// Each safetensors file holds one tensor per module name; d_A = d_in + 1 for modules with a bias
// (kronfluence appends the 1 as the last column). kronfluence builds FactorArguments(**json) from
// factor_arguments.json, so our own fields live in a separate file.
// Precision: each tensor is written in the type it is held in (a float32 model's eigenvectors as
// F32, as kronfluence's default; an fp64 model's as F64), and read back into the precision of the
// model that opens it: F32 stays Float32Array for a float32 model, F64 files (all ours before
// this) are narrowed for it and widened F32 files for an fp64 one. Counts and eigenvalues are
// always read as fp64.

import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { restoreReplacedPath, writeAtomicWith, writeFileAtomic } from '../../../common/atomic-write';
import { readRegularFile } from '../../../common/read-file';
import { readStoredTraining, type TrainingConvention } from '../../data/training';
import type { EighDtype } from '../../linalg/eigh';
import { type Floats, firstNonFinite, inPrecision, type Precision, precisionOf, toF64 } from '../../linalg/matrix';
import {
  checkDataChecksum,
  HEADER_SHA256,
  readSafetensorsHeader,
  readTensor,
  readTensorF64,
  writeSafetensors,
} from '../../model/safetensors';
import { type ModelParts, readModelParts } from '../fingerprint';
import { CovarianceAccumulator } from './covariance';
import type { Eigenbasis } from './eigenbasis';
import type { ModuleShape } from './gradient';
import { type LambdaAccumulator, lambdaMean } from './lambda';
import { type Damping, DEFAULT_DAMPING, makePreconditioner, type Preconditioner } from './precondition';

export const ACTIVATION_COVARIANCE = 'activation_covariance';
export const GRADIENT_COVARIANCE = 'gradient_covariance';
export const NUM_ACTIVATION_COVARIANCE_PROCESSED = 'num_activation_covariance_processed';
export const NUM_GRADIENT_COVARIANCE_PROCESSED = 'num_gradient_covariance_processed';
export const ACTIVATION_EIGENVECTORS = 'activation_eigenvectors';
export const ACTIVATION_EIGENVALUES = 'activation_eigenvalues';
export const GRADIENT_EIGENVECTORS = 'gradient_eigenvectors';
export const GRADIENT_EIGENVALUES = 'gradient_eigenvalues';
export const LAMBDA_MATRIX = 'lambda_matrix';
export const NUM_LAMBDA_PROCESSED = 'num_lambda_processed';
export const FACTOR_ARGUMENTS_FILE = 'factor_arguments.json';
export const OUR_ARGUMENTS_FILE = 'influence_lens_arguments.json';

const COVARIANCE_FILES = [
  ACTIVATION_COVARIANCE,
  GRADIENT_COVARIANCE,
  NUM_ACTIVATION_COVARIANCE_PROCESSED,
  NUM_GRADIENT_COVARIANCE_PROCESSED,
];
const EIGEN_FILES = [ACTIVATION_EIGENVECTORS, ACTIVATION_EIGENVALUES, GRADIENT_EIGENVECTORS, GRADIENT_EIGENVALUES];
const LAMBDA_FILES = [LAMBDA_MATRIX, NUM_LAMBDA_PROCESSED];
/** Every file of complete factors (what `loadFactors` may read): a change to any is a refit. */
export const FACTOR_FILES: readonly string[] = [
  OUR_ARGUMENTS_FILE,
  FACTOR_ARGUMENTS_FILE,
  ...[...COVARIANCE_FILES, ...EIGEN_FILES, ...LAMBDA_FILES].map((f) => `${f}.safetensors`),
];

/** A factors folder or file that cannot be used as it is (missing, incomplete, damaged, foreign): the
 * person fixes or refits it, so the CLI prints its message alone. */
export class FactorsError extends Error {
  override name = 'FactorsError';
}

/** A factors folder whose fit has not finished (a person acts on it: the CLI prints its message alone). */
export class UnfinishedFitError extends Error {
  override name = 'UnfinishedFitError';
}

/**
 * What this version's fit computes for a given model, data and settings, stored with the factors
 * it writes. Bumped whenever that changes, so that factors an earlier version fitted are refused
 * (stage.ts) and a cache of them is fitted again (fit-job.ts), never used as if this version had
 * fitted them:
 * - 1 (stored as no `fitVersion`): every fit before the key existed;
 * - 2: sampled labels drawn per example from a stream of the seed, the pass and the example's
 *   index (before, one stream per batch: the same seed gave other labels, hence other factors).
 */
export const FIT_VERSION = 2;

/** What changed in the fit since each version, for a refusal's message (FIT_VERSION's list). */
export const FIT_CHANGES: Readonly<Record<number, string>> = {
  2: 'sampled labels are drawn per example',
};

/** Says how factors of fit version `v` differ from this version's (for refusals and refits). */
export function fitVersionChange(v: number | null | undefined): string {
  const since = Object.entries(FIT_CHANGES)
    .filter(([k]) => Number(k) > (v ?? 1) && Number(k) <= FIT_VERSION)
    .map(([, what]) => what);
  return `fit version ${v ?? 1}, this version fits version ${FIT_VERSION}${since.length ? `: since then ${since.join('; ')}` : ''}`;
}

export interface FactorArguments {
  strategy: 'ekfac';
  /** labels for the Fisher: sampled from the model (true Fisher) or the data's own */
  labels: 'sampled' | 'empirical';
  /** damping to use with these factors unless a query overrides it */
  damping: Damping;
  modules: string[];
  /** examples used to fit (null: all) */
  maxExamples: number | null;
  /** seed of label sampling and example selection (null when unknown, e.g. kronfluence's factors) */
  seed: number | null;
  /** fingerprints of the model weights and the data the factors were fitted on (null when unknown) */
  modelFingerprint?: string | null;
  dataFingerprint?: string | null;
  /**
   * how the training records were tokenized (data/training.ts; null when unknown: factors of
   * another tool, or written before it was stored): scoring under another convention is refused
   * (stage.ts), as the candidates would be other token sequences than the factors were fitted on
   */
  training?: TrainingConvention | null;
  /**
   * the precision the covariances were eigendecomposed in (kronfluence's eigendecomposition_dtype);
   * absent means float64, as in every fit before the option existed
   */
  eigendecompositionDtype?: EighDtype;
  /**
   * the tokenization the records were fitted under (data/tokenize.ts tokenizationKey: the
   * tokenizer's and chat template's digests, the training convention; null or absent when unknown:
   * written before it was stored): factors of another tokenizer are refused (stage.ts). Not part of
   * the fit's identity: dataFingerprint already covers it.
   */
  tokenization?: Record<string, unknown> | null;
  /**
   * what modelFingerprint is made of (fingerprint.ts ModelParts: config.json, the adapter's
   * settings, each weight file's digest), so that a refusal can say what changed; null or absent
   * when unknown. Not part of the fit's identity: modelFingerprint already covers it.
   */
  modelParts?: ModelParts | null;
  /**
   * which version of this program's fit wrote them (FIT_VERSION; 1 for our factors written before
   * it was stored, null for another tool's, whose fit is its own)
   */
  fitVersion?: number | null;
}

/** The eigendecomposition precision of stored arguments (absent: float64). */
export function eigendecompositionDtypeOf(a: Pick<FactorArguments, 'eigendecompositionDtype'>): EighDtype {
  return a.eigendecompositionDtype ?? 'float64';
}

/** One module's stored factors; each stage is optional (they are fitted one after another). */
export interface ModuleFactors {
  name: string;
  dA: number;
  dOut: number;
  covariance?: {
    activationSum: Floats;
    activationCount: number;
    gradientSum: Floats;
    gradientCount: number;
  };
  eigen?: { qA: Floats; eigA: Float64Array; qS: Floats; eigS: Float64Array };
  lambda?: { sum: Floats; count: number };
}

export interface Factors {
  args: FactorArguments;
  /** identifies the model weights and data the factors were fitted on (null for foreign factors) */
  fingerprint: string | null;
  modules: Record<string, ModuleFactors>;
}

export interface SaveOptions {
  /** on-disk float type; kronfluence's default is F32. Counts are always I64. Default 'auto':
   * each tensor as it is held (Float32Array → F32, Float64Array → F64). */
  dtype?: 'F32' | 'F64' | 'auto';
  /**
   * Stages copied file by file from a directory `saveFactors` wrote, after verifying each file's
   * data checksum and module names, instead of written from memory (the modules then need not
   * hold them): the fit job's final write, which would otherwise load every covariance and
   * eigenvector again beside Λ (about 15 GB at the Qwen2.5-0.5B shape).
   */
  copyFrom?: { dir: string; stages: Array<'covariance' | 'eigen'> };
}

const STAGE_FILES = { covariance: COVARIANCE_FILES, eigen: EIGEN_FILES } as const;

/** Copies verified stage files into `dir`; returns the float type of the copied covariances, if any. */
function copyStages(
  dir: string,
  from: NonNullable<SaveOptions['copyFrom']>,
  modules: string[],
): 'F32' | 'F64' | undefined {
  let covarianceType: 'F32' | 'F64' | undefined;
  const files = from.stages.flatMap((stage) => STAGE_FILES[stage]);
  // every file verified before any is copied: a refused copy leaves nothing half-written
  for (const file of files) {
    const src = join(from.dir, `${file}.safetensors`);
    const h = readSafetensorsHeader(src);
    const check = checkDataChecksum(h);
    if (check !== 'ok')
      throw new FactorsError(
        `${src}: ${check === 'absent' ? 'has no data checksum' : 'data does not match its checksum'}; refit`,
      );
    const names = [...h.tensors.keys()].sort();
    const want = [...modules].sort();
    if (names.length !== want.length || names.some((n, i) => n !== want[i]))
      throw new FactorsError(`${src} holds modules ${names.join(', ')}; expected ${want.join(', ')}`);
    if (file === ACTIVATION_COVARIANCE) covarianceType = h.tensors.get(names[0])!.dtype === 'F32' ? 'F32' : 'F64';
  }
  for (const file of files)
    writeAtomicWith(join(dir, `${file}.safetensors`), (tmp) =>
      copyFileSync(join(from.dir, `${file}.safetensors`), tmp),
    );
  return covarianceType;
}

export interface LoadOptions {
  /** the precision of the model the factors serve: covariance sums, eigenvectors and Λ sums come
   * back as Float32Array for 'fp32', Float64Array for 'fp64' (default) */
  precision?: Precision;
  /** false: skip the covariance files (scoring needs only eigenvectors and Λ). Default true. */
  covariances?: boolean;
}

export function factorsDir(root: string, name: string): string {
  return join(root, `factors_${name}`);
}

/** Collects what the fitting stages produced for one module. */
export function moduleFactors(
  cov: CovarianceAccumulator,
  basis?: Eigenbasis,
  lambda?: LambdaAccumulator,
): ModuleFactors {
  const mf: ModuleFactors = {
    name: cov.shape.name,
    dA: cov.dA,
    dOut: cov.shape.dOut,
    covariance: {
      activationSum: cov.activationSum,
      activationCount: cov.activationCount,
      gradientSum: cov.gradientSum,
      gradientCount: cov.gradientCount,
    },
  };
  if (basis) mf.eigen = { qA: basis.qA, eigA: basis.eigA, qS: basis.qS, eigS: basis.eigS };
  if (lambda) mf.lambda = { sum: lambda.sum, count: lambda.count };
  return mf;
}

/** Writes every stage that all modules have. Files are written atomically, arguments last. */
export function saveFactors(dir: string, factors: Factors, options: SaveOptions = {}): void {
  const dtype = options.dtype ?? 'auto';
  const mods = Object.values(factors.modules);
  if (mods.length === 0) throw new Error(`saveFactors(${dir}): no modules`);
  mkdirSync(dir, { recursive: true });
  const typeOf = (x: Floats | undefined): 'F32' | 'F64' =>
    dtype !== 'auto' ? dtype : x instanceof Float32Array ? 'F32' : 'F64';
  const first = mods[0];
  const copiedCovariance = options.copyFrom
    ? copyStages(
        dir,
        options.copyFrom,
        mods.map((m) => m.name),
      )
    : undefined;
  // per-example gradients are in the model's precision (that of the covariances); Λ is summed in
  // fp64 (LambdaAccumulator), so stages written before Λ exists say so too and every file's
  // metadata agrees. kronfluence reads neither when scoring (test/oracle/KRONFLUENCE.md).
  const kron = kronfluenceArguments(factors.args, {
    covariance: copiedCovariance ?? typeOf(first.covariance?.activationSum ?? first.eigen?.qA ?? first.lambda?.sum),
    lambda: first.lambda ? typeOf(first.lambda.sum) : dtype === 'auto' ? 'F64' : dtype,
  });
  const metadata: Record<string, string> = {};
  for (const [k, v] of Object.entries(kron)) metadata[k] = v === null ? 'None' : pyStr(v);
  if (factors.fingerprint) metadata.influence_lens_fingerprint = factors.fingerprint;
  // which fit wrote the file: files of two fits of the same model and data (another seed or
  // labels) must never be read together
  metadata.influence_lens_fit = fitIdentity(factors.args, factors.fingerprint);

  const stage = (present: (m: ModuleFactors) => boolean, what: string) => {
    const n = mods.filter(present).length;
    if (n !== 0 && n !== mods.length)
      throw new Error(`saveFactors(${dir}): only ${n} of ${mods.length} modules have ${what}`);
    return n > 0;
  };
  // writeSafetensors converts an array that is not already of `dtype`
  const float = (data: Floats, shape: number[]) => ({ dtype: typeOf(data), shape, data });
  // kronfluence counts are int64; weighted (non-integer) counts are kept exact as F64, which
  // kronfluence also divides by.
  const count = (c: number) =>
    Number.isSafeInteger(c)
      ? { dtype: 'I64' as const, shape: [1], data: BigInt64Array.of(BigInt(c)) }
      : { dtype: 'F64' as const, shape: [1], data: Float64Array.of(c) };
  const write = (file: string, pick: (m: ModuleFactors) => ReturnType<typeof float> | ReturnType<typeof count>) => {
    const tensors: Parameters<typeof writeSafetensors>[1] = {};
    for (const m of mods) tensors[m.name] = pick(m);
    writeSafetensors(join(dir, `${file}.safetensors`), tensors, metadata, { checksum: true });
  };

  if (stage((m) => !!m.covariance, 'covariances')) {
    write(ACTIVATION_COVARIANCE, (m) => float(m.covariance!.activationSum, [m.dA, m.dA]));
    write(GRADIENT_COVARIANCE, (m) => float(m.covariance!.gradientSum, [m.dOut, m.dOut]));
    write(NUM_ACTIVATION_COVARIANCE_PROCESSED, (m) => count(m.covariance!.activationCount));
    write(NUM_GRADIENT_COVARIANCE_PROCESSED, (m) => count(m.covariance!.gradientCount));
  }
  if (stage((m) => !!m.eigen, 'eigendecompositions')) {
    write(ACTIVATION_EIGENVECTORS, (m) => float(m.eigen!.qA, [m.dA, m.dA]));
    write(ACTIVATION_EIGENVALUES, (m) => float(m.eigen!.eigA, [m.dA]));
    write(GRADIENT_EIGENVECTORS, (m) => float(m.eigen!.qS, [m.dOut, m.dOut]));
    write(GRADIENT_EIGENVALUES, (m) => float(m.eigen!.eigS, [m.dOut]));
  }
  if (stage((m) => !!m.lambda, 'eigenvalue corrections')) {
    write(LAMBDA_MATRIX, (m) => float(m.lambda!.sum, [m.dOut, m.dA]));
    write(NUM_LAMBDA_PROCESSED, (m) => count(m.lambda!.count));
  }
  writeJsonAtomic(join(dir, FACTOR_ARGUMENTS_FILE), kron);
  writeJsonAtomic(join(dir, OUR_ARGUMENTS_FILE), {
    ...factors.args,
    modules: factors.args.modules.length ? factors.args.modules : mods.map((m) => m.name),
    fingerprint: factors.fingerprint,
    format: 1,
  });
}

/**
 * Deletes the factor files and both arguments files from `dir` (nothing else in it): for a
 * folder this program owns as a cache, whose factors no longer match (fit-job.ts, replaceStale).
 */
export function removeFactorFiles(dir: string): void {
  // the arguments first, so the files are never read as ours; the caller has already marked the
  // folder as an unfinished fit (partials/job.json), or files without arguments read as kronfluence's
  for (const f of [OUR_ARGUMENTS_FILE, FACTOR_ARGUMENTS_FILE]) rmSync(join(dir, f), { force: true });
  for (const f of [...COVARIANCE_FILES, ...EIGEN_FILES, ...LAMBDA_FILES])
    rmSync(join(dir, `${f}.safetensors`), { force: true });
}

/** Reads a factors directory written by us or by kronfluence (any float dtype). */
export function loadFactors(dir: string, options: LoadOptions = {}): Factors {
  restoreReplacedPath(dir); // a stage save (or a save of a folder holding it) killed between its two renames
  if (!existsSync(dir))
    throw new FactorsError(
      `no factors folder at ${dir}: fit them there first (influence-lens fit --out ${dir}), or fix the path`,
    );
  // The fit job writes its final factors file by file into `dir`, our arguments file last, and
  // removes its partials/ after: a fit killed in that write leaves stage files that look whole
  // but no arguments (so no fingerprint, damping or labels). Never read that as complete.
  if (!existsSync(join(dir, OUR_ARGUMENTS_FILE)) && existsSync(join(dir, 'partials', 'job.json')))
    throw new UnfinishedFitError(
      `${dir} holds an unfinished influence-lens fit (${join(dir, 'partials')}); run the same fit again to finish it`,
    );
  const precision = options.precision ?? 'fp64';
  // our arguments, read first: our files must then carry both checksums (data and tensor table)
  const ours = readJson(join(dir, OUR_ARGUMENTS_FILE));
  if (ours && ours.format !== undefined && ours.format !== 1)
    throw new FactorsError(
      `${dir}: ${OUR_ARGUMENTS_FILE} says "format": ${JSON.stringify(ours.format)}; this version reads format 1 (written by a later version of influence-lens?): fit the factors again with this version`,
    );
  // from fit version 2 on, our files carry both checksums (earlier ones are refused by version)
  const strict = ours !== null && storedFitVersion(dir, ours.fitVersion) >= 2;
  const has = (files: string[]) => files.every((f) => existsSync(join(dir, `${f}.safetensors`)));
  const stages = {
    covariance: options.covariances !== false && has(COVARIANCE_FILES),
    eigen: has(EIGEN_FILES),
    lambda: has(LAMBDA_FILES),
  };
  if (!stages.covariance && !stages.eigen && !stages.lambda) {
    // not one factor file nor arguments file: an empty folder, or a fit just starting there (it
    // makes the folder before its partials/job.json), not factors that "cannot be used"
    const any = [...COVARIANCE_FILES, ...EIGEN_FILES, ...LAMBDA_FILES].some((f) =>
      existsSync(join(dir, `${f}.safetensors`)),
    );
    if (!any && !ours && !existsSync(join(dir, FACTOR_ARGUMENTS_FILE)))
      throw new FactorsError(
        `${dir} holds no factors yet (no factor file, no ${OUR_ARGUMENTS_FILE}): fit them there (influence-lens fit --out ${dir}); a fit that is just starting there looks the same for a moment`,
      );
    throw new FactorsError(`${dir} holds no complete set of factor files (expected e.g. ${LAMBDA_MATRIX}.safetensors)`);
  }
  // counts and eigenvalues are small and read exactly; the d×d tensors in the model's precision
  const exact = new Set([
    NUM_ACTIVATION_COVARIANCE_PROCESSED,
    NUM_GRADIENT_COVARIANCE_PROCESSED,
    NUM_LAMBDA_PROCESSED,
    ACTIVATION_EIGENVALUES,
    GRADIENT_EIGENVALUES,
  ]);
  // each file read once: its tensors, and its metadata for the identity checks below
  const files = new Map<string, ReturnType<typeof readAll>>();
  const open = (file: string) => {
    let f = files.get(file);
    if (!f) {
      f = readAll(join(dir, `${file}.safetensors`), exact.has(file) ? 'fp64' : precision, {
        counts: COUNT_FILES.has(file),
        strict,
      });
      files.set(file, f);
    }
    return f.tensors;
  };
  const exactly = (t: Floats) => t as Float64Array; // files in `exact` are read as Float64Array
  // Module names and sizes come from whichever stage is present.
  const shapes = new Map<string, { dA: number; dOut: number }>();
  const sizeFrom = (file: string, pick: (shape: number[]) => { dA?: number; dOut?: number }) => {
    for (const [name, t] of Object.entries(open(file))) {
      const s = { ...(shapes.get(name) ?? { dA: 0, dOut: 0 }) };
      const p = pick(t.shape ?? []);
      if (p.dA) s.dA = p.dA;
      if (p.dOut) s.dOut = p.dOut;
      shapes.set(name, s);
    }
  };
  if (stages.lambda) sizeFrom(LAMBDA_MATRIX, (s) => ({ dOut: s[0], dA: s[1] }));
  if (stages.eigen) {
    sizeFrom(ACTIVATION_EIGENVALUES, (s) => ({ dA: s[0] }));
    sizeFrom(GRADIENT_EIGENVALUES, (s) => ({ dOut: s[0] }));
  }
  if (stages.covariance) {
    sizeFrom(ACTIVATION_COVARIANCE, (s) => ({ dA: s[0] }));
    sizeFrom(GRADIENT_COVARIANCE, (s) => ({ dOut: s[0] }));
  }

  const modules: Record<string, ModuleFactors> = {};
  for (const [name, { dA, dOut }] of shapes) {
    const get = (file: string, shape: number[]) => {
      const t = open(file)[name];
      if (!t) throw new FactorsError(`${join(dir, file)}.safetensors has no tensor for module ${name}`);
      const want = shape.reduce((x, y) => x * y, 1);
      if (t.length !== want) {
        throw new FactorsError(`${file}[${name}] has ${t.length} values; expected shape [${shape.join(', ')}]`);
      }
      return t;
    };
    const mf: ModuleFactors = { name, dA, dOut };
    if (stages.covariance) {
      mf.covariance = {
        activationSum: get(ACTIVATION_COVARIANCE, [dA, dA]),
        activationCount: get(NUM_ACTIVATION_COVARIANCE_PROCESSED, [1])[0],
        gradientSum: get(GRADIENT_COVARIANCE, [dOut, dOut]),
        gradientCount: get(NUM_GRADIENT_COVARIANCE_PROCESSED, [1])[0],
      };
    }
    if (stages.eigen) {
      mf.eigen = {
        qA: unitRows(get(ACTIVATION_EIGENVECTORS, [dA, dA]), dA, dir, ACTIVATION_EIGENVECTORS, name),
        eigA: exactly(get(ACTIVATION_EIGENVALUES, [dA])),
        qS: unitRows(get(GRADIENT_EIGENVECTORS, [dOut, dOut]), dOut, dir, GRADIENT_EIGENVECTORS, name),
        eigS: exactly(get(GRADIENT_EIGENVALUES, [dOut])),
      };
    }
    if (stages.lambda) {
      mf.lambda = { sum: get(LAMBDA_MATRIX, [dOut, dA]), count: get(NUM_LAMBDA_PROCESSED, [1])[0] };
    }
    modules[name] = mf;
  }

  const kron = readJson(join(dir, FACTOR_ARGUMENTS_FILE));
  if (kron && kron.strategy !== undefined && kron.strategy !== 'ekfac') {
    throw new FactorsError(`${dir}: factors use kronfluence strategy "${kron.strategy}"; only "ekfac" is supported`);
  }
  const args: FactorArguments = ours
    ? oursArguments(dir, ours, [...shapes.keys()])
    : {
        // kronfluence: damping is a score argument, and its `damping_factor=None` heuristic is ours
        strategy: 'ekfac',
        labels: kron?.use_empirical_fisher === true ? 'empirical' : 'sampled',
        damping: DEFAULT_DAMPING,
        modules: [...shapes.keys()],
        maxExamples: typeof kron?.covariance_max_examples === 'number' ? kron.covariance_max_examples : null,
        seed: null,
        fitVersion: null,
        ...storedDtype(
          dir,
          kron?.eigendecomposition_dtype === undefined
            ? undefined
            : (({ 'torch.float64': 'float64', 'torch.float32': 'float32' } as Record<string, unknown>)[
                String(kron.eigendecomposition_dtype)
              ] ?? kron.eigendecomposition_dtype),
          FACTOR_ARGUMENTS_FILE,
          'eigendecomposition_dtype',
        ),
      };
  const fingerprint = typeof ours?.fingerprint === 'string' ? ours.fingerprint : null;
  if (ours) {
    const fit = fitIdentity(args, fingerprint);
    for (const [file, { metadata: meta }] of files) {
      const other =
        (meta.influence_lens_fit !== undefined && meta.influence_lens_fit !== fit) ||
        (meta.influence_lens_fingerprint !== undefined && meta.influence_lens_fingerprint !== fingerprint);
      if (other)
        throw new FactorsError(
          `${dir}: ${file}.safetensors was written by another fit than ${OUR_ARGUMENTS_FILE} describes (other data, labels, seed or eigendecomposition precision): ` +
            'the folder mixes two fits; fit again into an empty folder',
        );
    }
    // the modules the arguments name are the files' modules (an edited list was ignored)
    if (Array.isArray(ours.modules) && (ours.modules as unknown[]).length) {
      const named = [...(ours.modules as string[])].map(String).sort();
      const held = [...shapes.keys()].sort();
      if (named.length !== held.length || named.some((n, i) => n !== held[i]))
        throw new FactorsError(
          `${dir}: ${OUR_ARGUMENTS_FILE} names ${named.length} modules but the factor files hold ${held.length}${
            named.find((n) => !shapes.has(n)) ? ` (e.g. no ${named.find((n) => !shapes.has(n))})` : ''
          }: the folder mixes two fits or was edited; fit again into an empty folder`,
        );
    }
  } else {
    // no arguments file (removed, or kronfluence's folder with some of our files copied in): files
    // our fit wrote are not read without it, since which model and data they belong to is in it
    // (another model's factors with the file deleted were used, with only a vague warning)
    const fits = new Map<string, string>();
    for (const [file, { metadata: meta }] of files) {
      if (meta.influence_lens_fit !== undefined)
        fits.set(file, `${meta.influence_lens_fit}:${meta.influence_lens_fingerprint ?? ''}`);
    }
    if (fits.size)
      throw new FactorsError(
        `${dir}: ${[...fits.keys()].join(', ')} ${fits.size === 1 ? 'was' : 'were'} written by influence-lens's fit, but its ${OUR_ARGUMENTS_FILE} is missing, so which model and data ${fits.size === 1 ? 'it belongs' : 'they belong'} to cannot be checked: fit again into an empty folder`,
      );
  }
  return { args, fingerprint, modules };
}

/**
 * The fit settings of our factors in `dir` (labels, seed, example cap, eigendecomposition precision), read from
 * the arguments file alone, and the fingerprint of the data they were fitted on; null when there
 * is none or it cannot be read. The server fits a new training checkpoint with the settings of
 * the factors the user fitted, not its own defaults, and says when they were fitted on other data
 * than the configuration's fit dataset.
 */
export function readFitSettings(
  dir: string,
): Pick<FactorArguments, 'labels' | 'seed' | 'maxExamples' | 'eigendecompositionDtype' | 'dataFingerprint'> | null {
  try {
    const ours = readJson(join(dir, OUR_ARGUMENTS_FILE));
    if (!ours) return null;
    const { labels, seed, maxExamples, eigendecompositionDtype, dataFingerprint } = oursArguments(dir, ours, []);
    return {
      labels,
      seed,
      maxExamples,
      dataFingerprint,
      ...(eigendecompositionDtype ? { eigendecompositionDtype } : {}),
    };
  } catch {
    return null;
  }
}

/** Our arguments file read back; `modules` when the file names none. */
function oursArguments(dir: string, ours: Record<string, unknown>, modules: string[]): FactorArguments {
  return {
    strategy: 'ekfac',
    labels: ours.labels === 'empirical' ? 'empirical' : 'sampled',
    damping: storedDamping(dir, ours.damping),
    modules: Array.isArray(ours.modules) ? (ours.modules as string[]) : modules,
    maxExamples: typeof ours.maxExamples === 'number' ? ours.maxExamples : null,
    seed: typeof ours.seed === 'number' ? ours.seed : null,
    modelFingerprint: typeof ours.modelFingerprint === 'string' ? ours.modelFingerprint : null,
    dataFingerprint: typeof ours.dataFingerprint === 'string' ? ours.dataFingerprint : null,
    training: ours.training === undefined || ours.training === null ? null : storedTraining(dir, ours.training),
    tokenization:
      typeof ours.tokenization === 'object' && ours.tokenization !== null && !Array.isArray(ours.tokenization)
        ? (ours.tokenization as Record<string, unknown>)
        : null,
    ...storedDtype(dir, ours.eigendecompositionDtype, OUR_ARGUMENTS_FILE, 'eigendecompositionDtype'),
    modelParts: readModelParts(ours.modelParts),
    fitVersion: storedFitVersion(dir, ours.fitVersion),
  };
}

/** Machine epsilon of the float types factor files store. */
const STORED_EPSILON: Record<string, number> = { F64: 2 ** -52, F32: 2 ** -23, F16: 2 ** -10, BF16: 2 ** -7 };

/**
 * Eigenvectors are an orthonormal basis: every row of Q has norm 1 (to float32 rounding). A
 * damaged or edited file passed every other check while its scores came out NaN or Inf (an
 * entry of 1e30) or silently scaled; checking the rows' norms costs one pass over Q.
 */
function unitRows(q: Floats & { stored?: string }, n: number, dir: string, file: string, module: string): Floats {
  // rounding to the stored type moves a norm by up to about its epsilon (kronfluence's low-precision
  // presets store bf16 bases: 1.1e-3 to 1.7e-3 off), so the tolerance is 8 of them, 1e-3 at least
  const tol = Math.max(1e-3, 8 * (STORED_EPSILON[q.stored ?? 'F64'] ?? 2 ** -7));
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (let j = i * n; j < (i + 1) * n; j++) s += q[j] * q[j];
    if (!(Math.abs(Math.sqrt(s) - 1) <= tol))
      throw new FactorsError(
        `${join(dir, file)}.safetensors: the eigenvectors of module ${module} are not orthonormal (row ${i} has norm ${Math.sqrt(s).toPrecision(4)}, not 1): the file was damaged or edited; fit the factors again`,
      );
  }
  return q;
}

/** A stored damping: absent means the default; anything but {relative} or {absolute} of a number >= 0 is refused. */
function storedDamping(dir: string, v: unknown): Damping {
  if (v === undefined || v === null) return DEFAULT_DAMPING;
  const d = v as Record<string, unknown>;
  const ok = (x: unknown) => typeof x === 'number' && Number.isFinite(x) && x >= 0;
  if (typeof v === 'object' && !Array.isArray(v) && Object.keys(d).length === 1) {
    if ('relative' in d && ok(d.relative)) return { relative: d.relative as number };
    if ('absolute' in d && ok(d.absolute)) return { absolute: d.absolute as number };
  }
  throw new FactorsError(
    `${dir}: ${OUR_ARGUMENTS_FILE} holds "damping": ${JSON.stringify(v)}; it must be {"relative": x} or {"absolute": x} with a number x >= 0`,
  );
}

/** A stored fit version: absent means 1 (every fit before it was stored); anything but a positive integer is refused. */
function storedFitVersion(dir: string, v: unknown): number {
  if (v === undefined || v === null) return 1;
  if (typeof v === 'number' && Number.isInteger(v) && v >= 1) return v;
  throw new FactorsError(
    `${dir}: ${OUR_ARGUMENTS_FILE} holds "fitVersion": ${JSON.stringify(v)}, which is not a fit version (a positive integer); fit the factors again`,
  );
}

/** A stored eigendecomposition precision: float32 kept, float64 or absent left out (the default), anything else refused. */
function storedDtype(dir: string, v: unknown, file: string, key: string): { eigendecompositionDtype?: 'float32' } {
  if (v === undefined || v === null || v === 'float64') return {};
  if (v === 'float32') return { eigendecompositionDtype: 'float32' };
  throw new FactorsError(
    `${dir}: ${file} holds "${key}": ${JSON.stringify(v)}, which this version does not know (float64 or float32); fit the factors again`,
  );
}

function storedTraining(dir: string, v: unknown): TrainingConvention {
  try {
    return readStoredTraining(v);
  } catch (e) {
    throw new FactorsError(
      `${dir}: ${OUR_ARGUMENTS_FILE} holds an unreadable "training" (${(e as Error).message}); fit the factors again`,
    );
  }
}

/** What identifies one fit's files: the model and data, and what else changes the factors. */
function fitIdentity(args: FactorArguments, fingerprint: string | null): string {
  const what = [
    fingerprint,
    args.modelFingerprint ?? null,
    args.dataFingerprint ?? null,
    args.labels,
    args.seed,
    args.maxExamples,
    // only when not the default, so that every fit written before the option keeps its identity
    ...(eigendecompositionDtypeOf(args) === 'float64' ? [] : [eigendecompositionDtypeOf(args)]),
    // likewise only from version 2 on: files of two versions' fits are not one fit's
    ...((args.fitVersion ?? 1) === 1 ? [] : [`fit ${args.fitVersion}`]),
  ];
  return createHash('sha256').update(JSON.stringify(what)).digest('hex').slice(0, 16);
}

/**
 * The EK-FAC preconditioner of one loaded module (needs the eigen and lambda stages), held in
 * `precision` (default: that of its eigenvectors, i.e. of the loaded factors). The bases are
 * shared with `mf` when already of that type.
 */
export function preconditionerFor(
  mf: ModuleFactors,
  damping: Damping = DEFAULT_DAMPING,
  precision?: Precision,
): Preconditioner {
  if (!mf.eigen || !mf.lambda) {
    throw new FactorsError(
      `factors of module ${mf.name} lack ${mf.eigen ? 'the eigenvalue correction' : 'eigenvectors'}`,
    );
  }
  const p = precision ?? precisionOf(mf.eigen.qA);
  const { qA, qS, eigA, eigS } = mf.eigen;
  const basis: Eigenbasis = {
    module: mf.name,
    dA: mf.dA,
    dOut: mf.dOut,
    qA: inPrecision(qA, p),
    eigA,
    qS: inPrecision(qS, p),
    eigS,
  };
  // the mean is a fresh array: the inverse may take its place
  return makePreconditioner(basis, lambdaMean(mf.lambda.sum, mf.lambda.count, mf.name, p), damping, { inPlace: true });
}

/** Restores the covariance accumulator of a loaded module (e.g. to merge more data into it). */
export function covarianceFor(mf: ModuleFactors, shape: ModuleShape): CovarianceAccumulator {
  if (!mf.covariance) throw new Error(`factors of module ${mf.name} have no covariances`);
  const c = mf.covariance;
  return CovarianceAccumulator.fromSums(
    shape,
    toF64(c.activationSum),
    c.activationCount,
    toF64(c.gradientSum),
    c.gradientCount,
  );
}

/** kronfluence's FactorArguments.to_dict() for our arguments (so kronfluence can load our factors). */
function kronfluenceArguments(a: FactorArguments, dtypes: { covariance: 'F32' | 'F64'; lambda: 'F32' | 'F64' }) {
  const torch = (d: 'F32' | 'F64') => (d === 'F64' ? 'torch.float64' : 'torch.float32');
  const t = torch(dtypes.covariance);
  const tl = torch(dtypes.lambda);
  return {
    strategy: 'ekfac',
    use_empirical_fisher: a.labels === 'empirical',
    amp_dtype: null,
    amp_scale: 65536.0,
    has_shared_parameters: false,
    covariance_max_examples: a.maxExamples,
    covariance_data_partitions: 1,
    covariance_module_partitions: 1,
    activation_covariance_dtype: t,
    gradient_covariance_dtype: t,
    eigendecomposition_dtype: eigendecompositionDtypeOf(a) === 'float32' ? 'torch.float32' : 'torch.float64',
    lambda_max_examples: a.maxExamples,
    lambda_data_partitions: 1,
    lambda_module_partitions: 1,
    use_iterative_lambda_aggregation: false,
    offload_activations_to_cpu: false,
    per_sample_gradient_dtype: t,
    lambda_dtype: tl,
  };
}

/** Python's str() of a JSON scalar, as kronfluence writes safetensors metadata. */
function pyStr(v: unknown): string {
  return typeof v === 'boolean' ? (v ? 'True' : 'False') : String(v);
}

/** The factor files that hold token counts (integers, or F64 for weighted counts); the rest hold floats. */
const COUNT_FILES = new Set([
  NUM_ACTIVATION_COVARIANCE_PROCESSED,
  NUM_GRADIENT_COVARIANCE_PROCESSED,
  NUM_LAMBDA_PROCESSED,
]);
const FLOAT_DTYPES = new Set(['F16', 'BF16', 'F32', 'F64']);

/**
 * Every tensor of a factor file in `precision` (no copy when stored so), with the file's metadata,
 * refused when its bytes or tensor table no longer match the checksums we wrote with it
 * (kronfluence's files carry none), when its types are not a factor file's, or when it holds NaN
 * or ±Inf.
 */
function readAll(
  path: string,
  precision: Precision,
  kind: { counts: boolean; strict: boolean },
): {
  tensors: Record<string, Floats & { shape?: number[]; stored?: string }>;
  metadata: Record<string, string>;
} {
  const h = readSafetensorsHeader(path);
  const check = checkDataChecksum(h);
  if (check === 'mismatch')
    throw new FactorsError(`${path}: the file does not match its checksum (damaged); refit the factors`);
  // beside our arguments file, every file is one our fit wrote, with both checksums: one without
  // them is another tool's copied in, or was altered (its bytes or tensor table would go unchecked)
  if (kind.strict && h.metadata.influence_lens_fit === undefined)
    throw new FactorsError(
      `${path}: not written by influence-lens's fit (it says no fit), though ${OUR_ARGUMENTS_FILE} beside it is: the folder mixes files of two tools; fit again into an empty folder`,
    );
  if (kind.strict && (check === 'absent' || !h.metadata[HEADER_SHA256]))
    throw new FactorsError(
      `${path}: written by influence-lens's fit but without its ${check === 'absent' ? 'data' : 'tensor table'} checksum, so it was altered since; refit the factors`,
    );
  const out: Record<string, Floats & { shape?: number[]; stored?: string }> = {};
  for (const [name, info] of h.tensors) {
    // kronfluence writes its token counts as int64: one of its count files holding floats was
    // relabelled (an I64 count read as F64 is a denormal near 5e-321); ours may be F64 (weighted
    // counts) and are covered by their tensor table checksum
    if (kind.counts && h.metadata.influence_lens_fit === undefined && FLOAT_DTYPES.has(info.dtype))
      throw new FactorsError(
        `${path}: tensor "${name}" is stored as ${info.dtype}; kronfluence's token counts are integers (I64): the file was altered or is not a count file`,
      );
    // a float relabelled as an integer type (or the reverse) reads as other numbers
    if (!kind.counts && !FLOAT_DTYPES.has(info.dtype))
      throw new FactorsError(
        `${path}: tensor "${name}" is stored as ${info.dtype}; factors are floats (F32 or F64): the file was altered or is not a factor file`,
      );
    // checked as stored, then again when narrowed (an F64 value beyond the float32 range)
    const { data } = readTensor(h, name);
    const stored: Floats = data instanceof Float32Array || data instanceof Float64Array ? data : readTensorF64(h, name);
    const bad = firstNonFinite(stored);
    if (bad >= 0)
      throw new FactorsError(`${path}: tensor "${name}" holds ${stored[bad]} at index ${bad}; refit the factors`);
    const t: Floats & { shape?: number[]; stored?: string } = inPrecision(stored, precision);
    const over = t === stored ? -1 : firstNonFinite(t);
    if (over >= 0)
      throw new FactorsError(
        `${path}: tensor "${name}" holds ${stored[over]} at index ${over}, beyond the float32 range; ` +
          "open the model with precision 'fp64'",
      );
    t.shape = info.shape;
    t.stored = info.dtype;
    out[name] = t;
  }
  return { tensors: out, metadata: h.metadata };
}

function readJson(path: string): Record<string, unknown> | null {
  if (!existsSync(path)) return null;
  try {
    return JSON.parse(readRegularFile(path, (what) => new FactorsError(`${path} is ${what}`)).toString('utf8'));
  } catch (e) {
    if (e instanceof FactorsError) throw e;
    throw new FactorsError(`cannot parse ${path}: ${(e as Error).message}`);
  }
}

function writeJsonAtomic(path: string, value: unknown) {
  writeFileAtomic(path, `${JSON.stringify(value, null, 4)}\n`);
}
