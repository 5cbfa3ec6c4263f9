// The gradient store, for candidates at scale: every training example's per-module
// gradient, compressed once at indexing time with random projections of the Kronecker factors
// (LoGra, Choe et al. 2024): G̃ = PSᵀ G PA = Σ_t (PSᵀ g_t)(PAᵀ ã_t)ᵀ, kS × kA per module, formed
// inside the graph without the full gradient. With Gaussian PA, PS of variance 1/k,
// E[P Pᵀ] = I, so ⟨PSᵀ M PA, G̃⟩ is an unbiased estimate of ⟨M, G⟩ for any query matrix M
// (EK-FAC-preconditioned or not): one query scores the whole corpus with one matrix-vector
// product per module; the top candidates are then reranked exactly.
// Modules no wider than k on a side keep that side exact (identity instead of a projection).
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
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
import { Rng } from '../util/random';

export interface StoreModule {
  name: string;
  dA: number;
  dOut: number;
  kA: number;
  kS: number;
  /** dA × kA row-major */
  PA: Float64Array;
  /** dOut × kS row-major */
  PS: Float64Array;
}

export interface StoreIdentity {
  modelFingerprint: string;
  dataFingerprint: string;
  k: number;
  seed: number;
  modules: ModuleSelection;
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
    opts: { batchSize?: number; onProgress?: (done: number, total: number) => void; signal?: AbortSignal } = {},
  ): Promise<GradientStore> {
    const graph = await model.compile({ labels: 'data', projected: true, modules: identity.modules });
    const rng = new Rng(identity.seed);
    const modules: StoreModule[] = graph.moduleInfo.map((m) => {
      const dA = m.dIn + (m.hasBias ? 1 : 0);
      const side = (d: number) => {
        const k = Math.min(identity.k, d);
        const P = new Float64Array(d * k);
        if (k === d) for (let i = 0; i < d; i++) P[i * d + i] = 1;
        else for (let i = 0; i < P.length; i++) P[i] = rng.normal() / Math.sqrt(k);
        return { k, P };
      };
      const a = side(dA);
      const s = side(m.dOut);
      return { name: m.name, dA, dOut: m.dOut, kA: a.k, kS: s.k, PA: a.P, PS: s.P };
    });
    const feeds: Record<string, ort.Tensor> = {};
    for (const m of modules) {
      feeds[`PA.${m.name}`] = graph.tensor(m.PA, [m.dA, m.kA]);
      feeds[`PS.${m.name}`] = graph.tensor(m.PS, [m.dOut, m.kS]);
    }
    const n = examples.length;
    const rows = new Map(modules.map((m) => [m.name, new Float32Array(n * m.kS * m.kA)]));
    const order = [...examples.keys()].sort((a, b) => examples[a].ids.length - examples[b].ids.length || a - b);
    const bs = opts.batchSize ?? 16;
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
    const out = new Float64Array(this.size);
    for (const m of this.modules) {
      const full = M.get(m.name);
      if (!full) throw new GradientStoreError(`no query matrix for module ${m.name}`);
      const mp = project(full, m); // kS × kA
      const r = this.rows.get(m.name)!;
      const size = m.kS * m.kA;
      for (let k = 0; k < this.size; k++) {
        let s = 0;
        const off = k * size;
        for (let j = 0; j < size; j++) s += r[off + j] * mp[j];
        out[k] += s;
      }
    }
    return out;
  }

  /** Written to a temp file and renamed: a killed process never leaves a torn store. */
  save(dir: string): void {
    mkdirSync(dir, { recursive: true });
    const tensors: Record<string, TensorToWrite> = {};
    for (const m of this.modules) {
      tensors[`rows.${m.name}`] = { dtype: 'F32', shape: [this.size, m.kS * m.kA], data: this.rows.get(m.name)! };
      tensors[`PA.${m.name}`] = { dtype: 'F64', shape: [m.dA, m.kA], data: m.PA };
      tensors[`PS.${m.name}`] = { dtype: 'F64', shape: [m.dOut, m.kS], data: m.PS };
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

/** PSᵀ M PA for a dOut × dA matrix M. */
function project(M: Float64Array, m: StoreModule): Float64Array {
  const { dA, dOut, kA, kS, PA, PS } = m;
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
