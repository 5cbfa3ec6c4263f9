// The flags sidecar: `<dataset>.exclude.jsonl` next to the dataset, one
// `{"hash", "line", "reason", "score", "query"}` per flagged example (the
// README's "In VS Code" section). `influence-lens train --exclude` reads the same file.
//
// Nothing is ever lost: every change is a read-modify-write of the whole file done while holding
// a lock on it (common/owner-lock.ts: a `<sidecar>.lock` file naming its process, so two editor
// windows, or the editor and a script, never overwrite each other's flags; the lock of a process
// that died is taken over at once, and that of a live one never, even a suspended one). The new content goes through a temporary file that is flushed and renamed
// over the old one (a crash leaves the old file or the new one, never half of either), and lines
// this code does not understand (hand edits, merge conflict markers, records from a newer version)
// are kept verbatim and in place. Flagging an already flagged example keeps its first entry.
// Pure Node (no `vscode`), unit-tested.
import { existsSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { cleanStaleTempsOf, notWritable, resolveLinks, writeFileAtomic } from '../../common/atomic-write';
import { asBuffer, byteLines, hasBom, lineText, UTF8_BOM } from '../../common/byte-lines';
import { describeOwner, tryLock } from '../../common/owner-lock';

export { writeFileAtomic };

export interface FlagEntry {
  /** the example's content hash (16 hex digits) */
  hash: string;
  /** 1-based line in the dataset when it was flagged (lines move; the hash is the identity) */
  line: number;
  /** why it was flagged, in words */
  reason: string;
  /** its influence score on the query that led to the flag (null when flagged by hand) */
  score: number | null;
  /** that query: prompt + completion ('' when flagged by hand) */
  query: string;
}

export interface SidecarLine {
  /** 1-based line in the sidecar */
  line: number;
  /** the line as it is in the file (without its newline) */
  text: string;
  /** the line's bytes as they are in the file, terminator included: what a rewrite puts back */
  raw: Buffer;
  /** the entry, when the line is one */
  entry?: FlagEntry;
}

export interface Sidecar {
  /** the file starts with a UTF-8 byte order mark (kept on rewrite) */
  bom?: boolean;
  lines: SidecarLine[];
  entries: FlagEntry[];
  /** lines that are neither blank nor an entry: kept, and reported */
  problems: Array<{ line: number; message: string }>;
}

/** `data/train.jsonl` → `data/train.exclude.jsonl` (any other name gets `.exclude.jsonl` appended). */
export function sidecarPathFor(datasetPath: string): string {
  return datasetPath.replace(/\.jsonl$/i, '') + '.exclude.jsonl';
}

/**
 * Another dataset file whose flags would go to the same sidecar as `datasetPath`'s
 * (`train.json` and `train.json.jsonl`, `train` and `train.jsonl`, `a.jsonl` and `a.JSONL`), or
 * undefined. Flags are written only when there is none: one sidecar must not mix two datasets.
 */
export function sidecarSharedWith(datasetPath: string): string | undefined {
  const sidecar = sidecarPathFor(datasetPath);
  const stem = sidecar.replace(/\.exclude\.jsonl$/i, '');
  const dir = dirname(stem);
  const name = basename(stem).toLowerCase();
  let siblings: string[];
  try {
    siblings = readdirSync(dir);
  } catch {
    return undefined;
  }
  const mine = basename(datasetPath);
  return siblings
    .filter((f) => f !== mine && (f.toLowerCase() === `${name}.jsonl` || f === basename(stem)))
    .map((f) => join(dir, f))
    .find((p) => existsSync(p) && statSync(p).isFile());
}

/** Whether a path is a sidecar (so it is never mistaken for a dataset). */
export function isSidecarPath(path: string): boolean {
  return /\.exclude\.jsonl$/i.test(path);
}

/**
 * The dataset a sidecar belongs to, the inverse of `sidecarPathFor`: `train.exclude.jsonl` →
 * `train.jsonl` (or `train.JSONL`, whichever exists), `train.json.exclude.jsonl` → `train.json`
 * (a dataset not named `.jsonl` keeps its whole name). With neither on disk, `<stem>.jsonl`.
 */
export function datasetPathForSidecar(sidecarPath: string): string {
  const stem = sidecarPath.replace(/\.exclude\.jsonl$/i, '');
  const jsonl = `${stem}.jsonl`;
  if (existsSync(jsonl)) return jsonl;
  try {
    const dir = dirname(stem);
    const name = basename(stem);
    const other = readdirSync(dir).find((f) => f.toLowerCase() === `${name}.jsonl`.toLowerCase() && f.startsWith(name));
    if (other) return join(dir, other);
  } catch {
    // no such folder: the default below
  }
  if (existsSync(stem) && statSync(stem).isFile()) return stem;
  return jsonl;
}

/**
 * The sidecar's lines, each with its bytes as in the file (line ending included), so that a
 * rewrite puts back every line it does not change byte for byte: CRLF endings, a BOM, bytes
 * that are not UTF-8 (such a line is reported and kept, never re-encoded). Split as every JSONL
 * file is (common/byte-lines.ts).
 */
export function parseSidecar(data: Uint8Array | string): Sidecar {
  const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : asBuffer(data);
  const out: Sidecar = { lines: [], entries: [], problems: [] };
  if (hasBom(buf)) out.bom = true;
  for (const l of byteLines(buf)) {
    const text = lineText(buf, l);
    if (text === undefined) {
      out.lines.push({ line: l.line, text: buf.subarray(l.start, l.end).toString('utf8'), raw: l.raw });
      out.problems.push({ line: l.line, message: 'not UTF-8 text' });
      continue;
    }
    const line: SidecarLine = { line: l.line, text, raw: l.raw };
    out.lines.push(line);
    if (!text.trim()) continue;
    if (CONFLICT_MARKER.test(text)) {
      out.problems.push({ line: l.line, message: 'a merge conflict marker' });
      continue;
    }
    const entry = toEntry(text);
    if (typeof entry === 'string') out.problems.push({ line: l.line, message: entry });
    else {
      line.entry = entry;
      out.entries.push(entry);
    }
  }
  return out;
}

/** git's conflict markers (`<<<<<<< ours`, `|||||||`, `=======`, `>>>>>>> theirs`). */
const CONFLICT_MARKER = /^(<{7}|\|{7}|={7}|>{7})( |$)/;

/**
 * The hashes a sidecar flags, read from the file on disk, for the commands that remove examples
 * (export, apply removal). A sidecar with any line that is not a flag (a merge conflict, a hand
 * edit gone wrong, bytes that are not UTF-8) is refused: which examples it means is not known, so
 * removing either side's, or none, could drop or keep the wrong ones. `train --exclude` refuses
 * the same files.
 */
export function readFlagsForRemoval(path: string): Set<string> {
  const s = readSidecar(path);
  const p = s.problems[0];
  if (p) {
    const conflict = s.problems.some((x) => x.message === 'a merge conflict marker');
    throw new Error(
      `${path} line ${p.line} is not a flag (${p.message})${s.problems.length > 1 ? `, and ${s.problems.length - 1} more line(s)` : ''}: ` +
        (conflict
          ? 'resolve the merge conflict first (keep the flags you mean, delete the <<<<<<< ======= >>>>>>> lines)'
          : 'correct or delete those lines first') +
        '; nothing was changed',
    );
  }
  return new Set(s.entries.map((e) => e.hash));
}

export function readSidecar(path: string): Sidecar {
  let data: Buffer;
  try {
    data = readFileSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { lines: [], entries: [], problems: [] };
    throw e;
  }
  return parseSidecar(data);
}

/** One entry as a sidecar line (fixed key order, so the file diffs well). */
export function formatEntry(e: FlagEntry): string {
  return JSON.stringify({ hash: e.hash, line: e.line, reason: e.reason, score: e.score, query: e.query });
}

/** Adds entries whose hash is not flagged yet; returns how many were added. */
export function addFlags(path: string, entries: FlagEntry[]): Promise<number> {
  return withLock(path, () => addFlagsUnlocked(path, entries));
}

function addFlagsUnlocked(path: string, entries: FlagEntry[]): number {
  const s = readSidecar(path);
  const have = new Set(s.entries.map((e) => e.hash));
  const add: FlagEntry[] = [];
  for (const e of entries) {
    if (have.has(e.hash)) continue;
    have.add(e.hash);
    add.push(e);
  }
  if (!add.length) return 0;
  writeLines(path, s, [...s.lines, ...add.map(formatEntry)]);
  return add.length;
}

/** Removes the entries with these hashes (every other line stays); returns how many were removed. */
export function removeFlags(path: string, hashes: Iterable<string>): Promise<number> {
  const drop = new Set(hashes);
  return withLock(path, () => removeFlagsUnlocked(path, drop));
}

function removeFlagsUnlocked(path: string, drop: Set<string>): number {
  const s = readSidecar(path);
  const keep = s.lines.filter((l) => !(l.entry && drop.has(l.entry.hash)));
  const removed = s.lines.length - keep.length;
  if (removed) writeLines(path, s, keep);
  return removed;
}

/** Changes the reason of the entry with this hash; returns whether it was found. */
export function setReason(path: string, hash: string, reason: string): Promise<boolean> {
  return withLock(path, () => setReasonUnlocked(path, hash, reason));
}

function setReasonUnlocked(path: string, hash: string, reason: string): boolean {
  const s = readSidecar(path);
  let found = false;
  const lines = s.lines.map((l): SidecarLine | string => {
    if (!l.entry || l.entry.hash !== hash) return l;
    found = true;
    // keep any fields a newer version wrote, in their order
    return JSON.stringify({ ...(JSON.parse(l.text) as object), reason });
  });
  if (found) writeLines(path, s, lines);
  return found;
}

/**
 * How long to wait for another live process's lock (a healthy holder keeps it for milliseconds);
 * INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS changes it (tests).
 */
export function lockWaitMs(): number {
  const v = Number(process.env.INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS);
  return Number.isFinite(v) && v >= 0 ? v : 15_000;
}

/**
 * Runs `fn` holding the sidecar's lock (`<sidecar>.lock`), polling for it. The waits between tries
 * are awaited, never slept: the editor runs this on the extension host's one thread, which every
 * extension of the window shares (a blocking wait froze hovers for up to 15 s). The lock of a
 * process that no longer runs is taken over at once; a live holder's (even one suspended for
 * minutes) never is: after `lockWaitMs()` this throws, naming that process, and nothing is
 * written. `fn` runs synchronously, so two changes from one process never interleave.
 */
export async function withLock<T>(path: string, fn: () => T): Promise<T> {
  // a sidecar that is a symbolic link (flags shared between checkouts) is locked and written as
  // the file it points to, so writers through two links never overwrite each other
  const real = resolveLinks(path);
  const lockPath = `${real}.lock`;
  const deadline = Date.now() + lockWaitMs();
  let release: (() => void) | undefined;
  for (let wait = 5; !release; wait = Math.min(wait * 2, 100)) {
    let got: ReturnType<typeof tryLock>;
    try {
      got = tryLock(lockPath, `changing the flags in ${path}`);
    } catch (e) {
      throw notWritable(e, real); // said of the flags file, not of its lock
    }
    if (typeof got === 'function') release = got;
    else {
      if (Date.now() > deadline)
        throw new Error(
          `${path} is being changed by ${describeOwner(got)}; try again (delete ${lockPath} only if no such process runs)`,
        );
      await sleep(wait);
    }
  }
  try {
    // leftovers of a writer killed mid-write (`<sidecar>.tmp-<pid>-…`), once that process is gone
    cleanStaleTempsOf(path);
    return fn();
  } finally {
    release();
  }
}

/**
 * Writes the sidecar back: lines read from it (`SidecarLine`) byte for byte, new or changed ones
 * (strings) with the file's own line ending (CRLF when most of its lines have one), its BOM kept.
 * A result with no text left removes the file.
 */
function writeLines(path: string, read: Sidecar, lines: Array<SidecarLine | string>): void {
  if (!lines.some((l) => (typeof l === 'string' ? l : l.text).trim())) {
    rmSync(resolveLinks(path), { force: true }); // a link stays, and is written through by the next flag
    return;
  }
  const crlf = read.lines.filter((l) => l.raw.at(-2) === 0x0d && l.raw.at(-1) === 0x0a).length;
  const eol = crlf > read.lines.length / 2 ? '\r\n' : '\n';
  const parts: Buffer[] = read.bom ? [UTF8_BOM] : [];
  lines.forEach((l, i) => {
    if (typeof l === 'string') parts.push(Buffer.from(`${l}${eol}`, 'utf8'));
    else {
      parts.push(l.raw);
      // a last line without its newline gets one when a line follows it
      if (l.raw.at(-1) !== 0x0a && i + 1 < lines.length) parts.push(Buffer.from(eol));
    }
  });
  // the person's file: a link to it (flags shared between checkouts) is written through, its mode kept
  writeFileAtomic(path, Buffer.concat(parts), { userFile: true });
}

function toEntry(text: string): FlagEntry | string {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return 'not valid JSON';
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return 'not a JSON object';
  const o = v as Record<string, unknown>;
  if (typeof o.hash !== 'string' || !o.hash) return 'no "hash" string';
  return {
    hash: o.hash,
    line: typeof o.line === 'number' ? o.line : 0,
    reason: typeof o.reason === 'string' ? o.reason : '',
    score: typeof o.score === 'number' ? o.score : null,
    query: typeof o.query === 'string' ? o.query : '',
  };
}

/** Whether `path` is a folder (following links; false when nothing is there). */
export function isFolder(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}
