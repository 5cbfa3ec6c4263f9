// The eigenvalue correction Λ from per-token rows the fit already has. With empirical labels the
// covariance pass and the Λ pass take the same gradients of the same examples: the covariance
// graph's per-token activations a and output gradients g are exactly what the Λ graph computes
// again before rotating them. The fit keeps them, in memory within a budget (`rowsBudgetBytes`),
// else in a temporary file (row-store.ts), and Λ runs this small graph over them instead of a
// second forward and backward over the data: Σ_b (Q_Sᵀ G_b Q_A)² = Σ_b ((g_b Q_S)ᵀ (ã_b Q_A))², the same products and reduction as the
// Λ pass's own (model/engine.ts, `lambda`), only without the model around them.
// Sampled labels (true Fisher) draw fresh labels for the correction, as kronfluence does, so their
// gradients differ between the passes and the rows are never kept for them.

import { DataType, Graph, type Tensor } from '../../model/onnx/graph';
import { arenaPolicy, createSession, type Device, floatTensor, ort, ortProfilePrefix } from '../../model/onnx/session';
import { positiveEnv } from '../../util/env';
import { machineMemoryBytes } from '../chunking';
import { FileRowStore, MemoryRowStore, type RowStore, rowsSpillDir, spillRoom } from './row-store';

/** A tracked module as the rows graph sees it. */
export interface RowModule {
  name: string;
  /** the module whose activation rows this one reads (q/k/v and gate/up read one tensor) */
  leader: string;
  dIn: number;
  dOut: number;
  hasBias: boolean;
}

/** The rows of a whole covariance pass, kept for the Λ pass. */
export interface TokenRows {
  modules: RowModule[];
  fp64: boolean;
  /** examples covered (sequences), to check the Λ pass is over the same ones */
  examples: number;
  /**
   * Rows of consecutive covariance runs gathered into blocks, each sequence's rows padded with
   * zeros to its block's length T (zero output gradients add nothing to any sum). Runs of the rows
   * graph cover whole blocks: the Λ sums come out once per run, each the size of the tracked
   * modules' weights, so a run per covariance run (two sequences at SmolLM-135M) spent more time
   * writing and adding sums than rotating rows.
   */
  shapes: Array<{ B: number; T: number }>;
  /** where they are: memory, or a temporary file (row-store.ts); closed once the Λ pass used them */
  store: RowStore;
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

/** Bytes the rows of a covariance pass's runs take in their blocks (padding included). */
export function rowsBytes(modules: RowModule[], fp64: boolean, runs: Array<{ B: number; T: number }>): number {
  return blocksBytes(modules, fp64, planBlocks(runs).blocks);
}

function blocksBytes(modules: RowModule[], fp64: boolean, blocks: Array<{ B: number; T: number }>): number {
  return blocks.reduce((s, b) => s + b.B * b.T, 0) * rowFloatsPerToken(modules) * (fp64 ? 8 : 4);
}

/** The keys a rows graph reads: `a.<leader>` (d_in floats per token), `g.<module>` (d_out). */
export function rowKeys(modules: RowModule[]): Map<string, number> {
  const dims = new Map<string, number>();
  for (const m of modules) {
    if (m.leader === m.name) dims.set(`a.${m.name}`, m.dIn);
    dims.set(`g.${m.name}`, m.dOut);
  }
  return dims;
}

/** Where a covariance pass's rows go, or why they are not kept. */
export type RowsPlace = { where: 'memory' } | { where: 'file'; dir: string } | { where: 'none'; why: string };

/**
 * Memory while `bytes` fit the rows budget (`rowsBudgetBytes`), else a file in the spill folder
 * when it has room (row-store.ts), else nowhere: Λ then takes the Λ graph's own pass.
 */
export function placeRows(bytes: number, covBytes: number): RowsPlace {
  const budget = rowsBudgetBytes(covBytes);
  if (budget === 0) return { where: 'none', why: 'INFLUENCE_LENS_FIT_ROWS_MB=0' };
  if (bytes <= budget) return { where: 'memory' };
  const dir = rowsSpillDir();
  if (!dir) return { where: 'none', why: `over the memory budget and INFLUENCE_LENS_FIT_ROWS_DIR=off` };
  const room = spillRoom(dir, bytes);
  return room.ok ? { where: 'file', dir } : { where: 'none', why: room.why };
}

/**
 * Collects a covariance pass's runs into planned blocks, in memory or in a file (copies; the run's
 * own arrays can go). A write that fails (a full disk) gives the rows up instead of the fit:
 * `failed` says why, and Λ takes its own pass.
 */
export class RowCollector {
  private readonly plan: ReturnType<typeof planBlocks>;
  private readonly store: RowStore;
  private next = 0;
  private readonly examples: number;
  readonly bytes: number;
  /** the largest run's rows */
  private readonly runBytes: number;
  failed: string | undefined;

  constructor(
    private readonly modules: RowModule[],
    private readonly fp64: boolean,
    runs: Array<{ B: number; T: number }>,
    place: { where: 'memory' } | { where: 'file'; dir: string },
  ) {
    this.plan = planBlocks(runs);
    const layout = { blocks: this.plan.blocks, dims: rowKeys(modules), fp64 };
    this.bytes = blocksBytes(modules, fp64, this.plan.blocks);
    this.runBytes = Math.max(0, ...runs.map((r) => r.B * r.T)) * rowFloatsPerToken(modules) * (fp64 ? 8 : 4);
    this.store = place.where === 'file' ? new FileRowStore(place.dir, layout) : new MemoryRowStore(layout);
    this.examples = runs.reduce((s, r) => s + r.B, 0);
  }

  get where() {
    return this.store.where;
  }

  /** The next run's rows: `a` per leader and `g` per module, each [B, T, d] as the graph returned them. */
  add(
    B: number,
    T: number,
    a: (leader: string) => Float32Array | Float64Array,
    g: (module: string) => Float32Array | Float64Array,
  ) {
    const r = this.next++;
    if (this.failed) return;
    const where = this.plan.at[r];
    if (!where) throw new Error(`covariance run ${r + 1} was not planned (${this.plan.at.length} were)`);
    try {
      for (const m of this.modules) {
        if (m.leader === m.name) this.store.write(where.block, `a.${m.name}`, where.offset, a(m.name), B, T);
        this.store.write(where.block, `g.${m.name}`, where.offset, g(m.name), B, T);
      }
    } catch (e) {
      this.giveUp(e);
    }
  }

  /**
   * Until no more than one run's rows are still being written (a file store writes while the next
   * run computes, holding that run's arrays meanwhile).
   */
  async drain(all = false) {
    if (this.failed) return;
    try {
      await this.store.settle(all ? 0 : this.runBytes);
    } catch (e) {
      this.giveUp(e);
    }
  }

  private giveUp(e: unknown) {
    // the planner's and the shapes' checks are bugs; what the disk refuses is a reason to recompute
    if (this.store.where !== 'file' || !(e as NodeJS.ErrnoException).code) throw e;
    this.failed = `writing them to ${this.store.dir} failed (${(e as Error).message})`;
    this.store.close();
  }

  /** The rows, once every planned run was added and written; undefined when a write failed. */
  async finish(): Promise<TokenRows | undefined> {
    if (this.next !== this.plan.at.length)
      throw new Error(`${this.next} of ${this.plan.at.length} covariance runs were added to the kept rows`);
    await this.drain(true);
    if (this.failed) return undefined;
    return {
      modules: this.modules,
      fp64: this.fp64,
      examples: this.examples,
      shapes: this.plan.blocks,
      store: this.store,
      bytes: this.bytes,
    };
  }

  /** Gives the rows up (the pass failed or was cancelled): a file's space goes back now. */
  abandon() {
    this.store.close();
  }
}

/**
 * Bytes of rows a fit may keep between its passes (INFLUENCE_LENS_FIT_ROWS_MB, in MiB; 0 turns it
 * off). Default: twice the covariance sums' bytes (`covarianceBytes`: the fit holds its covariances
 * and then eigenbases of that size anyway, so its peak grows by a bounded factor of them, never with
 * the data), at most an eighth of the machine's memory (INFLUENCE_LENS_MEMORY_MB replaces it, for
 * tests). At Pythia-70M that is 579 MB (the rows of 23 sequences of 128 tokens), at SmolLM-135M
 * 2.19 GB (16 sequences: 2.08 GB). Keeping 2 GiB at Pythia-70M × 256 raised `bench ekfac`'s peak
 * (fit and scoring in one process) from 2.5 to 5.0 GB (kronfluence's: 3.4). It does not depend on
 * the memory free at the time. Rows over it go to a file, which gives the same bits; only where no
 * disk has room does Λ take the Λ graph's pass, whose last bits differ (`placeRows`).
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
 * Modules in groups whose rows, for the largest slice of sequences one run takes (`sliceTokens`),
 * stay within `readBytes`: a leader's rows go with every module that reads them. A file store is
 * read a group at a time; rows in memory are one group.
 */
export function rowGroups(modules: RowModule[], fp64: boolean, sliceTokens: number, readBytes: number): RowModule[][] {
  const units = new Map<string, RowModule[]>();
  for (const m of modules) {
    const u = units.get(m.leader);
    if (u) u.push(m);
    else units.set(m.leader, [m]);
  }
  const groups: RowModule[][] = [];
  let cur: RowModule[] = [];
  let curBytes = 0;
  for (const unit of units.values()) {
    const bytes = sliceTokens * rowFloatsPerToken(unit) * (fp64 ? 8 : 4);
    if (cur.length && curBytes + bytes > readBytes) {
      groups.push(cur);
      cur = [];
      curBytes = 0;
    }
    cur.push(...unit);
    curBytes += bytes;
  }
  if (cur.length) groups.push(cur);
  return groups;
}

/**
 * Runs the rows graph over every kept block, splitting a block's sequences so that one run of the
 * graph stays within `budgetBytes`, and hands each module's Σ and the sequences it covers to
 * `add`. Rows in a file are read a module group at a time (`rowGroups`, each group's rows of one
 * run within `readBytes`, default half the budget), one graph per group; a module's sums do not
 * depend on the other modules in its graph, and the split of the sequences is the same, so its Λ
 * is the same bit for bit wherever the rows were kept. The rows are used up (the store closed).
 */
export async function lambdaFromRows(
  rows: TokenRows,
  feeds: { qA: (name: string) => Float32Array | Float64Array; qS: (name: string) => Float32Array | Float64Array },
  opts: {
    threads?: number;
    device?: Device;
    budgetBytes: number;
    readBytes?: number;
    add: (module: string, sum: Float32Array | Float64Array, sequences: number) => void;
    onRun?: (done: number, total: number) => void;
    signal?: AbortSignal;
  },
): Promise<void> {
  const { store } = rows;
  try {
    if (store.closed) throw new Error('the kept rows were already used (they serve one eigenvalue correction)');
    const owner = sharedRotations(rows.modules, feeds.qA);
    const per = (T: number) =>
      Math.max(1, Math.floor(opts.budgetBytes / rowsBytesPerSequence(rows.modules, rows.fp64, T)));
    const sliceTokens = Math.max(0, ...rows.shapes.map(({ B, T }) => Math.min(B, per(T)) * T));
    const groups =
      store.where === 'memory'
        ? [rows.modules]
        : rowGroups(rows.modules, rows.fp64, sliceTokens, opts.readBytes ?? opts.budgetBytes / 2);
    const type = rows.fp64 ? 'float64' : 'float32';
    const bpe = rows.fp64 ? 8 : 4;
    // Rows read from a file land in one buffer that every run reuses, so what the reads hold is one
    // group's slice, whenever V8 collects.
    const scratch =
      store.where === 'file'
        ? new ArrayBuffer(Math.max(0, ...groups.map((g) => sliceTokens * rowFloatsPerToken(g) * bpe)))
        : undefined;
    const total = groups.length * rows.shapes.length;
    let done = 0;
    for (const [gi, group] of groups.entries()) {
      opts.signal?.throwIfAborted();
      const names = new Set(group.map((m) => m.name));
      const groupOwner = new Map([...owner].filter(([m]) => names.has(m)));
      const session = await createSession(lambdaRowsGraph(group, rows.fp64, groupOwner), {
        threads: opts.threads,
        device: opts.device,
        optimization: rows.fp64 ? 'basic' : 'all',
        // rows in memory: runs of the same shapes one after the other with only sums coming out, as
        // the scoring graphs. Rows from a file: a session per group with a few runs each, where the
        // arenas only added memory (Pythia-70M × 256: Λ's peak 4.08 GB with them, 2.80 GB without,
        // 34.6 and 34.4 s), unless every graph is asked to have one (INFLUENCE_LENS_ORT_ARENA=on)
        arena: store.where === 'memory' ? arenaPolicy() !== 'off' : arenaPolicy() === 'on',
      });
      try {
        // the bases in the graph's precision (a float32 model's fit holds them in float32 already)
        const fixed: Record<string, ort.Tensor> = {};
        for (const m of group) {
          const dA = m.dIn + (m.hasBias ? 1 : 0);
          fixed[`QS.${m.name}`] = floatTensor(rows.fp64, feeds.qS(m.name), [m.dOut, m.dOut]);
          if (!groupOwner.has(m.name)) fixed[`QA.${m.name}`] = floatTensor(rows.fp64, feeds.qA(m.name), [dA, dA]);
        }
        for (const [r, { B: blockB, T }] of rows.shapes.entries()) {
          const step = per(T);
          for (let b0 = 0; b0 < blockB; b0 += step) {
            opts.signal?.throwIfAborted();
            const B = Math.min(step, blockB - b0);
            let at = 0;
            const input = (key: string, d: number) => {
              let into: Float32Array | Float64Array | undefined;
              if (scratch) {
                into = rows.fp64 ? new Float64Array(scratch, at, B * T * d) : new Float32Array(scratch, at, B * T * d);
                at += B * T * d * bpe;
              }
              return new ort.Tensor(type, store.read(r, key, b0, B, into), [B, T, d]);
            };
            const inputs: Record<string, ort.Tensor> = { ...fixed };
            for (const m of group) {
              if (m.leader === m.name) inputs[`a.${m.name}`] = input(`a.${m.name}`, m.dIn);
              inputs[`g.${m.name}`] = input(`g.${m.name}`, m.dOut);
            }
            const out = await session.run(inputs);
            for (const m of group) opts.add(m.name, out[`L.${m.name}`].data as Float32Array | Float64Array, B);
          }
          // the last group to read a block frees it (rows in memory)
          if (gi === groups.length - 1) store.drop(r);
          opts.onRun?.(++done, total);
        }
      } finally {
        if (ortProfilePrefix()) session.endProfiling();
        await session.release();
      }
    }
  } finally {
    store.close();
  }
}
