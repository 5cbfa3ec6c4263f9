// Fitting EK-FAC factors over a training-data sample (Grosse et al. 2023 §2.2):
//   pass 1: covariance sums Σ ã ãᵀ and Σ g gᵀ per tracked module (computed inside the graph);
//   eigendecompositions of A and S in fp64, or float32 when asked (eigenvectors then held in the
//   model's precision);
//   pass 2: eigenvalue correction Λ = mean_z (Q_Sᵀ G(z) Q_A)² (rotated inside the graph); with
//   empirical labels, from pass 1's per-token rows when they fit in memory (ekfac/lambda-rows.ts).
// Labels are sampled from the model (true Fisher) unless `labels: 'empirical'`. Every pass
// can run on one partition of the data; partial sums add up (covariance.ts, lambda.ts).

import { createHash } from 'node:crypto';
import { Semaphore } from '../../common/semaphore';
import { type EighDtype, eighBytes, parallelEigh } from '../linalg/eigh';
import type { Floats, Precision } from '../linalg/matrix';
import type { Batch, Model, ModuleInfo, ModuleSelection, RunResult } from '../model/engine';
import type { ort } from '../model/onnx/session';
import { DEFAULTS } from '../settings';
import { collectGarbage, collectWhenPiledUp, noteDroppedSoon } from '../util/gc';
import { Rng } from '../util/random';
import { memoryBoundedBatches, runBudgetBytes, runShape, sequenceLimitBytes } from './chunking';
import { CovarianceAccumulator } from './ekfac/covariance';
import { assembleEigenbasis, type Decomposition, decomposeCovariance, type Eigenbasis } from './ekfac/eigenbasis';
import type { ModuleShape } from './ekfac/gradient';
import { LambdaAccumulator } from './ekfac/lambda';
import {
  covarianceBytes,
  lambdaFromRows,
  placeRows,
  RowCollector,
  type RowModule,
  rowsBytes,
  type TokenRows,
} from './ekfac/lambda-rows';

export interface TokenizedExample {
  ids: number[];
  /** per-position loss weights (position t predicts token t+1) */
  weights: number[];
}

export interface FitOptions {
  modules: ModuleSelection;
  labels: 'sampled' | 'empirical';
  seed: number;
  /** sequences per batch */
  batchSize?: number;
  /** only this slice of the examples: { index: i, count: n } → examples k with k % n === i */
  partition?: { index: number; count: number };
  onProgress?: (stage: 'covariance' | 'eigendecomposition' | 'lambda', done: number, total: number) => void;
  /** checked before every batch: an aborted fit stops there and throws the signal's reason */
  signal?: AbortSignal;
  /** the precision of the eigendecompositions (kronfluence's eigendecomposition_dtype). Default float64. */
  eigendecompositionDtype?: EighDtype;
  /** a line for the fit's log: where the per-token rows for Λ went, or why they were not kept */
  onNote?: (line: string) => void;
}

export interface FittedFactors {
  modules: ModuleInfo[];
  covariances: Map<string, CovarianceAccumulator>;
  bases: Map<string, Eigenbasis>;
  lambdas: Map<string, LambdaAccumulator>;
}

export function moduleShape(m: ModuleInfo): ModuleShape {
  return { name: m.name, dIn: m.dIn, dOut: m.dOut, appendOne: m.hasBias };
}

function select(examples: TokenizedExample[], p?: { index: number; count: number }): TokenizedExample[] {
  if (!p) return examples;
  if (!(p.count >= 1 && p.index >= 0 && p.index < p.count)) throw new Error(`bad partition ${p.index}/${p.count}`);
  return examples.filter((_, k) => k % p.count === p.index);
}

const data = (t: ort.Tensor) => t.data as Float32Array | Float64Array;

/** What the covariance pass gives: the sums, and the kept rows with a line that says where or why not. */
export interface CovariancePass {
  modules: ModuleInfo[];
  covariances: Map<string, CovarianceAccumulator>;
  rows?: TokenRows;
  rowsNote?: string;
}

/**
 * Pass 1: covariance sums. The graph returns every tracked module's per-token input and output
 * gradient; the sums Σ ã ãᵀ and Σ g gᵀ are added by BLAS gemm straight into running sums in the
 * graph's precision (kronfluence keeps float32 ones too). Reducing inside the graph instead
 * returned every module's full d × d sums from every run, ~1.2 GB per run at the SmolLM-135M
 * shape, and added them in JS: the covariance pass took 5× kronfluence's time there.
 */
export async function fitCovariances(
  model: Model,
  examples: TokenizedExample[],
  opts: FitOptions,
  keep: { rows?: boolean } = {},
): Promise<CovariancePass> {
  return perTokenPass(model, examples, opts, { sums: true, rows: !!keep.rows, stage: 'covariance' });
}

/**
 * The covariance pass's runs: the graph returns every tracked module's per-token rows, added into
 * the covariance sums (`sums`) and, with empirical labels when they fit the rows budget, kept for
 * the eigenvalue correction (`rows`). The Λ pass runs it again for the rows alone when they were
 * not kept (a resumed fit): the same graph over the same batches gives the same rows, bit for bit,
 * so a fit's factors do not depend on whether it was interrupted.
 */
async function perTokenPass(
  model: Model,
  examples: TokenizedExample[],
  opts: FitOptions,
  want: { sums: boolean; rows: boolean; stage: 'covariance' | 'lambda' },
): Promise<CovariancePass> {
  const graph = await model.compile({ labels: labelsOf(opts), perToken: true, modules: opts.modules });
  const modules = graph.moduleInfo;
  const precision = graph.fp64 ? 'fp64' : 'fp32';
  // Modules that read the same tensor (q/k/v, gate/up) share one activation sum, added once.
  const leaders = new Map<string, CovarianceAccumulator>();
  const covariances = new Map<string, CovarianceAccumulator>();
  const activationFrom: Array<{ module: string; acc: CovarianceAccumulator }> = [];
  const rowModules: RowModule[] = [];
  for (const m of graph.modules) {
    const key = `${m.input.name}:${m.hasBias}`;
    const leader = leaders.get(key);
    const acc = new CovarianceAccumulator(moduleShape(m), { precision, shareActivationsWith: leader });
    if (!leader) {
      leaders.set(key, acc);
      activationFrom.push({ module: m.name, acc });
    }
    covariances.set(m.name, acc);
    const lead = leader ? activationFrom.find((x) => x.acc === leader)!.module : m.name;
    rowModules.push({ name: m.name, leader: lead, dIn: m.dIn, dOut: m.dOut, hasBias: m.hasBias });
  }
  const outputs = [...activationFrom.map((x) => `a.${x.module}`), ...modules.map((m) => `g.${m.name}`)];
  const bs = memoryBoundedBatches(
    select(examples, opts.partition),
    opts.batchSize ?? DEFAULTS.batchSize,
    model.tokenizer.padTokenId ?? 0,
    runShape(modules, model.config, false, graph.fp64),
  );
  // With empirical labels the Λ pass would compute these same rows again: keep them for it, in
  // memory within the budget or else in a temporary file (ekfac/lambda-rows.ts, row-store.ts).
  let rows: RowCollector | undefined;
  let rowsNote: string | undefined;
  if (want.rows && opts.labels === 'empirical') {
    const runs = bs.map(({ batch }) => ({ B: batch.B, T: batch.T }));
    const bytes = rowsBytes(rowModules, graph.fp64, runs);
    const place = placeRows(bytes, covarianceBytes(rowModules, graph.fp64));
    if (place.where === 'none') rowsNote = `per-token rows (${mib(bytes)}) not kept: ${place.why}`;
    else {
      try {
        rows = new RowCollector(rowModules, graph.fp64, runs, place);
        rowsNote = `per-token rows (${mib(bytes)}) kept ${place.where === 'file' ? `in a temporary file in ${place.dir}` : 'in memory'}`;
      } catch (e) {
        // a folder that refuses the file is a reason to take the Λ pass, not to fail the fit
        if (!(e as NodeJS.ErrnoException).code) throw e;
        rowsNote = `per-token rows (${mib(bytes)}) not kept: a file in ${(place as { dir: string }).dir} could not be made (${(e as Error).message})`;
      }
    }
  }
  if (!want.sums && !rows) {
    if (rowsNote) opts.onNote?.(`${rowsNote}: Λ takes its own pass`);
    return { modules, covariances, rowsNote };
  }
  // a function of its own, so that no variable of the loop keeps a run's rows alive under the next run (RunResult)
  const add = async (out: RunResult, batch: Batch) => {
    rows?.add(
      batch.B,
      batch.T,
      (leader) => data(out[`a.${leader}`]),
      (module) => data(out[`g.${module}`]),
    );
    // a file store writes them meanwhile; the next run starts once the run before is written
    const written = rows?.drain();
    try {
      if (want.sums) addSums(out, batch);
    } finally {
      await written;
    }
  };
  const addSums = (out: RunResult, batch: Batch) => {
    // only attended tokens count (right padding: each sequence's first `length` rows), as
    // kronfluence masks with the attention mask
    const real = realRows(batch);
    for (const { module, acc } of activationFrom) {
      const d = acc.shape.dIn;
      acc.addActivationRows(real.rows(data(out[`a.${module}`]), d), real.count);
    }
    for (const m of modules) {
      const acc = covariances.get(m.name)!;
      acc.addGradientRows(real.rows(data(out[`g.${m.name}`]), m.dOut), real.count).endBatch();
    }
  };
  try {
    for (const [i, { batch, idx }] of bs.entries()) {
      opts.signal?.throwIfAborted();
      await add(await graph.run(batch, { uniforms: uniformsFor(opts, 'covariance', batch, idx), outputs }), batch);
      opts.onProgress?.(want.stage, i + 1, bs.length);
    }
  } catch (e) {
    rows?.abandon();
    throw e;
  }
  const kept = await rows?.finish();
  if (rows?.failed) rowsNote = `per-token rows not kept: ${rows.failed}`;
  if (rowsNote) opts.onNote?.(want.stage === 'lambda' ? `${rowsNote} (computed again for Λ)` : rowsNote);
  return { modules, covariances, rows: kept, rowsNote };
}

const mib = (bytes: number) => `${Math.round(bytes / 2 ** 20)} MiB`;

/** The rows of a right-padded batch that are real tokens, packed (no copy when nothing is padded). */
function realRows(batch: Batch) {
  const { B, T, lengths } = batch;
  const count = lengths.reduce((s, n) => s + n, 0);
  return {
    count,
    rows(x: Float32Array | Float64Array, d: number): Float32Array | Float64Array {
      if (x.length !== B * T * d) throw new Error(`expected ${B}×${T}×${d} per-token values, got ${x.length}`);
      if (count === B * T) return x;
      const out = x instanceof Float32Array ? new Float32Array(count * d) : new Float64Array(count * d);
      let o = 0;
      for (let b = 0; b < B; b++) {
        out.set(x.subarray(b * T * d, (b * T + lengths[b]) * d), o);
        o += lengths[b] * d;
      }
      return out;
    },
  };
}

/**
 * Eigendecompose each module's A and S (fp64, or float32 when `eigendecompositionDtype` says so;
 * LAPACK when available), several at once when the
 * library allows it (`parallelEigh`: single-threaded calls on libuv's thread pool, largest
 * modules first so the last to finish are small). The eigenvectors are stored in `precision`
 * (default fp64; a float32 model's fit passes 'fp32', as kronfluence keeps its factors in
 * float32). A module's covariance is finalized only when a slot is free, and its accumulator is
 * deleted from `covariances` once its basis exists, so the peak holds the bases made so far, the
 * matrices in flight and the covariances still to decompose, not both full sets: pass a copy of
 * the map to keep them.
 */
export async function fitEigenbases(
  covariances: Map<string, CovarianceAccumulator>,
  opts?: Pick<FitOptions, 'signal' | 'onProgress' | 'eigendecompositionDtype'> & { precision?: Precision },
): Promise<Map<string, Eigenbasis>> {
  const order = [...covariances.keys()];
  const total = order.length;
  const size = (acc: CovarianceAccumulator) => Math.max(acc.dA, acc.shape.dOut);
  const largest = Math.max(0, ...[...covariances.values()].map(size));
  const { parallel, end } = parallelEigh(largest, Math.max(0, sequenceLimitBytes()) / 2);
  const done = new Map<string, Eigenbasis>();
  const eigenOpts = { precision: opts?.precision, dtype: opts?.eigendecompositionDtype };
  // Modules that read the same input (q/k/v, gate/up) have identical activation covariances
  // (the graph emits one A for them): decompose each distinct A once. A is matched by the
  // sha256 of its bytes (the covariance itself is released as we go); equal digests mean equal
  // values, so the result is the same as decomposing it again.
  const seenA = new Map<string, Promise<Decomposition>>();
  const digests = new Map<Floats, string>();
  const claimed = new Set<Promise<Decomposition>>();
  // one slot per decomposition in flight; a slot is taken before its covariance is finalized
  const slots = new Semaphore(parallel, 2 * order.length);
  const holding = async (release: () => void, f: () => Promise<Decomposition>) => {
    try {
      return await f();
    } finally {
      release();
    }
  };
  const modules: Promise<void>[] = [];
  let failure: { error: unknown } | undefined;
  try {
    for (const name of [...order].sort((x, y) => size(covariances.get(y)!) - size(covariances.get(x)!))) {
      opts?.signal?.throwIfAborted();
      if (failure) throw failure.error;
      const acc = covariances.get(name)!;
      const releaseA = await slots.acquire(opts?.signal);
      // the sums' lower triangles, divided by their counts as the solver's input is copied
      const cov = acc.lowerSums();
      // modules sharing one sum (q/k/v, gate/up) hash it once; equal sums of their own still match
      const key = digests.get(cov.A) ?? digest(cov.A, cov.scaleA);
      digests.set(cov.A, key);
      let a = seenA.get(key);
      if (a) releaseA();
      else {
        const A = { ...eigenOpts, lowerSum: { scale: cov.scaleA } };
        a = holding(releaseA, () => decomposeCovariance(name, 'activation', cov.A, cov.dA, A));
        seenA.set(key, a);
      }
      const releaseS = await slots.acquire(opts?.signal);
      const S = { ...eigenOpts, lowerSum: { scale: cov.scaleS } };
      const s = holding(releaseS, () => decomposeCovariance(name, 'gradient', cov.S, cov.dOut, S));
      const mine = a;
      const module = Promise.all([mine, s]).then(([da, ds]) => {
        // the first module to finish owns the shared activation arrays; the others copy them
        const shared = claimed.has(mine);
        claimed.add(mine);
        done.set(name, assembleEigenbasis(name, cov, da, ds, { precision: opts?.precision, shared }));
        covariances.delete(name);
        // each decomposition leaves its fp64 covariance, a symmetrized copy, LAPACK's workspace and
        // the column-major result; collected once a few hundred MB have piled up, not after every
        // module (a full collection each: 10 s of the 42 s phase at SmolLM-135M, on the cores
        // LAPACK was using)
        noteDroppedSoon(eighBytes(cov.dOut) + (shared ? 0 : eighBytes(cov.dA)));
        collectWhenPiledUp(EIGEN_GARBAGE_BYTES);
        opts?.onProgress?.('eigendecomposition', done.size, total);
      });
      // a failure stops the loop at the next module instead of decomposing the rest
      module.catch((error) => {
        failure ??= { error };
      });
      modules.push(module);
    }
    await Promise.all(modules);
  } finally {
    // every call in flight must end before BLAS gets its threads back
    await Promise.allSettled(modules);
    end();
  }
  collectGarbage(); // what is left of the pile, before the Λ pass allocates
  return new Map(order.map((name) => [name, done.get(name)!]));
}

/** Equal digests: equal sums (every byte, both triangles) and equal scales, so equal inputs to the solver. */
function digest(a: Floats, scale: number): string {
  return createHash('sha256')
    .update(`${a.constructor.name}:${a.length}:${scale}:`)
    .update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength))
    .digest('hex');
}

/** Garbage the eigendecompositions may leave before one collection (see fitEigenbases). */
const EIGEN_GARBAGE_BYTES = 256 * 2 ** 20;

/**
 * Pass 2: eigenvalue correction sums. With empirical labels (the same gradients as pass 1) and
 * rows within the budget, from pass 1's `rows` (consumed) or, without them, the same rows computed
 * again; otherwise the Λ graph's own pass over the data.
 */
export async function fitLambdas(
  model: Model,
  examples: TokenizedExample[],
  bases: Map<string, Eigenbasis>,
  opts: FitOptions,
  rows?: TokenRows,
): Promise<Map<string, LambdaAccumulator>> {
  // with empirical labels within the rows budget, Λ always comes from the rows: the kept ones, or
  // the same rows again (a resumed fit), so that both give the same factors
  if (!rows && opts.labels === 'empirical')
    rows = (await perTokenPass(model, examples, opts, { sums: false, rows: true, stage: 'lambda' })).rows;
  if (rows) return lambdasFromRows(model, examples, bases, opts, rows);
  const graph = await model.compile({ labels: labelsOf(opts), lambda: true, modules: opts.modules });
  const feeds: Record<string, ort.Tensor> = {};
  const lambdas = new Map<string, LambdaAccumulator>();
  for (const m of graph.moduleInfo) {
    const b = bases.get(m.name);
    if (!b) throw new Error(`no eigenbasis for module ${m.name}: fit covariances over the same modules`);
    feeds[`QA.${m.name}`] = graph.tensor(b.qA, [b.dA, b.dA]);
    feeds[`QS.${m.name}`] = graph.tensor(b.qS, [b.dOut, b.dOut]);
    lambdas.set(m.name, new LambdaAccumulator(b));
  }
  // Other labels than pass 1's (uniformsFor's pass), as kronfluence draws fresh labels for the correction.
  const bs = memoryBoundedBatches(
    select(examples, opts.partition),
    opts.batchSize ?? DEFAULTS.batchSize,
    model.tokenizer.padTokenId ?? 0,
    runShape(graph.moduleInfo, model.config, 'transient', graph.fp64),
  );
  // a function of its own: no loop variable keeps a run's sums alive under the next run (RunResult)
  const add = (out: RunResult, B: number) => {
    for (const m of graph.moduleInfo) lambdas.get(m.name)!.addSum(data(out[`L.${m.name}`]), B);
  };
  for (const [i, { batch, idx }] of bs.entries()) {
    opts.signal?.throwIfAborted();
    add(await graph.run(batch, { uniforms: uniformsFor(opts, 'lambda', batch, idx), feeds }), batch.B);
    opts.onProgress?.('lambda', i + 1, bs.length);
  }
  return lambdas;
}

async function lambdasFromRows(
  model: Model,
  examples: TokenizedExample[],
  bases: Map<string, Eigenbasis>,
  opts: FitOptions,
  rows: TokenRows,
): Promise<Map<string, LambdaAccumulator>> {
  const lambdas = new Map<string, LambdaAccumulator>();
  try {
    // rows are the covariance pass's gradients: only the same labels over the same examples make them Λ's
    if (opts.labels !== 'empirical')
      throw new Error('kept rows serve the eigenvalue correction only with empirical labels');
    const count = select(examples, opts.partition).length;
    if (rows.examples !== count)
      throw new Error(`the kept rows cover ${rows.examples} examples, the eigenvalue correction ${count}`);
    for (const m of rows.modules) {
      const b = bases.get(m.name);
      if (!b) throw new Error(`no eigenbasis for module ${m.name}: fit covariances over the same modules`);
      lambdas.set(m.name, new LambdaAccumulator(b));
    }
  } catch (e) {
    rows.store.close(); // a file's space goes back now, not when the process ends
    throw e;
  }
  await lambdaFromRows(
    rows,
    { qA: (name) => bases.get(name)!.qA, qS: (name) => bases.get(name)!.qS },
    {
      threads: model.options.threads,
      device: model.options.device,
      // half the run budget: the Λ pass holds its group's rows (a file's) beside each run, and its
      // peak at Pythia-70M × 256 with the whole budget (2.8 GB) nearly reached kronfluence's
      budgetBytes: runBudgetBytes() / 2,
      signal: opts.signal,
      add: (module, sum, sequences) => lambdas.get(module)!.addSum(sum, sequences),
      onRun: (done, total) => opts.onProgress?.('lambda', done, total),
    },
  );
  return lambdas;
}

export async function fitFactors(model: Model, examples: TokenizedExample[], opts: FitOptions): Promise<FittedFactors> {
  const { modules, covariances, rows } = await fitCovariances(model, examples, opts, { rows: true });
  // a copy: the covariances are returned with the bases
  const bases = await fitEigenbases(new Map(covariances), { ...opts, precision: model.precision });
  const lambdas = await fitLambdas(model, examples, bases, opts, rows);
  return { modules, covariances, bases, lambdas };
}

function labelsOf(opts: FitOptions): 'sampled' | 'data' {
  return opts.labels === 'sampled' ? 'sampled' : 'data';
}

/**
 * The uniforms that sampled labels are drawn from, per example: example i's stream is seeded by
 * (seed, pass, i), i its index among all the fit's examples, so that neither the batch size, the
 * memory budget that splits batches, nor a partition changes the label an example gets (a stream
 * per batch made --batch-size 2 move a covariance by up to 109%, like another seed). Padded
 * positions get 0.5: their loss weight is 0.
 */
function uniformsFor(
  opts: FitOptions,
  pass: 'covariance' | 'lambda',
  batch: Batch,
  idx: number[],
): Float32Array | undefined {
  if (opts.labels !== 'sampled') return undefined;
  const out = new Float32Array(batch.B * batch.T).fill(0.5);
  for (let b = 0; b < batch.B; b++) {
    const i = globalIndex(idx[b], opts.partition);
    out.set(new Rng(exampleSeed(opts.seed, pass === 'covariance' ? 0 : 1, i)).uniforms(batch.lengths[b]), b * batch.T);
  }
  return out;
}

/** The index among all the fit's examples of the k-th example of a partition (`select`). */
function globalIndex(k: number, p?: { index: number; count: number }): number {
  return p ? k * p.count + p.index : k;
}

/** A 32-bit seed for one example's stream: (seed, pass, index) mixed by murmur3's finalizer. */
function exampleSeed(seed: number, pass: number, index: number): number {
  let h = (seed >>> 0) ^ Math.imul(pass + 1, 0x85ebca6b) ^ Math.imul(index + 1, 0x9e3779b1);
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}
