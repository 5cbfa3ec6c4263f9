// What ONNX Runtime's own matrix products allow on this machine: the fp32 GEMM rate of a
// product's shape, and from it a lower bound on the time any engine built on these products
// needs to score one candidate. Scoring a candidate is a forward and a backward pass plus its
// per-example gradients; both tools do that same arithmetic, so how far a throughput ratio
// against another tool can go is bounded by how fast the products themselves run here.

import type { ModuleInfo } from '../../src/server/model/engine';
import { headChunkRows } from '../../src/server/model/head';
import { DataType, Graph } from '../../src/server/model/onnx/graph';
import { createSession, ort } from '../../src/server/model/onnx/session';
import { Rng } from '../../src/server/util/random';

/** ORT's fp32 GEMM rate for an [m,k]×[k,n] product (transB: B given as [n,k]), GFLOP/s, best of `reps` warm runs. */
export async function gemmRate(
  m: number,
  k: number,
  n: number,
  threads: number | undefined,
  reps: number,
  transB = false,
): Promise<number> {
  const g = new Graph();
  const a = g.input('a', DataType.FLOAT, [m, k]);
  const b = g.input('b', DataType.FLOAT, transB ? [n, k] : [k, n]);
  g.output(g.gemm(a, b, null, transB), 'y');
  // with its arena, as the scoring graphs run: a fresh output each run would time page faults, not the product
  const sess = await createSession(g.encode(), { threads, arena: true });
  const rng = new Rng(3);
  const feeds = {
    a: new ort.Tensor('float32', rng.uniforms(m * k), [m, k]),
    b: new ort.Tensor('float32', rng.uniforms(k * n), transB ? [n, k] : [k, n]),
  };
  await sess.run(feeds);
  let best = Number.POSITIVE_INFINITY;
  // at least `reps` runs and a quarter of a second of them: small products take a few ms, and
  // the best of a handful was at the mercy of this shared host's moment
  const t1 = performance.now();
  for (let i = 0; i < reps || performance.now() - t1 < 250; i++) {
    const t0 = performance.now();
    await sess.run(feeds);
    best = Math.min(best, performance.now() - t0);
  }
  await sess.release();
  return (2 * m * k * n) / (best / 1000) / 1e9;
}

export interface BoundProduct {
  /** what the product is, e.g. "forward", "head logits" */
  what: string;
  /** the shape whose rate was measured */
  m: number;
  k: number;
  n: number;
  transB: boolean;
  /** GFLOP of this kind per candidate, summed over modules */
  gflop: number;
  gflops_rate: number;
  seconds: number;
}

export interface ScoringBound {
  /** counted matrix-product work of one candidate, GFLOP */
  gflop_per_candidate: number;
  /** that work at ORT's measured rate for each product's shape: no engine on these products is faster */
  seconds_per_candidate: number;
  products: BoundProduct[];
}

/** A module's layer index from its name (`…layers.3.…`, `…h.3.…`), or null. */
function layerOf(name: string): number | null {
  const m = /\.(?:layers|h)\.(\d+)\./.exec(name);
  return m ? Number(m[1]) : null;
}

/**
 * Lower bound on one candidate's scoring time: the matrix products every exact EK-FAC score of a
 * `T`-token candidate against `Q` query rows needs, each timed at ORT's best rate for its shape
 * (rows of `batch` candidates at once, the LM head in the engine's chunks of rows). Counted:
 * each tracked module's forward, its input gradient (not for the first layer, whose inputs' gradients
 * lead only to the untracked embedding), its per-example gradient Σ_t g_t a_tᵀ and its ⟨P_q, G⟩ with
 * every query row; the LM head's logits and its input gradient. Not counted (so the bound is
 * optimistic): attention's own products, every elementwise op, normalisation and the loss.
 */
export async function scoringBound(
  modules: ModuleInfo[],
  head: { vocab: number; hidden: number },
  T: number,
  batch: number,
  Q: number,
  threads: number | undefined,
  reps = 5,
  /** rates measured earlier (by shape key): the best of both is kept, so that one slow moment of the host does not lower the bound */
  earlier?: ScoringBound,
): Promise<ScoringBound> {
  const rows = batch * T;
  type Item = { what: string; m: number; k: number; n: number; transB: boolean; flop: number };
  const items: Item[] = [];
  for (const mod of modules) {
    const dA = mod.dIn + (mod.hasBias ? 1 : 0);
    items.push({ what: 'forward', m: rows, k: mod.dIn, n: mod.dOut, transB: true, flop: 2 * T * mod.dIn * mod.dOut });
    if (layerOf(mod.name) !== 0)
      items.push({
        what: 'input gradient',
        m: rows,
        k: mod.dOut,
        n: mod.dIn,
        transB: false,
        flop: 2 * T * mod.dOut * mod.dIn,
      });
    items.push({ what: 'per-example gradient', m: mod.dOut, k: T, n: dA, transB: false, flop: 2 * T * mod.dOut * dA });
    items.push({ what: '⟨P_q, G⟩', m: batch, k: mod.dOut * dA, n: Q, transB: true, flop: 2 * Q * mod.dOut * dA });
  }
  const c = Math.min(rows, headChunkRows(head.vocab, 4));
  const hv = 2 * T * head.hidden * head.vocab;
  items.push({ what: 'head logits', m: c, k: head.hidden, n: head.vocab, transB: true, flop: hv });
  items.push({ what: 'head input gradient', m: c, k: head.vocab, n: head.hidden, transB: false, flop: hv });

  // one measurement per distinct shape
  const rate = new Map<string, number>();
  const keyOf = (it: { what: string; m: number; k: number; n: number; transB: boolean }) =>
    `${it.what}|${it.m}|${it.k}|${it.n}|${it.transB}`;
  const before = new Map((earlier?.products ?? []).map((p) => [keyOf(p), p.gflops_rate]));
  const products = new Map<string, BoundProduct>();
  for (const { flop, ...shape } of items) {
    const key = keyOf(shape);
    if (!rate.has(key))
      rate.set(
        key,
        Math.max(before.get(key) ?? 0, await gemmRate(shape.m, shape.k, shape.n, threads, reps, shape.transB)),
      );
    const r = rate.get(key)!;
    const p = products.get(key) ?? { ...shape, gflop: 0, gflops_rate: r, seconds: 0 };
    p.gflop += flop / 1e9;
    p.seconds += flop / 1e9 / r;
    products.set(key, p);
  }
  const list = [...products.values()];
  return {
    gflop_per_candidate: list.reduce((s, p) => s + p.gflop, 0),
    seconds_per_candidate: list.reduce((s, p) => s + p.seconds, 0),
    products: list,
  };
}
