// The safetensors format: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, __metadata__: {…}}, then raw
// little-endian tensor bytes. We read headers and single tensors with positioned reads
// (never the whole file), and write atomically (temporary file + rename) so a crash never
// leaves a half-written file where a good one was.
import { createHash } from 'node:crypto';
import { closeSync, fstatSync, ftruncateSync, openSync, readSync, writeSync } from 'node:fs';
import { writeAtomicWith, writeAtomicWithAsync } from '../../common/atomic-write';
import { READ_NOWAIT } from '../../common/read-file';

export type DType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

const SIZES: Record<DType, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };
export const SUPPORTED_DTYPES = Object.keys(SIZES) as DType[];

export class SafetensorsError extends Error {}

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** absolute byte offset of the tensor's data in the file */
  byteOffset: number;
  byteLength: number;
}

export interface SafetensorsHeader {
  path: string;
  fileSize: number;
  /** where tensor data begins (8 + header length) */
  dataStart: number;
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

export type TypedArray =
  | Float64Array
  | Float32Array
  | Uint16Array
  | BigInt64Array
  | Int32Array
  | Int16Array
  | Int8Array
  | Uint8Array;

export interface TensorToWrite {
  dtype: DType;
  shape: number[];
  /** the values; converted to `dtype` when they are not already stored that way */
  data: TypedArray | ArrayLike<number>;
}

export function dtypeSize(dtype: DType): number {
  return SIZES[dtype];
}

/** Parse and validate the header of a safetensors file. */
export function readSafetensorsHeader(path: string): SafetensorsHeader {
  let fd: number;
  try {
    fd = openSync(path, READ_NOWAIT); // a pipe put in its place must not block: fstat refuses it below
  } catch (e) {
    throw new SafetensorsError(`${path}: cannot open (${(e as NodeJS.ErrnoException).code ?? e})`);
  }
  try {
    const stat = fstatSync(fd);
    if (!stat.isFile())
      throw new SafetensorsError(
        `${path}: not a safetensors file (${stat.isDirectory() ? 'a directory' : 'not a regular file'})`,
      );
    const fileSize = stat.size;
    if (fileSize < 8) throw new SafetensorsError(`${path}: not a safetensors file (only ${fileSize} bytes)`);
    const lenBuf = Buffer.alloc(8);
    readSync(fd, lenBuf, 0, 8, 0);
    const headerLen = Number(lenBuf.readBigUInt64LE(0));
    if (headerLen > 100 * 2 ** 20 || 8 + headerLen > fileSize)
      throw new SafetensorsError(
        `${path}: not a safetensors file (header length ${headerLen} does not fit in ${fileSize} bytes)`,
      );
    const hbuf = Buffer.alloc(headerLen);
    readSync(fd, hbuf, 0, headerLen, 8);
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(hbuf.toString('utf8'));
    } catch (e) {
      throw new SafetensorsError(`${path}: the header is not valid JSON (${(e as Error).message})`);
    }
    if (!json || typeof json !== 'object' || Array.isArray(json))
      throw new SafetensorsError(`${path}: the header is not a JSON object`);
    const dataStart = 8 + headerLen;
    const tensors = new Map<string, TensorInfo>();
    let metadata: Record<string, string> = {};
    for (const [name, raw] of Object.entries(json)) {
      if (name === '__metadata__') {
        metadata = (raw ?? {}) as Record<string, string>;
        continue;
      }
      const r = raw as { dtype?: string; shape?: number[]; data_offsets?: [number, number] };
      const where = `${path}: tensor "${name}"`;
      if (!r || typeof r.dtype !== 'string' || !Array.isArray(r.shape) || !Array.isArray(r.data_offsets))
        throw new SafetensorsError(`${where} has no dtype / shape / data_offsets`);
      if (!(r.dtype in SIZES))
        throw new SafetensorsError(`${where} has dtype ${r.dtype}; supported: ${SUPPORTED_DTYPES.join(', ')}`);
      const dtype = r.dtype as DType;
      if (!r.shape.every((x) => Number.isInteger(x) && x >= 0))
        throw new SafetensorsError(`${where} has shape ${JSON.stringify(r.shape)}; a shape is a list of integers >= 0`);
      const [b, e] = r.data_offsets;
      const count = r.shape.reduce((a, x) => a * x, 1);
      if (!(Number.isInteger(b) && Number.isInteger(e) && b >= 0 && e >= b && dataStart + e <= fileSize))
        throw new SafetensorsError(`${where}: data_offsets [${b}, ${e}] lie outside the file (truncated download?)`);
      if (e - b !== count * SIZES[dtype])
        throw new SafetensorsError(
          `${where}: ${e - b} bytes for shape [${r.shape}] of ${dtype} (expected ${count * SIZES[dtype]})`,
        );
      tensors.set(name, { name, dtype, shape: r.shape, byteOffset: dataStart + b, byteLength: e - b });
    }
    checkTiling(path, dataStart, fileSize, tensors);
    return { path, fileSize, dataStart, tensors, metadata };
  } finally {
    closeSync(fd);
  }
}

/**
 * The tensors' bytes must cover the data exactly, one after another, as the safetensors format
 * requires (its library refuses anything else): two tensors whose offsets overlap read the same
 * bytes (a damaged header made k_proj read q_proj's weights, silently), and bytes that belong to
 * no tensor mean the header and the data disagree.
 */
function checkTiling(path: string, dataStart: number, fileSize: number, tensors: Map<string, TensorInfo>): void {
  const spans = [...tensors.values()]
    .map((t) => ({ name: t.name, b: t.byteOffset - dataStart, e: t.byteOffset - dataStart + t.byteLength }))
    .sort((x, y) => x.b - y.b || x.e - y.e);
  let end = 0;
  let last = '';
  for (const { name, b, e } of spans) {
    if (b < end)
      throw new SafetensorsError(
        `${path}: tensor "${name}" (bytes ${b}–${e}) overlaps tensor "${last}" (to byte ${end}): the header is damaged; the file cannot be read as its writer meant`,
      );
    if (b > end)
      throw new SafetensorsError(
        `${path}: bytes ${end}–${b} of the data, before tensor "${name}", belong to no tensor: the header and the data disagree (a damaged file)`,
      );
    end = e;
    last = name;
  }
  if (dataStart + end !== fileSize)
    throw new SafetensorsError(
      `${path}: ${fileSize - dataStart - end} bytes after the last tensor belong to no tensor: the header and the data disagree (a damaged or appended-to file)`,
    );
}

function info(h: SafetensorsHeader, name: string): TensorInfo {
  const t = h.tensors.get(name);
  if (!t) throw new SafetensorsError(`${h.path}: no tensor named "${name}"`);
  return t;
}

/** Raw bytes of one tensor (a positioned read; the file is never loaded whole). */
export function readTensorBytes(h: SafetensorsHeader, name: string): Buffer {
  const t = info(h, name);
  const buf = Buffer.allocUnsafe(t.byteLength);
  const fd = openSync(h.path, READ_NOWAIT);
  try {
    let done = 0;
    while (done < t.byteLength) {
      const n = readSync(fd, buf, done, t.byteLength - done, t.byteOffset + done);
      if (n === 0) throw new SafetensorsError(`${h.path}: unexpected end of file reading "${name}"`);
      done += n;
    }
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** One tensor in its stored type (F16/BF16 come back as raw Uint16Array bits). */
export function readTensor(h: SafetensorsHeader, name: string): { dtype: DType; shape: number[]; data: TypedArray } {
  const t = info(h, name);
  const buf = readTensorBytes(h, name);
  const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const data: TypedArray = {
    F64: () => new Float64Array(ab),
    F32: () => new Float32Array(ab),
    F16: () => new Uint16Array(ab),
    BF16: () => new Uint16Array(ab),
    I64: () => new BigInt64Array(ab),
    I32: () => new Int32Array(ab),
    I16: () => new Int16Array(ab),
    I8: () => new Int8Array(ab),
    U8: () => new Uint8Array(ab),
    BOOL: () => new Uint8Array(ab),
  }[t.dtype]();
  return { dtype: t.dtype, shape: t.shape, data };
}

/** One tensor converted to float32 (any stored type). */
export function readTensorF32(h: SafetensorsHeader, name: string): Float32Array {
  const { dtype, data } = readTensor(h, name);
  return toFloat(dtype, data, Float32Array);
}

/** One tensor converted to float64 (any stored type). */
export function readTensorF64(h: SafetensorsHeader, name: string): Float64Array {
  const { dtype, data } = readTensor(h, name);
  return toFloat(dtype, data, Float64Array);
}

function toFloat<T extends Float32Array | Float64Array>(
  dtype: DType,
  data: TypedArray,
  Ctor: { new (n: number): T; from(x: ArrayLike<number>): T },
): T {
  if (dtype === 'F16' || dtype === 'BF16') {
    const bits = data as Uint16Array;
    const out = new Ctor(bits.length);
    const conv = dtype === 'F16' ? halfToFloat : bf16ToFloat;
    for (let i = 0; i < bits.length; i++) out[i] = conv(bits[i]);
    return out;
  }
  if (data instanceof BigInt64Array) {
    const out = new Ctor(data.length);
    for (let i = 0; i < data.length; i++) out[i] = Number(data[i]);
    return out;
  }
  if (data instanceof Ctor) return data as T;
  return Ctor.from(data as ArrayLike<number>);
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function bf16ToFloat(bits: number): number {
  u32[0] = bits << 16;
  return f32[0];
}

/** Round-to-nearest-even float → bfloat16 bits. */
export function floatToBf16(x: number): number {
  f32[0] = x;
  const u = u32[0];
  if (Number.isNaN(x)) return 0x7fc0;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

export function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? Number.NaN : s * Number.POSITIVE_INFINITY;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** float → IEEE half bits, rounded to nearest. */
export function floatToHalf(x: number): number {
  if (Number.isNaN(x)) return 0x7e00;
  const s = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a >= 65520) return s | 0x7c00;
  if (a < 2 ** -24 / 2) return s;
  if (a < 2 ** -14) return s | Math.round(a / 2 ** -24); // subnormal
  let e = Math.floor(Math.log2(a));
  let m = a / 2 ** e - 1;
  let mi = Math.round(m * 1024);
  if (mi === 1024) {
    mi = 0;
    e += 1;
  }
  m = mi;
  return s | ((e + 15) << 10) | m;
}

function encodeTensor(name: string, t: TensorToWrite): Uint8Array {
  const count = t.shape.reduce((a, x) => a * x, 1);
  if (t.data.length !== count)
    throw new SafetensorsError(`tensor "${name}": ${t.data.length} values for shape [${t.shape}] (${count})`);
  const d = t.data;
  const view = (a: TypedArray) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  switch (t.dtype) {
    case 'F64':
      return view(d instanceof Float64Array ? d : Float64Array.from(d as ArrayLike<number>));
    case 'F32':
      return view(d instanceof Float32Array ? d : Float32Array.from(d as ArrayLike<number>));
    case 'F16':
    case 'BF16': {
      if (d instanceof Uint16Array) return view(d);
      const conv = t.dtype === 'F16' ? floatToHalf : floatToBf16;
      const out = new Uint16Array(count);
      for (let i = 0; i < count; i++) out[i] = conv((d as ArrayLike<number>)[i]);
      return view(out);
    }
    case 'I64': {
      if (d instanceof BigInt64Array) return view(d);
      const out = new BigInt64Array(count);
      for (let i = 0; i < count; i++) out[i] = BigInt(Math.trunc((d as ArrayLike<number>)[i]));
      return view(out);
    }
    case 'I32':
      return view(d instanceof Int32Array ? d : Int32Array.from(d as ArrayLike<number>));
    case 'I16':
      return view(d instanceof Int16Array ? d : Int16Array.from(d as ArrayLike<number>));
    case 'I8':
      return view(d instanceof Int8Array ? d : Int8Array.from(d as ArrayLike<number>));
    case 'U8':
    case 'BOOL':
      return view(d instanceof Uint8Array ? d : Uint8Array.from(d as ArrayLike<number>));
    default:
      throw new SafetensorsError(`tensor "${name}": unsupported dtype ${t.dtype}`);
  }
}

/** Metadata key holding the sha256 of a file's tensor data, for caches we verify on load. */
export const DATA_SHA256 = 'data_sha256';
/**
 * The sha256 of the tensor table (each tensor's name, dtype, shape and offsets, by name): the data
 * checksum alone let a header edit through (two tensors' names swapped, a float dtype relabelled
 * as an integer one) with every byte intact. Written with `data_sha256`; checked where present.
 */
export const HEADER_SHA256 = 'header_sha256';

/** HEADER_SHA256 of a tensor table (offsets relative to the data). */
function tableDigest(
  table: Iterable<[string, { dtype: string; shape: number[]; begin: number; end: number }]>,
): string {
  const rows = [...table]
    .map(([name, t]) => [name, t.dtype, t.shape, t.begin, t.end] as const)
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return createHash('sha256').update(JSON.stringify(rows)).digest('hex');
}

/**
 * Write tensors (in the given key order) and string metadata. Atomic: the file appears
 * complete or not at all. With `checksum`, the sha256 of the tensor data is stored in the
 * metadata (`data_sha256`) so a reader can tell damaged bytes from good ones
 * (`checkDataChecksum`).
 */
export function writeSafetensors(
  path: string,
  tensors: Record<string, TensorToWrite>,
  metadata: Record<string, string> = {},
  options: { checksum?: boolean } = {},
): void {
  const header: Record<string, unknown> = {};
  const parts: Uint8Array[] = [];
  let offset = 0;
  const digest = options.checksum ? createHash('sha256') : null;
  const table = new Map<string, { dtype: string; shape: number[]; begin: number; end: number }>();
  for (const [name, t] of Object.entries(tensors)) {
    const bytes = encodeTensor(name, t);
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes.byteLength] };
    table.set(name, { dtype: t.dtype, shape: t.shape, begin: offset, end: offset + bytes.byteLength });
    parts.push(bytes);
    digest?.update(bytes);
    offset += bytes.byteLength;
  }
  const meta = digest
    ? { ...metadata, [DATA_SHA256]: digest.digest('hex'), [HEADER_SHA256]: tableDigest(table) }
    : metadata;
  let json = JSON.stringify(Object.keys(meta).length ? { __metadata__: meta, ...header } : header);
  // pad the header with spaces so tensor data starts 8-byte aligned (as the reference writer does)
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const hbytes = Buffer.from(json, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hbytes.byteLength));
  writeAtomicWith(path, (tmp) => {
    const fd = openSync(tmp, 'wx');
    try {
      writeAll(fd, len);
      writeAll(fd, hbytes);
      for (const p of parts) writeAll(fd, p);
    } finally {
      closeSync(fd);
    }
  });
}

/** A tensor's place in a file written by writeSafetensorsStreamed. */
export interface TensorLayout {
  dtype: DType;
  shape: number[];
}

/** The header bytes (length prefix included) for tensors laid out in key order. */
function headerBytes(
  layout: Record<string, TensorLayout>,
  meta: Record<string, string>,
): { bytes: Buffer; offsets: Map<string, number> } {
  const header: Record<string, unknown> = {};
  const rel = new Map<string, number>();
  let offset = 0;
  for (const [name, t] of Object.entries(layout)) {
    const n = t.shape.reduce((a, x) => a * x, 1) * SIZES[t.dtype];
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + n] };
    rel.set(name, offset);
    offset += n;
  }
  let json = JSON.stringify(Object.keys(meta).length ? { __metadata__: meta, ...header } : header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const h = Buffer.from(json, 'utf8');
  const bytes = Buffer.alloc(8 + h.byteLength);
  bytes.writeBigUInt64LE(BigInt(h.byteLength));
  h.copy(bytes, 8);
  const offsets = new Map([...rel].map(([k, v]) => [k, bytes.byteLength + v]));
  return { bytes, offsets };
}

/**
 * Writes a safetensors file whose tensor data `fill` writes itself, with positioned writes at
 * the absolute offsets `offsetOf` gives, into a file already of its final size: no tensor need
 * be held whole (the gradient store writes each example's rows as they are computed). Atomic
 * like writeSafetensors; with `checksum` the data is read back once and its sha256 written into
 * the metadata (the header keeps its length: the digest replaces a placeholder of the same size).
 */
export async function writeSafetensorsStreamed(
  path: string,
  layout: Record<string, TensorLayout>,
  metadata: Record<string, string>,
  fill: (fd: number, offsetOf: (name: string) => number) => Promise<void>,
  options: { checksum?: boolean } = {},
): Promise<void> {
  const placeholder = options.checksum
    ? { ...metadata, [DATA_SHA256]: '0'.repeat(64), [HEADER_SHA256]: '0'.repeat(64) }
    : metadata;
  const first = headerBytes(layout, placeholder);
  const last = Object.keys(layout).at(-1);
  const end = last === undefined ? first.bytes.byteLength : first.offsets.get(last)! + sizeOf(layout[last]);
  await writeAtomicWithAsync(path, async (tmp) => {
    const fd = openSync(tmp, 'wx+'); // read back for the checksum
    try {
      writeAll(fd, first.bytes);
      ftruncateSync(fd, end);
      await fill(fd, (name) => {
        const at = first.offsets.get(name);
        if (at === undefined) throw new SafetensorsError(`${path}: no tensor named "${name}" in the layout`);
        return at;
      });
      if (options.checksum) {
        const digest = createHash('sha256');
        const buf = Buffer.allocUnsafe(8 << 20);
        for (let at = first.bytes.byteLength; at < end; ) {
          const n = readSync(fd, buf, 0, Math.min(buf.length, end - at), at);
          if (n === 0) throw new SafetensorsError(`${tmp}: ended early while hashing what was written`);
          digest.update(buf.subarray(0, n));
          at += n;
        }
        const table = new Map(
          Object.entries(layout).map(([name, t]) => {
            const begin = first.offsets.get(name)! - first.bytes.byteLength;
            return [name, { dtype: t.dtype, shape: t.shape, begin, end: begin + sizeOf(t) }] as const;
          }),
        );
        const final = headerBytes(layout, {
          ...metadata,
          [DATA_SHA256]: digest.digest('hex'),
          [HEADER_SHA256]: tableDigest(table),
        });
        if (final.bytes.byteLength !== first.bytes.byteLength)
          throw new SafetensorsError('the header changed length when its checksum was filled in');
        writeSync(fd, final.bytes, 0, final.bytes.byteLength, 0);
      }
    } finally {
      closeSync(fd);
    }
  });
}

function sizeOf(t: TensorLayout): number {
  return t.shape.reduce((a, x) => a * x, 1) * SIZES[t.dtype];
}

/**
 * Whether a file's tensor data still has the sha256 written with it: 'ok', 'mismatch'
 * (bytes changed since), or 'absent' (written without a checksum).
 */
export function checkDataChecksum(
  h: SafetensorsHeader,
  /** sees every chunk of the data as it is hashed (`at`: its offset in the file); the chunk is reused afterwards */
  inspect?: (chunk: Buffer, at: number) => void,
): 'ok' | 'mismatch' | 'absent' {
  const want = h.metadata[DATA_SHA256];
  if (!want) return 'absent';
  const table = h.metadata[HEADER_SHA256];
  if (
    table !== undefined &&
    table !==
      tableDigest(
        [...h.tensors].map(([name, t]) => [
          name,
          {
            dtype: t.dtype,
            shape: t.shape,
            begin: t.byteOffset - h.dataStart,
            end: t.byteOffset - h.dataStart + t.byteLength,
          },
        ]),
      )
  )
    return 'mismatch';
  const digest = createHash('sha256');
  const buf = Buffer.allocUnsafe(8 << 20);
  const fd = openSync(h.path, READ_NOWAIT);
  try {
    for (let at = h.dataStart; ; ) {
      const n = readSync(fd, buf, 0, buf.length, at);
      if (n === 0) break;
      digest.update(buf.subarray(0, n));
      inspect?.(buf.subarray(0, n), at);
      at += n;
    }
  } finally {
    closeSync(fd);
  }
  return digest.digest('hex') === want ? 'ok' : 'mismatch';
}

function writeAll(fd: number, bytes: Uint8Array) {
  let done = 0;
  while (done < bytes.byteLength) done += writeSync(fd, bytes, done, bytes.byteLength - done);
}
