// AdamW (Loshchilov & Hutter) over named Float32Array parameters, with global-norm
// gradient clipping. Weight decay is decoupled and skipped for vectors (norms, biases).

export interface AdamWOptions {
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
}

export class AdamW {
  private m = new Map<string, Float32Array>();
  private v = new Map<string, Float32Array>();
  step = 0;

  constructor(
    private readonly params: Map<string, Float32Array>,
    private readonly shapes: Map<string, number[]>,
    readonly opts: AdamWOptions,
  ) {
    for (const [k, p] of params) {
      this.m.set(k, new Float32Array(p.length));
      this.v.set(k, new Float32Array(p.length));
    }
  }

  /** Apply one update with gradients `grads` (already averaged), at learning rate `lr`. */
  update(grads: Map<string, Float32Array>, lr: number): void {
    const b1 = this.opts.beta1 ?? 0.9;
    const b2 = this.opts.beta2 ?? 0.95;
    const eps = this.opts.eps ?? 1e-8;
    const wd = this.opts.weightDecay ?? 0.0;
    this.step++;
    const c1 = 1 - b1 ** this.step;
    const c2 = 1 - b2 ** this.step;
    for (const [k, p] of this.params) {
      const g = grads.get(k);
      if (!g) throw new Error(`AdamW: no gradient for ${k}`);
      const m = this.m.get(k)!;
      const v = this.v.get(k)!;
      const decay = (this.shapes.get(k)?.length ?? 1) >= 2 ? wd : 0;
      for (let i = 0; i < p.length; i++) {
        const gi = g[i];
        m[i] = b1 * m[i] + (1 - b1) * gi;
        v[i] = b2 * v[i] + (1 - b2) * gi * gi;
        p[i] -= lr * (m[i] / c1 / (Math.sqrt(v[i] / c2) + eps) + decay * p[i]);
      }
    }
  }
}

/** Scale gradients in place so their global L2 norm is at most `maxNorm`; returns the norm before. */
export function clipGradients(grads: Map<string, Float32Array>, maxNorm: number): number {
  let sq = 0;
  for (const g of grads.values()) for (let i = 0; i < g.length; i++) sq += g[i] * g[i];
  const norm = Math.sqrt(sq);
  if (!Number.isFinite(norm)) throw new Error('gradient norm is not finite (NaN/Inf): lower the learning rate');
  if (norm > maxNorm) {
    const s = maxNorm / norm;
    for (const g of grads.values()) for (let i = 0; i < g.length; i++) g[i] *= s;
  }
  return norm;
}

/** Linear warmup, then cosine decay to `minRatio`·lr. */
export function learningRate(step: number, total: number, lr: number, warmup: number, minRatio = 0.1): number {
  if (step < warmup) return (lr * (step + 1)) / warmup;
  const p = Math.min(1, (step - warmup) / Math.max(1, total - warmup));
  return lr * (minRatio + (1 - minRatio) * 0.5 * (1 + Math.cos(Math.PI * p)));
}
