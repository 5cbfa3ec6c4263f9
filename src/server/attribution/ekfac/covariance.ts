// K-FAC covariance factors (Grosse et al. 2023, eq. 17): A = E[ã ãᵀ] over tokens and
// S = E[g gᵀ] over tokens, g taken with labels sampled from the model (true Fisher).
// We keep sums and counts, as kronfluence stores them (`activation_covariance` is
// Σ ã ãᵀ and `num_activation_covariance_processed` the token count), so partial sums
// from data partitions merge by addition and the mean is taken once, at the end. A float32
// fit keeps float32 sums (kronfluence's default dtype), accumulated by BLAS gemm from the
// graph's per-token rows; fp64 graphs and merges keep fp64.
import { type Floats, firstNonFinite, mirrorLower, symmetrize, syrkLower } from '../../linalg/matrix';
import {
  activationRows,
  checkRows,
  factorDim,
  gradientRows,
  type ModuleShape,
  NonFiniteError,
  type RowWeights,
} from './gradient';

// Rows per GEMM: bounds the fp64 copy of a batch to CHUNK × d values.
const CHUNK = 4096;

export interface Covariances {
  /** mean ã ãᵀ, d_A × d_A */
  A: Float64Array;
  /** mean g gᵀ, d_out × d_out */
  S: Float64Array;
  dA: number;
  dOut: number;
}

/**
 * One running symmetric sum Σ x xᵀ and its count. Modules that read the same input (q/k/v,
 * gate/up) share one: their activation factor is accumulated once, not once per module.
 * Only the lower triangle is kept exact (`syrkLower`); the upper one is mirrored when the sum is read.
 */
class SymmetricSum {
  lowerOnly = false;
  count = 0;
  constructor(readonly data: Floats) {}
  settled(n: number): Floats {
    if (this.lowerOnly) mirrorLower(this.data, n);
    this.lowerOnly = false;
    return this.data;
  }
}

export interface AccumulatorOptions {
  /**
   * Precision of the running sums: 'fp32' as kronfluence keeps them (half the memory; what a
   * float32 graph's rows are anyway), 'fp64' for fp64 graphs and merged partitions. Default fp64.
   */
  precision?: 'fp32' | 'fp64';
  /**
   * a module reading the same input (same width and bias): share its activation sum. Add
   * activations (and merge) through ONE of the sharing accumulators only: each add reaches all.
   */
  shareActivationsWith?: CovarianceAccumulator;
}

export class CovarianceAccumulator {
  readonly dA: number;
  readonly precision: 'fp32' | 'fp64';
  private readonly act: SymmetricSum;
  private readonly grad: SymmetricSum;
  /** batches added (for error messages) */
  batches = 0;

  constructor(
    readonly shape: ModuleShape,
    options: AccumulatorOptions = {},
  ) {
    this.dA = factorDim(shape);
    this.precision = options.precision ?? 'fp64';
    const alloc = (n: number) => (this.precision === 'fp32' ? new Float32Array(n) : new Float64Array(n));
    const other = options.shareActivationsWith;
    if (other) {
      if (other.dA !== this.dA || other.shape.appendOne !== shape.appendOne || other.precision !== this.precision)
        throw new Error(`module ${shape.name} cannot share the activation covariance of ${other.shape.name}`);
      this.act = other.act;
    } else this.act = new SymmetricSum(alloc(this.dA * this.dA));
    this.grad = new SymmetricSum(alloc(shape.dOut * shape.dOut));
  }

  /** Σ_t w_t ã_t ã_tᵀ (d_A × d_A, row-major) */
  get activationSum(): Floats {
    return this.act.settled(this.dA);
  }
  /** Σ_t w_t g_t g_tᵀ (d_out × d_out) */
  get gradientSum(): Floats {
    return this.grad.settled(this.shape.dOut);
  }
  /** Σ_t w_t over activation rows (the token count for 0/1 masks) */
  get activationCount(): number {
    return this.act.count;
  }
  set activationCount(v: number) {
    this.act.count = v;
  }
  get gradientCount(): number {
    return this.grad.count;
  }
  set gradientCount(v: number) {
    this.grad.count = v;
  }
  /** true when this module's activation sum is another module's (same input) */
  sharesActivationsWith(other: CovarianceAccumulator): boolean {
    return this.act === other.act;
  }

  /**
   * Adds one batch: `a` is rows × d_in, `g` rows × d_out (the same tokens). `weights` (0/1
   * mask or non-negative) multiply each token's outer products and its count, which for a
   * 0/1 mask is kronfluence's attention-mask handling.
   */
  add(a: Floats, g: Floats, rows: number, weights?: RowWeights): this {
    this.addActivations(a, rows, weights);
    this.addGradients(g, rows, weights);
    this.batches++;
    return this;
  }

  addActivations(a: Floats, rows: number, weights?: RowWeights): this {
    const { dIn, appendOne, name } = this.shape;
    const what = `activations of module ${name} in batch ${this.batches + 1}`;
    if (a.length !== rows * dIn) throw new Error(`${what}: expected ${rows}×${dIn} values, got ${a.length}`);
    if (!weights) return this.addActivationRows(a, rows);
    const count = sumWeights(weights, rows, what);
    for (let r0 = 0; r0 < rows; r0 += CHUNK) {
      const r1 = Math.min(rows, r0 + CHUNK);
      // √w-scaled rows with the bias column folded in (the column holds √w, so its products are w)
      const X = activationRows(
        a.subarray(r0 * dIn, r1 * dIn),
        r1 - r0,
        dIn,
        appendOne,
        what,
        sub(weights, r0, r1),
        Math.sqrt,
      );
      syrkLower(this.inPrecision(X), r1 - r0, this.dA, this.act.data);
    }
    this.act.lowerOnly = true;
    this.act.count += count;
    return this;
  }

  addGradients(g: Floats, rows: number, weights?: RowWeights): this {
    const { dOut, name } = this.shape;
    const what = `output gradients of module ${name} in batch ${this.batches + 1}`;
    if (g.length !== rows * dOut) throw new Error(`${what}: expected ${rows}×${dOut} values, got ${g.length}`);
    if (!weights) return this.addGradientRows(g, rows);
    const count = sumWeights(weights, rows, what);
    for (let r0 = 0; r0 < rows; r0 += CHUNK) {
      const r1 = Math.min(rows, r0 + CHUNK);
      const Y = gradientRows(g.subarray(r0 * dOut, r1 * dOut), r1 - r0, dOut, what, sub(weights, r0, r1), Math.sqrt);
      syrkLower(this.inPrecision(Y), r1 - r0, dOut, this.grad.data);
    }
    this.grad.lowerOnly = true;
    this.grad.count += count;
    return this;
  }

  /**
   * Adds `rows` unweighted token rows of activations (rows × d_in, as the graph emits them; the
   * bias column is folded in here): Σ a aᵀ by BLAS straight into the sum, Σ a into its bias row,
   * the count into its corner. NaN/Inf stop here, naming the module, batch, row and column; the
   * sum has taken them by then (`checkDiagonal`), and `finalize` refuses it.
   */
  addActivationRows(a: Floats, rows: number): this {
    const { dIn, appendOne, name } = this.shape;
    const what = `activations of module ${name} in batch ${this.batches + 1}`;
    if (a.length < rows * dIn) throw new Error(`${what}: expected ${rows}×${dIn} values, got ${a.length}`);
    const x = this.inPrecision(a.subarray(0, rows * dIn));
    const S = this.act.data;
    syrkLower(x, rows, dIn, S, this.dA);
    checkDiagonal(S, dIn, this.dA, x, what);
    if (appendOne) {
      // ã = [a, 1]: the last row holds Σ a (lower triangle) and the corner the count
      const colSums = new Float64Array(dIn);
      for (let t = 0; t < rows; t++) {
        const o = t * dIn;
        for (let j = 0; j < dIn; j++) colSums[j] += x[o + j];
      }
      const last = dIn * this.dA;
      for (let j = 0; j < dIn; j++) S[last + j] += colSums[j];
      S[last + dIn] += rows;
    }
    this.act.lowerOnly = true;
    this.act.count += rows;
    return this;
  }

  /** Adds `rows` unweighted rows of output gradients (rows × d_out) by BLAS; NaN/Inf stop here. */
  addGradientRows(g: Floats, rows: number): this {
    const { dOut, name } = this.shape;
    const what = `output gradients of module ${name} in batch ${this.batches + 1}`;
    if (g.length < rows * dOut) throw new Error(`${what}: expected ${rows}×${dOut} values, got ${g.length}`);
    const y = this.inPrecision(g.subarray(0, rows * dOut));
    syrkLower(y, rows, dOut, this.grad.data);
    checkDiagonal(this.grad.data, dOut, dOut, y, what);
    this.grad.lowerOnly = true;
    this.grad.count += rows;
    return this;
  }

  /** Marks the end of one batch (for error messages). */
  endBatch(): this {
    this.batches++;
    return this;
  }

  /**
   * Adds one batch's sums reduced in the graph (fp32 or fp64), in place: no copies. A NaN or
   * Inf stops here, naming the module and the batch, before it can spread into the factors.
   */
  addSums(activationSum: Floats, activationCount: number, gradientSum: Floats, gradientCount: number): this {
    const { name } = this.shape;
    const step = `batch ${this.batches + 1}`;
    if (activationSum.length !== this.act.data.length || gradientSum.length !== this.grad.data.length)
      throw new Error(
        `covariance sums of module ${name} (${step}) have ${activationSum.length} and ${gradientSum.length} values`,
      );
    const add = (dst: Floats, src: Floats, what: string) => {
      let check = 0;
      for (let i = 0; i < src.length; i++) {
        const v = src[i];
        dst[i] += v;
        check += v * 0; // NaN/Inf propagate into check; finite values add 0
      }
      if (check !== 0) {
        const bad = firstNonFinite(src);
        throw new NonFiniteError(
          `${Number.isNaN(src[bad]) ? 'NaN' : 'Inf'} in the ${what} of module ${name} in ${step}`,
        );
      }
    };
    // full symmetric sums: adding them to a lower-only sum is still right once it is mirrored
    add(this.act.data, activationSum, 'activation covariance (the activations overflowed or were NaN)');
    add(this.grad.data, gradientSum, 'gradient covariance (the output gradients overflowed or were NaN)');
    this.act.count += activationCount;
    this.grad.count += gradientCount;
    this.batches++;
    return this;
  }

  /** Adds another partition's sums (same module and shape). */
  merge(other: CovarianceAccumulator): this {
    const s = this.shape;
    const o = other.shape;
    if (s.name !== o.name || s.dIn !== o.dIn || s.dOut !== o.dOut || s.appendOne !== o.appendOne) {
      throw new Error(`cannot merge covariances of ${describe(o)} into ${describe(s)}`);
    }
    if (this.act === other.act || this.grad === other.grad)
      throw new Error(`cannot merge module ${s.name} into itself`);
    const oa = other.activationSum;
    const og = other.gradientSum;
    const a = this.act.data;
    const g = this.grad.data;
    for (let i = 0; i < a.length; i++) a[i] += oa[i];
    for (let i = 0; i < g.length; i++) g[i] += og[i];
    this.act.count += other.activationCount;
    this.grad.count += other.gradientCount;
    this.batches += other.batches;
    return this;
  }

  /** Restores an accumulator from stored sums (kronfluence's files, or one batch reduced in-graph), in their precision. */
  static fromSums(
    shape: ModuleShape,
    activationSum: Floats,
    activationCount: number,
    gradientSum: Floats,
    gradientCount: number,
    batches = 1,
  ): CovarianceAccumulator {
    const acc = new CovarianceAccumulator(shape, {
      precision: activationSum instanceof Float32Array && gradientSum instanceof Float32Array ? 'fp32' : 'fp64',
    });
    if (activationSum.length !== acc.act.data.length || gradientSum.length !== acc.grad.data.length) {
      throw new Error(
        `covariance sums of module ${shape.name} have ${activationSum.length} and ${gradientSum.length} values; ` +
          `expected ${acc.dA}² and ${shape.dOut}²`,
      );
    }
    acc.act.data.set(activationSum);
    acc.grad.data.set(gradientSum);
    acc.act.count = activationCount;
    acc.grad.count = gradientCount;
    acc.batches = batches;
    return acc;
  }

  /** The means A = Σ ã ãᵀ / n_a and S = Σ g gᵀ / n_g in fp64 (symmetric); throws on NaN/Inf or no data. */
  finalize(): Covariances {
    const { name, dOut } = this.shape;
    const after = this.checkCounts();
    const A = meanOf(this.activationSum, this.activationCount, `activation covariance of module ${name} ${after}`);
    const S = meanOf(this.gradientSum, this.gradientCount, `gradient covariance of module ${name} ${after}`);
    return { A: symmetrize(A, this.dA), S: symmetrize(S, dOut), dA: this.dA, dOut };
  }

  /**
   * The sums as they are, for a solver that reads their lower triangles (`eigh` with `lower`) and
   * divides by the counts as it copies them: the means without a pass of their own. The arrays are
   * the accumulator's; NaN/Inf are left to that solver's check. Throws when no rows were added.
   */
  lowerSums(): { A: Floats; S: Floats; dA: number; dOut: number; scaleA: number; scaleS: number } {
    this.checkCounts();
    return {
      A: this.act.data,
      S: this.grad.data,
      dA: this.dA,
      dOut: this.shape.dOut,
      scaleA: 1 / this.activationCount,
      scaleS: 1 / this.gradientCount,
    };
  }

  private checkCounts(): string {
    const { name } = this.shape;
    const after = `after ${this.batches} batch${this.batches === 1 ? '' : 'es'}`;
    if (!(this.activationCount > 0)) throw new Error(`no activation rows were added for module ${name} (${after})`);
    if (!(this.gradientCount > 0)) throw new Error(`no gradient rows were added for module ${name} (${after})`);
    return after;
  }

  private inPrecision(x: Floats): Floats {
    if (this.precision === 'fp32') return x instanceof Float32Array ? x : Float32Array.from(x);
    return x instanceof Float64Array ? x : Float64Array.from(x);
  }
}

/**
 * After Σ x xᵀ took a batch of rows: a NaN or Inf anywhere in the batch reaches the diagonal
 * (Σ_t x_tj² is NaN or Inf), so the `cols` diagonal entries tell what a scan of every value would,
 * and that scan cost 2.5 ns a value, 1.3 s of a 15 s covariance pass at SmolLM-135M × 16. Only a
 * bad diagonal scans the rows, to name the row and column; finite rows whose squares overflow the
 * sum's precision are refused as such. The batch is in the sum by then: it is not used after an
 * error (and `finalize` would refuse it).
 */
function checkDiagonal(sum: Floats, cols: number, ld: number, rows: Floats, what: string): void {
  for (let j = 0; j < cols; j++) {
    const v = sum[j * ld + j];
    if (v - v === 0) continue;
    checkRows(rows, cols, what);
    let big = 0;
    for (let i = j; i < rows.length; i += cols) big = Math.max(big, Math.abs(rows[i]));
    throw new NonFiniteError(
      `${what}: Σ x xᵀ overflowed ${rows instanceof Float32Array ? 'float32' : 'float64'} in column ${j} ` +
        `(values up to ${big.toPrecision(3)}): the model's activations or gradients are diverging`,
    );
  }
}

function meanOf(sum: Floats, count: number, what: string): Float64Array {
  const bad = firstNonFinite(sum);
  if (bad >= 0) throw new NonFiniteError(`${Number.isNaN(sum[bad]) ? 'NaN' : 'Inf'} in ${what}`);
  const out = new Float64Array(sum.length);
  const inv = 1 / count;
  for (let i = 0; i < sum.length; i++) out[i] = sum[i] * inv;
  return out;
}

function sub(w: RowWeights | undefined, r0: number, r1: number): RowWeights | undefined {
  return w ? w.subarray(r0, r1) : undefined;
}

function sumWeights(w: RowWeights, rows: number, what: string): number {
  if (w.length !== rows) throw new Error(`${what}: expected ${rows} row weights, got ${w.length}`);
  let s = 0;
  for (let t = 0; t < rows; t++) s += w[t];
  return s;
}

function describe(s: ModuleShape) {
  return `${s.name} (${s.dOut}×${s.dIn}${s.appendOne ? '+1' : ''})`;
}
