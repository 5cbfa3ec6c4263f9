// The gradient store, for candidates at scale: every training example's per-module
// gradient, compressed once at indexing time with random projections of the Kronecker factors
// (LoGra, Choe et al. 2024): G̃ = PSᵀ G PA = Σ_t (PSᵀ g_t)(PAᵀ ã_t)ᵀ, kS × kA per module, formed
// inside the graph without the full gradient. With Gaussian PA, PS of variance 1/k,
// E[P Pᵀ] = I, so ⟨PSᵀ M PA, G̃⟩ is an unbiased estimate of ⟨M, G⟩ for any query matrix M
// (EK-FAC-preconditioned or not): one query scores the whole corpus with one matrix-vector
// product per module; the top candidates are then reranked exactly.
// Modules no wider than k on a side keep that side exact (identity instead of a projection).
// With the EK-FAC factors the projections follow their eigenbases and whiten (store-projection.ts),
// and every score comes with a standard error so that explain rescores every example the
// store cannot rule out of the shown lists.
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Preconditioner } from '../attribution/ekfac/precondition';
import type { TokenizedExample } from '../attribution/fit';
import { type Batch, type Model, type ModuleSelection, makeBatch } from '../model/engine';
import type { ort } from '../model/onnx/session';
import {
  checkDataChecksum,
  readSafetensorsHeader,
  readTensorF64,
  type TensorToWrite,
  writeSafetensors,
} from '../model/safetensors';
import { DEFAULTS } from '../settings';
import { Rng } from '../util/random';
import { eigenProjection, preconditionerFingerprint, randomProjection, type StoreProjection } from './store-projection';

export interface StoreModule {
  name: string;
  dA: number;
  dOut: number;
  kA: number;
  kS: number;
  /** dA × kA row-major: the example side's projection (a gradient G is stored as PSᵀ G PA) */
  PA: Float64Array;
  /** dOut × kS row-major */
  PS: Float64Array;
  /** the query side's projections (the query matrix M is reduced to QSᵀ M QA); PA, PS when absent */
  QA?: Float64Array;
  QS?: Float64Array;
}

export interface StoreIdentity {
  modelFingerprint: string;
  dataFingerprint: string;
  k: number;
  seed: number;
  modules: ModuleSelection;
  /** 'random' when absent (stores written before the eigen projection) */
  projection?: StoreProjection;
  /** for 'eigen': the fingerprint of the factors and damping whose eigenbases it uses */
  factorsFingerprint?: string;
}

export class GradientStoreError extends Error {}

const FILE = 'gradient_store.safetensors';

export class GradientStore {
  private constructor(
    readonly identity: StoreIdentity,
    readonly modules: StoreModule[],
    /** module → [N, kS·kA] */
    readonly rows: Map<string, Float32Array>,
    readonly size: number,
  ) {}

  get bytes(): number {
    let b = 0;
    for (const r of this.rows.values()) b += r.byteLength;
    return b;
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
    if (projection === 'eigen') {
      const fp = opts.preconditioners && preconditionerFingerprint(opts.preconditioners);
      if (fp !== identity.factorsFingerprint)
        throw new GradientStoreError(
          `the store is declared for factors ${identity.factorsFingerprint}, but was given ${fp ?? 'none'}`,
        );
    }
    const modules: StoreModule[] = model.modules(identity.modules).map((m) => {
      const dA = m.dIn + (m.hasBias ? 1 : 0);
      if (projection === 'random') return randomProjection(m.name, dA, m.dOut, identity.k, rng);
      const p = opts.preconditioners?.get(m.name);
      if (!p) throw new GradientStoreError(`an eigen-projected store needs the EK-FAC factors of module ${m.name}`);
      return eigenProjection(m.name, p, identity.k, rng);
    });
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
    const graph = await model.compile({ labels: 'data', projected: true, modules: identity.modules });
    const feeds: Record<string, ort.Tensor> = {};
    for (const m of modules) {
      feeds[`PA.${m.name}`] = graph.tensor(m.PA, [m.dA, m.kA]);
      feeds[`PS.${m.name}`] = graph.tensor(m.PS, [m.dOut, m.kS]);
    }
    const n = examples.length;
    const rows = new Map(modules.map((m) => [m.name, new Float32Array(n * m.kS * m.kA)]));
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
        const dst = rows.get(m.name)!;
        idx.forEach((k, b) => {
          for (let j = 0; j < size; j++) dst[k * size + j] = p[b * size + j];
        });
      }
      opts.onProgress?.(Math.min(n, i + bs), n);
    }
    for (const m of modules) {
      const bad = rows.get(m.name)!.findIndex((v) => !Number.isFinite(v));
      if (bad >= 0)
        throw new GradientStoreError(
          `the model gave a non-finite projected gradient for module ${m.name} (example ${Math.floor(bad / (m.kS * m.kA))})`,
        );
    }
    return new GradientStore(identity, modules, rows, n);
  }

  /** Approximate ⟨M_l, G_l(z)⟩ summed over modules, for every stored example. */
  scores(M: Map<string, Float64Array>): Float64Array {
    return this.estimate(M).scores;
  }

  /**
   * The scores and each one's standard error: a projection to k_S × k_A coordinates estimates
   * ⟨X, Y⟩ with variance ≈ ‖X‖²‖Y‖² / (k_S k_A) (Johnson–Lindenstrauss; Achlioptas 2003),
   * and both norms are estimated from the projections themselves. With the eigen projection
   * X, Y are the whitened query and example, so an example whose gradient the projection
   * cannot resolve (memorised examples: tiny gradients in low-curvature directions,
   * amplified by 1/(Λ+λ)) gets a wide interval instead of a confident wrong rank.
   */
  estimate(M: Map<string, Float64Array>): { scores: Float64Array; sd: Float64Array } {
    const out = new Float64Array(this.size);
    const variance = new Float64Array(this.size);
    for (const m of this.modules) {
      const full = M.get(m.name);
      if (!full) throw new GradientStoreError(`no query matrix for module ${m.name}`);
      const mp = project(full, m); // kS × kA
      let qq = 0;
      for (const v of mp) qq += v * v;
      const r = this.rows.get(m.name)!;
      const size = m.kS * m.kA;
      const exact = m.kA === m.dA && m.kS === m.dOut;
      for (let k = 0; k < this.size; k++) {
        let s = 0;
        let zz = 0;
        const off = k * size;
        for (let j = 0; j < size; j++) {
          const z = r[off + j];
          s += z * mp[j];
          zz += z * z;
        }
        out[k] += s;
        if (!exact) variance[k] += (qq * zz) / size;
      }
    }
    return { scores: out, sd: variance.map(Math.sqrt) };
  }

  /** Written to a temp file and renamed: a killed process never leaves a torn store. */
  save(dir: string): void {
    mkdirSync(dir, { recursive: true });
    const tensors: Record<string, TensorToWrite> = {};
    for (const m of this.modules) {
      tensors[`rows.${m.name}`] = { dtype: 'F32', shape: [this.size, m.kS * m.kA], data: this.rows.get(m.name)! };
      tensors[`PA.${m.name}`] = { dtype: 'F64', shape: [m.dA, m.kA], data: m.PA };
      tensors[`PS.${m.name}`] = { dtype: 'F64', shape: [m.dOut, m.kS], data: m.PS };
      if (m.QA) tensors[`QA.${m.name}`] = { dtype: 'F64', shape: [m.dA, m.kA], data: m.QA };
      if (m.QS) tensors[`QS.${m.name}`] = { dtype: 'F64', shape: [m.dOut, m.kS], data: m.QS };
    }
    // writeSafetensors writes atomically (src/common/atomic-write.ts), with a data checksum
    writeSafetensors(
      join(dir, FILE),
      tensors,
      {
        identity: JSON.stringify(this.identity),
        modules: JSON.stringify(this.modules.map(({ name, dA, dOut, kA, kS }) => ({ name, dA, dOut, kA, kS }))),
        size: String(this.size),
      },
      { checksum: true },
    );
  }

  /**
   * Loads a store if it exists, was built for exactly `expect`, and its bytes are those
   * written (sha256 in its metadata); null when stale, absent or damaged (the caller
   * rebuilds it; damage is reported through `notice`). A store that holds NaN or ±Inf is
   * an error naming the file: it was built from a model that produced them.
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
      rmSync(path, { force: true }); // unreadable: rebuild
      return null;
    }
    const meta = h.metadata ?? {};
    if (meta.identity !== JSON.stringify(expect)) return null;
    const check = checkDataChecksum(h);
    if (check !== 'ok') {
      // 'absent': written before stores carried a checksum
      if (check === 'mismatch') notice(`gradient store ${path} does not match its checksum (damaged); rebuilding it`);
      rmSync(path, { force: true });
      return null;
    }
    const size = Number(meta.size);
    const modules: StoreModule[] = (JSON.parse(meta.modules ?? '[]') as Array<Omit<StoreModule, 'PA' | 'PS'>>).map(
      (m) => ({
        ...m,
        PA: readTensorF64(h, `PA.${m.name}`),
        PS: readTensorF64(h, `PS.${m.name}`),
        ...(expect.projection === 'eigen'
          ? { QA: readTensorF64(h, `QA.${m.name}`), QS: readTensorF64(h, `QS.${m.name}`) }
          : {}),
      }),
    );
    const rows = new Map(modules.map((m) => [m.name, Float32Array.from(readTensorF64(h, `rows.${m.name}`))]));
    for (const m of modules)
      for (const [what, values] of [
        [`rows.${m.name}`, rows.get(m.name)!],
        [`PA.${m.name}`, m.PA],
        [`PS.${m.name}`, m.PS],
      ] as const) {
        const bad = values.findIndex((v) => !Number.isFinite(v));
        if (bad >= 0)
          throw new GradientStoreError(
            `${path}: tensor "${what}" holds ${values[bad]} at index ${bad}; the model gave non-finite gradients (delete the file after fixing the cause)`,
          );
      }
    return new GradientStore(expect, modules, rows, size);
  }
}

/** QSᵀ M QA (the query side's projections) for a dOut × dA matrix M. */
function project(M: Float64Array, m: StoreModule): Float64Array {
  const { dA, dOut, kA, kS } = m;
  const PA = m.QA ?? m.PA;
  const PS = m.QS ?? m.PS;
  // MP = M PA  (dOut × kA)
  const MP = new Float64Array(dOut * kA);
  for (let i = 0; i < dOut; i++)
    for (let j = 0; j < dA; j++) {
      const v = M[i * dA + j];
      if (v === 0) continue;
      for (let c = 0; c < kA; c++) MP[i * kA + c] += v * PA[j * kA + c];
    }
  const out = new Float64Array(kS * kA);
  for (let i = 0; i < dOut; i++)
    for (let r = 0; r < kS; r++) {
      const p = PS[i * kS + r];
      if (p === 0) continue;
      for (let c = 0; c < kA; c++) out[r * kA + c] += p * MP[i * kA + c];
    }
  return out;
}
