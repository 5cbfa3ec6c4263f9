// The eigenvalue correction Λ from per-token rows the fit already has. With empirical labels the
// covariance pass and the Λ pass take the same gradients of the same examples: the covariance
// graph's per-token activations a and output gradients g are exactly what the Λ graph computes
// again before rotating them. When they fit in a memory budget (`rowsBudgetBytes`) the fit keeps
// them, and Λ runs this small graph over them instead of a second forward and backward over the
// data: Σ_b (Q_Sᵀ G_b Q_A)² = Σ_b ((g_b Q_S)ᵀ (ã_b Q_A))², the same products and reduction as the
// Λ pass's own (model/engine.ts, `lambda`), only without the model around them.
// Sampled labels (true Fisher) draw fresh labels for the correction, as kronfluence does, so their
// gradients differ between the passes and the rows are never kept for them.

import { DataType, Graph, type Tensor } from '../../model/onnx/graph';
import { arenaPolicy, createSession, type Device, floatTensor, ort, ortProfilePrefix } from '../../model/onnx/session';
import { positiveEnv } from '../../util/env';
import { machineMemoryBytes } from '../chunking';

/** A tracked module as the rows graph sees it. */
export interface RowModule {
  name: string;
  /** the module whose activation rows this one reads (q/k/v and gate/up read one tensor) */
  leader: string;
  dIn: number;
  dOut: number;
  hasBias: boolean;
}

/**
 * Rows of consecutive covariance runs gathered into one block, each sequence's rows padded with
 * zeros to the block's length T (zero output gradients add nothing to any sum). Runs of the rows
 * graph over whole blocks: the Λ sums come out once per run, each the size of the tracked modules'
 * weights, so a run per covariance run (two sequences at SmolLM-135M) spent more time writing and
 * adding sums than rotating rows.
 */
export interface RowBlock {
  B: number;
  T: number;
  /** per leader module: [B, T, d_in] */
  a: Map<string, Float32Array | Float64Array>;
  /** per module: [B, T, d_out] */
  g: Map<string, Float32Array | Float64Array>;
}

/** The rows of a whole covariance pass, kept for the Λ pass. */
export interface TokenRows {
  modules: RowModule[];
  fp64: boolean;
  /** examples covered (sequences), to check the Λ pass is over the same ones */
  examples: number;
  /** emptied as the Λ pass consumes them, so their memory goes as it goes */
  blocks: Array<RowBlock | undefined>;
  /** bytes of the blocks (padding included) */
  bytes: number;
}

/**
 * Which block each covariance run's rows go to, and at which sequence. Runs come sorted by
 * length (memoryBoundedBatches), so a block's T is its last run's; a run joins the current block
 * while the block's padded tokens stay within `waste` × its runs' own tokens.
 */
export function planBlocks(
  runs: Array<{ B: number; T: number }>,
  waste = 1.25,
): { blocks: Array<{ B: number; T: number }>; at: Array<{ block: number; offset: number }> } {
  const blocks: Array<{ B: number; T: number; tokens: number }> = [];
  const at: Array<{ block: number; offset: number }> = [];
  for (const { B, T } of runs) {
    const cur = blocks[blocks.length - 1];
    const T2 = cur ? Math.max(cur.T, T) : T;
    if (cur && (cur.B + B) * T2 <= waste * (cur.tokens + B * T)) {
      at.push({ block: blocks.length - 1, offset: cur.B });
      cur.B += B;
      cur.T = T2;
      cur.tokens += B * T;
    } else {
      at.push({ block: blocks.length, offset: 0 });
      blocks.push({ B, T, tokens: B * T });
    }
  }
  return { blocks: blocks.map(({ B, T }) => ({ B, T })), at };
}

/** Collects a covariance pass's runs into planned blocks (copies; the run's own arrays can go). */
export class RowCollector {
  readonly rows: TokenRows;
  private readonly plan: ReturnType<typeof planBlocks>;
  private next = 0;

  constructor(modules: RowModule[], fp64: boolean, runs: Array<{ B: number; T: number }>) {
    this.plan = planBlocks(runs);
    const perToken = rowFloatsPerToken(modules);
    const tokens = this.plan.blocks.reduce((s, b) => s + b.B * b.T, 0);
    this.rows = {
      modules,
      fp64,
      examples: runs.reduce((s, r) => s + r.B, 0),
      blocks: [],
      bytes: tokens * perToken * (fp64 ? 8 : 4),
    };
  }

  /** The next run's rows: `a` per leader and `g` per module, each [B, T, d] as the graph returned them. */
  add(
    B: number,
    T: number,
    a: (leader: string) => Float32Array | Float64Array,
    g: (module: string) => Float32Array | Float64Array,
  ) {
    const r = this.next++;
    const where = this.plan.at[r];
    if (!where) throw new Error(`covariance run ${r + 1} was not planned (${this.plan.at.length} were)`);
    const shape = this.plan.blocks[where.block];
    if (T > shape.T || where.offset + B > shape.B)
      throw new Error(`covariance run ${r + 1} (${B} × ${T}) does not fit its planned block (${shape.B} × ${shape.T})`);
    let block = this.rows.blocks[where.block];
    if (!block) {
      block = { B: shape.B, T: shape.T, a: new Map(), g: new Map() };
      this.rows.blocks[where.block] = block;
    }
    const put = (
      into: Map<string, Float32Array | Float64Array>,
      name: string,
      src: Float32Array | Float64Array,
      d: number,
    ) => {
      if (src.length !== B * T * d)
        throw new Error(`rows of ${name}: expected ${B}×${T}×${d} values, got ${src.length}`);
      let dst = into.get(name);
      if (!dst) {
        // zero-filled: padding rows stay zero
        dst = this.rows.fp64 ? new Float64Array(shape.B * shape.T * d) : new Float32Array(shape.B * shape.T * d);
        into.set(name, dst);
      }
      if (T === shape.T) dst.set(src, where.offset * T * d);
      else
        for (let b = 0; b < B; b++) dst.set(src.subarray(b * T * d, (b + 1) * T * d), (where.offset + b) * shape.T * d);
    };
    for (const m of this.rows.modules) {
      if (m.leader === m.name) put(block.a, m.name, a(m.name), m.dIn);
      put(block.g, m.name, g(m.name), m.dOut);
    }
  }

  /** The rows, once every planned run was added. */
  finish(): TokenRows {
    if (this.next !== this.plan.at.length)
      throw new Error(`${this.next} of ${this.plan.at.length} covariance runs were added to the kept rows`);
    return this.rows;
  }
}

/**
 * Bytes of rows a fit may keep between its passes (INFLUENCE_LENS_FIT_ROWS_MB, in MiB; 0 turns it
 * off). Default: twice the covariance sums' bytes (`covarianceBytes`: the fit holds its covariances
 * and then eigenbases of that size anyway, so its peak grows by a bounded factor of them, never with
 * the data), at most an eighth of the machine's memory (INFLUENCE_LENS_MEMORY_MB replaces it, for
 * tests). At Pythia-70M that is 579 MB (the rows of 23 sequences of 128 tokens), at SmolLM-135M
 * 2.19 GB (16 sequences: 2.08 GB). Keeping 2 GiB at Pythia-70M × 256 raised `bench ekfac`'s peak
 * (fit and scoring in one process) from 2.5 to 5.0 GB (kronfluence's: 3.4). It does not depend on the memory free at the time: which way
 * Λ is computed changes its last bits, and a fit must give the same factors each time it runs.
 */
export function rowsBudgetBytes(covarianceBytes: number): number {
  const raw = process.env.INFLUENCE_LENS_FIT_ROWS_MB;
  if (raw !== undefined && raw.trim() === '0') return 0;
  const mb = positiveEnv('INFLUENCE_LENS_FIT_ROWS_MB', 'MiB, or 0 to recompute the gradients in the Λ pass');
  if (mb !== undefined) return mb * 2 ** 20;
  return Math.min(2 * covarianceBytes, machineMemoryBytes() / 8);
}

/** Bytes of a fit's covariance sums: one d_A × d_A per distinct activation input, one d_out × d_out per module. */
export function covarianceBytes(modules: RowModule[], fp64: boolean): number {
  let floats = 0;
  for (const m of modules) {
    const dA = m.dIn + (m.hasBias ? 1 : 0);
    floats += m.dOut * m.dOut + (m.leader === m.name ? dA * dA : 0);
  }
  return floats * (fp64 ? 8 : 4);
}

/** Floats per token the rows of `modules` take: every leader's d_in and every module's d_out. */
export function rowFloatsPerToken(modules: RowModule[]): number {
  let n = 0;
  for (const m of modules) n += m.dOut + (m.leader === m.name ? m.dIn : 0);
  return n;
}

/**
 * The graph: per leader an input `a.<leader>` [B, T, d_in], per module `g.<module>` [B, T, d_out],
 * `QS.<module>` and `QA.<owner>`, output `L.<module>` = Σ_b ((g_b Q_S)ᵀ (ã_b Q_A))². Modules that
 * read the same rows with equal Q_A (`qaOwner`: q/k/v, gate/up) rotate them once.
 */
export function lambdaRowsGraph(modules: RowModule[], fp64: boolean, qaOwner: Map<string, string>): Uint8Array {
  const g = new Graph(fp64 ? DataType.DOUBLE : DataType.FLOAT);
  g.noGrad(() => {
    const inputs = new Map<string, Tensor>();
    const rotated = new Map<string, Tensor>();
    const byName = new Map(modules.map((m) => [m.name, m]));
    for (const m of modules) {
      const lead = byName.get(m.leader);
      if (!lead) throw new Error(`module ${m.name} reads the rows of ${m.leader}, which is not tracked`);
      let a = inputs.get(m.leader);
      if (!a) {
        a = g.input(`a.${m.leader}`, g.float, ['B', 'T', lead.dIn]);
        inputs.set(m.leader, a);
      }
      const dA = m.dIn + (m.hasBias ? 1 : 0);
      const owner = qaOwner.get(m.name) ?? m.name;
      let ar = rotated.get(owner);
      if (!ar) {
        ar = g.matmul(m.hasBias ? g.withOnes(a) : a, g.input(`QA.${owner}`, g.float, [dA, dA])); // [B, T, d_A]
        rotated.set(owner, ar);
      }
      const gy = g.input(`g.${m.name}`, g.float, ['B', 'T', m.dOut]);
      const gr = g.matmul(gy, g.input(`QS.${m.name}`, g.float, [m.dOut, m.dOut])); // [B, T, d_out]
      const rot = g.matmul(g.transpose(gr, [0, 2, 1]), ar); // [B, d_out, d_A]
      const L = g.node('ReduceSumSquare', [rot, g.ints([0])], [{ dtype: g.float, shape: [m.dOut, dA] }], {
        keepdims: 0,
      })[0];
      g.output(L, `L.${m.name}`);
    }
  });
  return g.encode('lambda_from_rows');
}

/** Which module's Q_A each module may use: the first with the same rows, bias and equal values. */
export function sharedRotations(modules: RowModule[], qA: (name: string) => ArrayLike<number>): Map<string, string> {
  const owner = new Map<string, string>();
  const seen: RowModule[] = [];
  for (const m of modules) {
    const q = qA(m.name);
    const same = seen.find((o) => o.leader === m.leader && o.hasBias === m.hasBias && equal(qA(o.name), q));
    if (same) owner.set(m.name, same.name);
    else seen.push(m);
  }
  return owner;
}

function equal(x: ArrayLike<number>, y: ArrayLike<number>): boolean {
  if (x === y) return true;
  if (x.length !== y.length) return false;
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

/**
 * Bytes one sequence of T tokens adds to a run of the rows graph. ONNX Runtime runs one module's
 * nodes after another and frees each intermediate after its last use, so what one sequence adds is
 * one module's rotated rows (ã Q_A, g Q_S and its transpose) and, while it is reduced, three of
 * its [d_out, d_A] matrices (the product, its square, the reduction's input): the largest module's
 * of each. The sums that come out (one [d_out, d_A] per module) do not grow with the sequences.
 */
export function rowsBytesPerSequence(modules: RowModule[], fp64: boolean, T: number): number {
  let largest = 0;
  let rotated = 0;
  for (const m of modules) {
    const dA = m.dIn + (m.hasBias ? 1 : 0);
    largest = Math.max(largest, m.dOut * dA);
    rotated = Math.max(rotated, dA + 2 * m.dOut);
  }
  return (fp64 ? 8 : 4) * (3 * largest + T * rotated);
}

/**
 * Runs the rows graph over every kept block, splitting a block's sequences so that one run of the
 * graph stays within `budgetBytes`, and hands each module's Σ and the sequences it covers to
 * `add`. Each block is dropped from `rows.blocks` once read.
 */
export async function lambdaFromRows(
  rows: TokenRows,
  feeds: { qA: (name: string) => Float32Array | Float64Array; qS: (name: string) => Float32Array | Float64Array },
  opts: {
    threads?: number;
    device?: Device;
    budgetBytes: number;
    add: (module: string, sum: Float32Array | Float64Array, sequences: number) => void;
    onRun?: (done: number, total: number) => void;
    signal?: AbortSignal;
  },
): Promise<void> {
  const owner = sharedRotations(rows.modules, feeds.qA);
  const session = await createSession(lambdaRowsGraph(rows.modules, rows.fp64, owner), {
    threads: opts.threads,
    device: opts.device,
    optimization: rows.fp64 ? 'basic' : 'all',
    // runs of the same shapes one after the other with only sums coming out, as the scoring graphs
    arena: arenaPolicy() !== 'off',
  });
  const type = rows.fp64 ? 'float64' : 'float32';
  // the bases in the graph's precision (a float32 model's fit holds them in float32 already)
  const tensor = (x: Float32Array | Float64Array, dims: number[]) => floatTensor(rows.fp64, x, dims);
  const fixed: Record<string, ort.Tensor> = {};
  for (const m of rows.modules) {
    const dA = m.dIn + (m.hasBias ? 1 : 0);
    fixed[`QS.${m.name}`] = tensor(feeds.qS(m.name), [m.dOut, m.dOut]);
    if (!owner.has(m.name)) fixed[`QA.${m.name}`] = tensor(feeds.qA(m.name), [dA, dA]);
  }
  try {
    for (let r = 0; r < rows.blocks.length; r++) {
      opts.signal?.throwIfAborted();
      const run = rows.blocks[r];
      if (!run) throw new Error(`block ${r + 1} of the kept rows was already used`);
      rows.blocks[r] = undefined;
      const per = Math.max(1, Math.floor(opts.budgetBytes / rowsBytesPerSequence(rows.modules, rows.fp64, run.T)));
      for (let b0 = 0; b0 < run.B; b0 += per) {
        const B = Math.min(per, run.B - b0);
        const slice = (x: Float32Array | Float64Array, d: number) =>
          new ort.Tensor(type, x.subarray(b0 * run.T * d, (b0 + B) * run.T * d), [B, run.T, d]);
        const inputs: Record<string, ort.Tensor> = { ...fixed };
        for (const m of rows.modules) {
          if (m.leader === m.name) inputs[`a.${m.name}`] = slice(run.a.get(m.name)!, m.dIn);
          inputs[`g.${m.name}`] = slice(run.g.get(m.name)!, m.dOut);
        }
        const out = await session.run(inputs);
        for (const m of rows.modules) opts.add(m.name, out[`L.${m.name}`].data as Float32Array | Float64Array, B);
      }
      opts.onRun?.(r + 1, rows.blocks.length);
    }
  } finally {
    rows.blocks.length = 0;
    if (ortProfilePrefix()) session.endProfiling();
    await session.release();
  }
}
