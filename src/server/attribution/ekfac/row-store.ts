// Where a fit keeps the covariance pass's per-token rows until its Λ pass (ekfac/lambda-rows.ts):
// in memory while they fit the rows budget, else in a temporary file. The rows are written once,
// in the covariance pass, and read once, a module group at a time, in the Λ pass, so a file costs
// one write and one read of each row: at SmolLM-135M 130 MB a 128-token sequence, against a
// second forward and backward of it. The file is unlinked as soon as it is open (POSIX), so
// nothing is left on disk when the process ends, however it ends (kill -9 included), and it is
// never a file anyone else can open; where unlinking an open file is refused (Windows) it is
// deleted on close instead.

import { randomBytes } from 'node:crypto';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  openSync,
  readSync,
  statfsSync,
  statSync,
  unlinkSync,
  write,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { EnvSettingError } from '../../util/env';

type Floats = Float32Array | Float64Array;

/** The rows of one block: per key (`a.<leader>`, `g.<module>`) a [B, T, d] array. */
export interface RowStore {
  readonly where: 'memory' | 'file';
  /** the folder of a file store */
  readonly dir?: string;
  /** true once closed: the rows were used (or given up) */
  readonly closed: boolean;
  /** a run's rows [B, T, d] (T ≤ the block's) as sequences offset… of the block */
  write(block: number, key: string, offset: number, src: Floats, B: number, T: number): void;
  /**
   * Sequences b0 … b0 + B − 1 of a block, [B, T_block, d]; padding rows are zeros. A file store
   * reads them `into` the array given (of exactly that length), else into a new one.
   */
  read(block: number, key: string, b0: number, B: number, into?: Floats): Floats;
  /** the block will not be read again (a memory store frees it) */
  drop(block: number): void;
  /**
   * Until at most `maxBytes` of writes are still in flight (a file store writes on libuv's pool, so
   * the next run computes while the last one's rows are written); the first failed write throws.
   */
  settle(maxBytes: number): Promise<void>;
  close(): void;
}

export interface RowLayout {
  blocks: Array<{ B: number; T: number }>;
  /** floats per token of each key */
  dims: Map<string, number>;
  fp64: boolean;
}

function alloc(fp64: boolean, n: number): Floats {
  return fp64 ? new Float64Array(n) : new Float32Array(n);
}

function checkWrite(l: RowLayout, block: number, key: string, offset: number, src: Floats, B: number, T: number) {
  const shape = l.blocks[block];
  const d = l.dims.get(key);
  if (!shape || d === undefined) throw new Error(`no block ${block + 1} or no rows ${key} in the plan`);
  if (T > shape.T || offset + B > shape.B)
    throw new Error(`rows ${key} (${B} × ${T}) do not fit block ${block + 1} (${shape.B} × ${shape.T}) at ${offset}`);
  if (src.length !== B * T * d) throw new Error(`rows of ${key}: expected ${B}×${T}×${d} values, got ${src.length}`);
  if (l.fp64 !== src instanceof Float64Array) throw new Error(`rows of ${key} are not in the fit's precision`);
  return { shape, d };
}

function used(): never {
  throw new Error('the kept rows were already used (they serve one eigenvalue correction)');
}

/** Rows in zero-filled arrays, a block's freed once it is dropped. */
export class MemoryRowStore implements RowStore {
  readonly where = 'memory';
  private blocks: Array<Map<string, Floats> | undefined>;
  closed = false;

  constructor(private readonly layout: RowLayout) {
    this.blocks = layout.blocks.map(() => new Map());
  }

  write(block: number, key: string, offset: number, src: Floats, B: number, T: number) {
    if (this.closed) used();
    const { shape, d } = checkWrite(this.layout, block, key, offset, src, B, T);
    const rows = this.blocks[block];
    if (!rows) throw new Error(`block ${block + 1} of the kept rows was dropped`);
    let dst = rows.get(key);
    if (!dst) {
      dst = alloc(this.layout.fp64, shape.B * shape.T * d); // zeros: padding rows stay zero
      rows.set(key, dst);
    }
    if (T === shape.T) dst.set(src, offset * T * d);
    else for (let b = 0; b < B; b++) dst.set(src.subarray(b * T * d, (b + 1) * T * d), (offset + b) * shape.T * d);
  }

  read(block: number, key: string, b0: number, B: number): Floats {
    if (this.closed) used();
    const rows = this.blocks[block];
    const x = rows?.get(key);
    if (!x) throw new Error(`rows ${key} of block ${block + 1} are not kept (dropped, or never written)`);
    const n = this.layout.blocks[block].T * this.layout.dims.get(key)!;
    return x.subarray(b0 * n, (b0 + B) * n);
  }

  drop(block: number) {
    this.blocks[block] = undefined;
  }

  async settle() {}

  close() {
    this.closed = true;
    this.blocks = [];
  }
}

/**
 * Rows in an unlinked temporary file: each block a region, in it each key's [B, T, d] rows. Writes
 * run on libuv's thread pool (`settle` bounds how much is in flight); the descriptor is closed only
 * once none is, so a write never lands in a file that reused its number.
 */
export class FileRowStore implements RowStore {
  readonly where = 'file';
  private fd: number | undefined;
  /** kept only where the file could not be unlinked while open */
  private path: string | undefined;
  private readonly at: Array<Map<string, number>> = [];
  readonly bytes: number;
  private readonly bpe: number;
  private readonly inflight = new Set<Promise<void>>();
  private pendingBytes = 0;
  private failure: Error | undefined;
  private closing = false;

  constructor(
    readonly dir: string,
    private readonly layout: RowLayout,
  ) {
    this.bpe = layout.fp64 ? 8 : 4;
    let pos = 0;
    for (const { B, T } of layout.blocks) {
      const keys = new Map<string, number>();
      for (const [key, d] of layout.dims) {
        keys.set(key, pos);
        pos += B * T * d * this.bpe;
      }
      this.at.push(keys);
    }
    this.bytes = pos;
    const path = join(dir, `influence-lens-rows-${process.pid}-${randomBytes(6).toString('hex')}.tmp`);
    this.fd = openSync(path, 'wx+', 0o600);
    try {
      unlinkSync(path);
    } catch {
      this.path = path;
    }
    try {
      // a sparse file of the final size: rows never written (padding) read back as zeros
      ftruncateSync(this.fd, this.bytes);
    } catch (e) {
      this.close();
      throw e;
    }
  }

  get closed() {
    return this.fd === undefined || this.closing;
  }

  private fdOrUsed(): number {
    if (this.fd === undefined || this.closing) used();
    return this.fd;
  }

  write(block: number, key: string, offset: number, src: Floats, B: number, T: number) {
    const fd = this.fdOrUsed();
    const { shape, d } = checkWrite(this.layout, block, key, offset, src, B, T);
    const base = this.at[block].get(key)!;
    const bytes = (x: Floats) => new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
    if (T === shape.T) this.enqueue(fd, bytes(src), base + offset * T * d * this.bpe);
    else
      for (let b = 0; b < B; b++)
        this.enqueue(fd, bytes(src.subarray(b * T * d, (b + 1) * T * d)), base + (offset + b) * shape.T * d * this.bpe);
  }

  private enqueue(fd: number, bytes: Uint8Array, pos: number) {
    this.pendingBytes += bytes.length;
    const p: Promise<void> = writeAll(fd, bytes, pos)
      .catch((e) => {
        this.failure ??= e as Error;
      })
      .finally(() => {
        this.pendingBytes -= bytes.length;
        this.inflight.delete(p);
        if (this.closing && this.inflight.size === 0) this.release();
      });
    this.inflight.add(p);
  }

  async settle(maxBytes: number) {
    while (this.pendingBytes > maxBytes && this.inflight.size) await Promise.race(this.inflight);
    if (this.failure) throw this.failure;
  }

  read(block: number, key: string, b0: number, B: number, into?: Floats): Floats {
    const fd = this.fdOrUsed();
    if (this.inflight.size) throw new Error('the kept rows are read before all were written (settle first)');
    if (this.failure) throw this.failure;
    const n = this.layout.blocks[block].T * this.layout.dims.get(key)!;
    if (into && (into.length !== B * n || into instanceof Float64Array !== this.layout.fp64))
      throw new Error(`rows ${key}: the array to read into holds ${into.length} values, not ${B * n}`);
    const out = into ?? alloc(this.layout.fp64, B * n);
    readAll(
      fd,
      new Uint8Array(out.buffer, out.byteOffset, out.byteLength),
      this.at[block].get(key)! + b0 * n * this.bpe,
    );
    return out;
  }

  drop() {}

  /** Closes now, or once the writes in flight are done: their space goes back either way. */
  close() {
    if (this.fd === undefined || this.closing) return;
    this.closing = true;
    if (this.inflight.size === 0) this.release();
  }

  private release() {
    const fd = this.fd;
    if (fd === undefined) return;
    this.fd = undefined;
    // closing after a failed write (the reason it is closed) may fail too; the space goes back either way
    try {
      closeSync(fd);
    } catch {}
    if (this.path) {
      const path = this.path;
      this.path = undefined;
      unlinkSync(path);
    }
  }
}

const writeAsync = promisify(write);

/** Writes all of `bytes` at `pos` (a call may write fewer bytes than asked, and at most 2 GiB). */
async function writeAll(fd: number, bytes: Uint8Array, pos: number) {
  for (let done = 0; done < bytes.length; ) {
    const { bytesWritten: n } = await writeAsync(fd, bytes, done, Math.min(bytes.length - done, 2 ** 30), pos + done);
    if (n <= 0) throw new Error(`could not write the kept rows (${n} of ${bytes.length - done} bytes written)`);
    done += n;
  }
}

function readAll(fd: number, into: Uint8Array, pos: number) {
  for (let done = 0; done < into.length; ) {
    const n = readSync(fd, into, done, Math.min(into.length - done, 2 ** 30), pos + done);
    if (n <= 0) throw new Error(`the kept rows' file ended early (${into.length - done} bytes missing)`);
    done += n;
  }
}

/** Filesystems whose files are memory (Linux statfs magic numbers): rows there save nothing. */
const IN_MEMORY_FS = new Map([
  [0x01021994, 'tmpfs'],
  [0x858458f6, 'ramfs'],
]);

/** Space a spill must leave free on its disk. */
export const SPILL_RESERVE_BYTES = 2 ** 30;

/**
 * The folder for rows over the memory budget: INFLUENCE_LENS_FIT_ROWS_DIR (an existing folder, or
 * `off` never to write them), else the system's temporary folder (TMPDIR). Refuses a value it does
 * not take, so that a typo is not a fit that silently takes the slow pass.
 */
export function rowsSpillDir(): string | undefined {
  const raw = process.env.INFLUENCE_LENS_FIT_ROWS_DIR;
  if (raw === undefined || raw.trim() === '') return tmpdir();
  if (raw.trim() === 'off') return undefined;
  if (!existsSync(raw) || !statSync(raw).isDirectory())
    throw new EnvSettingError(
      `INFLUENCE_LENS_FIT_ROWS_DIR="${raw}": use an existing folder (where a fit may write the rows that do not fit its memory budget), or off`,
    );
  return raw;
}

/**
 * Whether `bytes` of rows may go to a file in `dir` now: not on a filesystem that is memory, and
 * only with SPILL_RESERVE_BYTES left free after them. Says why not.
 */
export function spillRoom(dir: string, bytes: number): { ok: true } | { ok: false; why: string } {
  let fs: ReturnType<typeof statfsSync>;
  try {
    fs = statfsSync(dir);
  } catch (e) {
    return { ok: false, why: `${dir} cannot be used (${(e as Error).message})` };
  }
  const kind = IN_MEMORY_FS.get(Number(fs.type));
  if (kind) return { ok: false, why: `${dir} is a ${kind}, in memory: rows there would cost what they save` };
  const free = Number(fs.bavail) * Number(fs.bsize);
  if (free < bytes + SPILL_RESERVE_BYTES)
    return {
      ok: false,
      why: `${dir} has ${gib(free)} free, the rows need ${gib(bytes)} and ${gib(SPILL_RESERVE_BYTES)} must stay free (INFLUENCE_LENS_FIT_ROWS_DIR picks another folder)`,
    };
  return { ok: true };
}

const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`;
