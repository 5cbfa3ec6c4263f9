// A small ONNX graph builder with reverse-mode differentiation at build time.
//
// ONNX Runtime has no autodiff, so every differentiable op below records a tape entry
// with its backward rule, written with standard ONNX ops. `grad()` walks the tape in
// reverse and emits the backward graph. Shapes are tracked statically (numbers for
// fixed sizes, strings for symbolic ones such as batch "B" or sequence "T"), which is
// all the backward rules need to know which axes were broadcast.
import {
  type AttributeValue,
  DataType,
  encodeModel,
  type ModelProto,
  type NodeProto,
  type TensorProto,
  type ValueInfo,
} from './proto';

export { DataType } from './proto';
export type Dim = number | string;

export interface Tensor {
  readonly name: string;
  readonly dtype: DataType;
  readonly shape: readonly Dim[];
}

type Grad = Tensor | null;

/** `need[i]` says whether input i's gradient is wanted, so rules can skip dead work. */
type Backward = (gys: Grad[], need: boolean[]) => Grad[];

interface TapeEntry {
  inputs: Tensor[];
  outputs: Tensor[];
  backward: Backward;
}

export const OPSET = 21;
export const MS_DOMAIN = 'com.microsoft';

const ELEM_BYTES: Partial<Record<DataType, number>> = {
  [DataType.FLOAT]: 4,
  [DataType.DOUBLE]: 8,
  [DataType.INT64]: 8,
  [DataType.INT32]: 4,
  [DataType.FLOAT16]: 2,
  [DataType.BFLOAT16]: 2,
  [DataType.UINT8]: 1,
  [DataType.BOOL]: 1,
};

export function elemBytes(dt: DataType): number {
  const b = ELEM_BYTES[dt];
  if (!b) throw new Error(`unsupported ONNX data type ${dt}`);
  return b;
}

function dimEq(a: Dim, b: Dim): boolean {
  return a === b;
}

/** Numpy-style broadcast of two static shapes. Symbolic dims must match by name. */
export function broadcastShapes(a: readonly Dim[], b: readonly Dim[]): Dim[] {
  const n = Math.max(a.length, b.length);
  const out: Dim[] = [];
  for (let i = 0; i < n; i++) {
    const x = a[a.length - n + i] ?? 1;
    const y = b[b.length - n + i] ?? 1;
    if (dimEq(x, y) || y === 1) out.push(x);
    else if (x === 1) out.push(y);
    else throw new Error(`cannot broadcast shapes [${a}] and [${b}]`);
  }
  return out;
}

function dimProduct(dims: readonly Dim[]): Dim {
  let num = 1;
  const syms: string[] = [];
  for (const d of dims) {
    if (typeof d === 'number') num *= d;
    else syms.push(d);
  }
  if (!syms.length) return num;
  return [...(num !== 1 ? [String(num)] : []), ...syms].join('*');
}

export class Graph {
  readonly nodes: NodeProto[] = [];
  readonly initializers: TensorProto[] = [];
  readonly inputs: ValueInfo[] = [];
  readonly outputs: ValueInfo[] = [];
  private tape: TapeEntry[] = [];
  private recording = true;
  private counter = 0;
  private consts = new Map<string, Tensor>();
  private names = new Set<string>();
  /** tensors some node produces (a graph input or initializer is not renamable) */
  private produced = new Set<string>();
  /** graph outputs that name a node's tensor directly (old → new), applied by toModel() */
  private renames = new Map<string, string>();
  /** tensor name → the graph output that carries it (the first name it was output under) */
  private outputOf = new Map<string, string>();
  /**
   * Output names that read another output's tensor (name → that output), when one tensor was
   * output under several names: the graph has one output, a run returns it under every name
   * (`CompiledGraph.aliases`).
   */
  readonly aliases = new Map<string, string>();

  /**
   * `float` is the floating type of constants (FLOAT normally, DOUBLE for precise checks).
   * `parent`: this graph is a Loop body (see `loop`); names come from the outermost graph, so no
   * body tensor shadows an outer one (ONNX lets a body read every outer tensor by name).
   */
  constructor(
    readonly float: DataType = DataType.FLOAT,
    private readonly parent?: Graph,
  ) {
    if (parent) this.recording = false;
  }

  fresh(prefix: string): string {
    if (this.parent) return this.parent.fresh(prefix);
    let name: string;
    do name = `${prefix}_${this.counter++}`;
    while (this.names.has(name));
    this.names.add(name);
    return name;
  }

  private claim(name: string): string {
    if (this.parent) return this.parent.claim(name);
    if (this.names.has(name)) throw new Error(`duplicate tensor name ${name}`);
    this.names.add(name);
    return name;
  }

  input(name: string, dtype: DataType, shape: Dim[]): Tensor {
    this.claim(name);
    this.inputs.push({ name, dataType: dtype, shape });
    return { name, dtype, shape };
  }

  initializer(
    name: string,
    dtype: DataType,
    shape: number[],
    data: Uint8Array | { location: string; offset: number; length: number },
  ): Tensor {
    return this.addInitializer(this.claim(name), dtype, shape, data);
  }

  private addInitializer(
    name: string,
    dtype: DataType,
    shape: number[],
    data: Uint8Array | { location: string; offset: number; length: number },
  ): Tensor {
    const t: TensorProto =
      data instanceof Uint8Array
        ? { name, dataType: dtype, dims: shape, raw: data }
        : { name, dataType: dtype, dims: shape, external: data };
    this.initializers.push(t);
    return { name, dtype, shape };
  }

  /**
   * Mark a tensor as a graph output under `name`. A node's tensor is renamed in place (when the
   * model is written) instead of copied by an Identity: ONNX Runtime's Identity copies, which
   * cost 2% of the covariance pass at the Pythia-70M shape (46 per-token outputs a run). A tensor
   * already output under another name is not output again: `name` becomes an alias of that output
   * (q/k/v read one input; ONNX Runtime copied it into each extra output, and ran the copies even
   * when they were not fetched: 0.26 s of a 10.4 s covariance pass at SmolLM-135M).
   */
  output(t: Tensor, name = t.name): Tensor {
    const first = this.outputOf.get(t.name);
    if (first !== undefined) {
      if (name === first) throw new Error(`graph output ${name} is declared twice`);
      if (name !== t.name) this.claim(name);
      this.aliases.set(name, first);
      return { name: first, dtype: t.dtype, shape: t.shape };
    }
    let out = t;
    if (name !== t.name) {
      this.claim(name);
      if (this.produced.has(t.name) && !this.renames.has(t.name)) this.renames.set(t.name, name);
      else this.nodes.push({ opType: 'Identity', inputs: [t.name], outputs: [name] });
      out = { name, dtype: t.dtype, shape: t.shape };
    }
    this.outputOf.set(t.name, name);
    this.outputs.push({ name, dataType: t.dtype });
    return out;
  }

  /** Emit one raw node (no gradient recorded). */
  node(
    opType: string,
    inputs: Array<Tensor | string>,
    outs: Array<{ dtype: DataType; shape: readonly Dim[] }>,
    attributes?: Record<string, AttributeValue>,
    domain?: string,
  ): Tensor[] {
    const outputs = outs.map((o) => ({ name: this.fresh(opType.toLowerCase()), dtype: o.dtype, shape: o.shape }));
    for (const o of outputs) this.produced.add(o.name);
    this.nodes.push({
      opType,
      inputs: inputs.map((i) => (typeof i === 'string' ? i : i.name)),
      outputs: outputs.map((o) => o.name),
      attributes,
      domain,
    });
    return outputs;
  }

  private node1(
    opType: string,
    inputs: Array<Tensor | string>,
    dtype: DataType,
    shape: readonly Dim[],
    attributes?: Record<string, AttributeValue>,
    domain?: string,
  ): Tensor {
    return this.node(opType, inputs, [{ dtype, shape }], attributes, domain)[0];
  }

  private record(inputs: Tensor[], outputs: Tensor[], backward: Backward): void {
    if (this.recording) this.tape.push({ inputs, outputs, backward });
  }

  /** Run `fn` without recording gradients (labels, masks, shapes...). */
  noGrad<R>(fn: () => R): R {
    const was = this.recording;
    this.recording = false;
    try {
      return fn();
    } finally {
      this.recording = was;
    }
  }

  // ---------- constants ----------

  private constant(key: string, dtype: DataType, shape: number[], bytes: Uint8Array): Tensor {
    const cached = this.consts.get(key);
    if (cached) return cached;
    const t = this.addInitializer(this.fresh('const'), dtype, shape, bytes);
    this.consts.set(key, t);
    return t;
  }

  /** A scalar of the graph's float type (or `dtype`). */
  scalar(v: number, dtype: DataType = this.float): Tensor {
    let bytes: Uint8Array;
    if (dtype === DataType.FLOAT) bytes = new Uint8Array(new Float32Array([v]).buffer);
    else if (dtype === DataType.DOUBLE) bytes = new Uint8Array(new Float64Array([v]).buffer);
    else if (dtype === DataType.INT64) bytes = new Uint8Array(new BigInt64Array([BigInt(v)]).buffer);
    else throw new Error(`scalar: unsupported dtype ${dtype}`);
    return this.constant(`s:${dtype}:${v}`, dtype, [], bytes);
  }

  /** A 1-D int64 constant (axes, shapes, split sizes). */
  ints(values: number[]): Tensor {
    const bytes = new Uint8Array(new BigInt64Array(values.map((v) => BigInt(v))).buffer);
    return this.constant(`i:${values.join(',')}`, DataType.INT64, [values.length], bytes);
  }

  /** A float constant of the graph's float type with a given shape. */
  floats(values: ArrayLike<number>, shape: number[]): Tensor {
    const bytes =
      this.float === DataType.DOUBLE
        ? new Uint8Array(Float64Array.from(values).buffer)
        : new Uint8Array(Float32Array.from(values).buffer);
    return this.addInitializer(this.fresh('const'), this.float, shape, bytes);
  }

  // ---------- non-differentiable helpers ----------

  /** Shape of `x` (optionally a [start, end) slice of it) as a 1-D int64 tensor. */
  shapeOf(x: Tensor, start?: number, end?: number): Tensor {
    const attrs: Record<string, AttributeValue> = {};
    if (start !== undefined) attrs.start = start;
    if (end !== undefined) attrs.end = end;
    const n = (end ?? x.shape.length) - (start ?? 0);
    return this.node1('Shape', [x], DataType.INT64, [n < 0 ? x.shape.length + n : n], attrs);
  }

  cast(x: Tensor, to: DataType): Tensor {
    return this.node1('Cast', [x], to, x.shape, { to });
  }

  /** x with a column of ones appended on its last axis ([..., d] → [..., d + 1]; the bias column of ã). */
  withOnes(x: Tensor): Tensor {
    const rank = x.shape.length;
    const shape = this.concatInts([this.shapeOf(x, 0, rank - 1), this.ints([1])]);
    const one = new Uint8Array((this.float === DataType.DOUBLE ? new Float64Array([1]) : new Float32Array([1])).buffer);
    const ones = this.node1('ConstantOfShape', [shape], this.float, [...x.shape.slice(0, -1), 1], {
      value: { name: 'value', dataType: this.float, dims: [1], raw: one },
    });
    return this.concat([x, ones], rank - 1);
  }

  zerosLike(x: Tensor): Tensor {
    return this.node1('ConstantOfShape', [this.shapeOf(x)], x.dtype, x.shape, {
      value: { name: 'value', dataType: x.dtype, dims: [1], raw: zeroBytes(x.dtype) },
    });
  }

  concatInts(parts: Tensor[]): Tensor {
    const n = parts.reduce((s, p) => s + (p.shape[0] as number), 0);
    return this.node1('Concat', parts, DataType.INT64, [n], { axis: 0 });
  }

  // ---------- differentiable ops ----------

  /** Sum `gy` over the axes along which `x` was broadcast, back to x's shape. */
  unbroadcast(gy: Tensor, x: Tensor): Tensor {
    if (gy.shape.length === x.shape.length && gy.shape.every((d, i) => dimEq(d, x.shape[i]))) return gy;
    const k = gy.shape.length - x.shape.length;
    const axes: number[] = [];
    for (let i = 0; i < gy.shape.length; i++) {
      if (i < k) axes.push(i);
      else if (x.shape[i - k] === 1 && gy.shape[i] !== 1) axes.push(i);
    }
    let r = gy;
    if (axes.length) {
      const shape = gy.shape.map((d, i) => (axes.includes(i) ? 1 : d));
      r = this.node1('ReduceSum', [gy, this.ints(axes)], gy.dtype, shape, { keepdims: 1 });
    }
    if (k > 0) r = this.node1('Reshape', [r, this.shapeOf(x)], x.dtype, x.shape);
    return r;
  }

  private binary(op: string, a: Tensor, b: Tensor): Tensor {
    return this.node1(op, [a, b], a.dtype, broadcastShapes(a.shape, b.shape));
  }

  add(a: Tensor, b: Tensor): Tensor {
    const y = this.binary('Add', a, b);
    this.record([a, b], [y], ([gy], [na, nb]) => [
      na ? this.unbroadcast(gy!, a) : null,
      nb ? this.unbroadcast(gy!, b) : null,
    ]);
    return y;
  }

  sub(a: Tensor, b: Tensor): Tensor {
    const y = this.binary('Sub', a, b);
    this.record([a, b], [y], ([gy], [na, nb]) => [
      na ? this.unbroadcast(gy!, a) : null,
      nb ? this.unbroadcast(this.neg(gy!), b) : null,
    ]);
    return y;
  }

  mul(a: Tensor, b: Tensor): Tensor {
    const y = this.binary('Mul', a, b);
    this.record([a, b], [y], ([gy], [na, nb]) => [
      na ? this.unbroadcast(this.mul(gy!, b), a) : null,
      nb ? this.unbroadcast(this.mul(gy!, a), b) : null,
    ]);
    return y;
  }

  div(a: Tensor, b: Tensor): Tensor {
    const y = this.binary('Div', a, b);
    this.record([a, b], [y], ([gy], [na, nb]) => {
      const ga = this.div(gy!, b);
      return [na ? this.unbroadcast(ga, a) : null, nb ? this.unbroadcast(this.neg(this.mul(ga, y)), b) : null];
    });
    return y;
  }

  neg(x: Tensor): Tensor {
    const y = this.node1('Neg', [x], x.dtype, x.shape);
    this.record([x], [y], ([gy]) => [this.neg(gy!)]);
    return y;
  }

  private unary(op: string, x: Tensor, backward: (gy: Tensor, y: Tensor) => Tensor): Tensor {
    const y = this.node1(op, [x], x.dtype, x.shape);
    this.record([x], [y], ([gy]) => [backward(gy!, y)]);
    return y;
  }

  exp(x: Tensor): Tensor {
    return this.unary('Exp', x, (gy, y) => this.mul(gy, y));
  }

  log(x: Tensor): Tensor {
    return this.unary('Log', x, (gy) => this.div(gy, x));
  }

  sqrt(x: Tensor): Tensor {
    return this.unary('Sqrt', x, (gy, y) => this.div(this.mul(gy, this.scalar(0.5)), y));
  }

  tanh(x: Tensor): Tensor {
    return this.unary('Tanh', x, (gy, y) => this.mul(gy, this.sub(this.scalar(1), this.mul(y, y))));
  }

  sigmoid(x: Tensor): Tensor {
    return this.unary('Sigmoid', x, (gy, y) => this.mul(gy, this.mul(y, this.sub(this.scalar(1), y))));
  }

  erf(x: Tensor): Tensor {
    // d/dx erf(x) = 2/sqrt(pi) * exp(-x^2)
    const backward = (gy: Tensor) =>
      this.mul(gy, this.mul(this.scalar(2 / Math.sqrt(Math.PI)), this.exp(this.neg(this.mul(x, x)))));
    if (x.dtype !== DataType.DOUBLE) return this.unary('Erf', x, backward);
    // ORT has no fp64 Erf kernel (only fp64 checks build such graphs). Use the series
    // erf(x) = 2/√π · e^(−x²) · Σ_n 2ⁿ x^(2n+1) / (1·3·…·(2n+1)): all terms share a sign (no
    // cancellation), and 110 terms reach double precision for |x| ≤ 6 (erf(6) = 1 − 2e-17).
    const y = this.noGrad(() => {
      const xc = this.node1('Clip', [x, this.scalar(-6), this.scalar(6)], x.dtype, x.shape);
      const x2 = this.mul(xc, xc);
      let term = xc;
      let sum = xc;
      for (let n = 1; n <= 110; n++) {
        term = this.mul(this.mul(term, x2), this.scalar(2 / (2 * n + 1)));
        sum = this.add(sum, term);
      }
      return this.mul(this.mul(sum, this.exp(this.neg(x2))), this.scalar(2 / Math.sqrt(Math.PI)));
    });
    this.record([x], [y], ([gy]) => [backward(gy!)]);
    return y;
  }

  /** x^p for a constant exponent p. */
  pow(x: Tensor, p: number): Tensor {
    const y = this.node1('Pow', [x, this.scalar(p)], x.dtype, x.shape);
    this.record([x], [y], ([gy]) => [this.mul(gy!, this.mul(this.scalar(p), this.pow(x, p - 1)))]);
    return y;
  }

  /** Batched matrix product over the last two axes (numpy broadcasting on the rest). */
  matmul(a: Tensor, b: Tensor): Tensor {
    const batch = broadcastShapes(a.shape.slice(0, -2), b.shape.slice(0, -2));
    const shape = [...batch, a.shape[a.shape.length - 2], b.shape[b.shape.length - 1]];
    const y = this.node1('MatMul', [a, b], a.dtype, shape);
    this.record([a, b], [y], ([gy], [na, nb]) => [
      na ? this.unbroadcast(this.matmul(gy!, this.swapLast(b)), a) : null,
      nb ? this.unbroadcast(this.matmul(this.swapLast(a), gy!), b) : null,
    ]);
    return y;
  }

  private swapLast(x: Tensor): Tensor {
    const n = x.shape.length;
    const perm = [...Array(n).keys()];
    [perm[n - 2], perm[n - 1]] = [perm[n - 1], perm[n - 2]];
    return this.transpose(x, perm);
  }

  /**
   * y = a · op(b) (+ c), a: [N, k]. `transB` when b is stored [n, k] (torch Linear),
   * not when it is [k, n] (GPT-2 Conv1D). No weight copy either way.
   */
  gemm(a: Tensor, b: Tensor, c: Tensor | null, transB: boolean): Tensor {
    const n = transB ? b.shape[0] : b.shape[1];
    const y = this.node1('Gemm', c ? [a, b, c] : [a, b], a.dtype, [a.shape[0], n], { transB: transB ? 1 : 0 });
    this.record(c ? [a, b, c] : [a, b], [y], ([gy], [na, nb, nc]) => {
      const g = gy!;
      // dA = gy · op(b)ᵀ ; dB = aᵀ gy (or its transpose when b is stored transposed)
      const ga = na ? this.node1('Gemm', [g, b], a.dtype, a.shape, { transB: transB ? 0 : 1 }) : null;
      const gb = !nb
        ? null
        : transB
          ? this.node1('Gemm', [g, a], b.dtype, b.shape, { transA: 1 })
          : this.node1('Gemm', [a, g], b.dtype, b.shape, { transA: 1 });
      const gc = c && nc ? this.node1('ReduceSum', [g, this.ints([0])], c.dtype, c.shape, { keepdims: 0 }) : null;
      return c ? [ga, gb, gc] : [ga, gb];
    });
    return y;
  }

  /** ONNX Reshape semantics: 0 copies the input dim, -1 is inferred. `shape` may be a tensor. */
  reshape(x: Tensor, shape: number[] | Tensor, staticShape?: Dim[]): Tensor {
    let out: Dim[];
    let shapeT: Tensor;
    if (Array.isArray(shape)) {
      shapeT = this.ints(shape);
      out = shape.map((d, i) => (d === 0 ? x.shape[i] : d));
      const inf = shape.indexOf(-1);
      if (inf >= 0) {
        const known = out.filter((_, i) => i !== inf);
        out[inf] = divideDims(x.shape, known);
      }
    } else {
      if (!staticShape) throw new Error('reshape by tensor needs the static shape');
      shapeT = shape;
      out = staticShape;
    }
    const y = this.node1('Reshape', [x, shapeT], x.dtype, out);
    this.record([x], [y], ([gy]) => [this.node1('Reshape', [gy!, this.shapeOf(x)], x.dtype, x.shape)]);
    return y;
  }

  transpose(x: Tensor, perm: number[]): Tensor {
    const y = this.node1(
      'Transpose',
      [x],
      x.dtype,
      perm.map((p) => x.shape[p]),
      { perm },
    );
    const inv = perm.map((_, i) => perm.indexOf(i));
    this.record([x], [y], ([gy]) => [this.transpose(gy!, inv)]);
    return y;
  }

  softmax(x: Tensor, axis = -1): Tensor {
    const y = this.node1('Softmax', [x], x.dtype, x.shape, { axis });
    this.record([x], [y], ([gy]) => {
      const dot = this.reduceSum(this.mul(gy!, y), [axis], true);
      return [this.mul(y, this.sub(gy!, dot))];
    });
    return y;
  }

  logSoftmax(x: Tensor, axis = -1): Tensor {
    const y = this.node1('LogSoftmax', [x], x.dtype, x.shape, { axis });
    this.record([x], [y], ([gy]) => [this.sub(gy!, this.mul(this.exp(y), this.reduceSum(gy!, [axis], true)))]);
    return y;
  }

  private reducedShape(x: Tensor, axes: number[], keep: boolean): Dim[] {
    const norm = axes.map((a) => (a < 0 ? a + x.shape.length : a));
    return keep ? x.shape.map((d, i) => (norm.includes(i) ? 1 : d)) : x.shape.filter((_, i) => !norm.includes(i));
  }

  private expandBack(gy: Tensor, x: Tensor, axes: number[], keep: boolean): Tensor {
    const g = keep ? gy : this.node1('Unsqueeze', [gy, this.ints(axes)], gy.dtype, this.reducedShape(x, axes, true));
    return this.node1('Expand', [g, this.shapeOf(x)], gy.dtype, x.shape);
  }

  reduceSum(x: Tensor, axes: number[], keepdims: boolean): Tensor {
    const y = this.node1('ReduceSum', [x, this.ints(axes)], x.dtype, this.reducedShape(x, axes, keepdims), {
      keepdims: keepdims ? 1 : 0,
    });
    this.record([x], [y], ([gy]) => [this.expandBack(gy!, x, axes, keepdims)]);
    return y;
  }

  /** Mean over axes of fixed size (norms reduce over the hidden dimension). */
  reduceMean(x: Tensor, axes: number[], keepdims: boolean): Tensor {
    let count = 1;
    for (const a of axes) {
      const d = x.shape[a < 0 ? a + x.shape.length : a];
      if (typeof d !== 'number') throw new Error('reduceMean over a symbolic axis');
      count *= d;
    }
    const y = this.node1('ReduceMean', [x, this.ints(axes)], x.dtype, this.reducedShape(x, axes, keepdims), {
      keepdims: keepdims ? 1 : 0,
    });
    this.record([x], [y], ([gy]) => [this.expandBack(this.mul(gy!, this.scalar(1 / count)), x, axes, keepdims)]);
    return y;
  }

  /** Split along `axis` into pieces of the given (fixed) sizes. */
  split(x: Tensor, sizes: number[], axis: number): Tensor[] {
    const ax = axis < 0 ? axis + x.shape.length : axis;
    const outs = this.node(
      'Split',
      [x, this.ints(sizes)],
      sizes.map((s) => ({ dtype: x.dtype, shape: x.shape.map((d, i) => (i === ax ? s : d)) })),
      { axis: ax },
    );
    this.record([x], outs, (gys) => [
      this.node1(
        'Concat',
        gys.map((g, i) => g ?? this.zerosLike(outs[i])),
        x.dtype,
        x.shape,
        { axis: ax },
      ),
    ]);
    return outs;
  }

  concat(xs: Tensor[], axis: number): Tensor {
    const ax = axis < 0 ? axis + xs[0].shape.length : axis;
    const sizes = xs.map((x) => x.shape[ax]);
    const total = sizes.every((s) => typeof s === 'number') ? (sizes as number[]).reduce((a, b) => a + b, 0) : '?';
    const y = this.node1(
      'Concat',
      xs,
      xs[0].dtype,
      xs[0].shape.map((d, i) => (i === ax ? total : d)),
      { axis: ax },
    );
    this.record(xs, [y], ([gy]) => {
      if (!sizes.every((s) => typeof s === 'number')) throw new Error('concat backward needs fixed sizes');
      return this.node('Split', [gy!, this.ints(sizes as number[])], xs, { axis: ax });
    });
    return y;
  }

  /** Embedding lookup: table [V, d] rows picked by int64 ids. */
  gatherRows(table: Tensor, ids: Tensor): Tensor {
    const y = this.node1('Gather', [table, ids], table.dtype, [...ids.shape, ...table.shape.slice(1)], { axis: 0 });
    this.record([table, ids], [y], ([gy], [nt]) => {
      if (!nt) return [null, null];
      const idx = this.node1('Unsqueeze', [ids, this.ints([-1])], DataType.INT64, [...ids.shape, 1]);
      const gt = this.node1('ScatterND', [this.zerosLike(table), idx, gy!], table.dtype, table.shape, {
        reduction: 'add',
      });
      return [gt, null];
    });
    return y;
  }

  unsqueeze(x: Tensor, axes: number[]): Tensor {
    const shape = [...x.shape];
    for (const a of [...axes].sort((p, q) => p - q)) shape.splice(a < 0 ? a + shape.length + 1 : a, 0, 1);
    const y = this.node1('Unsqueeze', [x, this.ints(axes)], x.dtype, shape);
    this.record([x], [y], ([gy]) => [this.node1('Reshape', [gy!, this.shapeOf(x)], x.dtype, x.shape)]);
    return y;
  }

  /** Broadcast `x` to a shape given as an int64 tensor (static shape known to the caller). */
  expand(x: Tensor, shape: Tensor, staticShape: Dim[]): Tensor {
    const y = this.node1('Expand', [x, shape], x.dtype, staticShape);
    this.record([x], [y], ([gy]) => [this.unbroadcast(gy!, x)]);
    return y;
  }

  /**
   * Register a composite op: `outputs` were computed from `inputs` by ops emitted under
   * noGrad(), and `backward` gives the input gradients directly (e.g. cross-entropy).
   */
  custom(inputs: Tensor[], outputs: Tensor[], backward: Backward): void {
    this.record(inputs, outputs, backward);
  }

  /**
   * An ONNX Loop of `trips` iterations (int64 scalar), recorded without a gradient (wrap it in
   * `custom`). `body(b, i, carried)` builds one iteration in the child graph `b` from the
   * iteration number `i` (int64 scalar) and the loop-carried values (`init` on the first
   * iteration), reading outer tensors directly, and returns the next carried values and the
   * per-iteration `scans`, which the Loop stacks along a new first axis (ONNX Runtime requires
   * every iteration's to have the same shape). Returns the final carried values, then the
   * stacked scans ([trips, ...scan shape]). Each iteration's intermediates are freed before the
   * next one runs, which is what a loop is for here: memory bounded by one iteration's.
   */
  loop(
    trips: Tensor,
    init: Tensor[],
    scans: Array<{ dtype: DataType; shape: readonly Dim[] }>,
    body: (b: Graph, i: Tensor, carried: Tensor[]) => { carried: Tensor[]; scans: Tensor[] },
  ): Tensor[] {
    const b = new Graph(this.float, this);
    const input = (prefix: string, dtype: DataType, shape: Dim[]): Tensor => {
      const name = b.fresh(prefix);
      b.inputs.push({ name, dataType: dtype, shape });
      return { name, dtype, shape };
    };
    const i = input('loop_iter', DataType.INT64, []);
    const cond = input('loop_cond', DataType.BOOL, []);
    const carriedIn = init.map((t) => input('loop_carried', t.dtype, [...t.shape]));
    const res = body(b, i, carriedIn);
    if (res.carried.length !== init.length || res.scans.length !== scans.length)
      throw new Error('loop: the body returned the wrong number of values');
    // every body output under a name of its own (an outer tensor or an input cannot be one)
    for (const t of [cond, ...res.carried, ...res.scans]) {
      const [o] = b.node('Identity', [t], [t]);
      b.outputs.push({ name: o.name, dataType: t.dtype });
    }
    const trip = trips.shape.length === 0 ? trips : this.node1('Reshape', [trips, this.ints([])], DataType.INT64, []);
    return this.node(
      'Loop',
      [trip, '', ...init],
      [
        ...init.map((t) => ({ dtype: t.dtype, shape: t.shape })),
        ...scans.map((s) => ({ dtype: s.dtype, shape: ['K', ...s.shape] })),
      ],
      {
        body: {
          graph: { graphName: this.fresh('loop_body'), ...b.graphParts() },
        },
      },
    );
  }

  private graphParts() {
    return { nodes: this.nodes, initializers: this.initializers, inputs: this.inputs, outputs: this.outputs };
  }

  // ---------- reverse mode ----------

  /**
   * Gradients of the scalar `loss` with respect to each tensor of `wrt` (graph inputs,
   * initializers or intermediate tensors). Returns null where `loss` does not depend on it.
   */
  grad(loss: Tensor, wrt: Tensor[]): Map<string, Tensor | null> {
    if (loss.shape.length !== 0) throw new Error('grad: loss must be a scalar');
    const want = new Set(wrt.map((t) => t.name));
    // Forward pass over the tape: which tensors depend on something in `wrt`.
    const live = new Set(want);
    for (const e of this.tape) if (e.inputs.some((i) => live.has(i.name))) for (const o of e.outputs) live.add(o.name);
    if (!live.has(loss.name)) throw new Error('grad: loss does not depend on the requested tensors');

    const parts = new Map<string, Tensor[]>();
    const summed = new Map<string, Tensor>();
    const gradOf = (t: Tensor): Grad => {
      const done = summed.get(t.name);
      if (done) return done;
      const p = parts.get(t.name);
      if (!p?.length) return null;
      let s = p[0];
      for (let i = 1; i < p.length; i++) s = this.node1('Add', [s, p[i]], s.dtype, s.shape);
      summed.set(t.name, s);
      return s;
    };
    const addPart = (t: Tensor, g: Tensor) => {
      if (summed.has(t.name)) throw new Error(`grad: gradient of ${t.name} used before complete`);
      const p = parts.get(t.name);
      if (p) p.push(g);
      else parts.set(t.name, [g]);
    };
    parts.set(loss.name, [this.scalar(1, loss.dtype)]);

    this.noGrad(() => {
      for (let k = this.tape.length - 1; k >= 0; k--) {
        const e = this.tape[k];
        if (!e.inputs.some((i) => live.has(i.name))) continue;
        const gys = e.outputs.map(gradOf);
        if (gys.every((g) => g === null)) continue;
        const gxs = e.backward(
          gys,
          e.inputs.map((i) => live.has(i.name)),
        );
        e.inputs.forEach((x, i) => {
          const g = gxs[i];
          if (g && live.has(x.name)) addPart(x, g);
        });
      }
    });
    const out = new Map<string, Tensor | null>();
    for (const t of wrt) out.set(t.name, gradOf(t));
    return out;
  }

  toModel(name = 'influence_lens'): ModelProto {
    // (a tensor is output once: a second name for it is an alias, so no renamed tensor is also an output under its own name)
    const nodes = this.renames.size ? renamed(this.nodes, this.renames) : this.nodes;
    return {
      graphName: name,
      ...this.graphParts(),
      nodes,
      opsets: [
        { domain: '', version: OPSET },
        { domain: MS_DOMAIN, version: 1 },
      ],
    };
  }

  encode(name?: string): Uint8Array {
    return encodeModel(this.toModel(name));
  }
}

function zeroBytes(dt: DataType): Uint8Array {
  return new Uint8Array(elemBytes(dt));
}

/** Static size of the -1 dimension of a reshape: prod(input) / prod(known). */
function divideDims(input: readonly Dim[], known: readonly Dim[]): Dim {
  let num = 1;
  const syms: string[] = [];
  for (const d of input) {
    if (typeof d === 'number') num *= d;
    else syms.push(...d.split('*'));
  }
  for (const d of known) {
    if (typeof d === 'number') num /= d;
    else
      for (const s of d.split('*')) {
        const i = syms.indexOf(s);
        if (i < 0) return '?';
        syms.splice(i, 1);
      }
  }
  if (!syms.length) return num;
  return dimProduct([...(num !== 1 ? [num] : []), ...syms]);
}

/**
 * `nodes` with tensors renamed, Loop bodies included: a body reads outer tensors by name, and
 * names are unique across the outermost graph and its bodies (`Graph.fresh`), so one map serves all.
 */
function renamed(nodes: NodeProto[], rename: Map<string, string>): NodeProto[] {
  const r = (n: string) => rename.get(n) ?? n;
  return nodes.map((n) => {
    let attributes = n.attributes;
    if (attributes && Object.values(attributes).some((v) => typeof v === 'object' && v !== null && 'graph' in v)) {
      attributes = Object.fromEntries(
        Object.entries(attributes).map(([k, v]) =>
          typeof v === 'object' && v !== null && 'graph' in v
            ? [k, { graph: { ...v.graph, nodes: renamed(v.graph.nodes, rename) } }]
            : [k, v],
        ),
      );
    }
    return { ...n, inputs: n.inputs.map(r), outputs: n.outputs.map(r), attributes };
  });
}
