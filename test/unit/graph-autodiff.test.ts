// Every differentiable op of the graph builder, checked against central finite
// differences run through ONNX Runtime itself (fp64 where ORT has fp64 kernels).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DataType, type Graph as G, Graph, type Tensor } from '../../src/server/model/onnx/graph';
import { createSession, ort } from '../../src/server/model/onnx/session';

function rng(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
}

interface Case {
  name: string;
  shapes: number[][];
  fn: (g: G, xs: Tensor[]) => Tensor;
  dtype?: DataType;
  positive?: boolean;
  tol?: number;
}

async function check(c: Case): Promise<void> {
  const dtype = c.dtype ?? DataType.DOUBLE;
  const g = new Graph(dtype);
  const xs = c.shapes.map((s, i) => g.input(`x${i}`, dtype, s));
  const y = c.fn(g, xs);
  // f = sum(r ⊙ y) with fixed random r so every output element matters differently
  const rand = rng(7);
  const size = y.shape.reduce<number>((a, d) => a * (d as number), 1);
  const r = g.floats(
    Array.from({ length: size }, () => rand()),
    y.shape as number[],
  );
  const f = g.reduceSum(g.mul(y, r), [...y.shape.keys()], false);
  const grads = g.grad(f, xs);
  g.output(f, 'f');
  xs.forEach((x, i) => {
    const gx = grads.get(x.name);
    assert.ok(gx, `${c.name}: no gradient for x${i}`);
    g.output(gx, `g${i}`);
  });
  const sess = await createSession(g.encode(), { threads: 1 });
  const Arr = dtype === DataType.DOUBLE ? Float64Array : Float32Array;
  const ortType = dtype === DataType.DOUBLE ? 'float64' : 'float32';
  const rx = rng(11);
  const vals = c.shapes.map((s) => {
    const v = new Arr(s.reduce((a, b) => a * b, 1));
    for (let j = 0; j < v.length; j++) v[j] = c.positive ? 0.5 + Math.abs(rx()) : rx() * 2;
    return v;
  });
  const run = async (vs: Float64Array[] | Float32Array[]) => {
    const feeds: Record<string, ort.Tensor> = {};
    vs.forEach((v, i) => {
      feeds[`x${i}`] = new ort.Tensor(ortType, v, c.shapes[i]);
    });
    return sess.run(feeds);
  };
  const base = await run(vals as Float64Array[]);
  const eps = dtype === DataType.DOUBLE ? 1e-6 : 1e-2;
  const tol = c.tol ?? (dtype === DataType.DOUBLE ? 1e-6 : 2e-3);
  for (let i = 0; i < vals.length; i++) {
    const analytic = base[`g${i}`].data as Float64Array;
    for (let j = 0; j < vals[i].length; j++) {
      const plus = vals.map((v) => v.slice()) as Float64Array[];
      const minus = vals.map((v) => v.slice()) as Float64Array[];
      plus[i][j] += eps;
      minus[i][j] -= eps;
      const fp = Number((await run(plus)).f.data[0]);
      const fm = Number((await run(minus)).f.data[0]);
      const numeric = (fp - fm) / (2 * eps);
      const err = Math.abs(numeric - analytic[j]) / Math.max(1, Math.abs(numeric));
      assert.ok(err < tol, `${c.name}: d/dx${i}[${j}] analytic ${analytic[j]} vs numeric ${numeric}`);
    }
  }
}

const cases: Case[] = [
  { name: 'add broadcast', shapes: [[2, 3], [3]], fn: (g, [a, b]) => g.add(a, b) },
  {
    name: 'sub broadcast',
    shapes: [
      [2, 1, 3],
      [4, 1],
    ],
    fn: (g, [a, b]) => g.sub(a, b),
  },
  {
    name: 'mul broadcast',
    shapes: [
      [2, 3],
      [2, 1],
    ],
    fn: (g, [a, b]) => g.mul(a, b),
  },
  { name: 'div', shapes: [[2, 3], [3]], fn: (g, [a, b]) => g.div(a, b), positive: true },
  { name: 'exp/log/sqrt', shapes: [[5]], fn: (g, [a]) => g.add(g.exp(a), g.mul(g.log(a), g.sqrt(a))), positive: true },
  { name: 'tanh/sigmoid', shapes: [[6]], fn: (g, [a]) => g.mul(g.tanh(a), g.sigmoid(a)) },
  { name: 'pow', shapes: [[4]], fn: (g, [a]) => g.pow(a, 3) },
  { name: 'erf (fp32)', shapes: [[6]], fn: (g, [a]) => g.erf(a), dtype: DataType.FLOAT },
  {
    name: 'matmul batched',
    shapes: [
      [2, 3, 4],
      [2, 4, 2],
    ],
    fn: (g, [a, b]) => g.matmul(a, b),
  },
  {
    name: 'matmul broadcast',
    shapes: [
      [2, 3, 4],
      [4, 2],
    ],
    fn: (g, [a, b]) => g.matmul(a, b),
  },
  { name: 'gemm transB + bias', shapes: [[3, 4], [5, 4], [5]], fn: (g, [a, b, c]) => g.gemm(a, b, c, true) },
  {
    name: 'gemm',
    shapes: [
      [3, 4],
      [4, 5],
    ],
    fn: (g, [a, b]) => g.gemm(a, b, null, false),
  },
  { name: 'reshape/transpose', shapes: [[2, 6]], fn: (g, [a]) => g.transpose(g.reshape(a, [0, 2, 3]), [2, 0, 1]) },
  { name: 'softmax', shapes: [[2, 5]], fn: (g, [a]) => g.softmax(a, -1) },
  { name: 'logSoftmax', shapes: [[2, 5]], fn: (g, [a]) => g.logSoftmax(a, -1) },
  { name: 'reduceSum', shapes: [[2, 3, 4]], fn: (g, [a]) => g.reduceSum(a, [1], false) },
  { name: 'reduceMean keep', shapes: [[2, 3, 4]], fn: (g, [a]) => g.mul(g.reduceMean(a, [-1], true), a) },
  {
    name: 'split/concat',
    shapes: [[2, 6]],
    fn: (g, [a]) => {
      const [p, q, r] = g.split(a, [1, 2, 3], 1);
      return g.concat([g.mul(r, r), p, g.neg(q)], 1);
    },
  },
  {
    name: 'split with unused piece',
    shapes: [[2, 4]],
    fn: (g, [a]) => g.split(a, [3, 1], 1)[0],
  },
  { name: 'unsqueeze', shapes: [[3]], fn: (g, [a]) => g.mul(g.unsqueeze(a, [0]), g.unsqueeze(a, [1])) },
  {
    name: 'expand',
    shapes: [[1, 3]],
    fn: (g, [a]) => g.expand(a, g.ints([4, 3]), [4, 3]),
  },
];

for (const c of cases) test(`autodiff: ${c.name}`, () => check(c));

test('autodiff: embedding gather with repeated ids', async () => {
  const g = new Graph(DataType.DOUBLE);
  const table = g.input('table', DataType.DOUBLE, [4, 3]);
  const ids = g.input('ids', DataType.INT64, [5]);
  const y = g.gatherRows(table, ids);
  const f = g.reduceSum(g.mul(y, y), [0, 1], false);
  g.output(g.grad(f, [table]).get('table')!, 'gt');
  const sess = await createSession(g.encode());
  const t = Float64Array.from({ length: 12 }, (_, i) => i / 10);
  const idv = [0, 2, 2, 3, 0];
  const out = await sess.run({
    table: new ort.Tensor('float64', t, [4, 3]),
    ids: new ort.Tensor('int64', BigInt64Array.from(idv.map(BigInt)), [5]),
  });
  const gt = out.gt.data as Float64Array;
  // d/dT[r] sum over lookups of T[id]^2 = 2 * count(r) * T[r]
  for (let r = 0; r < 4; r++)
    for (let c = 0; c < 3; c++) {
      const count = idv.filter((v) => v === r).length;
      assert.ok(Math.abs(gt[r * 3 + c] - 2 * count * t[r * 3 + c]) < 1e-12);
    }
});

test('autodiff: gradient of an intermediate tensor', async () => {
  const g = new Graph(DataType.DOUBLE);
  const x = g.input('x', DataType.DOUBLE, [3]);
  const h = g.mul(x, x); // h = x², f = sum(h·x) ⇒ df/dh = x
  const f = g.reduceSum(g.mul(h, x), [0], false);
  g.output(g.grad(f, [h]).get(h.name)!, 'gh');
  const sess = await createSession(g.encode());
  const out = await sess.run({ x: new ort.Tensor('float64', Float64Array.from([1, -2, 3]), [3]) });
  assert.deepEqual(Array.from(out.gh.data as Float64Array), [1, -2, 3]);
});

test('fp64 erf (series, no ORT kernel) reaches double precision', async () => {
  const g = new Graph(DataType.DOUBLE);
  const x = g.input('x', DataType.DOUBLE, [7]);
  g.output(g.erf(x), 'y');
  const sess = await createSession(g.encode());
  const xs = [0, 0.5, 1, 2, -3, 5.5, 9];
  // reference values from Python math.erf / math.erfc
  const ref = [
    0,
    0.5204998778130465,
    0.8427007929497149,
    0.9953222650189527,
    -0.9999779095030014,
    1 - 7.357847917974398e-15,
    1,
  ];
  const out = await sess.run({ x: new ort.Tensor('float64', Float64Array.from(xs), [7]) });
  const y = out.y.data as Float64Array;
  for (let i = 0; i < xs.length; i++)
    assert.ok(Math.abs(y[i] - ref[i]) < 1e-15, `erf(${xs[i]}) = ${y[i]}, expected ${ref[i]}`);
});

test('a graph output renamed in place is still read by name inside a Loop body', async () => {
  const g = new Graph(DataType.DOUBLE);
  const x = g.input('x', DataType.DOUBLE, [3]);
  const h = g.mul(x, x);
  // h leaves as "h_out" (renamed in place, no Identity) and a Loop body reads it by its old name
  g.output(h, 'h_out');
  const [total] = g.loop(g.ints([2]), [g.scalar(0, DataType.DOUBLE)], [], (b, _i, [acc]) => ({
    carried: [b.add(acc, b.reduceSum(h, [0], false))],
    scans: [],
  }));
  g.output(total, 'total');
  const sess = await createSession(g.encode());
  const out = await sess.run({ x: new ort.Tensor('float64', Float64Array.from([1, -2, 3]), [3]) });
  assert.deepEqual(Array.from(out.h_out.data as Float64Array), [1, 4, 9]);
  assert.deepEqual(Array.from(out.total.data as Float64Array), [28]);
});

test('a tensor output under several names is one output; the other names alias it', async () => {
  const g = new Graph(DataType.DOUBLE);
  const x = g.input('x', DataType.DOUBLE, [3]);
  const h = g.mul(x, x);
  g.output(h, 'first');
  assert.equal(g.output(h, 'second').name, 'first');
  g.output(x, 'x_out'); // a graph input cannot be renamed: one Identity
  g.output(x, 'x_again');
  g.output(g.add(h, x), 'sum'); // read after the rename: the renamed tensor still feeds it
  assert.deepEqual(
    g.outputs.map((o) => o.name),
    ['first', 'x_out', 'sum'],
  );
  assert.deepEqual(
    [...g.aliases],
    [
      ['second', 'first'],
      ['x_again', 'x_out'],
    ],
  );
  const model = g.toModel();
  assert.equal(model.nodes.filter((n) => n.opType === 'Identity').length, 1);
  assert.throws(() => g.output(h, 'first'), /graph output first is declared twice/);
  assert.throws(() => g.output(h, 'sum'), /duplicate tensor name sum/);
  const sess = await createSession(g.encode());
  const out = await sess.run({ x: new ort.Tensor('float64', Float64Array.from([1, -2, 3]), [3]) });
  assert.deepEqual(Array.from(out.first.data as Float64Array), [1, 4, 9]);
  assert.deepEqual(Array.from(out.x_out.data as Float64Array), [1, -2, 3]);
  assert.deepEqual(Array.from(out.sum.data as Float64Array), [2, 2, 12]);
});
