// The language-model head and its cross-entropy, in chunks of tokens. The logits are [N, V]:
// at 2,048 tokens of a 50k vocabulary one copy is 412 MB, and the loss and its backward
// (log-softmax, its exponential, the gradient) held four or five of them at once. Here an ONNX
// Loop computes the head a few hundred rows at a time, so only one chunk's [c, V] tensors are
// alive; every row's result is the same computation as on the whole matrix (rows are
// independent), only the gradient of the head's weight sums over the chunks in another order.
import { checkRows, chunkBounds, chunkPlan } from './onnx/chunks';
import { DataType, type Graph, type Tensor } from './onnx/graph';

/** Bytes of one chunk's logits: a handful of [c, V] tensors are alive in an iteration. */
export const HEAD_CHUNK_BYTES = 32 * 2 ** 20;

/** Rows per chunk: as many as fit HEAD_CHUNK_BYTES of logits (`override` for tests). */
export function headChunkRows(vocab: number, bytesPerFloat: number, override?: number): number {
  if (override !== undefined) return checkRows('head chunk', override);
  return Math.max(1, Math.floor(HEAD_CHUNK_BYTES / (vocab * bytesPerFloat)));
}

export type HeadLabels = { kind: 'data'; targets: Tensor } | { kind: 'sampled'; uniforms: Tensor };

export interface HeadLoss {
  /** [N] −log p(target_t) */
  nll: Tensor;
  /** [N] the targets (drawn inside the loop when sampled) */
  targets: Tensor;
}

/**
 * −log softmax(hidden · Wᵀ)[target] per row, hidden [N, d], W [V, d], recorded as one custom op
 * with inputs (hidden, W). With `grad`, the forward loop also keeps J_t = ∂nll_t/∂h_t =
 * (softmax_t − e_target)ᵀ W ([N, d], small), so the backward is J scaled by the upstream
 * gradient with no second pass over the vocabulary; the weight's own gradient, asked only for
 * parameter gradients, recomputes each chunk's logits in a second loop.
 */
export function crossEntropyHead(
  g: Graph,
  hidden: Tensor,
  W: Tensor,
  labels: HeadLabels,
  rows: number,
  grad: boolean,
): HeadLoss {
  const V = W.shape[0] as number;
  const d = W.shape[1] as number;
  const I = DataType.INT64;
  const F = g.float;

  const lay = g.noGrad(() => {
    const n = g.shapeOf(hidden, 0, 1);
    const { k, c, pad } = chunkPlan(g, n, g.ints([rows]));
    const zero = g.ints([0]);
    const pad1 = (x: Tensor) =>
      g.node('Pad', [x, g.concatInts([zero, pad])], [{ dtype: x.dtype, shape: ['P'] }], { mode: 'constant' })[0];
    const hp = g.node('Pad', [hidden, g.concatInts([zero, zero, pad, zero])], [{ dtype: F, shape: ['P', d] }], {
      mode: 'constant',
    })[0];
    const unpad = (x: Tensor) =>
      g.node('Slice', [x, zero, n, zero], [{ dtype: x.dtype, shape: [hidden.shape[0], ...x.shape.slice(1)] }])[0];
    return { k, c, pad1, hp, unpad };
  });

  /** one chunk's slice of a padded [P, ...] tensor, inside a loop body */
  const chunkOf = (b: Graph, i: Tensor) => {
    const { start, end } = chunkBounds(b, i, lay.c);
    return (x: Tensor) =>
      b.node('Slice', [x, start, end, b.ints([0])], [{ dtype: x.dtype, shape: ['c', ...x.shape.slice(1)] }])[0];
  };
  const logSoftmax = (b: Graph, h: Tensor) => {
    const logits = b.node('Gemm', [h, W], [{ dtype: F, shape: ['c', V] }], { transB: 1 })[0];
    return b.node('LogSoftmax', [logits], [{ dtype: F, shape: ['c', V] }], { axis: 1 })[0];
  };
  const column = (b: Graph, t: Tensor) => b.node('Unsqueeze', [t, b.ints([1])], [{ dtype: I, shape: ['c', 1] }])[0];

  const targetsP = labels.kind === 'data' ? g.noGrad(() => lay.pad1(g.reshape(labels.targets, [-1]))) : null;
  const uniformsP = labels.kind === 'sampled' ? g.noGrad(() => lay.pad1(g.reshape(labels.uniforms, [-1]))) : null;

  const scans = [
    { dtype: F, shape: ['c'] },
    ...(uniformsP ? [{ dtype: I, shape: ['c'] }] : []),
    ...(grad ? [{ dtype: F, shape: ['c', d] }] : []),
  ];
  const stacked = g.loop(lay.k, [], scans, (b, i) => {
    const slice = chunkOf(b, i);
    const logp = logSoftmax(b, slice(lay.hp));
    const t = uniformsP ? sample(b, logp, slice(uniformsP), V) : slice(targetsP!);
    const col = column(b, t);
    const picked = b.node('GatherElements', [logp, col], [{ dtype: F, shape: ['c', 1] }], { axis: 1 })[0];
    const nll = b.node('Neg', [b.reshape(picked, [-1])], [{ dtype: F, shape: ['c'] }])[0];
    const out = [nll];
    if (uniformsP) out.push(t);
    if (grad) out.push(inputGradient(b, logp, col, t, W));
    return { carried: [], scans: out };
  });

  const { nll, targets, targetsPadded, J } = g.noGrad(() => {
    const flat = (x: Tensor, dtype: DataType) => g.node('Reshape', [x, g.ints([-1])], [{ dtype, shape: ['P'] }])[0];
    const nllP = flat(stacked[0], F);
    const sampledP = uniformsP ? flat(stacked[1], I) : null;
    const tP = sampledP ?? targetsP!;
    const jP = grad
      ? g.node('Reshape', [stacked[stacked.length - 1], g.ints([-1, d])], [{ dtype: F, shape: ['P', d] }])[0]
      : null;
    return {
      nll: lay.unpad(nllP),
      targets: labels.kind === 'data' ? g.reshape(labels.targets, [-1]) : lay.unpad(tP),
      targetsPadded: tP,
      J: jP && lay.unpad(jP),
    };
  });

  g.custom([hidden, W], [nll], ([gy], [needH, needW]) => {
    if (!grad) throw new Error('crossEntropyHead: built without its gradient');
    const up = g.unsqueeze(gy!, [1]);
    const dh = needH ? g.mul(J!, up) : null;
    if (!needW) return [dh, null];
    // dW = Σ_t gy_t (softmax_t − e_target)ᵀ h_t, summed chunk by chunk
    const gyP = lay.pad1(gy!);
    const [dW] = g.loop(lay.k, [g.zerosLike(W)], [], (b, i, [acc]) => {
      const slice = chunkOf(b, i);
      const h = slice(lay.hp);
      const logp = logSoftmax(b, h);
      const upC = b.node('Unsqueeze', [slice(gyP), b.ints([1])], [{ dtype: F, shape: ['c', 1] }])[0];
      const dlogits = b.node(
        'Mul',
        [softmaxMinusTarget(b, logp, column(b, slice(targetsPadded))), upC],
        [{ dtype: F, shape: ['c', V] }],
      )[0];
      const next = b.node('Gemm', [dlogits, h, acc], [{ dtype: F, shape: [V, d] }], { transA: 1 })[0];
      return { carried: [next], scans: [] };
    });
    return [dh, dW];
  });
  return { nll, targets };
}

/**
 * The softmax of one chunk without the target's entry (`others`, [c, V]) and the sum of those
 * probabilities (`rest`, [c, 1]): ∂nll/∂logits = others − rest·e_target, the target's entry taken
 * as −Σ_{j≠t} p_j instead of p_t − 1. For a memorised token p_t rounds to 1 in float32, and p_t − 1
 * to 0 or one rounding step, while the gradient is made of the other probabilities, which are
 * exact: a float32 gradient was off by 10–80% at −log p between 1e-7 and 1e-15 (fp64 reference,
 * test/unit/head-chunks.test.ts). The row sums to zero, as the true gradient does.
 */
function softmaxWithoutTarget(b: Graph, logp: Tensor, col: Tensor): { others: Tensor; rest: Tensor } {
  const F = b.float;
  const shape = logp.shape;
  const p = b.node('Exp', [logp], [{ dtype: F, shape }])[0];
  const others = b.node('ScatterElements', [p, col, filled(b, col, 0)], [{ dtype: F, shape }], { axis: 1 })[0];
  const rest = b.node('ReduceSum', [others, b.ints([1])], [{ dtype: F, shape: ['c', 1] }], { keepdims: 1 })[0];
  return { others, rest };
}

/** ∂nll/∂logits of one chunk, [c, V] (for the head weight's gradient). */
function softmaxMinusTarget(b: Graph, logp: Tensor, col: Tensor): Tensor {
  const { others, rest } = softmaxWithoutTarget(b, logp, col);
  const minusRest = b.node('Neg', [rest], [{ dtype: b.float, shape: ['c', 1] }])[0];
  return b.node('ScatterElements', [others, col, minusRest], [{ dtype: b.float, shape: logp.shape }], { axis: 1 })[0];
}

/**
 * J = ∂nll/∂h of one chunk, [c, d] = (others − rest·e_target)ᵀ W = others·W − rest·W[target]:
 * the target's row of W is gathered ([c, d]) instead of writing −rest into a second [c, V] copy
 * (a ScatterElements over the whole chunk). Both terms are of the gradient's own size (others and
 * rest are the small probabilities), so nothing cancels that the [c, V] form kept.
 */
function inputGradient(b: Graph, logp: Tensor, col: Tensor, target: Tensor, W: Tensor): Tensor {
  const F = b.float;
  const d = W.shape[1] as number;
  const { others, rest } = softmaxWithoutTarget(b, logp, col);
  const wt = b.node('Gather', [W, target], [{ dtype: F, shape: ['c', d] }], { axis: 0 })[0];
  const restWt = b.node('Mul', [wt, rest], [{ dtype: F, shape: ['c', d] }])[0];
  return b.node('Gemm', [others, W, restWt], [{ dtype: F, shape: ['c', d] }], { beta: { float: -1 } })[0];
}

/** [c, 1] of `value` in the graph's float type, shaped like `col`. */
function filled(b: Graph, col: Tensor, value: number): Tensor {
  const v = b.float === DataType.DOUBLE ? new Float64Array([value]) : new Float32Array([value]);
  return b.node('ConstantOfShape', [b.shapeOf(col)], [{ dtype: b.float, shape: col.shape }], {
    value: { name: 'value', dataType: b.float, dims: [1], raw: new Uint8Array(v.buffer) },
  })[0];
}

/**
 * Labels drawn from the model's own predictive distribution by inverse-CDF sampling, with
 * uniforms fed from JS (so the seed lives in one place): the count of vocabulary entries whose
 * cumulative probability is below u.
 */
function sample(b: Graph, logp: Tensor, u: Tensor, V: number): Tensor {
  const F = b.float;
  const probs = b.node('Exp', [logp], [{ dtype: F, shape: logp.shape }])[0];
  const cdf = b.node('CumSum', [probs, b.scalar(1, DataType.INT64)], [{ dtype: F, shape: logp.shape }])[0];
  const uCol = b.node('Unsqueeze', [u, b.ints([1])], [{ dtype: F, shape: ['c', 1] }])[0];
  // counted in the graph's float type, not int64: half the bytes of a [c, V] tensor, and
  // exact (whole numbers below 2^24 are exact in float32; vocabularies are far smaller)
  const below = b.cast(b.node('Less', [cdf, uCol], [{ dtype: DataType.BOOL, shape: logp.shape }])[0], F);
  const count = b.node('ReduceSum', [below, b.ints([1])], [{ dtype: F, shape: ['c'] }], { keepdims: 0 })[0];
  return b.node(
    'Min',
    [b.cast(count, DataType.INT64), b.scalar(V - 1, DataType.INT64)],
    [{ dtype: DataType.INT64, shape: ['c'] }],
  )[0];
}
