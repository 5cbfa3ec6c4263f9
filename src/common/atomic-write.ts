// The one way this project replaces a file or a folder on disk: write a temporary sibling, flush
// it (fsync), rename it over the target, then flush the folder so the rename itself survives a
// power cut. A crash at any moment leaves the old file or the new one, never half of either (a
// folder's old version may be left set aside, `<dir>.old-…`, which its next reader puts back).
// A user's file (`{ userFile: true }`: the flags file) keeps its mode, and a symbolic link to it
// is written through; every other writer (caches, factors, exports) replaces a link by a file, as
// it always did, so a write never lands outside the folder it names.
//
// Temporaries are named `<target>.tmp-<pid>-<thread>x<n>-h<host>` (and set-aside folders
// `<target>.old-<pid>-<thread>x<n>-h<host>`) so that leftovers of a process killed mid-write (kill -9, out
// of memory, a full disk) can be recognised as ours and removed once that process is gone
// (`cleanStaleTemps`). `<host>` (a hash of the host name) keeps the writes of another machine or
// container sharing the folder (a partition of a fit) from being judged by a pid that means
// nothing here: only this host's temporaries, and those of versions before the tag, are removed. (The write-file-atomic package names its temporaries by a hash, so
// its leftovers could never be told apart from a user's files; hence this small helper.)
import { createHash } from 'node:crypto';
import {
  chmodSync,
  closeSync,
  existsSync,
  fsyncSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  writeSync,
} from 'node:fs';
import { hostname } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { threadId } from 'node:worker_threads';
import { physicalPath, realOrResolved } from './real-path';

let counter = 0;

/** This host in our temporaries' names: `h` and 8 hex digits of its name's sha256. */
function hostTag(): string {
  return `h${createHash('sha256').update(hostname()).digest('hex').slice(0, 8)}`;
}

/**
 * A fresh temporary path next to `target` (a trailing slash ignored), marked with this process's
 * id and, where the system says it, its start time: a pid can be reused (a restarted container's
 * process is PID 1 again), and a temporary of the former process must still be seen as left over.
 */
export function tempPathFor(target: string, kind: 'tmp' | 'old' = 'tmp'): string {
  counter++;
  ownStart ??= processStart(process.pid) ?? '';
  // threadId keeps two worker threads of one process apart
  return `${physicalPath(target)}.${kind}-${process.pid}-${threadId}x${counter}-${hostTag()}${ownStart ? `-s${ownStart}` : ''}`;
}

let ownStart: string | undefined;

/** A process's start time (clock ticks since boot, /proc/<pid>/stat's 22nd field), where Linux says it. */
export function processStart(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // the command name (field 2) is in parentheses and may hold spaces and ')': fields after the last one
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/**
 * Matches our temporaries: group 1 is `tmp` (a new version being written) or `old` (a folder's
 * previous version, moved aside while the new one is renamed into place), group 2 the pid, group 3
 * the host tag (absent in names of older versions). The `-<thread>x<n>` tail is required for `old`
 * (a user's own `model.old-2024` is not ours); `tmp` also matches the older `.tmp-<pid>` names.
 */
const TEMP_NAME =
  /\.(?:(tmp)-(\d+)(?:-\d+x\d+(?:-(h[0-9a-f]{8})(?:-s(\d+))?)?)?|(old)-(\d+)-\d+x\d+(?:-(h[0-9a-f]{8})(?:-s(\d+))?)?)$/;

/** Whether a file or folder name is one of our temporaries (a write in progress, or its leftover). */
export function isTemporaryName(name: string): boolean {
  return TEMP_NAME.test(name);
}

/** `TEMP_NAME` read: which kind of temporary, its pid, and whether its writer is known to be gone. */
function tempName(name: string): { kind: 'tmp' | 'old'; pid: number; index: number; gone: boolean } | null {
  const m = TEMP_NAME.exec(name);
  if (!m) return null;
  const [kind, pid, host, start] = m[1] ? (['tmp', m[2], m[3], m[4]] as const) : (['old', m[6], m[7], m[8]] as const);
  // another host's writer (a fit partition on another machine, a container) may be running: never judged here
  const ours = host === undefined || host === hostTag();
  // a live process with that pid that started at another time is not the writer (a reused pid)
  const reused = (): boolean => {
    if (start === undefined) return false;
    const now = processStart(Number(pid));
    return now !== undefined && now !== start;
  };
  const gone = ours && (!processAlive(Number(pid)) || reused());
  return { kind, pid: Number(pid), index: m.index, gone };
}

export interface AtomicWriteOptions {
  /**
   * A file the person owns (the flags file): a symbolic link is written through (`resolveLinks`),
   * and an existing file keeps its mode. Without it, a link is replaced by the new file.
   */
  userFile?: boolean;
  /** An existing file keeps its mode (a cleaned copy replaced with --force must not widen a 0600 file). */
  keepMode?: boolean;
}

/** Writes `data` to `path` atomically and durably. `mode` applies to a new file. */
export function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  options: { mode?: number } & AtomicWriteOptions = {},
): void {
  writeAtomicWith(
    path,
    (tmp) => {
      const fd = openSync(tmp, 'wx', options.mode ?? 0o644);
      try {
        const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
        let off = 0;
        while (off < buf.byteLength) off += writeSync(fd, buf, off, buf.byteLength - off);
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    },
    options,
  );
}

/**
 * Replaces `path` with the file that `write(tmp)` creates at the temporary path it is given
 * (for writers that stream, like the safetensors writer). The file is flushed before the rename;
 * on any error the temporary is removed and the old file stays.
 */
export function writeAtomicWith(link: string, write: (tmp: string) => void, options: AtomicWriteOptions = {}): void {
  const path = options.userFile ? resolveLinks(link) : physicalPath(link);
  const tmp = tempPathFor(path);
  try {
    write(tmp);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw notWritable(e, path);
  }
  commitTemp(tmp, path, options.userFile === true || options.keepMode === true);
}

/** writeAtomicWith for a writer that awaits (the gradient store writes its rows as they are computed). */
export async function writeAtomicWithAsync(link: string, write: (tmp: string) => Promise<void>): Promise<void> {
  const path = physicalPath(link);
  const tmp = tempPathFor(path);
  try {
    await write(tmp);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw notWritable(e, path);
  }
  commitTemp(tmp, path, false);
}

/**
 * A permission error (or a missing folder) met writing `target`'s temporary, said of the target
 * and its folder (the temporary's name means nothing to the person); any other error as it is.
 */
export function notWritable(e: unknown, target: string): unknown {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT' && !existsSync(dirname(target)))
    return Object.assign(new Error(`cannot write ${basename(target)}: its folder ${dirname(target)} does not exist`), {
      code,
    });
  if (code !== 'EACCES' && code !== 'EPERM' && code !== 'EROFS') return e;
  const why = code === 'EROFS' ? 'is on a read-only file system' : 'is not writable by this user';
  return Object.assign(new Error(`cannot write ${basename(target)}: its folder ${dirname(target)} ${why} (${code})`), {
    code,
  });
}

/**
 * The file a path names once symbolic links are followed (a dangling link's target included):
 * the rename must replace that file, not the link (a flags file shared by a link, a cleaned copy
 * linked into a training folder), so the temporary is made beside it.
 */
export function resolveLinks(path: string): string {
  // the folders on the way as the system resolves them (`physicalPath`): the checks before a write
  // read the path through the system, so the write must land where they looked
  let p = physicalPath(path);
  for (let hops = 0; hops < 40; hops++) {
    let target: string;
    try {
      if (!lstatSync(p).isSymbolicLink()) return p;
      target = readlinkSync(p);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return p; // a new file
      throw e;
    }
    // a relative target is read from the link's real folder: lexically against a path that runs
    // through another link, `../` went elsewhere than the system goes
    p = resolve(realOrResolved(dirname(p)), target);
  }
  throw new Error(`${path}: too many levels of symbolic links`);
}

/**
 * Flushes a finished temporary, renames it over `path` and flushes the folder; removes it on
 * failure. `keepMode`: the temporary first gets the mode of the file it replaces (a rename would
 * otherwise reset a group-writable flags file to the temporary's), after the flush, which reads it.
 */
function commitTemp(tmp: string, path: string, keepMode: boolean): void {
  try {
    fsyncPath(tmp);
    if (keepMode)
      try {
        chmodSync(tmp, statSync(path).mode & 0o7777);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      }
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  fsyncDir(dirname(path));
}

/**
 * Replaces the folder `dir` with the one `fill(tmp)` writes into the (created, empty) temporary
 * folder it is given (`stageDir`, then `commitDir`). On any error the temporary is removed and
 * the old folder stays. A `dir` that is a symbolic link is written through: the folder it names
 * is replaced and the link stays (an --out linked to another disk keeps its data there; the
 * checks before a write read through the link too, so they judge the folder that is replaced).
 */
export function replaceDirAtomic(dir: string, fill: (tmp: string) => void): void {
  const tmp = stageDir(dir);
  try {
    fill(tmp);
    commitDir(tmp, dir);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}

/**
 * A new, empty temporary folder beside `dir` (`<dir>.tmp-<pid>-…`) for a writer that fills it over
 * time (a training run writes its checkpoints there) and then calls `commitDir`. A process killed
 * before that leaves a temporary that `cleanStaleTemps` removes once the process is gone.
 */
export function stageDir(dirIn: string): string {
  const dir = resolveLinks(dirIn);
  mkdirSync(dirname(dir), { recursive: true });
  restoreReplacedDir(dir); // an earlier writer killed between its two renames
  const tmp = tempPathFor(dir);
  mkdirSync(tmp);
  return tmp;
}

/**
 * Puts the filled temporary `tmp` (from `stageDir`) in place of `dir`: every file is flushed, the
 * old folder is renamed aside (`<dir>.old-<pid>-…`), the new one renamed into place, and only then
 * is the old one removed. The live folder is never deleted file by file, so a crash at any moment
 * leaves the old folder, the new one, or (between the two renames) the old one set aside, which
 * `restoreReplacedDir` (called by readers and by `cleanStaleTemps`) puts back once the writer is
 * gone. On an error the old folder stays and so does the temporary (a caller may keep it: a
 * training run's finished model); `replaceDirAtomic` removes its own.
 */
export function commitDir(tmp: string, dirIn: string): void {
  const dir = resolveLinks(dirIn);
  const old = tempPathFor(dir, 'old');
  let movedAside = false;
  try {
    fsyncTree(tmp);
    if (existsSync(dir)) {
      renameSync(dir, old);
      movedAside = true;
    }
    renameSync(tmp, dir);
  } catch (e) {
    if (movedAside && !existsSync(dir))
      try {
        renameSync(old, dir);
      } catch {
        // left set aside: restoreReplacedDir puts it back once this process is gone
      }
    throw e;
  }
  fsyncDir(dirname(dir));
  // best effort: the new folder is in place; a leftover is removed by cleanStaleTemps later
  if (movedAside) rmSync(old, { recursive: true, force: true, maxRetries: 3 });
}

/**
 * Puts back the previous version of `dir` when a process killed in the middle of
 * `replaceDirAtomic` left it set aside (`<dir>.old-<pid>-…`, that pid no longer running) and no
 * `dir` in its place. Returns whether it restored one. Cheap when there is nothing to do.
 */
export function restoreReplacedDir(dirIn: string): boolean {
  const dir = resolveLinks(dirIn);
  if (existsSync(dir)) return false;
  const parent = dirname(dir);
  const prefix = `${basename(dir)}.old-`;
  let names: string[];
  try {
    names = readdirSync(parent).filter((n) => n.startsWith(prefix));
  } catch {
    return false;
  }
  for (const name of names) {
    const t = tempName(name);
    if (t?.kind !== 'old' || name.slice(0, t.index) !== basename(dir) || !t.gone) continue;
    try {
      renameSync(join(parent, name), dir);
    } catch (e) {
      // another reader (a worker thread, the CLI beside the server) put it back first
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTEMPTY' || code === 'EEXIST') return false;
      throw e;
    }
    fsyncDir(parent);
    return true;
  }
  return false;
}

/**
 * `restoreReplacedDir` for `dir` and the folders above it that are missing, outermost first: a
 * file read inside a replaced folder (`corpus/tokenizer/tokenizer.json` of a corpus a killed
 * `data build` set aside) needs the folder put back that was replaced, whichever level that is.
 * Returns whether it restored one. Cheap when `dir` exists.
 */
export function restoreReplacedPath(dir: string): boolean {
  const missing: string[] = [];
  for (let p = physicalPath(dir); !existsSync(p); p = dirname(p)) {
    missing.push(p);
    if (dirname(p) === p) break;
  }
  let restored = false;
  for (const p of missing.reverse()) {
    if (restoreReplacedDir(p)) restored = true;
    else if (!existsSync(p)) break; // nothing set aside here: the levels below cannot exist either
  }
  return restored;
}

/**
 * Removes the temporaries (files or folders) that processes which no longer run left in `root`
 * and its subfolders down to `depth` levels. Only names of our pattern whose pid is not alive are
 * touched; symbolic links are never followed. A folder's previous version set aside by a killed
 * `replaceDirAtomic` is put back where its folder is missing, removed where the new one is in
 * place. With `prefix`, only names in `root` itself that start with it are looked at (the
 * siblings of one folder in a user's directory). Returns the paths removed (or put back).
 */
export function cleanStaleTemps(
  root: string,
  depth = 3,
  prefix = '',
  options: { fullFormOnly?: boolean; keep?: ReadonlyArray<string> } = {},
): string[] {
  const removed: string[] = [];
  const walk = (dir: string, level: number) => {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return; // absent or unreadable: nothing of ours to clean
    }
    for (const name of names) {
      if (level === 1 && !name.startsWith(prefix)) continue;
      const p = join(dir, name);
      let st: ReturnType<typeof lstatSync>;
      try {
        st = lstatSync(p);
      } catch {
        continue;
      }
      if (st.isSymbolicLink()) continue;
      const t = tempName(name);
      // in a person's folder only our current names: a `notes.tmp-20261205` is theirs
      if (t && options.fullFormOnly && !FULL_TEMP_NAME.test(name)) continue;
      if (options.keep?.some((k) => realOrResolved(k) === realOrResolved(p))) continue; // a caller still reads from it
      if (t?.gone) {
        // a folder's previous version set aside by a writer killed before it renamed the new one
        // into place: put it back rather than lose the folder
        if (t.kind === 'old' && restoreReplacedDir(join(dir, name.slice(0, t.index)))) {
          removed.push(p);
          continue;
        }
        try {
          rmSync(p, { recursive: true, force: true });
          removed.push(p);
        } catch {
          // best effort: another user's leftover in a shared (sticky) folder is not ours to remove
        }
      } else if (st.isDirectory() && level < depth) walk(p, level + 1);
    }
  };
  walk(root, 1);
  return removed;
}

/**
 * Removes the temporaries that killed writers of `path` left (`<name>.tmp-<pid>-…`, and the
 * lock's), beside it and, for a symbolic link, beside the file or folder it points to (where
 * `writeAtomicWith` with `userFile` and the folder writers put them). Only this version's full
 * temporary names: these are a person's folders, where a `corpus.tmp-20240101` is their own copy
 * (the older `.tmp-<pid>` form matched it, and a pid that no process had was taken for a dead writer).
 * `keep`: paths of temporaries left in place (a killed train's staging folder a new run resumes from).
 */
export function cleanStaleTempsOf(path: string, keep: ReadonlyArray<string> = []): string[] {
  return [...new Set([physicalPath(path), resolveLinks(path)])].flatMap((p) =>
    cleanStaleTemps(dirname(p), 1, `${basename(p)}.`, { fullFormOnly: true, keep }),
  );
}

/** The names this version gives its temporaries (`tempPathFor`), pid, thread and counter. */
const FULL_TEMP_NAME = /\.(?:tmp|old)-\d+-\d+x\d+(?:-h[0-9a-f]{8}(?:-s\d+)?)?$/;

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
