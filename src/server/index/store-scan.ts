// Scoring a gradient store against one query: the rows are read in fixed-size chunks of
// examples (from memory, or from the store's file into two reused buffers) and each chunk is
// scored by a small ONNX graph, Σ_modules scale ⊙ (fp16→fp32 rows · q), so the server holds a
// bounded amount of the store however large the corpus (the file's pages are the page cache's,
// not the process's). ONNX Runtime's vectorised fp16 conversion and matrix-vector product are
// about 3× faster per CPU second than the fp16-table loop in JS (bench store --scan). The next
// chunk is read by libuv's thread pool while the current one is scored: onnxruntime-node runs a
// session synchronously on the JS thread, so a read on that thread could never overlap it.
import { closeSync, fstatSync, openSync, read, readSync } from 'node:fs';
import { DataType, Graph, type Tensor } from '../model/onnx/graph';
import { createSession, ort } from '../model/onnx/session';

/** One chunk of rows: per module, fp16 bits [n, size] and the fp32 scale of each row. */
export interface ChunkRows {
  half: Uint16Array[];
  scale: Float32Array[];
}

/** Where the rows come from; `slot` (0 or 1) names the buffer a chunk is read into. */
export interface RowSource {
  read(first: number, n: number, slot: number): ChunkRows;
  /** the same, read off the JS thread (a file's rows: libuv's thread pool) */
  readAhead(first: number, n: number, slot: number): Promise<ChunkRows>;
  close(): void;
}

/**
 * The default bytes of rows per chunk (both buffers together hold twice this). 8 MiB rather than
 * 16: each module's fp32 copy of a chunk's rows (the Cast before the product) then stays in the
 * CPU's cache. 100,000 rows of the k = 40 size (14 × 1,600 fp16), 1 thread, page cache warm,
 * best of 3 on the 2-core VM, reads still on the JS thread: 16 MiB 1,455 ms, 8 MiB 1,194 ms,
 * 4 MiB 1,181 ms, 2 MiB 1,439 ms, 1 MiB 1,705 ms (smaller chunks pay ONNX Runtime's per-run cost
 * more often). With the reads in the thread pool: 8 MiB 725–930 ms (load 3).
 */
export const CHUNK_BYTES = 8 << 20;

/** Examples per chunk for rows of `sizes` numbers per module (fp16 values and one fp32 scale each). */
export function examplesPerChunk(sizes: number[], chunkBytes: number): number {
  const rowBytes = sizes.reduce((a, s) => a + 2 * s + 4, 0);
  return Math.max(1, Math.floor(chunkBytes / rowBytes));
}

/** Rows held in memory (a store just built and not written): chunks are views, never copies. */
export function memoryRows(rows: Array<{ half: Uint16Array; scale: Float32Array }>, sizes: number[]): RowSource {
  const read = (first: number, n: number): ChunkRows => ({
    half: rows.map((r, i) => r.half.subarray(first * sizes[i], (first + n) * sizes[i])),
    scale: rows.map((r) => r.scale.subarray(first, first + n)),
  });
  return { read, readAhead: async (first, n) => read(first, n), close: () => {} };
}

/** What identifies a file's contents between its verification and a later read. */
export interface FileStamp {
  dev: number;
  ino: number;
  size: number;
  mtimeMs: number;
  ctimeMs: number;
}

export function stampOf(st: { dev: number; ino: number; size: number; mtimeMs: number; ctimeMs: number }): FileStamp {
  return { dev: st.dev, ino: st.ino, size: st.size, mtimeMs: st.mtimeMs, ctimeMs: st.ctimeMs };
}

export function sameStamp(a: FileStamp, b: FileStamp): boolean {
  return a.dev === b.dev && a.ino === b.ino && a.size === b.size && a.mtimeMs === b.mtimeMs && a.ctimeMs === b.ctimeMs;
}

export class StoreFileChanged extends Error {}

/**
 * Rows read from the store's file with positioned reads into two reused buffers per module.
 * The file must still be the one verified (`stamp`): checked when opened and again at `close`,
 * so a file replaced or rewritten since its sha256 was checked is never scored silently.
 */
export function fileRows(
  path: string,
  stamp: FileStamp,
  where: Array<{ rows: number; scale: number }>,
  sizes: number[],
  perChunk: number,
): RowSource {
  const fd = openSync(path, 'r');
  const check = () => {
    if (!sameStamp(stampOf(fstatSync(fd)), stamp)) {
      throw new StoreFileChanged(`${path} changed on disk since its checksum was verified`);
    }
  };
  try {
    check();
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  const bufs = [0, 1].map(() => ({
    half: sizes.map((s) => new Uint16Array(perChunk * s)),
    scale: sizes.map(() => new Float32Array(perChunk)),
  }));
  const truncated = () => new StoreFileChanged(`${path} ended early (truncated since its checksum was verified)`);
  const bytesOf = (into: Uint16Array | Float32Array) => new Uint8Array(into.buffer, into.byteOffset, into.byteLength);
  const readExact = (into: Uint16Array | Float32Array, at: number) => {
    const bytes = bytesOf(into);
    for (let done = 0; done < bytes.length; ) {
      const n = readSync(fd, bytes, done, bytes.length - done, at + done);
      if (n === 0) throw truncated();
      done += n;
    }
  };
  const readExactAsync = async (into: Uint16Array | Float32Array, at: number) => {
    const bytes = bytesOf(into);
    for (let done = 0; done < bytes.length; ) {
      const n = await new Promise<number>((ok, fail) =>
        read(fd, bytes, done, bytes.length - done, at + done, (e, got) => (e ? fail(e) : ok(got))),
      );
      if (n === 0) throw truncated();
      done += n;
    }
  };
  // the chunk's views into slot `slot`'s buffers, and the reads that fill them
  const plan = (first: number, n: number, slot: number) => {
    const b = bufs[slot];
    const out: ChunkRows = { half: [], scale: [] };
    const reads: Array<[Uint16Array | Float32Array, number]> = [];
    sizes.forEach((s, i) => {
      const half = b.half[i].subarray(0, n * s);
      const scale = b.scale[i].subarray(0, n);
      reads.push([half, where[i].rows + first * s * 2], [scale, where[i].scale + first * 4]);
      out.half.push(half);
      out.scale.push(scale);
    });
    return { out, reads };
  };
  return {
    read: (first, n, slot) => {
      const { out, reads } = plan(first, n, slot);
      for (const [into, at] of reads) readExact(into, at);
      return out;
    },
    readAhead: async (first, n, slot) => {
      const { out, reads } = plan(first, n, slot);
      await Promise.all(reads.map(([into, at]) => readExactAsync(into, at)));
      return out;
    },
    close: () => {
      try {
        check();
      } finally {
        closeSync(fd);
      }
    },
  };
}

/**
 * The scoring graph for modules of `sizes` stored numbers: inputs r<i> (fp16 [n, size_i]),
 * s<i> (fp32 [n]), q<i> (fp32 [size_i, 1]); output `score` [n] = Σ_i s_i ⊙ (r_i q_i), and with
 * `variance` also inputs v<i> (fp32 scalar) and output `variance` [n] = Σ_i v_i s_i² ‖r_i‖².
 */
function scanGraph(sizes: number[], variance: boolean): Uint8Array {
  const g = new Graph(DataType.FLOAT);
  g.noGrad(() => {
    let score: Tensor | undefined;
    let vsum: Tensor | undefined;
    sizes.forEach((size, i) => {
      const r = g.cast(g.input(`r${i}`, DataType.FLOAT16, ['n', size]), DataType.FLOAT);
      const s = g.input(`s${i}`, DataType.FLOAT, ['n']);
      const q = g.input(`q${i}`, DataType.FLOAT, [size, 1]);
      const term = g.mul(s, g.reshape(g.matmul(r, q), [-1]));
      score = score ? g.add(score, term) : term;
      if (variance) {
        const v = g.input(`v${i}`, DataType.FLOAT, []);
        const t = g.mul(v, g.mul(g.mul(s, s), g.reduceSum(g.mul(r, r), [1], false)));
        vsum = vsum ? g.add(vsum, t) : t;
      }
    });
    g.output(score!, 'score');
    if (vsum) g.output(vsum, 'variance');
  });
  return g.encode('gradient_store_scan');
}

/** A store's scoring session (one per store and kind; opened on the first query). */
export class StoreScanner {
  private sessions = new Map<boolean, Promise<ort.InferenceSession>>();

  constructor(
    readonly sizes: number[],
    readonly threads?: number,
  ) {}

  private session(variance: boolean): Promise<ort.InferenceSession> {
    let s = this.sessions.get(variance);
    if (!s) {
      s = createSession(scanGraph(this.sizes, variance), { threads: this.threads });
      this.sessions.set(variance, s);
      s.catch(() => this.sessions.delete(variance));
    }
    return s;
  }

  /**
   * Scores examples [0, total) in chunks of `perChunk`: `q[i]` is module i's projected query
   * (its kept coordinates), `v[i]` (with variance) the factor of ‖row‖² in the variance.
   */
  async scan(
    source: RowSource,
    total: number,
    perChunk: number,
    q: Float32Array[],
    v?: number[],
  ): Promise<{ scores: Float64Array; variance?: Float64Array }> {
    let next: Promise<ChunkRows> | undefined;
    // the source is closed on every path, a failure before the first chunk included
    try {
      const session = await this.session(!!v);
      const scores = new Float64Array(total);
      const variance = v ? new Float64Array(total) : undefined;
      const qs = q.map((x, i) => new ort.Tensor('float32', x, [this.sizes[i], 1]));
      const vs = v?.map((x) => new ort.Tensor('float32', Float32Array.of(x), []));
      const run = async (first: number, rows: ChunkRows) => {
        const n = rows.scale[0].length;
        const feeds: Record<string, ort.Tensor> = {};
        this.sizes.forEach((size, i) => {
          feeds[`r${i}`] = new ort.Tensor('float16', rows.half[i], [n, size]);
          feeds[`s${i}`] = new ort.Tensor('float32', rows.scale[i], [n]);
          feeds[`q${i}`] = qs[i];
          if (vs) feeds[`v${i}`] = vs[i];
        });
        const out = await session.run(feeds);
        scores.set(out.score.data as Float32Array, first);
        if (variance) variance.set(out.variance.data as Float32Array, first);
      };
      // double buffering: chunk c + 1 is read into slot (c + 1) % 2 while chunk c is scored
      const ahead = (first: number, c: number) => {
        if (first >= total) return undefined;
        const p = source.readAhead(first, Math.min(perChunk, total - first), c % 2);
        p.catch(() => {}); // awaited in turn; this only keeps a failure during the other chunk's scoring from going unhandled
        return p;
      };
      next = ahead(0, 0);
      for (let first = 0, c = 0; first < total; first += perChunk, c++) {
        const rows = await next!;
        next = ahead(first + perChunk, c + 1);
        await run(first, rows);
      }
      return variance ? { scores, variance } : { scores };
    } finally {
      // a read still in flight (the scoring failed) must end before its buffer and file are let go
      await next?.catch(() => {});
      source.close();
    }
  }
}
