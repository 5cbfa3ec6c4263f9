// The language-model head and its cross-entropy, in chunks. The logits are [N, V]: at 2,048
// tokens of a 50k vocabulary one copy is 412 MB, and the loss and its backward (log-softmax, its
// exponential, the gradient) held four or five of them at once. So only one chunk's are alive:
// - for every loss and its gradient, an ONNX Loop takes a few hundred rows at a time and, inside
//   it, a second Loop takes the vocabulary a block of words at a time, keeping a running maximum,
//   sum of exponentials and gradient (the log-sum-exp computed online, as flash attention does for
//   its softmax). Each block of the head's weight is read once for all the rows of a chunk: with
//   whole-vocabulary chunks, a 262k vocabulary left room for only 32 rows, and each chunk read the
//   whole 671 MB weight twice, so the head ran at the memory's speed, not the GEMM's. Labels drawn
//   from the model are drawn from the blocks too (sampledVocabularyBlocks).
// - for the gradient of the head's own weight, a Loop takes a few rows at a time with their logits
//   over the whole vocabulary.
// Every row's result is the same computation as on the whole matrix up to the order of summation.
import { checkRows, chunkBounds, chunkPlan } from './onnx/chunks';
import { DataType, type Dim, type Graph, type Tensor } from './onnx/graph';

/** Bytes of one chunk's logits over the whole vocabulary: a handful of [c, V] tensors are alive in an iteration. */
export const HEAD_CHUNK_BYTES = 32 * 2 ** 20;

/**
 * The vocabulary-blocked pass: rows of a chunk, and the bytes of a block's [rows, words] tensors and
 * of its slice of the weight. Small enough to stay in a core's cache while the elementwise steps
 * (subtract, exponential, mask, sum) go over a block, large enough for the GEMMs to run near full
 * speed. Measured (2-vCPU AMD EPYC, forward + input gradient of 2,048 rows): 1,024 rows × 1,024
 * words took 8.9 s at Gemma 3's 262,144 × 640 head, 8.0 s at Qwen3's 151,936 × 1,024 and 1.2 s at
 * Pythia's 50,304 × 512, against 14.2, 11.8 and 1.7 s with whole-vocabulary chunks; blocks of
 * 8,192–16,384 words (32 MiB of logits) were as slow as whole-vocabulary chunks at Pythia's.
 */
export const HEAD_BLOCK_ROWS = 1024;
export const HEAD_BLOCK_BYTES = 4 * 2 ** 20;

/** Rows per chunk when a chunk's logits span the whole vocabulary: HEAD_CHUNK_BYTES of logits (`override` for tests). */
export function headChunkRows(vocab: number, bytesPerFloat: number, override?: number): number {
  if (override !== undefined) return checkRows('head chunk', override);
  return Math.max(1, Math.floor(HEAD_CHUNK_BYTES / (vocab * bytesPerFloat)));
}

/** How the head is cut: see the comment at the top of this file. */
export interface HeadPlan {
  /** rows of a chunk in the vocabulary-blocked pass (every loss and its gradient) */
  rows: number;
  /** words of one vocabulary block in that pass */
  vocabBlock: number;
  /** rows of a chunk whose logits span the whole vocabulary (the head weight's gradient) */
  logitRows: number;
}

/**
 * The plan for a head of `vocab` words over `hidden` features: a block's [rows, words] tensors and
 * its [words, hidden] slice of the weight each within HEAD_BLOCK_BYTES. Tests override the rows (of
 * every pass) and the block's words.
 */
export function headPlan(
  vocab: number,
  hidden: number,
  bytesPerFloat: number,
  override: { rows?: number; vocabBlock?: number } = {},
): HeadPlan {
  const rows = override.rows === undefined ? HEAD_BLOCK_ROWS : checkRows('head chunk', override.rows);
  const fit = Math.floor(HEAD_BLOCK_BYTES / (Math.max(rows, hidden) * bytesPerFloat));
  const given = override.vocabBlock;
  if (given !== undefined && !(Number.isInteger(given) && given >= 1))
    throw new Error(`head vocabulary block must be a positive integer, got ${given}`);
  const block = given ?? Math.max(1, fit);
  return {
    rows,
    vocabBlock: Math.min(vocab, block),
    logitRows: headChunkRows(vocab, bytesPerFloat, override.rows),
  };
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
  plan: HeadPlan,
  grad: boolean,
): HeadLoss {
  const V = W.shape[0] as number;
  const d = W.shape[1] as number;
  const I = DataType.INT64;
  const F = g.float;

  /** `hidden`'s rows padded to K chunks of c rows, at most `rows` a chunk */
  const layout = (rows: number) =>
    g.noGrad(() => {
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
  type Layout = ReturnType<typeof layout>;

  /** one chunk's slice of a padded [P, ...] tensor, inside a loop body */
  const chunkOf = (b: Graph, i: Tensor, lay: Layout) => {
    const { start, end } = chunkBounds(b, i, lay.c);
    return (x: Tensor) =>
      b.node('Slice', [x, start, end, b.ints([0])], [{ dtype: x.dtype, shape: ['c', ...x.shape.slice(1)] }])[0];
  };
  const logSoftmax = (b: Graph, h: Tensor) => {
    const logits = b.node('Gemm', [h, W], [{ dtype: F, shape: ['c', V] }], { transB: 1 })[0];
    return b.node('LogSoftmax', [logits], [{ dtype: F, shape: ['c', V] }], { axis: 1 })[0];
  };
  const column = (b: Graph, t: Tensor) => b.node('Unsqueeze', [t, b.ints([1])], [{ dtype: I, shape: ['c', 1] }])[0];
  /** the rows' [P] per-chunk scans, flattened and unpadded */
  const rowsOf = (lay: Layout, x: Tensor, dtype: DataType) =>
    lay.unpad(g.node('Reshape', [x, g.ints([-1])], [{ dtype, shape: ['P'] }])[0]);
  const jOf = (lay: Layout, x: Tensor) =>
    lay.unpad(g.node('Reshape', [x, g.ints([-1, d])], [{ dtype: F, shape: ['P', d] }])[0]);

  let nll: Tensor;
  let targets: Tensor;
  let J: Tensor | null = null;
  if (labels.kind === 'data') {
    // rows a chunk at a time, the vocabulary a block at a time inside (vocabularyBlocks)
    const lay = layout(plan.rows);
    const targetsP = g.noGrad(() => lay.pad1(g.reshape(labels.targets, [-1])));
    const scans = [{ dtype: F, shape: ['c'] }, ...(grad ? [{ dtype: F, shape: ['c', d] }] : [])];
    const stacked = g.loop(lay.k, [], scans, (b, i) => {
      const slice = chunkOf(b, i, lay);
      const r = vocabularyBlocks(b, slice(lay.hp), W, slice(targetsP), plan.vocabBlock, grad);
      return { carried: [], scans: r.J ? [r.nll, r.J] : [r.nll] };
    });
    ({ nll, targets, J } = g.noGrad(() => ({
      nll: rowsOf(lay, stacked[0], F),
      targets: g.reshape(labels.targets, [-1]),
      J: grad ? jOf(lay, stacked[1]) : null,
    })));
  } else {
    // the same blocks, drawing each row's label as they go (sampledVocabularyBlocks)
    const lay = layout(plan.rows);
    const uniformsP = g.noGrad(() => lay.pad1(g.reshape(labels.uniforms, [-1])));
    const scans = [
      { dtype: F, shape: ['c'] },
      { dtype: I, shape: ['c'] },
      ...(grad ? [{ dtype: F, shape: ['c', d] }] : []),
    ];
    const stacked = g.loop(lay.k, [], scans, (b, i) => {
      const slice = chunkOf(b, i, lay);
      const r = sampledVocabularyBlocks(b, slice(lay.hp), W, slice(uniformsP), plan.vocabBlock, grad);
      return { carried: [], scans: r.J ? [r.nll, r.targets, r.J] : [r.nll, r.targets] };
    });
    ({ nll, targets, J } = g.noGrad(() => ({
      nll: rowsOf(lay, stacked[0], F),
      targets: rowsOf(lay, stacked[1], I),
      J: grad ? jOf(lay, stacked[2]) : null,
    })));
  }

  g.custom([hidden, W], [nll], ([gy], [needH, needW]) => {
    if (!J) throw new Error('crossEntropyHead: built without its gradient');
    const up = g.unsqueeze(gy!, [1]);
    const dh = needH ? g.mul(J, up) : null;
    if (!needW) return [dh, null];
    // dW = Σ_t gy_t (softmax_t − e_target)ᵀ h_t, summed chunk by chunk over whole-vocabulary logits
    const lay = layout(plan.logitRows);
    const gyP = lay.pad1(gy!);
    const targetsP = g.noGrad(() => lay.pad1(targets));
    const [dW] = g.loop(lay.k, [g.zerosLike(W)], [], (b, i, [acc]) => {
      const slice = chunkOf(b, i, lay);
      const h = slice(lay.hp);
      const logp = logSoftmax(b, h);
      const upC = b.node('Unsqueeze', [slice(gyP), b.ints([1])], [{ dtype: F, shape: ['c', 1] }])[0];
      const dlogits = b.node(
        'Mul',
        [softmaxMinusTarget(b, logp, column(b, slice(targetsP))), upC],
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
 * One chunk of rows (h [c, d], targets t [c]) against the vocabulary a block of `block` words at a
 * time: an inner Loop carries each row's running maximum m of the logits, the sum s of
 * exp(logit − m) over every word but the target, the target's logit, and (with `grad`) the sum of
 * exp(logit − m)·W_word over the same words, each rescaled by exp(m_old − m_new) when the maximum
 * grows. At the end Z = s + exp(logit_t − m) is the softmax's denominator, so
 *   nll = m − logit_t + log Z  (what LogSoftmax computes: logit − max − log Σ exp(logit − max)),
 *   J = (Σ_{j≠t} p_j W_j) − (Σ_{j≠t} p_j) W_t,
 * the target's entry taken as −Σ_{j≠t} p_j as in softmaxWithoutTarget, for the same reason.
 */
function vocabularyBlocks(
  b: Graph,
  h: Tensor,
  W: Tensor,
  t: Tensor,
  block: number,
  grad: boolean,
): { nll: Tensor; J: Tensor | null } {
  const F = b.float;
  const I = DataType.INT64;
  const B = DataType.BOOL;
  const V = W.shape[0] as number;
  const d = W.shape[1] as number;
  const col = op(b, 'Unsqueeze', [t, b.ints([1])], I, ['c', 1]);
  const lowest = F === DataType.DOUBLE ? -Number.MAX_VALUE : -3.4028234663852886e38;
  // the target's logit starts as NaN: a target in no block (outside [0, V)) gives a NaN loss and
  // gradient, as an out-of-range index fails the whole-vocabulary path, never a finite wrong one
  const init = [filled(b, col, lowest), filled(b, col, 0), filled(b, col, Number.NaN)];
  if (grad) init.push(b.zerosLike(h));
  const [m, s, target, sumPW] = b.loop(b.ints([Math.ceil(V / block)]), init, [], (x, j, carried) => {
    const [mPrev, sPrev, targetPrev, sumPrev] = carried;
    const col1 = (type: string, ins: Tensor[], dtype = F) => op(x, type, ins, dtype, ['c', 1]);
    const block1 = (type: string, ins: Tensor[], attrs = {}) => op(x, type, ins, F, ['c', 'w'], attrs);
    // this block's words [start, start + block); the last block is shorter (Slice stops at V)
    const { start, Wb, width } = vocabularyBlock(x, W, j, block);
    const logits = block1('Gemm', [h, Wb], { transB: 1 });
    const mNew = col1('Max', [mPrev, op(x, 'ReduceMax', [logits, x.ints([1])], F, ['c', 1], { keepdims: 1 })]);
    const rescale = col1('Exp', [col1('Sub', [mPrev, mNew])]);
    const e = block1('Exp', [block1('Sub', [logits, mNew])]);
    // the target's place in this block, clamped into it; `here`: whether it is in this block
    const local = col1('Sub', [col, start], I);
    const here = col1('And', [col1('GreaterOrEqual', [local, x.ints([0])], B), col1('Less', [local, width], B)], B);
    const at = col1('Max', [col1('Min', [local, op(x, 'Sub', [width, x.ints([1])], I, [1])], I), x.ints([0])], I);
    const gather = (y: Tensor) => op(x, 'GatherElements', [y, at], F, ['c', 1], { axis: 1 });
    const targetNew = col1('Where', [here, gather(logits), targetPrev]);
    // exp(logit − m) of every word but the target (its entry set to 0 where it is in this block)
    const others = block1('ScatterElements', [e, at, col1('Where', [here, x.scalar(0), gather(e)])], { axis: 1 });
    const sum = op(x, 'ReduceSum', [others, x.ints([1])], F, ['c', 1], { keepdims: 1 });
    const next = [mNew, col1('Add', [col1('Mul', [sPrev, rescale]), sum]), targetNew];
    if (sumPrev) next.push(op(x, 'Gemm', [others, Wb, op(x, 'Mul', [sumPrev, rescale], F, ['c', d])], F, ['c', d]));
    return { carried: next, scans: [] };
  });
  const col1 = (type: string, ins: Tensor[]) => op(b, type, ins, F, ['c', 1]);
  const Z = col1('Add', [s, col1('Exp', [col1('Sub', [target, m])])]);
  const nll = op(b, 'Reshape', [col1('Add', [col1('Sub', [m, target]), col1('Log', [Z])]), b.ints([-1])], F, ['c']);
  if (!sumPW) return { nll, J: null };
  const sW = op(b, 'Mul', [op(b, 'Gather', [W, t], F, ['c', d], { axis: 0 }), s], F, ['c', d]);
  return { nll, J: op(b, 'Div', [op(b, 'Sub', [sumPW, sW], F, ['c', d]), Z], F, ['c', d]) };
}

/**
 * Sampled labels for one chunk of rows (h [c, d], uniforms u [c]), the vocabulary a block of
 * `block` words at a time: the same draw as inverse-CDF sampling over the whole distribution (the
 * count of words whose cumulative probability is below u), in two loops over the blocks.
 *
 * The first carries, per row, the running maximum m of the logits and the word a where it is, the
 * sum s of exp(logit − m) over every word but a, and (with `grad`) the same sum of exp(logit − m)·W,
 * rescaled as m grows; when a block holds a new maximum, the old one's term (exp(m_old − m_new),
 * and that times its row of W) joins the sums and the new one's stays out. Each block's sum of
 * exp(logit − m) and the m it was taken at are kept (scans), which gives every block's share of
 * the probability at the end: the draw's block is the count of blocks whose cumulative share is
 * below u, and what is left of u·total after the blocks before it is where the draw falls inside.
 * The second loop recomputes, in each block, the logits of only the rows whose draw fell in it
 * (a block's GEMM over c/blocks rows on average) and counts the words below that remainder.
 *
 * Why the maximum is left out of the sums: a label that was certain (p close to 1) is almost
 * always drawn as that word, and then ∂nll/∂h = Σ_{j≠t} p_j W_j − (Σ_{j≠t} p_j) W_t is made of the
 * other probabilities only, exact in float32, as in softmaxWithoutTarget. A label drawn elsewhere
 * has p_t ≤ 1/2, and Σ_j p_j W_j − W_t loses nothing.
 */
function sampledVocabularyBlocks(
  b: Graph,
  h: Tensor,
  W: Tensor,
  u: Tensor,
  block: number,
  grad: boolean,
): { nll: Tensor; targets: Tensor; J: Tensor | null } {
  const F = b.float;
  const I = DataType.INT64;
  const B = DataType.BOOL;
  const V = W.shape[0] as number;
  const d = W.shape[1] as number;
  const blocks = Math.ceil(V / block);
  const lowest = F === DataType.DOUBLE ? -Number.MAX_VALUE : -3.4028234663852886e38;
  const uCol = op(b, 'Unsqueeze', [u, b.ints([1])], F, ['c', 1]);
  /** the rows of W at `ids` ([c, 1] int64), [c, d] */
  const rowsOfW = (x: Graph, ids: Tensor) =>
    op(x, 'Gather', [W, op(x, 'Reshape', [ids, x.ints([-1])], I, ['c'])], F, ['c', d], { axis: 0 });
  /** how many entries of each row of `cum` are below that row's `limit`, at most `last` */
  const countBelow = (x: Graph, cum: Tensor, limit: Tensor, last: Tensor) => {
    const below = op(x, 'Cast', [op(x, 'Less', [cum, limit], B, [...cum.shape])], F, [...cum.shape], { to: F });
    const count = op(x, 'ReduceSum', [below, x.ints([1])], F, [cum.shape[0], 1], { keepdims: 1 });
    return op(x, 'Min', [op(x, 'Cast', [count], I, [cum.shape[0], 1], { to: I }), last], I, [cum.shape[0], 1]);
  };

  const init = [
    filled(b, uCol, lowest),
    op(b, 'Cast', [filled(b, uCol, 0)], I, ['c', 1], { to: I }),
    filled(b, uCol, 0),
  ];
  if (grad) init.push(b.zerosLike(h));
  const perBlock = [
    { dtype: F, shape: ['c'] },
    { dtype: F, shape: ['c'] },
  ];
  const [m, a, s, sumPW, maxAt, sumAt] = (() => {
    const out = b.loop(b.ints([blocks]), init, perBlock, (x, j, carried) => {
      const [mPrev, aPrev, sPrev, sumPrev] = carried;
      const col1 = (type: string, ins: Tensor[], dtype = F) => op(x, type, ins, dtype, ['c', 1]);
      const block1 = (type: string, ins: Tensor[], attrs = {}) => op(x, type, ins, F, ['c', 'w'], attrs);
      const { start, Wb } = vocabularyBlock(x, W, j, block);
      const logits = block1('Gemm', [h, Wb], { transB: 1 });
      const at = op(x, 'ArgMax', [logits], I, ['c', 1], { axis: 1, keepdims: 1 });
      const top = op(x, 'GatherElements', [logits, at], F, ['c', 1], { axis: 1 });
      // a new maximum only when strictly greater: a tie stays with the earlier word
      const isNew = col1('Greater', [top, mPrev], B);
      const mNew = col1('Where', [isNew, top, mPrev]);
      const rescale = col1('Exp', [col1('Sub', [mPrev, mNew])]);
      const e = block1('Exp', [block1('Sub', [logits, mNew])]);
      // every word but the maximum: its entry (exp(0) = 1) set to 0 where it is in this block
      const zeroHere = col1('Where', [isNew, x.scalar(0), op(x, 'GatherElements', [e, at], F, ['c', 1], { axis: 1 })]);
      const others = block1('ScatterElements', [e, at, zeroHere], { axis: 1 });
      const rest = op(x, 'ReduceSum', [others, x.ints([1])], F, ['c', 1], { keepdims: 1 });
      // the old maximum's term, exp(m_old − m_new), when it is replaced (0 on the first block)
      const oldTerm = col1('Where', [isNew, rescale, x.scalar(0)]);
      const next = [
        mNew,
        col1('Where', [isNew, col1('Add', [at, start], I), aPrev], I),
        col1('Add', [col1('Add', [col1('Mul', [sPrev, rescale]), oldTerm]), rest]),
      ];
      if (sumPrev) {
        const carriedIn = op(
          x,
          'Add',
          [op(x, 'Mul', [sumPrev, rescale], F, ['c', d]), op(x, 'Mul', [rowsOfW(x, aPrev), oldTerm], F, ['c', d])],
          F,
          ['c', d],
        );
        next.push(op(x, 'Gemm', [others, Wb, carriedIn], F, ['c', d]));
      }
      // this block's Σ exp(logit − m_new): `rest` plus the new maximum's own 1
      const blockSum = col1('Add', [rest, op(x, 'Cast', [isNew], F, ['c', 1], { to: F })]);
      const flat = (t: Tensor) => op(x, 'Reshape', [t, x.ints([-1])], F, ['c']);
      return { carried: next, scans: [flat(mNew), flat(blockSum)] };
    });
    return grad ? out : [out[0], out[1], out[2], null, out[3], out[4]];
  })();
  const col1 = (type: string, ins: Tensor[], dtype = F) => op(b, type, ins, dtype, ['c', 1]);
  const Z = col1('Add', [s, b.scalar(1)]);

  // every block's share of the row's probability (times Z), cumulated: [c, blocks]
  const byRow = (t: Tensor) => op(b, 'Transpose', [t], F, ['c', blocks], { perm: [1, 0] });
  const share = op(
    b,
    'Mul',
    [byRow(sumAt!), op(b, 'Exp', [op(b, 'Sub', [byRow(maxAt!), m], F, ['c', blocks])], F, ['c', blocks])],
    F,
    ['c', blocks],
  );
  const cum = op(b, 'CumSum', [share, b.scalar(1, I)], F, ['c', blocks]);
  const total = op(b, 'Slice', [cum, b.ints([blocks - 1]), b.ints([blocks]), b.ints([1])], F, ['c', 1]);
  const limit = col1('Mul', [uCol, total]);
  const drawnBlock = countBelow(b, cum, limit, b.ints([blocks - 1]));
  const before = col1('Sub', [
    op(b, 'GatherElements', [cum, drawnBlock], F, ['c', 1], { axis: 1 }),
    op(b, 'GatherElements', [share, drawnBlock], F, ['c', 1], { axis: 1 }),
  ]);
  const remainder = col1('Sub', [limit, before]);

  // the word inside the drawn block, and its logit: each block computes only its own rows
  const drawnFlat = op(b, 'Reshape', [drawnBlock, b.ints([-1])], I, ['c']);
  const flatZeros = op(b, 'Reshape', [filled(b, uCol, 0), b.ints([-1])], F, ['c']);
  const [targets, targetLogit] = b.loop(
    b.ints([blocks]),
    [op(b, 'Cast', [flatZeros], I, ['c'], { to: I }), flatZeros],
    [],
    (x, j, [tPrev, lPrev]) => {
      const mine = op(x, 'Equal', [drawnFlat, j], B, ['c']);
      const rows = op(x, 'Reshape', [op(x, 'NonZero', [mine], I, [1, 'r']), x.ints([-1])], I, ['r']);
      const pick = (t: Tensor, dtype: DataType, shape: Dim[]) => op(x, 'Gather', [t, rows], dtype, shape, { axis: 0 });
      const { start, Wb, width } = vocabularyBlock(x, W, j, block);
      const logits = op(x, 'Gemm', [pick(h, F, ['r', d]), Wb], F, ['r', 'w'], { transB: 1 });
      const e = op(x, 'Exp', [op(x, 'Sub', [logits, pick(m, F, ['r', 1])], F, ['r', 'w'])], F, ['r', 'w']);
      const within = op(x, 'CumSum', [e, x.scalar(1, I)], F, ['r', 'w']);
      const k = countBelow(x, within, pick(remainder, F, ['r', 1]), op(x, 'Sub', [width, x.ints([1])], I, [1]));
      const word = op(x, 'Reshape', [op(x, 'Add', [k, start], I, ['r', 1]), x.ints([-1])], I, ['r']);
      const logit = op(
        x,
        'Reshape',
        [op(x, 'GatherElements', [logits, k], F, ['r', 1], { axis: 1 }), x.ints([-1])],
        F,
        ['r'],
      );
      return {
        carried: [
          op(x, 'ScatterElements', [tPrev, rows, word], I, ['c'], { axis: 0 }),
          op(x, 'ScatterElements', [lPrev, rows, logit], F, ['c'], { axis: 0 }),
        ],
        scans: [],
      };
    },
  );
  const tCol = op(b, 'Unsqueeze', [targets, b.ints([1])], I, ['c', 1]);
  const tLogit = op(b, 'Unsqueeze', [targetLogit, b.ints([1])], F, ['c', 1]);
  const nll = op(b, 'Reshape', [col1('Add', [col1('Sub', [m, tLogit]), col1('Log', [Z])]), b.ints([-1])], F, ['c']);
  if (!sumPW) return { nll, targets, J: null };
  // drawn at the maximum: (Σ_{j≠a} p_j W_j) − (Σ_{j≠a} p_j) W_a; elsewhere: Σ_j p_j W_j − W_t
  const cd = (type: string, ins: Tensor[]) => op(b, type, ins, F, ['c', d]);
  const Wa = rowsOfW(b, a!);
  const atMax = cd('Div', [cd('Sub', [sumPW, cd('Mul', [Wa, s!])]), Z]);
  const elsewhere = cd('Sub', [cd('Div', [cd('Add', [sumPW, Wa]), Z]), rowsOfW(b, tCol)]);
  const J = cd('Where', [col1('Equal', [tCol, a!], B), atMax, elsewhere]);
  return { nll, targets, J };
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

/** Block `j` of the vocabulary: its slice of W ([w, d]), first word (`start`, [1]) and width; the last block is shorter (Slice stops at V). */
function vocabularyBlock(x: Graph, W: Tensor, j: Tensor, block: number): { start: Tensor; Wb: Tensor; width: Tensor } {
  const I = DataType.INT64;
  const start = op(x, 'Mul', [op(x, 'Unsqueeze', [j, x.ints([0])], I, [1]), x.ints([block])], I, [1]);
  const end = op(x, 'Add', [start, x.ints([block])], I, [1]);
  const Wb = op(x, 'Slice', [W, start, end, x.ints([0])], x.float, ['w', W.shape[1] as number]);
  return { start, Wb, width: x.shapeOf(Wb, 0, 1) };
}

/** One node with one output, in graph `x`. */
function op(x: Graph, type: string, ins: Tensor[], dtype: DataType, shape: Dim[], attrs = {}): Tensor {
  return x.node(type, ins, [{ dtype, shape }], attrs)[0];
}

/** [c, 1] of `value` in the graph's float type, shaped like `col`. */
function filled(b: Graph, col: Tensor, value: number): Tensor {
  const v = b.float === DataType.DOUBLE ? new Float64Array([value]) : new Float32Array([value]);
  return b.node('ConstantOfShape', [b.shapeOf(col)], [{ dtype: b.float, shape: col.shape }], {
    value: { name: 'value', dataType: b.float, dims: [1], raw: new Uint8Array(v.buffer) },
  })[0];
}
