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
import { closeSync, existsSync, mkdirSync, openSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import type { Preconditioner } from '../attribution/ekfac/precondition';
import type { TokenizedExample } from '../attribution/fit';
import { type Floats, gemm, toF64 } from '../linalg/matrix';
import { type Batch, type Model, type ModuleSelection, makeBatch, type RunResult } from '../model/engine';
import type { ort } from '../model/onnx/session';
import {
  checkDataChecksum,
  floatToHalf,
  halfToFloat,
  readSafetensorsHeader,
  readTensorF64,
  type TensorLayout,
  type TensorToWrite,
  writeSafetensors,
  writeSafetensorsStreamed,
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
import {
  CHUNK_BYTES,
  examplesPerChunk,
  type FileStamp,
  fileRows,
  memoryRows,
  type RowSource,
  StoreFileChanged,
  StoreScanner,
  sameStamp,
  stampOf,
} from './store-scan';

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

/**
 * Where the rows are: in memory (a store built without a folder: tests, benches), or in the
 * store's file, verified once (sha256 and finiteness, streamed) and from then on read in chunks
 * and trusted only while the file is the same one (device, inode, size, mtime, ctime).
 */
type Backing =
  | { kind: 'memory'; rows: Rows[] }
  | { kind: 'file'; path: string; stamp: FileStamp; where: Array<{ rows: number; scale: number }> };

export interface StoreOptions {
  /** bytes of rows per chunk of a query's scan (default CHUNK_BYTES; tests use small ones) */
  chunkBytes?: number;
  /** intra-op threads of the scan (default 1) */
  threads?: number;
}

export class GradientStore {
  private readonly scanner: StoreScanner;
  private readonly perChunk: number;

  private constructor(
    readonly identity: StoreIdentity,
    readonly modules: StoreModule[],
    private readonly backing: Backing,
    readonly size: number,
    opts: StoreOptions = {},
  ) {
    const sizes = modules.map(storedSize);
    // one intra-op thread: on the shared 2-core VM a second made the scan 3× slower (a synthetic
    // 100k-row store of the real row size: 1.5 s per query with 1 thread, 5.0 s with 2, 2.3 s ORT's default)
    this.scanner = new StoreScanner(sizes, opts.threads ?? 1);
    this.perChunk = examplesPerChunk(sizes, opts.chunkBytes ?? CHUNK_BYTES);
  }

  /** bytes of stored rows (fp16 values and fp32 scales) */
  get bytes(): number {
    return this.modules.reduce((b, m) => b + this.size * (2 * storedSize(m) + 4), 0);
  }

  /** The file the rows are read from (absent: held in memory). */
  get file(): string | undefined {
    return this.backing.kind === 'file' ? this.backing.path : undefined;
  }

  /** Why the store can no longer be used (its file changed since it was verified), or undefined. */
  stale(): string | undefined {
    const b = this.backing;
    if (b.kind !== 'file') return undefined;
    try {
      return sameStamp(stampOf(statSync(b.path)), b.stamp)
        ? undefined
        : `${b.path} changed on disk since its checksum was verified`;
    } catch (e) {
      return `${b.path} is gone (${(e as NodeJS.ErrnoException).code ?? e})`;
    }
  }

  private source(perChunk = this.perChunk): RowSource {
    const b = this.backing;
    const sizes = this.modules.map(storedSize);
    if (b.kind === 'memory') return memoryRows(b.rows, sizes);
    try {
      return fileRows(b.path, b.stamp, b.where, sizes, perChunk);
    } catch (e) {
      throw this.refused(e);
    }
  }

  private refused(e: unknown): unknown {
    if (e instanceof StoreFileChanged || (e as NodeJS.ErrnoException).code === 'ENOENT')
      return new GradientStoreError(
        `gradient store: ${(e as Error).message}; it is not used (load it again: it is verified and rebuilt if needed)`,
      );
    return e;
  }

  /** Example `i`'s stored coordinates of module `name`, decoded (tests, diagnostics). */
  row(name: string, i: number): Float64Array {
    const at = this.modules.findIndex((x) => x.name === name);
    if (at < 0) throw new GradientStoreError(`the store has no module ${name}`);
    if (!(Number.isInteger(i) && i >= 0 && i < this.size))
      throw new GradientStoreError(`the store has no example ${i} (size ${this.size})`);
    const src = this.source(1);
    try {
      const r = src.read(i, 1, 0);
      return Float64Array.from(r.half[at], (h) => HALF[h] * r.scale[at][0]);
    } finally {
      src.close();
    }
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
    } & BuildTarget = {},
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

  /**
   * A store with the given projections (build chooses them from the identity). With `dir`, each
   * example's rows are written into the store's file as they are computed (never all held), the
   * file is hashed when complete, and the store reads its rows from there.
   */
  static async buildWith(
    model: Model,
    examples: TokenizedExample[],
    identity: StoreIdentity,
    modules: StoreModule[],
    opts: {
      batchSize?: number;
      onProgress?: (done: number, total: number) => void;
      signal?: AbortSignal;
    } & BuildTarget = {},
  ): Promise<GradientStore> {
    const n = examples.length;
    const encode = (m: StoreModule, k: number, grid: Float32Array | Float64Array, half: Uint16Array): number => {
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
      const scale = top > 0 ? Math.fround(top / HALF_TOP) : 1;
      for (let j = 0; j < size; j++) half[j] = floatToHalf(v[j] / scale);
      return scale;
    };
    if (!opts.dir) {
      const rows = modules.map((m) => ({ half: new Uint16Array(n * storedSize(m)), scale: new Float32Array(n) }));
      const at = new Map(modules.map((m, i) => [m.name, i]));
      await projectExamples(model, examples, identity.modules, modules, {
        ...opts,
        each: (m, k, grid) => {
          const r = rows[at.get(m.name)!];
          const size = storedSize(m);
          r.scale[k] = encode(m, k, grid, r.half.subarray(k * size, (k + 1) * size));
        },
      });
      return new GradientStore(identity, modules, { kind: 'memory', rows }, n, opts);
    }
    // to the file: the scales (4 bytes per example and module) wait in memory, rows go out as computed
    const scales = modules.map(() => new Float32Array(n));
    const buf = modules.map((m) => new Uint16Array(storedSize(m)));
    const at = new Map(modules.map((m, i) => [m.name, i]));
    const path = join(opts.dir, FILE);
    mkdirSync(opts.dir, { recursive: true });
    await writeSafetensorsStreamed(
      path,
      layoutOf(modules, n),
      metadataOf(identity, modules, n),
      async (fd, offsetOf) => {
        const rowsAt = modules.map((m) => offsetOf(`rows.${m.name}`));
        await projectExamples(model, examples, identity.modules, modules, {
          ...opts,
          each: (m, k, grid) => {
            const i = at.get(m.name)!;
            scales[i][k] = encode(m, k, grid, buf[i]);
            writeAt(fd, buf[i], rowsAt[i] + k * buf[i].byteLength);
          },
        });
        for (const [i, m] of modules.entries()) {
          writeAt(fd, scales[i], offsetOf(`scale.${m.name}`));
          writeAt(fd, m.PA, offsetOf(`PA.${m.name}`));
          writeAt(fd, m.PS, offsetOf(`PS.${m.name}`));
          if (m.keep) writeAt(fd, m.keep, offsetOf(`keep.${m.name}`));
        }
      },
      { checksum: true },
    );
    // what was just hashed is what the store reads (the stamp is taken after the rename)
    const h = readSafetensorsHeader(path);
    return GradientStore.onFile(h, identity, modules, n, opts);
  }

  private static onFile(
    h: ReturnType<typeof readSafetensorsHeader>,
    identity: StoreIdentity,
    modules: StoreModule[],
    n: number,
    opts: StoreOptions,
  ): GradientStore {
    const where = modules.map((m) => ({
      rows: h.tensors.get(`rows.${m.name}`)!.byteOffset,
      scale: h.tensors.get(`scale.${m.name}`)!.byteOffset,
    }));
    const stamp = stampOf(statSync(h.path));
    return new GradientStore(identity, modules, { kind: 'file', path: h.path, stamp, where }, n, opts);
  }

  /** Approximate ⟨M_l, G_l(z)⟩ summed over modules, for every stored example. */
  async scores(M: Map<string, Floats>): Promise<Float64Array> {
    return (await this.estimate(M)).scores;
  }

  /**
   * The scores, and (random projection) each one's standard error: a projection to k_S × k_A
   * coordinates estimates ⟨X, Y⟩ with variance ≈ ‖X‖²‖Y‖² / (k_S k_A) (Johnson–Lindenstrauss;
   * Achlioptas 2003), both norms estimated from the projections themselves. The eigen-pair
   * store's truncation has no such error model (what it drops is not random): its `sd` is
   * absent, and explain relies on the exact rerank of the store's top and bottom.
   * The rows are scanned in chunks (store-scan.ts); the query is rounded to fp32 for the scan.
   */
  async estimate(M: Map<string, Floats>): Promise<{ scores: Float64Array; sd?: Float64Array }> {
    const random = (this.identity.projection ?? 'random') === 'random';
    const q: Float32Array[] = [];
    const v: number[] = [];
    for (const m of this.modules) {
      const full = M.get(m.name);
      if (!full) throw new GradientStoreError(`no query matrix for module ${m.name}`);
      const mp = project(full, m);
      let qq = 0;
      for (const x of mp) qq += x * x;
      const exact = m.kA === m.dA && m.kS === m.dOut;
      v.push(random && !exact ? qq / storedSize(m) : 0);
      q.push(Float32Array.from(mp));
    }
    let out: { scores: Float64Array; variance?: Float64Array };
    try {
      out = await this.scanner.scan(this.source(), this.size, this.perChunk, q, random ? v : undefined);
    } catch (e) {
      throw this.refused(e);
    }
    return random
      ? { scores: out.scores, sd: out.variance!.map((x) => Math.sqrt(Math.max(0, x))) }
      : { scores: out.scores };
  }

  /** Written to a temp file and renamed: a killed process never leaves a torn store. */
  save(dir: string): void {
    const b = this.backing;
    if (b.kind === 'file') {
      if (b.path === join(dir, FILE)) return;
      throw new GradientStoreError(`this store is already on disk at ${b.path}`);
    }
    mkdirSync(dir, { recursive: true });
    const tensors: Record<string, TensorToWrite> = {};
    for (const [i, m] of this.modules.entries()) {
      const r = b.rows[i];
      tensors[`rows.${m.name}`] = { dtype: 'F16', shape: [this.size, storedSize(m)], data: r.half };
      tensors[`scale.${m.name}`] = { dtype: 'F32', shape: [this.size], data: r.scale };
      tensors[`PA.${m.name}`] = { dtype: 'F64', shape: [m.dA, m.kA], data: m.PA };
      tensors[`PS.${m.name}`] = { dtype: 'F64', shape: [m.dOut, m.kS], data: m.PS };
      if (m.keep) tensors[`keep.${m.name}`] = { dtype: 'I32', shape: [m.keep.length], data: m.keep };
    }
    // writeSafetensors writes atomically (src/common/atomic-write.ts), with a data checksum
    writeSafetensors(join(dir, FILE), tensors, metadataOf(this.identity, this.modules, this.size), { checksum: true });
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
    opts: StoreOptions = {},
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
    const fail = (what: string) => {
      throw new GradientStoreError(`${path}: ${what} (delete the file; it will be rebuilt)`);
    };
    const size = Number(meta.size);
    let declared: Array<Omit<StoreModule, 'PA' | 'PS' | 'keep'>>;
    try {
      declared = JSON.parse(meta.modules ?? '[]');
    } catch {
      declared = [];
    }
    if (!(Number.isInteger(size) && size >= 0) || !Array.isArray(declared) || !declared.length)
      fail('its metadata does not say its size and modules');
    // the stamp is taken before the bytes are hashed: a change during or after the hash shows as another stamp
    const stamp = stampOf(statSync(path));
    // fp16 rows must be finite; found while hashing, judged after (a damaged file is rebuilt, not an error)
    const rowRanges = declared.flatMap((m) => {
      const t = h.tensors.get(`rows.${m.name}`);
      return t?.dtype === 'F16' ? [{ name: m.name, start: t.byteOffset, end: t.byteOffset + t.byteLength }] : [];
    });
    let bad: { name: string; index: number; bits: number } | undefined;
    const check = checkDataChecksum(h, (chunk, at) => {
      if (bad) return;
      for (const r of rowRanges) {
        const a = Math.max(r.start, at);
        const b = Math.min(r.end, at + chunk.length);
        for (let o = a; o < b; o += 2) {
          const bits = chunk[o - at] | (chunk[o - at + 1] << 8);
          // an fp16 value is NaN or ±Inf exactly when its exponent bits are all set
          if ((bits & 0x7c00) === 0x7c00) {
            bad = { name: r.name, index: (o - r.start) / 2, bits };
            return;
          }
        }
      }
    });
    if (check !== 'ok') {
      notice(
        `gradient store ${path} ${check === 'mismatch' ? 'does not match its checksum (damaged)' : 'has no checksum'}; rebuilding it`,
      );
      rmSync(path, { force: true });
      return null;
    }
    const nonFinite = (what: string, at: number, value: number) => {
      throw new GradientStoreError(
        `${path}: tensor "${what}" holds ${value} at index ${at}; the model gave non-finite gradients (delete the file after fixing the cause)`,
      );
    };
    if (bad) nonFinite(`rows.${bad.name}`, bad.index, HALF[bad.bits]);
    const modules: StoreModule[] = declared.map((m) => {
      const keep = h.tensors.has(`keep.${m.name}`) ? Int32Array.from(readTensorF64(h, `keep.${m.name}`)) : undefined;
      if (keep?.some((j) => !(j >= 0 && j < m.kS * m.kA))) fail(`tensor "keep.${m.name}" indexes outside its grid`);
      return {
        ...m,
        PA: readTensorF64(h, `PA.${m.name}`),
        PS: readTensorF64(h, `PS.${m.name}`),
        ...(keep ? { keep } : {}),
      };
    });
    const finite = (x: number) => Number.isFinite(x);
    for (const m of modules) {
      const rows = h.tensors.get(`rows.${m.name}`);
      if (rows?.dtype !== 'F16' || rows.byteLength !== size * storedSize(m) * 2)
        fail(`tensor "rows.${m.name}" is not ${size} × ${storedSize(m)} fp16`);
      const scale = h.tensors.get(`scale.${m.name}`);
      if (scale?.dtype !== 'F32' || scale.byteLength !== size * 4) fail(`tensor "scale.${m.name}" is not ${size} fp32`);
      // scales are 4 bytes per example: read in chunks to check them, never kept
      const fd = openSync(path, 'r');
      try {
        const buf = new Float32Array(1 << 16);
        for (let k = 0; k < size; k += buf.length) {
          const part = buf.subarray(0, Math.min(buf.length, size - k));
          readSync(fd, new Uint8Array(part.buffer, 0, part.byteLength), 0, part.byteLength, scale!.byteOffset + k * 4);
          const j = part.findIndex((x) => !finite(x));
          if (j >= 0) nonFinite(`scale.${m.name}`, k + j, part[j]);
        }
      } finally {
        closeSync(fd);
      }
      for (const [what, a] of [
        ['PA', m.PA],
        ['PS', m.PS],
      ] as const) {
        const j = a.findIndex((x) => !finite(x));
        if (j >= 0) nonFinite(`${what}.${m.name}`, j, a[j]);
      }
    }
    const store = GradientStore.onFile(h, expect, modules, size, opts);
    if (!sameStamp(store.backing.kind === 'file' ? store.backing.stamp : stamp, stamp)) {
      notice(`gradient store ${path} changed while it was being verified; not using it`);
      return null;
    }
    return store;
  }
}

/** Where a store's rows go while it is built: a folder (its file) or, without one, memory. */
export interface BuildTarget {
  /** the store's folder: rows are written there as computed, not held */
  dir?: string;
  chunkBytes?: number;
  threads?: number;
}

/** The file's tensors, in the order save() writes them. */
function layoutOf(modules: StoreModule[], n: number): Record<string, TensorLayout> {
  const layout: Record<string, TensorLayout> = {};
  for (const m of modules) {
    layout[`rows.${m.name}`] = { dtype: 'F16', shape: [n, storedSize(m)] };
    layout[`scale.${m.name}`] = { dtype: 'F32', shape: [n] };
    layout[`PA.${m.name}`] = { dtype: 'F64', shape: [m.dA, m.kA] };
    layout[`PS.${m.name}`] = { dtype: 'F64', shape: [m.dOut, m.kS] };
    if (m.keep) layout[`keep.${m.name}`] = { dtype: 'I32', shape: [m.keep.length] };
  }
  return layout;
}

function metadataOf(identity: StoreIdentity, modules: StoreModule[], n: number): Record<string, string> {
  return {
    format: String(STORE_FORMAT),
    identity: JSON.stringify(identity),
    modules: JSON.stringify(modules.map(({ name, dA, dOut, kA, kS }) => ({ name, dA, dOut, kA, kS }))),
    size: String(n),
  };
}

/** A positioned write of the whole of `a` (little-endian, as safetensors stores it). */
function writeAt(fd: number, a: Uint16Array | Float32Array | Float64Array | Int32Array, at: number): void {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  for (let done = 0; done < bytes.length; ) done += writeSync(fd, bytes, done, bytes.length - done, at + done);
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
  // a function of its own: no loop variable keeps a run's outputs alive under the next run (RunResult)
  const read = (out: RunResult, idx: number[]) => {
    for (const m of modules) {
      const size = m.kS * m.kA;
      const p = out[`P.${m.name}`].data as Float32Array | Float64Array;
      for (const [b, k] of idx.entries()) opts.each(m, k, p.subarray(b * size, (b + 1) * size));
    }
  };
  for (let i = 0; i < n; i += bs) {
    if (opts.signal?.aborted) throw new GradientStoreError('cancelled');
    const idx = order.slice(i, i + bs);
    const batch: Batch = makeBatch(
      idx.map((k) => examples[k]),
      model.tokenizer.padTokenId ?? 0,
    );
    read(await graph.run(batch, { feeds }), idx);
    opts.onProgress?.(Math.min(n, i + bs), n);
  }
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
