// A minimal protobuf encoder for the parts of onnx.proto we emit (ModelProto, GraphProto,
// NodeProto, TensorProto, ValueInfoProto, AttributeProto). Field numbers follow onnx.proto
// (IR version 10). We only ever write; ONNX Runtime does the reading, so every test that runs
// a graph also checks the encoding.

export enum DataType {
  FLOAT = 1,
  UINT8 = 2,
  INT8 = 3,
  INT32 = 6,
  INT64 = 7,
  BOOL = 9,
  FLOAT16 = 10,
  DOUBLE = 11,
  BFLOAT16 = 16,
}

/** Growable byte sink with protobuf primitives. */
class Writer {
  private buf = new Uint8Array(256);
  len = 0;

  private ensure(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.len + n) cap *= 2;
    const next = new Uint8Array(cap);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  varint(v: number | bigint): void {
    // Negative int64 values use the 10-byte two's complement form.
    let x = BigInt.asUintN(64, BigInt(v));
    this.ensure(10);
    while (x >= 0x80n) {
      this.buf[this.len++] = Number(x & 0x7fn) | 0x80;
      x >>= 7n;
    }
    this.buf[this.len++] = Number(x);
  }

  tag(field: number, wire: number): void {
    this.varint((field << 3) | wire);
  }

  bytes(field: number, data: Uint8Array): void {
    this.tag(field, 2);
    this.varint(data.length);
    this.ensure(data.length);
    this.buf.set(data, this.len);
    this.len += data.length;
  }

  string(field: number, s: string): void {
    this.bytes(field, new TextEncoder().encode(s));
  }

  int(field: number, v: number | bigint): void {
    this.tag(field, 0);
    this.varint(v);
  }

  float(field: number, v: number): void {
    this.tag(field, 5);
    this.ensure(4);
    new DataView(this.buf.buffer, this.buf.byteOffset + this.len, 4).setFloat32(0, v, true);
    this.len += 4;
  }

  message(field: number, write: (w: Writer) => void): void {
    const inner = new Writer();
    write(inner);
    this.bytes(field, inner.finish());
  }

  finish(): Uint8Array {
    return this.buf.subarray(0, this.len);
  }
}

export type AttributeValue =
  | number
  | string
  | number[]
  | string[]
  | TensorProto
  | { float: number }
  | { graph: GraphProto };

export interface TensorProto {
  name: string;
  dataType: DataType;
  dims: number[];
  /** Inline little-endian bytes; or `external` to point at a file region (no copy). */
  raw?: Uint8Array;
  external?: { location: string; offset: number; length: number };
}

export interface NodeProto {
  opType: string;
  inputs: string[];
  outputs: string[];
  name?: string;
  domain?: string;
  attributes?: Record<string, AttributeValue>;
}

export interface ValueInfo {
  name: string;
  dataType: DataType;
  /** number = fixed size, string = symbolic dimension */
  shape?: Array<number | string>;
}

/** A graph: the model's main graph, or a control-flow node's body (Loop). */
export interface GraphProto {
  graphName: string;
  nodes: NodeProto[];
  initializers: TensorProto[];
  inputs: ValueInfo[];
  outputs: ValueInfo[];
}

export interface ModelProto extends GraphProto {
  opsets: Array<{ domain: string; version: number }>;
  irVersion?: number;
  producer?: string;
}

function writeTensor(w: Writer, t: TensorProto): void {
  for (const d of t.dims) w.int(1, d);
  w.int(2, t.dataType);
  w.string(8, t.name);
  if (t.raw) w.bytes(9, t.raw);
  if (t.external) {
    const entries: Array<[string, string]> = [
      ['location', t.external.location],
      ['offset', String(t.external.offset)],
      ['length', String(t.external.length)],
    ];
    for (const [k, v] of entries)
      w.message(13, (e) => {
        e.string(1, k);
        e.string(2, v);
      });
    w.int(14, 1); // data_location = EXTERNAL
  }
}

// AttributeProto.AttributeType
const ATTR_FLOAT = 1;
const ATTR_INT = 2;
const ATTR_STRING = 3;
const ATTR_TENSOR = 4;
const ATTR_GRAPH = 5;
const ATTR_INTS = 7;

function writeAttribute(w: Writer, name: string, v: AttributeValue): void {
  w.string(1, name);
  if (typeof v === 'number') {
    if (!Number.isInteger(v)) throw new Error(`attribute ${name}: use { float: x } for float values`);
    w.int(3, v);
    w.int(20, ATTR_INT);
  } else if (typeof v === 'string') {
    w.string(4, v);
    w.int(20, ATTR_STRING);
  } else if (Array.isArray(v)) {
    if (v.every((x) => typeof x === 'number')) {
      for (const x of v as number[]) w.int(8, x);
      w.int(20, ATTR_INTS);
    } else {
      throw new Error(`attribute ${name}: unsupported list type`);
    }
  } else if ('float' in v) {
    w.float(2, v.float);
    w.int(20, ATTR_FLOAT);
  } else if ('graph' in v) {
    w.message(6, (gw) => writeGraph(gw, v.graph));
    w.int(20, ATTR_GRAPH);
  } else {
    w.message(5, (t) => writeTensor(t, v));
    w.int(20, ATTR_TENSOR);
  }
}

function writeValueInfo(w: Writer, v: ValueInfo): void {
  w.string(1, v.name);
  w.message(2, (type) =>
    type.message(1, (tt) => {
      tt.int(1, v.dataType);
      if (v.shape)
        tt.message(2, (shape) => {
          for (const d of v.shape ?? [])
            shape.message(1, (dim) => (typeof d === 'number' ? dim.int(1, d) : dim.string(2, d)));
        });
    }),
  );
}

function writeGraph(g: Writer, m: GraphProto): void {
  for (const n of m.nodes)
    g.message(1, (nw) => {
      for (const i of n.inputs) nw.string(1, i);
      for (const o of n.outputs) nw.string(2, o);
      if (n.name) nw.string(3, n.name);
      nw.string(4, n.opType);
      for (const [k, v] of Object.entries(n.attributes ?? {})) nw.message(5, (a) => writeAttribute(a, k, v));
      if (n.domain) nw.string(7, n.domain);
    });
  g.string(2, m.graphName);
  for (const t of m.initializers) g.message(5, (tw) => writeTensor(tw, t));
  for (const v of m.inputs) g.message(11, (vw) => writeValueInfo(vw, v));
  for (const v of m.outputs) g.message(12, (vw) => writeValueInfo(vw, v));
}

/** Serialize a model to ONNX protobuf bytes. */
export function encodeModel(m: ModelProto): Uint8Array {
  const w = new Writer();
  w.int(1, m.irVersion ?? 10);
  w.string(2, m.producer ?? 'influence-lens');
  w.message(7, (g) => writeGraph(g, m));
  for (const o of m.opsets)
    w.message(8, (ow) => {
      if (o.domain) ow.string(1, o.domain);
      ow.int(2, o.version);
    });
  return w.finish();
}
