// EK-FAC eigenvalue correction (George et al. 2018; Grosse et al. 2023, eq. 20):
// Λ = E_z[(Q_Sᵀ G(z) Q_A)²] elementwise, over per-example (per-sequence) gradients G(z),
// fitted with sampled labels. Stored like kronfluence's `lambda_matrix`: the SUM over
// examples, shape d_out × d_A, with `num_lambda_processed` the number of examples.
// The running sum is fp64 even for a float32 model (one graph-reduced batch sum is added per
// batch; a float32 running sum's rounding grows with the batches, about 1e-6 relative after
// 10⁴ of them): it costs d_out·d_A·4 more bytes during the Λ pass only. The mean, and the
// preconditioner built from it, are stored in the model's precision.
import { type Floats, firstNonFinite, gemm, type Precision, toF64 } from '../../linalg/matrix';
import { type Eigenbasis, toEigenbasis } from './eigenbasis';
import { activationRows, gradientRows, NonFiniteError, type RowWeights } from './gradient';

export class LambdaAccumulator {
  readonly dA: number;
  readonly dOut: number;
  /** Σ_z (Q_Sᵀ G(z) Q_A)², d_out × d_A row-major */
  readonly sum: Float64Array;
  /** examples added */
  count = 0;

  constructor(readonly basis: Eigenbasis) {
    this.dA = basis.dA;
    this.dOut = basis.dOut;
    this.sum = new Float64Array(this.dA * this.dOut);
  }

  /** Adds one example's gradient G (d_out × d_A row-major, bias column last when folded in). */
  addGradient(G: Floats): this {
    const what = `gradient of example ${this.count + 1} for module ${this.basis.module} (eigenvalue correction)`;
    if (G.length !== this.sum.length)
      throw new Error(`${what}: expected ${this.dOut}×${this.dA}, got ${G.length} values`);
    const bad = firstNonFinite(G);
    if (bad >= 0) throw new Error(`${G[bad]} in ${what}`);
    return this.addRotated(toEigenbasis(this.basis, toF64(G)));
  }

  /**
   * Adds one example given its tokens: `a` rows × d_in, `g` rows × d_out. Uses
   * Q_Sᵀ (Σ_t g_t ã_tᵀ) Q_A = (g Q_S)ᵀ (ã Q_A), cheaper than forming G when rows < d.
   */
  addTokens(a: Floats, g: Floats, rows: number, appendOne: boolean, weights?: RowWeights): this {
    const { dA, dOut } = this;
    const dIn = dA - (appendOne ? 1 : 0);
    const what = `example ${this.count + 1} for module ${this.basis.module} (eigenvalue correction)`;
    const X = activationRows(a, rows, dIn, appendOne, `activations of ${what}`, weights);
    const Y = gradientRows(g, rows, dOut, `output gradients of ${what}`);
    const direct = dOut * dA * rows + dOut * dOut * dA + dOut * dA * dA;
    const viaTokens = rows * (dOut * dOut + dA * dA + dOut * dA);
    if (viaTokens < direct) {
      const YQ = gemm(Y, toF64(this.basis.qS), rows, dOut, dOut);
      const XQ = gemm(X, toF64(this.basis.qA), rows, dA, dA);
      return this.addRotated(gemm(YQ, XQ, dOut, rows, dA, { transA: true }));
    }
    return this.addRotated(toEigenbasis(this.basis, gemm(Y, X, dOut, rows, dA, { transA: true })));
  }

  /** Adds one example already rotated into the eigenbasis (Q_Sᵀ G Q_A). */
  addRotated(Gt: Float64Array): this {
    const s = this.sum;
    for (let i = 0; i < s.length; i++) s[i] += Gt[i] * Gt[i];
    this.count++;
    return this;
  }

  /** Adds one batch's Σ_b (Q_Sᵀ G_b Q_A)² reduced in the graph, in place; NaN/Inf stop here. */
  addSum(sum: Floats, examples: number): this {
    if (sum.length !== this.sum.length)
      throw new Error(`lambda sum of module ${this.basis.module}: expected ${this.dOut}×${this.dA}, got ${sum.length}`);
    let check = 0;
    for (let i = 0; i < sum.length; i++) {
      this.sum[i] += sum[i];
      check += sum[i] * 0;
    }
    if (check !== 0) {
      const bad = firstNonFinite(sum);
      throw new Error(
        `${Number.isNaN(sum[bad]) ? 'NaN' : 'Inf'} in the eigenvalue correction (lambda) of module ${this.basis.module} after ${this.count} examples`,
      );
    }
    this.count += examples;
    return this;
  }

  merge(other: LambdaAccumulator): this {
    if (other.basis.module !== this.basis.module || other.sum.length !== this.sum.length) {
      throw new Error(`cannot merge eigenvalue corrections of ${other.basis.module} into ${this.basis.module}`);
    }
    for (let i = 0; i < this.sum.length; i++) this.sum[i] += other.sum[i];
    this.count += other.count;
    return this;
  }

  /** Restores from stored sums (e.g. kronfluence's `lambda_matrix` and `num_lambda_processed`). */
  static fromSum(basis: Eigenbasis, sum: Floats, count: number): LambdaAccumulator {
    const acc = new LambdaAccumulator(basis);
    if (sum.length !== acc.sum.length) {
      throw new Error(`lambda matrix of module ${basis.module}: expected ${basis.dOut}×${basis.dA}, got ${sum.length}`);
    }
    acc.sum.set(sum);
    acc.count = count;
    return acc;
  }

  /** Λ = sum / count (stored in `precision`, default fp64); throws on no examples or NaN/Inf. */
  mean(): Float64Array;
  mean(precision: Precision): Floats;
  mean(precision: Precision = 'fp64'): Floats {
    return lambdaMean(this.sum, this.count, this.basis.module, precision);
  }
}

/** Λ = sum / count from a stored or accumulated sum, divided in fp64 and stored in `precision`. */
export function lambdaMean(sum: Floats, count: number, module: string, precision: Precision = 'fp64'): Floats {
  const what = `eigenvalue correction (lambda) of module ${module} after ${count} examples`;
  if (!(count > 0)) throw new Error(`no examples were added to the ${what}`);
  const bad = firstNonFinite(sum);
  if (bad >= 0) throw new NonFiniteError(`${Number.isNaN(sum[bad]) ? 'NaN' : 'Inf'} in ${what}`);
  const out = precision === 'fp32' ? new Float32Array(sum.length) : new Float64Array(sum.length);
  for (let i = 0; i < out.length; i++) out[i] = sum[i] / count;
  const over = precision === 'fp32' ? firstNonFinite(out) : -1;
  if (over >= 0)
    throw new Error(`${what}: ${sum[over] / count} at entry ${over} exceeds the float32 range; use precision 'fp64'`);
  return out;
}
