// Splitting a dynamic axis of n rows into equal chunks for an ONNX Loop (the LM head's tokens in
// model/head.ts, attention's queries in architectures/common.ts): ONNX Runtime's Loop wants every
// iteration's scan outputs the same shape, so the axis is padded to K·c rows.
import { DataType, type Graph, type Tensor } from './graph';

const I = DataType.INT64;
const int = (g: Graph, op: string, a: Tensor, b: Tensor) => g.node(op, [a, b], [{ dtype: I, shape: [1] }])[0];

export interface ChunkPlan {
  /** [1] int64: the number of chunks K = ⌈n / rows⌉ (at least 1) */
  k: Tensor;
  /** [1] int64: rows per chunk c = ⌈n / K⌉, so fewer than K rows of padding, not up to a chunk */
  c: Tensor;
  /** [1] int64: K·c − n rows of padding */
  pad: Tensor;
}

/** The plan for n ([1] int64) rows taken at most `rows` ([1] int64, ≥ 1) at a time. */
export function chunkPlan(g: Graph, n: Tensor, rows: Tensor): ChunkPlan {
  const one = g.ints([1]);
  const k = int(g, 'Max', int(g, 'Div', int(g, 'Sub', int(g, 'Add', n, rows), one), rows), one);
  const c = int(g, 'Div', int(g, 'Sub', int(g, 'Add', n, k), one), k);
  return { k, c, pad: int(g, 'Sub', int(g, 'Mul', k, c), n) };
}

/** Inside a loop body `b`: rows [start, end) of chunk `i` (the iteration number, int64 scalar). */
export function chunkBounds(b: Graph, i: Tensor, c: Tensor): { start: Tensor; end: Tensor } {
  const start = int(b, 'Mul', b.node('Unsqueeze', [i, b.ints([0])], [{ dtype: I, shape: [1] }])[0], c);
  return { start, end: int(b, 'Add', start, c) };
}

/** A test's override of the rows per chunk, refused unless a positive integer. */
export function checkRows(what: string, rows: number): number {
  if (!Number.isInteger(rows) || rows < 1) throw new Error(`${what} rows must be a positive integer, got ${rows}`);
  return rows;
}
