// The gradient store, for candidates at scale: every training example's per-module
// gradient, compressed once at indexing time by projections of the Kronecker factors (LoGra,
// Choe et al. 2024, "What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence
// Functions"): PSᵀ G PA = Σ_t (PSᵀ g_t)(PAᵀ ã_t)ᵀ, kS × kA per module, formed inside the graph
// without the full gradient. A query matrix M (EK-FAC-preconditioned or not) is reduced the
// same way, so one query scores the whole corpus with one dot product per example and module;
// explain then reranks the top and bottom candidates exactly.
// With the EK-FAC factors, PA and PS are eigenvectors and the store keeps only the eigen-pairs
// that carry the preconditioned score (store-projection.ts); without them, Gaussian PA, PS of
// variance 1/k (E[P Pᵀ] = I: an unbiased estimate, with a standard error), a side no wider
// than k kept exact. Rows are stored in fp16 with one fp32 scale per example and module
// (half the bytes of fp32; the rounding moves no measured Spearman or containment: bench store).
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Preconditioner } from '../attribution/ekfac/precondition';
import type { TokenizedExample } from '../attribution/fit';
import { type Floats, gemm, toF64 } from '../linalg/matrix';
import { type Batch, type Model, type ModuleSelection, makeBatch } from '../model/engine';
import type { ort } from '../model/onnx/session';
import {
  checkDataChecksum,
  floatToHalf,
  halfToFloat,
  readSafetensorsHeader,
  readTensor,
  readTensorF32,
  readTensorF64,
  type TensorToWrite,
  writeSafetensors,
} from '../model/safetensors';
import { DEFAULTS } from '../settings';
import { Rng } from '../util/random';
import {
  chooseEigenPairs,
  eigenPairsModule,
  fullEigenbasis,
  preconditionerFingerprint,
  randomProjection,
  type StoreProjection,
} from './store-projection';

export interface StoreModule {
  name: string;
  dA: number;
  dOut: number;
  kA: number;
  kS: number;
  /** dA × kA row-major: the example side's projection (a gradient G is stored as PSᵀ G PA) */
  PA: Floats;
  /** dOut × kS row-major */
  PS: Floats;
  /** the entries of the kS × kA grid the store keeps, ascending (eigen); all of them when absent */
  keep?: Int32Array;
}

/** How many numbers a module stores per example. */
export function storedSize(m: StoreModule): number {
  return m.keep ? m.keep.length : m.kS * m.kA;
}

/**
 * Bumped whenever the file's layout or meaning changes: a store of another format is
 * rebuilt with a notice, never read. 1: fp32 rows, whitened random eigen projections;
 * 2: fp16 rows with per-example scales, chosen eigen-pairs.
 */
export const STORE_FORMAT = 2;

export interface StoreIdentity {
  modelFingerprint: string;
  dataFingerprint: string;
  /** coordinates per example: k² per module (random: a k × k projection; eigen: k² × modules pairs chosen over all modules) */
  k: number;
  seed: number;
  modules: ModuleSelection;
  /** 'random' when absent (stores written before the eigen projection) */
  projection?: StoreProjection;
  /** for 'eigen': the fingerprint of the factors and damping whose eigenbases it uses */
  factorsFingerprint?: string;
  /** for 'eigen': how many examples (evenly spaced) the pairs' weights are measured on */
  pilot?: number;
}

export class GradientStoreError extends Error {}

const FILE = 'gradient_store.safetensors';

/** fp16 bits → value, for every bit pattern (the query loop reads rows through it). */
const HALF = Float32Array.from({ length: 65536 }, (_, h) => halfToFloat(h));
/** A row's largest magnitude is stored as 2^15 in fp16 (max 65504): values down to 2^-24 of it stay normal. */
const HALF_TOP = 2 ** 15;

/** Rows of one module: fp16 bits [N, size] and the fp32 scale of each example's row. */
interface Rows {
  half: Uint16Array;
  scale: Float32Array;
}

export class GradientStore {
  private constructor(
    readonly identity: StoreIdentity,
    readonly modules: StoreModule[],
    /** module → its rows */
    private readonly rows: Map<string, Rows>,
    readonly size: number,
  ) {}

  /** bytes of stored rows (fp16 values and fp32 scales) */
  get bytes(): number {
    let b = 0;
    for (const r of this.rows.values()) b += r.half.byteLength + r.scale.byteLength;
    return b;
  }

  /** Example `i`'s stored coordinates of module `name`, decoded (tests, diagnostics). */
  row(name: string, i: number): Float64Array {
    const m = this.modules.find((x) => x.name === name);
    if (!m) throw new GradientStoreError(`the store has no module ${name}`);
    const { half, scale } = this.rows.get(name)!;
    const size = storedSize(m);
    return Float64Array.from(half.subarray(i * size, (i + 1) * size), (h) => HALF[h] * scale[i]);
  }

  static async build(
    model: Model,
    examples: TokenizedExample[],
    identity: StoreIdentity,
    opts: {
      batchSize?: number;
      onProgress?: (done: number, total: number) => void;
      signal?: AbortSignal;
      /** the EK-FAC preconditioners (required for projection 'eigen') */
      preconditioners?: Map<string, Preconditioner>;
    } = {},
  ): Promise<GradientStore> {
    const rng = new Rng(identity.seed);
    const projection = identity.projection ?? 'random';
    const shapes = model
      .modules(identity.modules)
      .map((m) => ({ name: m.name, dA: m.dIn + (m.hasBias ? 1 : 0), dOut: m.dOut }));
    if (projection === 'random') {
      const modules = shapes.map((m) => randomProjection(m.name, m.dA, m.dOut, identity.k, rng));
      return GradientStore.buildWith(model, examples, identity, modules, opts);
    }
    const fp = opts.preconditioners && preconditionerFingerprint(opts.preconditioners);
    if (fp !== identity.factorsFingerprint)
      throw new GradientStoreError(
        `the store is declared for factors ${identity.factorsFingerprint}, but was given ${fp ?? 'none'}`,
      );
    const pre = shapes.map((m) => {
      const p = opts.preconditioners?.get(m.name);
      if (!p) throw new GradientStoreError(`an eigen-projected store needs the EK-FAC factors of module ${m.name}`);
      return p;
    });
    // pilot: every eigen-pair of an evenly spaced sample, to weigh the pairs by E[G̃²] / (Λ + λ)
    const nPilot = Math.min(examples.length, identity.pilot ?? DEFAULTS.storePilot);
    if (!(nPilot >= 1))
      throw new GradientStoreError('an eigen-projected store needs at least one example to choose its pairs');
    const sample = Array.from({ length: nPilot }, (_, i) => Math.floor((i * examples.length) / nPilot));
    const weight = new Map(pre.map((p) => [p.module, new Float64Array(p.dOut * p.dA)]));
    const full = pre.map(fullEigenbasis);
    // a full rotation is d_out·d_A numbers per example and module: bound the batch by memory, not only by count
    const perExample = full.reduce((a, m) => a + m.kS * m.kA, 0);
    await projectExamples(
      model,
      sample.map((i) => examples[i]),
      identity.modules,
      full,
      {
        batchSize: Math.max(1, Math.min(opts.batchSize ?? DEFAULTS.batchSize, Math.floor(2 ** 25 / perExample))),
        signal: opts.signal,
        each: (m, _k, z) => {
          const w = weight.get(m.name)!;
          for (let j = 0; j < w.length; j++) w[j] += z[j] * z[j];
        },
      },
    );
    for (const p of pre) {
      const w = weight.get(p.module)!;
      for (let j = 0; j < w.length; j++) w[j] *= p.inverse[j] / nPilot;
    }
    const pairs = chooseEigenPairs(weight, identity.k * identity.k * pre.length);
    const modules = pre.map((p) => eigenPairsModule(p, pairs.get(p.module)!));
    return GradientStore.buildWith(model, examples, identity, modules, opts);
  }

  /** A store with the given projections (build chooses them from the identity). */
  static async buildWith(
    model: Model,
    examples: TokenizedExample[],
    identity: StoreIdentity,
    modules: StoreModule[],
    opts: { batchSize?: number; onProgress?: (done: number, total: number) => void; signal?: AbortSignal } = {},
  ): Promise<GradientStore> {
    const n = examples.length;
    const rows = new Map(
      modules.map((m) => [m.name, { half: new Uint16Array(n * storedSize(m)), scale: new Float32Array(n) }]),
    );
    await projectExamples(model, examples, identity.modules, modules, {
      ...opts,
      each: (m, k, grid) => {
        const size = storedSize(m);
        const v = m.keep ? Float64Array.from(m.keep, (j) => grid[j]) : grid;
        let top = 0;
        for (let j = 0; j < size; j++) {
          const x = Math.abs(v[j]);
          if (!(x <= top)) top = x; // NaN propagates into `top`
        }
        if (!Number.isFinite(top))
          throw new GradientStoreError(
            `the model gave a non-finite projected gradient for module ${m.name} (example ${k})`,
          );
        const r = rows.get(m.name)!;
        const scale = top > 0 ? Math.fround(top / HALF_TOP) : 1;
        r.scale[k] = scale;
        for (let j = 0; j < size; j++) r.half[k * size + j] = floatToHalf(v[j] / scale);
      },
    });
    return new GradientStore(identity, modules, rows, n);
  }

  /** Approximate ⟨M_l, G_l(z)⟩ summed over modules, for every stored example. */
  scores(M: Map<string, Floats>): Float64Array {
    return this.estimate(M).scores;
  }

  /**
   * The scores, and (random projection) each one's standard error: a projection to k_S × k_A
   * coordinates estimates ⟨X, Y⟩ with variance ≈ ‖X‖²‖Y‖² / (k_S k_A) (Johnson–Lindenstrauss;
   * Achlioptas 2003), both norms estimated from the projections themselves. The eigen-pair
   * store's truncation has no such error model (what it drops is not random): its `sd` is
   * absent, and explain relies on the exact rerank of the store's top and bottom.
   */
  estimate(M: Map<string, Floats>): { scores: Float64Array; sd?: Float64Array } {
    const out = new Float64Array(this.size);
    const random = (this.identity.projection ?? 'random') === 'random';
    const variance = new Float64Array(this.size);
    for (const m of this.modules) {
      const full = M.get(m.name);
      if (!full) throw new GradientStoreError(`no query matrix for module ${m.name}`);
      const mp = project(full, m);
      let qq = 0;
      for (const v of mp) qq += v * v;
      const { half, scale } = this.rows.get(m.name)!;
      const size = storedSize(m);
      const exact = m.kA === m.dA && m.kS === m.dOut;
      for (let k = 0; k < this.size; k++) {
        const c = scale[k];
        out[k] += dotHalf(half, k * size, mp, size) * c;
        if (random && !exact) variance[k] += (qq * dotHalf(half, k * size, null, size) * c * c) / size;
      }
    }
    return random ? { scores: out, sd: variance.map(Math.sqrt) } : { scores: out };
  }

  /** Written to a temp file and renamed: a killed process never leaves a torn store. */
  save(dir: string): void {
    mkdirSync(dir, { recursive: true });
    const tensors: Record<string, TensorToWrite> = {};
    for (const m of this.modules) {
      const r = this.rows.get(m.name)!;
      tensors[`rows.${m.name}`] = { dtype: 'F16', shape: [this.size, storedSize(m)], data: r.half };
      tensors[`scale.${m.name}`] = { dtype: 'F32', shape: [this.size], data: r.scale };
      tensors[`PA.${m.name}`] = { dtype: 'F64', shape: [m.dA, m.kA], data: m.PA };
      tensors[`PS.${m.name}`] = { dtype: 'F64', shape: [m.dOut, m.kS], data: m.PS };
      if (m.keep) tensors[`keep.${m.name}`] = { dtype: 'I32', shape: [m.keep.length], data: m.keep };
    }
    // writeSafetensors writes atomically (src/common/atomic-write.ts), with a data checksum
    writeSafetensors(
      join(dir, FILE),
      tensors,
      {
        format: String(STORE_FORMAT),
        identity: JSON.stringify(this.identity),
        modules: JSON.stringify(this.modules.map(({ name, dA, dOut, kA, kS }) => ({ name, dA, dOut, kA, kS }))),
        size: String(this.size),
      },
      { checksum: true },
    );
  }

  /**
   * Loads a store if it exists, is of this format, was built for exactly `expect`, and its
   * bytes are those written (sha256 in its metadata); null when stale, absent, damaged or
   * of another format (the caller rebuilds it; damage and an old format are reported
   * through `notice`). A store that holds NaN or ±Inf is an error naming the file: it was
   * built from a model that produced them.
   */
  static load(
    dir: string,
    expect: StoreIdentity,
    notice: (line: string) => void = (l) => process.stderr.write(`influence-lens: ${l}\n`),
  ): GradientStore | null {
    const path = join(dir, FILE);
    if (!existsSync(path)) return null;
    let h: ReturnType<typeof readSafetensorsHeader>;
    try {
      h = readSafetensorsHeader(path);
    } catch {
      notice(`gradient store ${path} is unreadable; rebuilding it`);
      rmSync(path, { force: true });
      return null;
    }
    const meta = h.metadata ?? {};
    if (meta.format !== String(STORE_FORMAT)) {
      notice(
        `gradient store ${path} is in format ${meta.format ?? 1}, this version reads format ${STORE_FORMAT}; rebuilding it`,
      );
      rmSync(path, { force: true });
      return null;
    }
    if (meta.identity !== JSON.stringify(expect)) return null;
    const check = checkDataChecksum(h);
    if (check !== 'ok') {
      notice(
        `gradient store ${path} ${check === 'mismatch' ? 'does not match its checksum (damaged)' : 'has no checksum'}; rebuilding it`,
      );
      rmSync(path, { force: true });
      return null;
    }
    const size = Number(meta.size);
    const fail = (what: string) => {
      throw new GradientStoreError(`${path}: ${what} (delete the file; it will be rebuilt)`);
    };
    const modules: StoreModule[] = (
      JSON.parse(meta.modules ?? '[]') as Array<Omit<StoreModule, 'PA' | 'PS' | 'keep'>>
    ).map((m) => {
      const keep = h.tensors.has(`keep.${m.name}`) ? Int32Array.from(readTensorF64(h, `keep.${m.name}`)) : undefined;
      if (keep?.some((j) => !(j >= 0 && j < m.kS * m.kA))) fail(`tensor "keep.${m.name}" indexes outside its grid`);
      return {
        ...m,
        PA: readTensorF64(h, `PA.${m.name}`),
        PS: readTensorF64(h, `PS.${m.name}`),
        ...(keep ? { keep } : {}),
      };
    });
    const rows = new Map<string, Rows>();
    for (const m of modules) {
      const half = readTensor(h, `rows.${m.name}`);
      if (half.dtype !== 'F16' || half.data.length !== size * storedSize(m))
        fail(`tensor "rows.${m.name}" is not ${size} × ${storedSize(m)} fp16`);
      const scale = readTensorF32(h, `scale.${m.name}`);
      const bits = half.data as Uint16Array;
      const check = (what: string, at: number, value: (at: number) => number) => {
        if (at >= 0)
          throw new GradientStoreError(
            `${path}: tensor "${what}" holds ${value(at)} at index ${at}; the model gave non-finite gradients (delete the file after fixing the cause)`,
          );
      };
      const nonFinite = (x: number) => !Number.isFinite(x);
      // an fp16 value is NaN or ±Inf exactly when its exponent bits are all set
      check(
        `rows.${m.name}`,
        bits.findIndex((b) => (b & 0x7c00) === 0x7c00),
        (at) => HALF[bits[at]],
      );
      check(`scale.${m.name}`, scale.findIndex(nonFinite), (at) => scale[at]);
      check(`PA.${m.name}`, m.PA.findIndex(nonFinite), (at) => m.PA[at]);
      check(`PS.${m.name}`, m.PS.findIndex(nonFinite), (at) => m.PS[at]);
      rows.set(m.name, { half: bits, scale });
    }
    return new GradientStore(expect, modules, rows, size);
  }
}

/**
 * Runs the projected graph (PSᵀ G PA per module) over `examples` and hands each example's
 * kS × kA grid to `each` with the example's index (the store's build; bench store's fp32 reference).
 */
export async function projectExamples(
  model: Model,
  examples: TokenizedExample[],
  selection: ModuleSelection,
  modules: StoreModule[],
  opts: {
    batchSize?: number;
    onProgress?: (done: number, total: number) => void;
    signal?: AbortSignal;
    each: (m: StoreModule, example: number, grid: Float32Array | Float64Array) => void;
  },
): Promise<void> {
  const graph = await model.compile({ labels: 'data', projected: true, modules: selection });
  const feeds: Record<string, ort.Tensor> = {};
  for (const m of modules) {
    feeds[`PA.${m.name}`] = graph.tensor(m.PA, [m.dA, m.kA]);
    feeds[`PS.${m.name}`] = graph.tensor(m.PS, [m.dOut, m.kS]);
  }
  const n = examples.length;
  const order = [...examples.keys()].sort((a, b) => examples[a].ids.length - examples[b].ids.length || a - b);
  const bs = opts.batchSize ?? DEFAULTS.batchSize;
  for (let i = 0; i < n; i += bs) {
    if (opts.signal?.aborted) throw new GradientStoreError('cancelled');
    const idx = order.slice(i, i + bs);
    const batch: Batch = makeBatch(
      idx.map((k) => examples[k]),
      model.tokenizer.padTokenId ?? 0,
    );
    const out = await graph.run(batch, { feeds });
    for (const m of modules) {
      const size = m.kS * m.kA;
      const p = out[`P.${m.name}`].data as Float32Array | Float64Array;
      for (const [b, k] of idx.entries()) opts.each(m, k, p.subarray(b * size, (b + 1) * size));
    }
    opts.onProgress?.(Math.min(n, i + bs), n);
  }
}

/**
 * Σ_j z_j x_j over the fp16 values z = half[off, off + n), or Σ z² when `x` is null. Four
 * accumulators let the loads overlap: this loop is the store's whole per-example query cost.
 */
function dotHalf(half: Uint16Array, off: number, x: Float64Array | null, n: number): number {
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  let j = 0;
  if (x) {
    for (; j + 3 < n; j += 4) {
      s0 += HALF[half[off + j]] * x[j];
      s1 += HALF[half[off + j + 1]] * x[j + 1];
      s2 += HALF[half[off + j + 2]] * x[j + 2];
      s3 += HALF[half[off + j + 3]] * x[j + 3];
    }
    for (; j < n; j++) s0 += HALF[half[off + j]] * x[j];
  } else
    for (; j < n; j++) {
      const z = HALF[half[off + j]];
      s0 += z * z;
    }
  return s0 + s1 + s2 + s3;
}

/** PSᵀ M PA for a dOut × dA matrix M, at the kept entries (all of the grid when `keep` is absent). */
function project(M: Floats, m: StoreModule): Float64Array {
  const { dA, dOut, kA, kS, keep } = m;
  const PA = toF64(m.PA);
  const PS = toF64(m.PS);
  const MP = gemm(toF64(M), PA, dOut, dA, kA); // dOut × kA
  if (!keep) return gemm(PS, MP, kS, dOut, kA, { transA: true });
  // only the kept entries: K·dOut work instead of kS·kA·dOut
  const out = new Float64Array(keep.length);
  for (let j = 0; j < keep.length; j++) {
    const r = Math.floor(keep[j] / kA);
    const c = keep[j] - r * kA;
    let s = 0;
    for (let i = 0; i < dOut; i++) s += PS[i * kS + r] * MP[i * kA + c];
    out[j] = s;
  }
  return out;
}
