// The one way this project replaces a file or a folder on disk: write a temporary sibling, flush
// it (fsync), rename it over the target, then flush the folder so the rename itself survives a
// power cut. A crash at any moment leaves the old file or the new one, never half of either.
//
// Temporaries are named `<target>.tmp-<pid>-<n>` so that leftovers of a process killed mid-write
// (kill -9, out of memory, a full disk) can be recognised as ours and removed once that process is
// gone (`cleanStaleTemps`). (The write-file-atomic package names its temporaries by a hash, so
// its leftovers could never be told apart from a user's files; hence this small helper.)
import {
  closeSync,
  fsyncSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  renameSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { threadId } from 'node:worker_threads';

let counter = 0;

/** A fresh temporary path next to `target`, marked with this process's id. */
export function tempPathFor(target: string): string {
  counter++;
  // threadId keeps two worker threads of one process apart
  return `${target}.tmp-${process.pid}-${threadId}x${counter}`;
}

/** Matches our temporaries, the pid in group 1 (also the older `.tmp-<pid>` names). */
const TEMP_NAME = /\.tmp-(\d+)(?:-\d+x\d+)?$/;

/** Writes `data` to `path` atomically and durably. `mode` applies to a new file. */
export function writeFileAtomic(path: string, data: string | Uint8Array, options: { mode?: number } = {}): void {
  writeAtomicWith(path, (tmp) => {
    const fd = openSync(tmp, 'wx', options.mode ?? 0o644);
    try {
      const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
      let off = 0;
      while (off < buf.byteLength) off += writeSync(fd, buf, off, buf.byteLength - off);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  });
}

/**
 * Replaces `path` with the file that `write(tmp)` creates at the temporary path it is given
 * (for writers that stream, like the safetensors writer). The file is flushed before the rename;
 * on any error the temporary is removed and the old file stays.
 */
export function writeAtomicWith(path: string, write: (tmp: string) => void): void {
  const tmp = tempPathFor(path);
  try {
    write(tmp);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  commitTemp(tmp, path);
}

/** writeAtomicWith for a writer that awaits (the gradient store writes its rows as they are computed). */
export async function writeAtomicWithAsync(path: string, write: (tmp: string) => Promise<void>): Promise<void> {
  const tmp = tempPathFor(path);
  try {
    await write(tmp);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  commitTemp(tmp, path);
}

/** Flushes a finished temporary, renames it over `path` and flushes the folder; removes it on failure. */
function commitTemp(tmp: string, path: string): void {
  try {
    fsyncPath(tmp);
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  fsyncDir(dirname(path));
}

/**
 * Replaces the folder `dir` with the one `fill(tmp)` writes into the (created, empty) temporary
 * folder it is given: every file in it is flushed, then the old folder is removed and the new one
 * renamed into place. A crash before the rename leaves the old folder (and a temporary that
 * `cleanStaleTemps` removes later).
 */
export function replaceDirAtomic(dir: string, fill: (tmp: string) => void): void {
  const tmp = tempPathFor(dir);
  mkdirSync(dirname(dir), { recursive: true });
  try {
    mkdirSync(tmp);
    fill(tmp);
    fsyncTree(tmp);
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  fsyncDir(dirname(dir));
}

/**
 * Removes the temporaries (files or folders) that processes which no longer run left in `root`
 * and its subfolders down to `depth` levels. Only names of our pattern whose pid is not alive are
 * touched; symbolic links are never followed. Returns the paths removed.
 */
export function cleanStaleTemps(root: string, depth = 3): string[] {
  const removed: string[] = [];
  const walk = (dir: string, level: number) => {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return; // absent or unreadable: nothing of ours to clean
    }
    for (const name of names) {
      const p = join(dir, name);
      let st: ReturnType<typeof lstatSync>;
      try {
        st = lstatSync(p);
      } catch {
        continue;
      }
      if (st.isSymbolicLink()) continue;
      const m = TEMP_NAME.exec(name);
      if (m && !processAlive(Number(m[1]))) {
        rmSync(p, { recursive: true, force: true });
        removed.push(p);
      } else if (st.isDirectory() && level < depth) walk(p, level + 1);
    }
  };
  walk(root, 1);
  return removed;
}

/** Whether a process with this id exists (EPERM: it does, it is someone else's). */
export function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function fsyncPath(path: string) {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function fsyncTree(dir: string) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) fsyncTree(p);
    else if (e.isFile()) fsyncPath(p);
  }
  fsyncDir(dir);
}

/** Makes a rename or create inside `dir` durable where the platform allows it (not on Windows). */
function fsyncDir(dir: string) {
  try {
    fsyncPath(dir);
  } catch {
    // best effort: Windows cannot open a folder for fsync
  }
}
