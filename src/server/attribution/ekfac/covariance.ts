// K-FAC covariance factors (Grosse et al. 2023, eq. 17): A = E[ã ãᵀ] over tokens and
// S = E[g gᵀ] over tokens, g taken with labels sampled from the model (true Fisher).
// We keep fp64 sums and counts, as kronfluence stores them (`activation_covariance` is
// Σ ã ãᵀ and `num_activation_covariance_processed` the token count), so partial sums
// from data partitions merge by addition and the mean is taken once, at the end.
import { type Floats, firstNonFinite, gemm, symmetrize } from '../../linalg/matrix';
import { activationRows, factorDim, gradientRows, type ModuleShape, type RowWeights } from './gradient';

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

export class CovarianceAccumulator {
  readonly dA: number;
  /** Σ_t w_t ã_t ã_tᵀ (d_A × d_A, row-major) */
  readonly activationSum: Float64Array;
  /** Σ_t w_t g_t g_tᵀ (d_out × d_out) */
  readonly gradientSum: Float64Array;
  /** Σ_t w_t over activation rows (the token count for 0/1 masks) */
  activationCount = 0;
  gradientCount = 0;
  /** batches added (for error messages) */
  batches = 0;

  constructor(readonly shape: ModuleShape) {
    this.dA = factorDim(shape);
    this.activationSum = new Float64Array(this.dA * this.dA);
    this.gradientSum = new Float64Array(shape.dOut * shape.dOut);
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
    const count = weights ? sumWeights(weights, rows, what) : rows;
    for (let r0 = 0; r0 < rows; r0 += CHUNK) {
      const r1 = Math.min(rows, r0 + CHUNK);
      const X = activationRows(
        a.subarray(r0 * dIn, r1 * dIn),
        r1 - r0,
        dIn,
        appendOne,
        what,
        sub(weights, r0, r1),
        Math.sqrt,
      );
      gemm(X, X, this.dA, r1 - r0, this.dA, { transA: true, beta: 1, out: this.activationSum });
    }
    this.activationCount += count;
    return this;
  }

  addGradients(g: Floats, rows: number, weights?: RowWeights): this {
    const { dOut, name } = this.shape;
    const what = `output gradients of module ${name} in batch ${this.batches + 1}`;
    if (g.length !== rows * dOut) throw new Error(`${what}: expected ${rows}×${dOut} values, got ${g.length}`);
    const count = weights ? sumWeights(weights, rows, what) : rows;
    for (let r0 = 0; r0 < rows; r0 += CHUNK) {
      const r1 = Math.min(rows, r0 + CHUNK);
      const Y = gradientRows(g.subarray(r0 * dOut, r1 * dOut), r1 - r0, dOut, what, sub(weights, r0, r1), Math.sqrt);
      gemm(Y, Y, dOut, r1 - r0, dOut, { transA: true, beta: 1, out: this.gradientSum });
    }
    this.gradientCount += count;
    return this;
  }

  /**
   * Adds one batch's sums reduced in the graph (fp32 or fp64), in place: no copies. A NaN or
   * Inf stops here, naming the module and the batch, before it can spread into the factors.
   */
  addSums(activationSum: Floats, activationCount: number, gradientSum: Floats, gradientCount: number): this {
    const { name } = this.shape;
    const step = `batch ${this.batches + 1}`;
    if (activationSum.length !== this.activationSum.length || gradientSum.length !== this.gradientSum.length)
      throw new Error(
        `covariance sums of module ${name} (${step}) have ${activationSum.length} and ${gradientSum.length} values`,
      );
    const add = (dst: Float64Array, src: Floats, what: string) => {
      let check = 0;
      for (let i = 0; i < src.length; i++) {
        const v = src[i];
        dst[i] += v;
        check += v * 0; // NaN/Inf propagate into check; finite values add 0
      }
      if (check !== 0) {
        const bad = firstNonFinite(src);
        throw new Error(`${Number.isNaN(src[bad]) ? 'NaN' : 'Inf'} in the ${what} of module ${name} in ${step}`);
      }
    };
    add(this.activationSum, activationSum, 'activation covariance (the activations overflowed or were NaN)');
    add(this.gradientSum, gradientSum, 'gradient covariance (the output gradients overflowed or were NaN)');
    this.activationCount += activationCount;
    this.gradientCount += gradientCount;
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
    for (let i = 0; i < this.activationSum.length; i++) this.activationSum[i] += other.activationSum[i];
    for (let i = 0; i < this.gradientSum.length; i++) this.gradientSum[i] += other.gradientSum[i];
    this.activationCount += other.activationCount;
    this.gradientCount += other.gradientCount;
    this.batches += other.batches;
    return this;
  }

  /** Restores an accumulator from stored sums (kronfluence's files, or one batch reduced in-graph). */
  static fromSums(
    shape: ModuleShape,
    activationSum: Float64Array,
    activationCount: number,
    gradientSum: Float64Array,
    gradientCount: number,
    batches = 1,
  ): CovarianceAccumulator {
    const acc = new CovarianceAccumulator(shape);
    if (activationSum.length !== acc.activationSum.length || gradientSum.length !== acc.gradientSum.length) {
      throw new Error(
        `covariance sums of module ${shape.name} have ${activationSum.length} and ${gradientSum.length} values; ` +
          `expected ${acc.dA}² and ${shape.dOut}²`,
      );
    }
    acc.activationSum.set(activationSum);
    acc.gradientSum.set(gradientSum);
    acc.activationCount = activationCount;
    acc.gradientCount = gradientCount;
    acc.batches = batches;
    return acc;
  }

  /** The means A = Σ ã ãᵀ / n_a and S = Σ g gᵀ / n_g (symmetrised); throws on NaN/Inf or no data. */
  finalize(): Covariances {
    const { name, dOut } = this.shape;
    const after = `after ${this.batches} batch${this.batches === 1 ? '' : 'es'}`;
    if (!(this.activationCount > 0)) throw new Error(`no activation rows were added for module ${name} (${after})`);
    if (!(this.gradientCount > 0)) throw new Error(`no gradient rows were added for module ${name} (${after})`);
    const A = meanOf(this.activationSum, this.activationCount, `activation covariance of module ${name} ${after}`);
    const S = meanOf(this.gradientSum, this.gradientCount, `gradient covariance of module ${name} ${after}`);
    return { A: symmetrize(A, this.dA), S: symmetrize(S, dOut), dA: this.dA, dOut };
  }
}

function meanOf(sum: Float64Array, count: number, what: string): Float64Array {
  const bad = firstNonFinite(sum);
  if (bad >= 0) throw new Error(`${Number.isNaN(sum[bad]) ? 'NaN' : 'Inf'} in ${what}`);
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
