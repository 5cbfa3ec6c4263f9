// Per-module shapes and per-example gradients from per-token activations and output gradients.
// For a linear module y = W a (+ b), the loss gradient is G = Σ_t g_t ã_tᵀ (d_out × d_A), where
// ã_t = [a_t, 1] when the bias is folded into W (docs/ARCHITECTURE.md, "The maths contract"; kronfluence appends the 1
// as the last column, so G[:, d_in] is the bias gradient).
import { type Floats, firstNonFinite } from '../../linalg/matrix';

export interface ModuleShape {
  /** e.g. "model.layers.0.mlp.up_proj" */
  name: string;
  /** input features of the layer, without the bias column */
  dIn: number;
  dOut: number;
  /** the layer has a bias: activations get a trailing 1 (factor dimension dIn + 1) */
  appendOne: boolean;
}

/** Width of the activation factor A: dIn, plus one when the bias is folded in. */
export function factorDim(s: ModuleShape): number {
  return s.dIn + (s.appendOne ? 1 : 0);
}

/** Per-row weights: a 0/1 mask or non-negative weights. */
export type RowWeights = Float32Array | Float64Array | Uint8Array;

/**
 * Activation rows as fp64 rows × d_A (appending the 1 when asked), each row scaled by
 * `scale(weights[t])` when weights are given. Throws on NaN/Inf, naming `what`.
 */
export function activationRows(
  a: Floats,
  rows: number,
  dIn: number,
  appendOne: boolean,
  what: string,
  weights?: RowWeights,
  scale: (w: number) => number = (w) => w,
): Float64Array {
  if (a.length !== rows * dIn)
    throw new Error(`${what}: expected ${rows}×${dIn} = ${rows * dIn} values, got ${a.length}`);
  checkRows(a, dIn, what);
  const dA = dIn + (appendOne ? 1 : 0);
  const X = new Float64Array(rows * dA);
  for (let t = 0; t < rows; t++) {
    const s = weights ? scale(checkWeight(weights[t], t, what)) : 1;
    const src = t * dIn;
    const dst = t * dA;
    for (let j = 0; j < dIn; j++) X[dst + j] = s * a[src + j];
    if (appendOne) X[dst + dIn] = s;
  }
  return X;
}

/** Gradient rows as fp64, optionally scaled per row. Throws on NaN/Inf, naming `what`. */
export function gradientRows(
  g: Floats,
  rows: number,
  dOut: number,
  what: string,
  weights?: RowWeights,
  scale: (w: number) => number = (w) => w,
): Float64Array {
  if (g.length !== rows * dOut) {
    throw new Error(`${what}: expected ${rows}×${dOut} = ${rows * dOut} values, got ${g.length}`);
  }
  checkRows(g, dOut, what);
  const X = Float64Array.from(g);
  if (weights) {
    for (let t = 0; t < rows; t++) {
      const s = scale(checkWeight(weights[t], t, what));
      if (s === 1) continue;
      for (let j = t * dOut; j < (t + 1) * dOut; j++) X[j] *= s;
    }
  }
  return X;
}

/**
 * A NaN or Inf met in a model's activations, gradients or the sums made of them: a damaged weight
 * or config value, or a diverging model (fit-job.ts adds which weight, where one is to blame).
 */
export class NonFiniteError extends Error {
  override name = 'NonFiniteError';
}

/** Throws on the first NaN/Inf of a rows × cols array, naming `what`, the row and the column. */
export function checkRows(x: Floats, cols: number, what: string) {
  const bad = firstNonFinite(x);
  if (bad < 0) return;
  const r = Math.floor(bad / cols);
  throw new NonFiniteError(`${Number.isNaN(x[bad]) ? 'NaN' : 'Inf'} in ${what} at row ${r}, column ${bad - r * cols}`);
}

function checkWeight(w: number, t: number, what: string): number {
  if (!(w >= 0) || w === Number.POSITIVE_INFINITY) throw new Error(`${what}: weight of row ${t} is ${w} (needs >= 0)`);
  return w;
}
