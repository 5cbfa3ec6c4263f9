// Content digests of (large) files, so caches are keyed by what a file holds rather than by
// its path, size or mtime, which survive a replacement (`mv` + `touch -r`, `cp -p`,
// `rsync -t`, `tar`, a re-download). Hashing a multi-GB checkpoint takes seconds, so each
// digest is remembered under the file's identity (device, inode, size, mtime, ctime): any
// write or rename changes the ctime, which no user tool can set back, so a remembered
// digest is never served for changed bytes. One exception, closed by waiting: a program that
// writes through a writable memory map moves mtime and ctime only on its first write to a clean
// page, so a file hashed while being written that way could change again under the same identity
// until the kernel writes its dirty pages back. A digest is therefore remembered only once the
// file's last change is older than RECENT_CHANGE_NS; a file changed more recently is hashed
// again at each open.
import { createHash } from 'node:crypto';
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';

const CHUNK = 8 << 20;

/** sha256 (hex) of a file's bytes, read in chunks. */
export function sha256File(path: string): string {
  const h = createHash('sha256');
  const buf = Buffer.allocUnsafe(CHUNK);
  const fd = openSync(path, 'r');
  try {
    for (;;) {
      const n = readSync(fd, buf, 0, CHUNK, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}

/**
 * Longer than Linux's dirty-page writeback (dirty_expire_centisecs, 30 s by default): after it,
 * a mapped write to a page faults again and moves mtime and ctime.
 */
const RECENT_CHANGE_NS = 90_000_000_000n;

/** What identifies a file's current bytes without reading them (symlinks followed), and when it last changed. */
function stat(path: string): { id: string; changedNs: bigint } {
  const s = statSync(path, { bigint: true });
  return {
    id: [s.dev, s.ino, s.size, s.mtimeNs, s.ctimeNs].join(':'),
    // the ctime moves with every write, and no user tool sets it
    changedNs: s.ctimeNs,
  };
}

function identity(path: string): string {
  return stat(path).id;
}

/**
 * sha256 of `path`'s content, remembered under `<cacheDir>/digests/` per file identity so a
 * file is read in full once. Symlinks are followed (the digest is of the bytes they reach).
 */
export function contentDigest(path: string, cacheDir: string): string {
  const real = realpathSync(path);
  const { id: before, changedNs } = stat(real);
  const memo = memoPath(real, before, cacheDir);
  if (existsSync(memo)) {
    const remembered = readFileSync(memo, 'utf8').trim();
    if (/^[0-9a-f]{64}$/.test(remembered)) return remembered;
  }
  const digest = sha256File(real);
  // remember it only if the file did not change while we read it, and its last change is old
  // enough that no mapped write can still be changing it under this identity
  const settled = BigInt(Date.now()) * 1_000_000n - changedNs > RECENT_CHANGE_NS;
  if (settled && identity(real) === before) remember(memo, cacheDir, digest);
  return digest;
}

/** The memo file of `real` (resolved) at `id`entity. */
function memoPath(real: string, id: string, cacheDir: string): string {
  return join(cacheDir, 'digests', `${createHash('sha256').update(`${real}\0${id}`).digest('hex').slice(0, 32)}`);
}

/** Remembers a digest; only a saving (the file is hashed again next time), so a read-only or full cache is no error. */
function remember(memo: string, cacheDir: string, digest: string): void {
  const tmp = `${memo}.${process.pid}.tmp`;
  try {
    mkdirSync(join(cacheDir, 'digests'), { recursive: true });
    writeFileSync(tmp, `${digest}\n`);
    renameSync(tmp, memo);
  } catch {
    try {
      rmSync(tmp, { force: true });
    } catch {}
  }
}

/**
 * The digest of one of an opened checkpoint's files, the same for the checkpoint's whole life:
 * the first time it is asked for (its fingerprint, or the snapshot the graphs read), it is taken
 * and kept, so that a file rewritten later can never give a fingerprint of other bytes than the
 * snapshot holds (the snapshot is checked against this digest, model/engine.ts).
 */
export function pinnedDigest(owner: object, path: string, cacheDir: string): string {
  let pins = pinned.get(owner);
  if (!pins) {
    pins = new Map();
    pinned.set(owner, pins);
  }
  let d = pins.get(path);
  if (d === undefined) {
    d = contentDigest(path, cacheDir);
    pins.set(path, d);
  }
  return d;
}

const pinned = new WeakMap<object, Map<string, string>>();

/**
 * The files of `owner` whose pinned digest no longer describes them (rewritten since the pin):
 * a file's current digest comes from the remembered one of its identity, so this reads a file
 * only when it changed.
 */
export function movedSincePinned(owner: object, cacheDir: string): string[] {
  const pins = pinned.get(owner);
  if (!pins) return [];
  const moved: string[] = [];
  for (const [path, d] of pins) {
    try {
      if (contentDigest(path, cacheDir) !== d) moved.push(path);
    } catch {
      moved.push(path);
    }
  }
  return moved;
}

export class FileChangedError extends Error {
  override name = 'FileChangedError';
}

/**
 * Copies `from` to `to` (created; it must not exist) in pieces and returns the sha256 of the bytes
 * copied. Refuses, rather than copy a mix, when the file changes while it is read: a read that
 * ends early (the file shrank: libuv's own copy loop then spins forever on some filesystems), or
 * a size, mtime or ctime that moved.
 */
export function copyHashing(from: string, to: string): string {
  const before = statSync(from, { bigint: true });
  const h = createHash('sha256');
  const buf = Buffer.allocUnsafe(CHUNK);
  const src = openSync(from, 'r');
  let dst: number | undefined;
  try {
    dst = openSync(to, 'wx', 0o644);
    const size = Number(before.size);
    let done = 0;
    while (done < size) {
      const n = readSync(src, buf, 0, Math.min(CHUNK, size - done), done);
      if (n === 0) throw new FileChangedError(`${from} shrank while it was being read (${done} of ${size} bytes)`);
      h.update(buf.subarray(0, n));
      let w = 0;
      while (w < n) w += writeSync(dst, buf, w, n - w);
      done += n;
    }
  } finally {
    closeSync(src);
    if (dst !== undefined) closeSync(dst);
  }
  const after = statSync(from, { bigint: true });
  if (after.size !== before.size || after.mtimeNs !== before.mtimeNs || after.ctimeNs !== before.ctimeNs)
    throw new FileChangedError(`${from} was written to while it was being read`);
  return h.digest('hex');
}

/** Records the digest of a file just written from bytes of known digest (a verified copy), so it is not read again. */
export function rememberDigest(path: string, digest: string, cacheDir: string): void {
  const real = realpathSync(path);
  remember(memoPath(real, identity(real), cacheDir), cacheDir, digest);
}
