// `influence-lens fit` as a resumable job. Each stage's result is written to disk before the
// next starts, so a killed run resumes where it stopped, and the data can be split into
// partitions fitted by separate processes (or machines sharing the directory):
//   <out>/partials/job.json                     what is being fitted (fingerprints, arguments)
//   <out>/partials/covariance-<i>-of-<n>/       partition i's covariance sums
//   <out>/partials/eigen/                       merged covariances + eigendecompositions
//   <out>/partials/lambda-<i>-of-<n>/           partition i's eigenvalue-correction sums
//   <out>/*.safetensors + arguments             the final factors (kronfluence layout); partials removed
//   <out>/.fit-partition-<i>-of-<n>.lock, .fit-shared.lock   held while a process runs (common/owner-lock.ts)
// Sums add across partitions, so the result equals a single-process fit over all the data
// (up to summation order).
// Processes sharing <out> take locks (common/owner-lock.ts): one per partition for the whole run (a second
// fit of the same partition is refused: two would replace each other's stages, and two fits
// with other settings would mix theirs), and one for the shared steps (job.json, the eigen
// stage, the final write), which the partitions take in turn, checking again once they hold it.
import { existsSync, mkdirSync, readFileSync, rmdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { cleanStaleTemps, replaceDirAtomic, writeFileAtomic } from '../../common/atomic-write';
import { describeOwner, removeStaleLocks, tryLock, waitLock } from '../../common/owner-lock';
import { loadDataset } from '../data/dataset';
import { contextLength, contextName, describeUntrained, tokenizationKey, tokenizeExamples } from '../data/tokenize';
import { describeTraining, sameTraining, type TrainingConvention } from '../data/training';
import { type EighDtype, eighBackend } from '../linalg/eigh';
import { nativeLapack } from '../linalg/native';
import { Model, type ModuleSelection } from '../model/engine';
import { nonFiniteCause } from '../model/weight-health';
import { collectGarbage } from '../util/gc';
import { CovarianceAccumulator } from './ekfac/covariance';
import type { Eigenbasis } from './ekfac/eigenbasis';
import {
  covarianceFor,
  eigendecompositionDtypeOf,
  type FactorArguments,
  type Factors,
  FIT_VERSION,
  fitVersionChange,
  loadFactors,
  type ModuleFactors,
  OUR_ARGUMENTS_FILE,
  removeFactorFiles,
  type SaveOptions,
  saveFactors,
} from './ekfac/factors-io';
import { NonFiniteError } from './ekfac/gradient';
import { LambdaAccumulator } from './ekfac/lambda';
import type { TokenRows } from './ekfac/lambda-rows';
import { type Damping, DEFAULT_DAMPING } from './ekfac/precondition';
import { dataFingerprint, modelChange, modelFingerprint, modelParts } from './fingerprint';
import { type FitOptions, fitCovariances, fitEigenbases, fitLambdas, moduleShape } from './fit';
import { SettingError } from './setup';

export interface FitJobOptions {
  modelDir: string;
  dataPath: string;
  out: string;
  modules: ModuleSelection;
  labels: 'sampled' | 'empirical';
  seed: number;
  maxExamples?: number;
  partition?: { index: number; count: number };
  batchSize?: number;
  skipMalformed?: boolean;
  damping?: Damping;
  /** the precision of the eigendecompositions (kronfluence's eigendecomposition_dtype); default float64 */
  eigendecompositionDtype?: EighDtype;
  /** the base checkpoint when modelDir is a LoRA adapter (default: its base_model_name_or_path) */
  base?: string;
  /** an already opened model (the server and the demo reuse theirs) */
  model?: Model;
  /** how the model was trained on its records, when `model` is not given (data/training.ts) */
  training?: TrainingConvention;
  onProgress?: FitOptions['onProgress'];
  /**
   * Stops the fit between batches (throwing the signal's reason). Stages already finished stay in
   * <out>/partials, so a later run resumes; the final factors are written only by a run that was not aborted.
   */
  signal?: AbortSignal;
  log?: (line: string) => void;
  /**
   * `out` is a cache this program owns (the embedded default's factors): factors or an unfinished
   * fit made for another model, data, labels or seed (e.g. by an older version, whose data
   * fingerprints differ) are replaced, not refused. Never set for a folder the user named.
   */
  replaceStale?: boolean;
}

export interface FitJobResult {
  /** 'done': factors written now; 'up-to-date': they already were; 'waiting': other partitions must run */
  status: 'done' | 'up-to-date' | 'waiting';
  message: string;
  examples: number;
  tokens: number;
  seconds: number;
}

export class FitJobError extends SettingError {
  override name = 'FitJobError';
}

/** Another live process is fitting the same partition into the same folder: nothing is wrong with the factors. */
export class FitBusyError extends FitJobError {
  override name = 'FitBusyError';
}

interface JobDescription {
  modelFingerprint: string;
  dataFingerprint: string;
  modules: ModuleSelection;
  labels: 'sampled' | 'empirical';
  seed: number;
  maxExamples: number | null;
  partitions: number;
  /** present only when float32, so that an unfinished fit of an older version still resumes */
  eigendecompositionDtype?: 'float32';
  /** this program's fit version (FIT_VERSION): an unfinished fit of an earlier one is not resumed */
  fitVersion: number;
}

export async function runFitJob(o: FitJobOptions): Promise<FitJobResult> {
  const n = o.partition?.count ?? 1;
  const i = o.partition?.index ?? 0;
  if (!(Number.isInteger(n) && n >= 1 && Number.isInteger(i) && i >= 0 && i < n))
    throw new FitJobError(`the partition must be i/n with 0 <= i < n (got ${i}/${n})`, 'partition');
  const created = !existsSync(o.out);
  mkdirSync(o.out, { recursive: true });
  const lock = join(o.out, `.fit-partition-${i}-of-${n}.lock`);
  let mine: ReturnType<typeof tryLock>;
  try {
    mine = tryLock(lock, n > 1 ? `fitting partition ${i}/${n}` : 'fitting');
  } catch (e) {
    // a folder of finished factors this process may not write (read-only) is only read: still up to date
    const code = (e as NodeJS.ErrnoException).code;
    if (!(code === 'EROFS' || code === 'EACCES' || code === 'EPERM') || !existsSync(join(o.out, OUR_ARGUMENTS_FILE)))
      throw e;
    mine = () => {};
  }
  if (typeof mine !== 'function')
    throw new FitBusyError(
      `another influence-lens fit, ${describeOwner(mine)}, is fitting ${n > 1 ? `partition ${i}/${n} ` : ''}into ${o.out}; ` +
        `let it finish (if no such process runs, delete ${lock})`,
      'out',
    );
  try {
    return await fitJob(o, n, i);
  } catch (e) {
    // a NaN in the fit's sums: name the damaged weight where one is to blame
    if (e instanceof NonFiniteError)
      throw new FitJobError(
        `${e.message}: ${nonFiniteCause((o.model ?? Model.open(o.modelDir, { base: o.base })).checkpoint)}`,
      );
    throw e;
  } finally {
    mine();
    // and those that killed fits of other partitions left (each is taken over by its partition's next run)
    removeStaleLocks(o.out, '.fit-');
    // a fit refused before writing anything leaves no empty folder (the server reads one as broken factors)
    if (created)
      try {
        rmdirSync(o.out); // fails (and is meant to) once anything is in it
      } catch {}
  }
}

/** runFitJob holding partition i's lock. */
async function fitJob(o: FitJobOptions, n: number, i: number): Promise<FitJobResult> {
  const start = Date.now();
  const log = o.log ?? (() => {});
  cleanStaleTemps(o.out); // what a fit killed in the middle of a write left
  const model = o.model ?? Model.open(o.modelDir, { base: o.base, training: o.training });
  // a LoRA adapter on attention layers only has no MLP module: say so instead of fitting nothing
  if (!model.modules(o.modules).length)
    throw new FitJobError(
      `modules "${o.modules}" selects none of the ${model.modules('all').length} tracked modules of ${o.modelDir}` +
        `${model.checkpoint.adapter ? ' (its LoRA adapter adapts no MLP layer)' : ''}; use modules "all" (--modules all)`,
    );
  const unread = model.unreadWeightsWarning();
  if (unread) log(`warning: ${unread}`);
  const maxLength = contextLength(model.checkpoint.config);
  // what the model's tokenizer and training convention refuse is a bad line here, skippable,
  // as in explain, scan, tokenize and the server
  const dataset = loadDataset(o.dataPath, {
    skipMalformed: o.skipMalformed,
    maxExamples: o.maxExamples,
    trainedBy: { tokenizer: model.tokenizer, maxLength },
  });
  if (dataset.skipped.length) log(`skipped ${dataset.skipped.length} malformed line(s) of ${o.dataPath}`);
  const { tokens, truncated } = tokenizeExamples(model.tokenizer, dataset.examples, maxLength, o.dataPath);
  const limit = Math.min(maxLength, model.tokenizer.training.maxLength ?? maxLength);
  if (truncated)
    log(
      `${truncated} example(s) longer than ${limit} tokens (${limit < maxLength ? "the training convention's maxLength" : contextName(model.checkpoint.config)}) were cut at the end`,
    );
  // an example cut before any trained token was not trained on (TRL drops such examples): its
  // activations would still enter the covariances and its zero gradient dilute Λ
  const trained = tokens.filter((t) => t.weights.some((w) => w > 0));
  if (trained.length < tokens.length)
    log(
      `${tokens.length - trained.length} example(s) have no trained token (${describeUntrained(tokens, limit)}): left out of the fit, as TRL drops fully masked examples (kronfluence, if given them, counts their tokens in the activation covariance and in Λ's average)`,
    );
  if (!trained.length)
    throw new FitJobError(`no example of ${o.dataPath} has a trained token within ${limit} tokens: nothing to fit`);
  const examples = trained.map((t) => ({ ids: t.ids, weights: t.weights }));
  // partition k takes examples k, k + n, ...: beyond the examples a partition has none to fit
  if (n > examples.length)
    throw new FitJobError(
      `the partition ${i}/${n} splits ${examples.length} example(s) into more partitions than examples (partitions ${examples.length} to ${n - 1} would have none); use at most ${examples.length}`,
      'partition',
    );
  const nTokens = examples.reduce((s, e) => s + e.ids.length, 0);

  const job: JobDescription = {
    modelFingerprint: modelFingerprint(model.checkpoint, model.options.cacheDir),
    dataFingerprint: dataFingerprint(
      dataset.examples.map((e) => e.hash),
      { maxLength, ...tokenizationKey(model.tokenizer) },
    ),
    modules: o.modules,
    labels: o.labels,
    seed: o.seed,
    maxExamples: o.maxExamples ?? null,
    partitions: n,
    ...(o.eigendecompositionDtype === 'float32' ? { eigendecompositionDtype: 'float32' as const } : {}),
    fitVersion: FIT_VERSION,
  };
  const result = (status: FitJobResult['status'], message: string): FitJobResult => ({
    status,
    message,
    examples: examples.length,
    tokens: nTokens,
    seconds: (Date.now() - start) / 1000,
  });

  const partials = join(o.out, 'partials');
  // the steps all partitions share, one process at a time (each checks again once it holds the lock)
  const shared = (what: string) => waitLock(join(o.out, '.fit-shared.lock'), what, { log, signal: o.signal });
  // Final factors already there: reuse them, or refuse to overwrite someone else's.
  if (existsSync(join(o.out, OUR_ARGUMENTS_FILE)) && o.replaceStale) {
    let have: FactorArguments | undefined;
    try {
      have = loadFactors(o.out).args;
    } catch {
      // unreadable, mixed or damaged: replaced below like any stale cache
    }
    const current = have && sameFit(have, job, o.modules, model);
    if (!current) {
      const release = await shared('replacing stale cached factors');
      try {
        log(
          `the cached factors in ${o.out} are for ${have ? describeDifference(have, job, model) : 'unreadable files'}: fitting them again`,
        );
        // A process killed from here on must leave a folder that reads as an unfinished fit, never
        // the old fit's files without the arguments that name them (read as another tool's
        // factors): this job's description goes in first, then the old files go.
        rmSync(partials, { recursive: true, force: true });
        mkdirSync(partials, { recursive: true });
        writeFileAtomic(join(partials, 'job.json'), `${JSON.stringify(job, null, 2)}\n`);
        removeFactorFiles(o.out);
      } finally {
        release();
      }
    }
  }
  if (existsSync(join(o.out, OUR_ARGUMENTS_FILE))) {
    const have = loadFactors(o.out).args;
    if (sameFit(have, job, o.modules, model)) {
      // a fit killed after writing the factors but before removing its partials left them (the
      // covariances and eigenvectors again: gigabytes at real shapes)
      if (existsSync(partials)) {
        const release = await shared('removing the partials a killed fit left');
        try {
          rmSync(partials, { recursive: true, force: true });
        } finally {
          release();
        }
      }
      return result('up-to-date', `${o.out} already holds factors for this model and data`);
    }
    throw new FitJobError(
      `${o.out} already holds factors fitted on ${describeDifference(have, job, model)}; ` +
        'write them to another directory, or delete that one to refit',
      'out',
    );
  }

  // said only when factors are really fitted from these renderings (not before a refusal)
  const standIn = tokens.filter((t) => t.rendering === 'stand-in').length;
  if (standIn)
    log(
      `warning: the model has no chat_template; ${standIn} "messages" record(s) rendered with the stand-in "<|role|>\\n" + content`,
    );

  const jobFile = join(partials, 'job.json');
  let release = await shared('checking the job');
  try {
    if (existsSync(jobFile)) {
      const prev = JSON.parse(readFileSync(jobFile, 'utf8')) as JobDescription;
      if (JSON.stringify(prev) !== JSON.stringify(job) && o.replaceStale) {
        // an owned cache's unfinished fit with other settings: start this one over
        log(`the unfinished fit in ${partials} had other settings (${diffKeys(prev, job)}): starting over`);
        rmSync(partials, { recursive: true, force: true });
        mkdirSync(partials, { recursive: true });
        writeFileAtomic(jobFile, `${JSON.stringify(job, null, 2)}\n`);
      } else if (JSON.stringify(prev) !== JSON.stringify(job))
        throw new FitJobError(
          prev.fitVersion !== job.fitVersion
            ? // its stages were computed by another version's fit: this one cannot finish it
              `${partials} holds an unfinished fit of another version of influence-lens (fit version ${prev.fitVersion ?? 1}, this version fits ${job.fitVersion}), which this version cannot finish: delete ${partials} to start over`
            : `${partials} holds an unfinished fit with other settings (${diffKeys(prev, job)}); ` +
                `finish it with the same options, or delete ${partials} to start over`,
        );
    } else if (existsSync(join(o.out, OUR_ARGUMENTS_FILE))) {
      // another partition wrote the factors after this one looked
      return result('up-to-date', `${o.out} already holds factors for this model and data`);
    } else {
      mkdirSync(partials, { recursive: true });
      writeFileAtomic(jobFile, `${JSON.stringify(job, null, 2)}\n`);
    }
  } finally {
    release();
  }

  if (o.eigendecompositionDtype === 'float32' && !nativeLapack()?.ssyevd)
    log(
      `no LAPACK ssyevd is loaded (${eighBackend().kind === 'js' ? 'no LAPACK library' : `${eighBackend().library} lacks it`}): the covariances are decomposed in float64, as without --eigendecomposition-dtype float32`,
    );
  const fitOpts: FitOptions = {
    modules: o.modules,
    labels: o.labels,
    // labels are drawn per example (fit.ts uniformsFor), so partitions draw what one process would
    seed: o.seed,
    batchSize: o.batchSize,
    partition: n > 1 ? { index: i, count: n } : undefined,
    onProgress: o.onProgress,
    signal: o.signal,
    eigendecompositionDtype: o.eigendecompositionDtype,
    onNote: log,
  };
  const covDir = (k: number) => join(partials, `covariance-${k}-of-${n}`);
  const lamDir = (k: number) => join(partials, `lambda-${k}-of-${n}`);
  const eigenDir = join(partials, 'eigen');
  const missing = (dir: (k: number) => string) =>
    Array.from({ length: n }, (_, k) => k).filter((k) => !existsSync(join(dir(k), OUR_ARGUMENTS_FILE)));
  const args = (): FactorArguments => ({
    strategy: 'ekfac',
    labels: o.labels,
    damping: o.damping ?? DEFAULT_DAMPING,
    modules: [],
    maxExamples: o.maxExamples ?? null,
    seed: o.seed,
    modelFingerprint: job.modelFingerprint,
    dataFingerprint: job.dataFingerprint,
    training: model.tokenizer.training,
    tokenization: tokenizationKey(model.tokenizer),
    ...(job.eigendecompositionDtype ? { eigendecompositionDtype: job.eigendecompositionDtype } : {}),
    modelParts: modelParts(model.checkpoint, model.options.cacheDir),
    fitVersion: FIT_VERSION,
  });
  const fingerprint = `${job.modelFingerprint}:${job.dataFingerprint}`;

  // What this process computed goes on to the next stage as it is, instead of being read back
  // from the file it was just saved to: at the Qwen2.5-0.5B shape the covariances and the bases are
  // 7 GB each, and a stage read back beside its not yet collected original did not fit in 24 GB.
  let carried: Map<string, CovarianceAccumulator> | undefined;
  let carriedBases: Map<string, Eigenbasis> | undefined;
  let carriedLambdas: Map<string, LambdaAccumulator> | undefined;
  let carriedRows: TokenRows | undefined;
  // rows in a temporary file give their space back when the job ends, however it ends
  try {
    // 1. covariance sums of this partition
    if (!existsSync(join(covDir(i), OUR_ARGUMENTS_FILE))) {
      // a partition takes every n-th example from its index (fit.ts, select)
      const over = n > 1 ? `${Math.ceil((examples.length - i) / n)} of ${examples.length}` : `${examples.length}`;
      log(`covariance pass${n > 1 ? ` (partition ${i}/${n})` : ''} over ${over} examples`);
      // one process doing the whole fit keeps the per-token rows for the Λ pass when labels are
      // empirical, in memory or a temporary file (ekfac/lambda-rows.ts, row-store.ts; the log says
      // where); a resumed fit recomputes them
      const { covariances, rows } = await fitCovariances(model, examples, fitOpts, { rows: n === 1 });
      o.signal?.throwIfAborted();
      saveCovariances(covDir(i), { args: args(), fingerprint }, covariances);
      // one partition's sums are the merged ones
      if (n === 1) carried = covariances;
      carriedRows = rows;
    }
    // 2. all partitions' covariances merged and eigendecomposed (any process may do it; it is
    //    deterministic), and read, under the shared lock (a last partition's final write removes them)
    release = await shared('eigendecomposing the covariances');
    let eigen: Factors | undefined;
    try {
      if (existsSync(join(o.out, OUR_ARGUMENTS_FILE)))
        return result('up-to-date', `${o.out} already holds factors for this model and data`);
      if (!existsSync(join(eigenDir, OUR_ARGUMENTS_FILE))) {
        const waiting = missing(covDir);
        if (waiting.length)
          return result(
            'waiting',
            `covariance of partition ${i}/${n} is done; partitions ${waiting.join(', ')} still need their covariance pass. ` +
              'Run them, then run any partition again to continue.',
          );
        const merged =
          carried ??
          mergeCovariances(
            Array.from({ length: n }, (_, k) => covDir(k)),
            model,
            o.modules,
          );
        carried = undefined;
        collectGarbage(); // the covariance pass's own
        // the merged covariances are on disk before the decompositions start (the eigen stage copies
        // their files), so that none is held beyond its own decomposition (fitEigenbases drops each)
        let covSource = covDir(0);
        if (n > 1) {
          covSource = join(partials, 'covariance-merged');
          saveCovariances(covSource, { args: args(), fingerprint }, merged);
        }
        const bases = await fitEigenbases(merged, { ...fitOpts, precision: model.precision });
        const modules: Record<string, ModuleFactors> = {};
        for (const [name, b] of bases) modules[name] = withEigen({ name, dA: b.dA, dOut: b.dOut }, b);
        o.signal?.throwIfAborted();
        saveStage(eigenDir, { args: args(), fingerprint, modules }, { dir: covSource, stages: ['covariance'] });
        carriedBases = bases;
      }
      // the bases in the model's precision (float32 for a float32 model, as the Λ graph consumes them);
      // the covariances stay on disk (the final write copies their files)
      if (!carriedBases) eigen = loadFactors(eigenDir, { precision: model.precision, covariances: false });
    } finally {
      release();
    }
    const bases =
      carriedBases ??
      new Map<string, Eigenbasis>(
        Object.values(eigen!.modules).map((m) => [m.name, { module: m.name, dA: m.dA, dOut: m.dOut, ...m.eigen! }]),
      );
    carriedBases = undefined;
    collectGarbage(); // the decompositions' copies and workspaces
    // 3. eigenvalue-correction sums of this partition
    if (!existsSync(join(lamDir(i), OUR_ARGUMENTS_FILE))) {
      log(`eigenvalue-correction pass${n > 1 ? ` (partition ${i}/${n})` : ''}`);
      if (carriedRows)
        log(
          `eigenvalue correction from the covariance pass's per-token rows (${Math.round(carriedRows.bytes / 2 ** 20)} MiB kept${carriedRows.store.where === 'file' ? ' in a temporary file' : ''}; empirical labels)`,
        );
      const lambdas = await fitLambdas(model, examples, bases, fitOpts, carriedRows);
      carriedRows = undefined;
      o.signal?.throwIfAborted();
      saveLambdas(lamDir(i), { args: args(), fingerprint }, lambdas);
      if (n === 1) carriedLambdas = lambdas;
    }
    collectGarbage(); // the Λ pass's
    const waiting = missing(lamDir);
    if (waiting.length)
      return result(
        'waiting',
        `eigenvalue correction of partition ${i}/${n} is done; partitions ${waiting.join(', ')} still need theirs. ` +
          'Run them; the last one writes the factors.',
      );
    // 4. merge and write the final factors (each partition's Λ file read once; covariance and
    //    eigen files copied from the eigen stage), then drop the partials
    release = await shared('writing the factors');
    try {
      // another partition, finishing at the same time, wrote them while this one waited
      if (existsSync(join(o.out, OUR_ARGUMENTS_FILE)))
        return result('up-to-date', `${o.out} already holds factors for this model and data`);
      const lams = carriedLambdas ?? new Map([...bases].map(([name, b]) => [name, new LambdaAccumulator(b)]));
      for (let k = carriedLambdas ? n : 0; k < n; k++) {
        const part = loadFactors(lamDir(k), { covariances: false });
        for (const [name, lam] of lams) {
          const got = part.modules[name]?.lambda;
          if (!got) throw new FitJobError(`${lamDir(k)} has no eigenvalue correction for module ${name}`);
          lam.merge(LambdaAccumulator.fromSum(lam.basis, got.sum, got.count));
        }
      }
      const modules: Record<string, ModuleFactors> = {};
      for (const [name, lam] of lams)
        modules[name] = { name, dA: lam.dA, dOut: lam.dOut, lambda: { sum: lam.sum, count: lam.count } };
      const final: Factors = { args: { ...args(), modules: Object.keys(modules) }, fingerprint, modules };
      o.signal?.throwIfAborted();
      saveFactors(o.out, final, { copyFrom: { dir: eigenDir, stages: ['covariance', 'eigen'] } });
      rmSync(partials, { recursive: true, force: true });
      return result('done', `wrote EK-FAC factors for ${Object.keys(modules).length} modules to ${o.out}`);
    } finally {
      release();
    }
  } finally {
    carriedRows?.store.close();
  }
}

/**
 * Saves a covariance stage. Its own function so that the record of the sums it writes dies with it:
 * a record left in the fit job's async frame kept every covariance alive through the eigen and Λ
 * stages (seen with WeakRefs on the sums at the Pythia-70M shape; at Qwen2.5-0.5B the covariances
 * are 7.3 GB). fit-memory.test.ts checks it.
 */
function saveCovariances(
  dir: string,
  head: Omit<Factors, 'modules'>,
  covariances: Map<string, CovarianceAccumulator>,
): void {
  const modules: Record<string, ModuleFactors> = {};
  for (const [name, acc] of covariances) modules[name] = covarianceOnly(acc);
  saveStage(dir, { ...head, modules });
}

/** Saves a partition's Λ sums (its own function for the same reason as saveCovariances). */
function saveLambdas(dir: string, head: Omit<Factors, 'modules'>, lambdas: Map<string, LambdaAccumulator>): void {
  const modules: Record<string, ModuleFactors> = {};
  for (const [name, acc] of lambdas)
    modules[name] = { name, dA: acc.dA, dOut: acc.dOut, lambda: { sum: acc.sum, count: acc.count } };
  saveStage(dir, { ...head, modules });
}

function covarianceOnly(acc: CovarianceAccumulator): ModuleFactors {
  return {
    name: acc.shape.name,
    dA: acc.dA,
    dOut: acc.shape.dOut,
    covariance: {
      activationSum: acc.activationSum,
      activationCount: acc.activationCount,
      gradientSum: acc.gradientSum,
      gradientCount: acc.gradientCount,
    },
  };
}

function withEigen(mf: ModuleFactors, b: Eigenbasis): ModuleFactors {
  return { ...mf, eigen: { qA: b.qA, eigA: b.eigA, qS: b.qS, eigS: b.eigS } };
}

function mergeCovariances(dirs: string[], model: Model, modules: ModuleSelection) {
  const shapes = model.modules(modules);
  // in the model's precision, as each partition's sums (kronfluence keeps float32 ones)
  const merged = new Map(
    shapes.map((m) => [m.name, new CovarianceAccumulator(moduleShape(m), { precision: model.precision })]),
  );
  for (const dir of dirs) {
    const f = loadFactors(dir);
    for (const m of shapes) {
      const mf = f.modules[m.name];
      if (!mf) throw new FitJobError(`${dir} has no covariance for module ${m.name}`);
      merged.get(m.name)!.merge(covarianceFor(mf, moduleShape(m)));
    }
  }
  return merged;
}

/** Writes a stage into a temp directory, then renames it into place: a stage exists whole or not at all. */
function saveStage(dir: string, factors: Factors, copyFrom?: SaveOptions['copyFrom']) {
  replaceDirAtomic(dir, (tmp) =>
    saveFactors(
      tmp,
      { ...factors, args: { ...factors.args, modules: Object.keys(factors.modules) } },
      copyFrom ? { copyFrom } : {},
    ),
  );
}

/** Whether stored factors are the fit `job` describes (then reused, never refitted or refused). */
function sameFit(have: FactorArguments, job: JobDescription, selection: ModuleSelection, model: Model): boolean {
  return (
    have.fitVersion === job.fitVersion &&
    have.modelFingerprint === job.modelFingerprint &&
    have.dataFingerprint === job.dataFingerprint &&
    have.labels === job.labels &&
    // sampled labels depend on the seed (the examples chosen are in the data fingerprint already)
    (job.labels !== 'sampled' || have.seed === job.seed) &&
    eigendecompositionDtypeOf(have) === (job.eigendecompositionDtype ?? 'float64') &&
    sameModules(have, selection, model)
  );
}

function sameModules(have: FactorArguments, selection: ModuleSelection, model: Model): boolean {
  const want = model
    .modules(selection)
    .map((m) => m.name)
    .sort();
  return JSON.stringify([...have.modules].sort()) === JSON.stringify(want);
}

function describeDifference(have: FactorArguments, job: JobDescription, model: Model): string {
  const training = model.tokenizer.training;
  // first: an earlier fit's fingerprints may be of another recipe, which would read as other data
  if (have.fitVersion !== job.fitVersion)
    return `an earlier version of this program's fit (${fitVersionChange(have.fitVersion)})`;
  if (have.modelFingerprint !== job.modelFingerprint) {
    const changed = have.modelParts
      ? modelChange(have.modelParts, modelParts(model.checkpoint, model.options.cacheDir))
      : '';
    return `another model (fingerprint ${have.modelFingerprint ?? 'unknown'}, this one is ${job.modelFingerprint}${changed ? `; since then: ${changed}` : ''})`;
  }
  if (have.training && !sameTraining(have.training, training))
    return `records tokenized under the training convention ${describeTraining(have.training)} (asked: ${describeTraining(training)})`;
  // the example cap changes which examples are read, so the data's fingerprint too: said first
  if ((have.maxExamples ?? null) !== job.maxExamples)
    return `${have.maxExamples === null || have.maxExamples === undefined ? 'all examples' : `the first ${have.maxExamples} examples`} (asked: ${job.maxExamples === null ? 'all' : `--max-examples ${job.maxExamples}`})`;
  if (have.dataFingerprint !== job.dataFingerprint)
    return `other data (fingerprint ${have.dataFingerprint ?? 'unknown'}, this data is ${job.dataFingerprint})`;
  if (have.labels !== job.labels) return `${have.labels} labels (asked: ${job.labels})`;
  if (job.labels === 'sampled' && have.seed !== job.seed)
    return `labels sampled with seed ${have.seed ?? 'unknown'} (asked: --seed ${job.seed})`;
  const dtype = job.eigendecompositionDtype ?? 'float64';
  if (eigendecompositionDtypeOf(have) !== dtype)
    return `covariances eigendecomposed in ${eigendecompositionDtypeOf(have)} (asked: --eigendecomposition-dtype ${dtype})`;
  return `other modules (${have.modules.length} modules; asked: ${job.modules})`;
}

function diffKeys(a: JobDescription, b: JobDescription): string {
  // keys of both: a key present in one description only (eigendecompositionDtype) is a difference too
  return ([...new Set([...Object.keys(a), ...Object.keys(b)])] as Array<keyof JobDescription>)
    .filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]))
    .map((k) =>
      k === 'eigendecompositionDtype'
        ? `--eigendecomposition-dtype ${a[k] ?? 'float64'} → ${b[k] ?? 'float64'}`
        : k === 'dataFingerprint'
          ? // the examples' hashes and how they are tokenized (--training, the tokenizer, the context)
            `the data or how it is tokenized (--training, the tokenizer): fingerprint ${a[k]} → ${b[k]}`
          : `${k}: ${JSON.stringify(a[k])} → ${JSON.stringify(b[k])}`,
    )
    .join(', ');
}
