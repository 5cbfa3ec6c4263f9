// "Export cleaned dataset": a filtered copy of a JSONL dataset without the flagged examples, in
// the same format (every kept line byte for byte, line endings and blank or malformed lines
// included), written next to the original; the source is never overwritten. Also the line
// list that "Apply removal to file" deletes. Pure Node (no `vscode`), unit-tested.

import { isUtf8 } from 'node:buffer';
import { lstatSync, readFileSync, statSync } from 'node:fs';
import { cleanStaleTempsOf, resolveLinks } from '../../common/atomic-write';
import { asBuffer, byteLines, hasBom, lineText, UTF8_BOM } from '../../common/byte-lines';
import { parseJsonLine } from '../../common/json-line';
import { realOrResolved } from '../../common/real-path';
import { isFolder, isSidecarPath, readFlagsForRemoval, sidecarPathFor, writeFileAtomic } from './sidecar';

/** `data/train.jsonl` → `data/train.cleaned.jsonl`. */
export function cleanedPathFor(datasetPath: string): string {
  return datasetPath.replace(/\.jsonl$/i, '') + '.cleaned.jsonl';
}

export interface FilterCounts {
  /** records kept (JSON objects; the server reads nothing else as an example) */
  kept: number;
  /** other lines kept as they are, blank ones aside: malformed, or a JSON value that is not an object */
  other: number;
  /** the removed records: 1-based line and hash */
  removed: Array<{ line: number; hash: string }>;
  /** excluded hashes that no line of the dataset has (the file changed, or another dataset's flag) */
  missing: string[];
}

export interface FilterResult extends FilterCounts {
  text: string;
}

/**
 * The dataset's bytes without the records whose content hash is excluded: every other line is
 * copied byte for byte (its line ending, the file's BOM, and bytes that are not UTF-8 included). A
 * line that is not valid UTF-8, or starts with a stray BOM, is malformed as the server reads it
 * (the same splitting: common/byte-lines.ts): kept, not counted.
 */
export function filterDatasetBytes(data: Uint8Array, excluded: ReadonlySet<string>): FilterCounts & { bytes: Buffer } {
  const buf = asBuffer(data);
  const found = new Set<string>();
  const removed: FilterCounts['removed'] = [];
  const out: Buffer[] = hasBom(buf) ? [UTF8_BOM] : [];
  let kept = 0;
  let other = 0;
  for (const l of byteLines(buf)) {
    const text = lineText(buf, l);
    const p = text === undefined ? undefined : parseJsonLine(text);
    const h = p?.kind === 'value' ? p.hash : undefined;
    if (h !== undefined && excluded.has(h)) {
      found.add(h);
      removed.push({ line: l.line, hash: h });
      continue;
    }
    const record = p?.kind === 'value' && p.value !== null && typeof p.value === 'object' && !Array.isArray(p.value);
    if (record) kept++;
    else if (p?.kind !== 'blank') other++;
    out.push(l.raw);
  }
  return { bytes: Buffer.concat(out), kept, other, removed, missing: [...excluded].filter((h) => !found.has(h)) };
}

/** The dataset text without the records whose content hash is excluded (an editor's text). */
export function filterDataset(text: string, excluded: ReadonlySet<string>): FilterResult {
  const { bytes, ...counts } = filterDatasetBytes(Buffer.from(text, 'utf8'), excluded);
  return { ...counts, text: bytes.toString('utf8') };
}

/** 0-based indices of the lines whose record is excluded. */
export function linesToRemove(text: string, excluded: ReadonlySet<string>): number[] {
  return filterDataset(text, excluded).removed.map((r) => r.line - 1);
}

/**
 * What "Apply removal to file" deletes from an editor's text: [start, end) offsets (UTF-16, as
 * `TextDocument.positionAt` takes them), sorted and disjoint, so that one edit can hold them all.
 * Each excluded line goes with its line ending; a run of removed lines that ends the text without
 * a final newline takes the newline before it instead (the text then ends where the kept line
 * before it ends). Leaves `filterDataset`'s records, and its text but for that final newline.
 */
export function removalSpans(text: string, excluded: ReadonlySet<string>): Array<[number, number]> {
  const lines = new Set(linesToRemove(text, excluded));
  const spans: Array<[number, number]> = [];
  let start = 0;
  for (let i = 0; start < text.length || i === 0; i++) {
    const nl = text.indexOf('\n', start);
    const end = nl < 0 ? text.length : nl + 1;
    if (lines.has(i)) {
      const last = spans[spans.length - 1];
      if (last && last[1] === start) last[1] = end;
      else spans.push([start, end]);
    }
    if (nl < 0) break;
    start = end;
  }
  const last = spans[spans.length - 1];
  if (last && last[1] === text.length && !text.endsWith('\n') && last[0] > 0)
    last[0] -= text.slice(0, last[0]).endsWith('\r\n') ? 2 : 1;
  return spans;
}

/**
 * Why saving an editor's text of a file would change bytes of lines nobody edited (VS Code's text
 * model decodes bad UTF-8 as U+FFFD and gives every line one ending), or undefined. `text`, the
 * editor's text when it has no unsaved edits, must then be the file's bytes (BOM aside).
 */
export function editorRewrites(disk: Buffer, text?: string): string | undefined {
  if (!isUtf8(disk)) return 'bytes that are not UTF-8 (the editor would save them as U+FFFD)';
  const s = disk.toString('latin1');
  const crlf = s.split('\r\n').length - 1;
  const lf = s.split('\n').length - 1 - crlf;
  if (s.split('\r').length - 1 > crlf)
    return 'carriage returns without a line feed (the editor would make them line breaks)';
  if (crlf && lf) return `mixed line endings (${crlf} CRLF, ${lf} LF; the editor would save one kind)`;
  if (
    text !== undefined &&
    !Buffer.concat([hasBom(disk) ? UTF8_BOM : Buffer.alloc(0), Buffer.from(text, 'utf8')]).equals(disk)
  )
    return 'bytes the editor holds differently (its encoding setting?)';
  return undefined;
}

export interface ExportResult extends FilterCounts {
  outPath: string;
}

/** The output of an export exists, and replacing it was not asked for. */
export class OutputExistsError extends Error {}

/**
 * Writes the cleaned copy of `datasetPath` (without the examples its sidecar flags) to `outPath`
 * (default `<name>.cleaned.jsonl` beside it). An existing `outPath` is replaced only with
 * `replace` (the person said so: the editor's "Replace", the CLI's --force); the dataset itself,
 * a flags file (any `*.exclude.jsonl`, another dataset's included) or a lock never, since the
 * copy would destroy what it was made from. Refuses a sidecar with lines that are not flags
 * (`readFlagsForRemoval`).
 */
export function exportCleaned(
  datasetPath: string,
  outPath = cleanedPathFor(datasetPath),
  options: { replace?: boolean } = {},
): ExportResult {
  const sidecar = sidecarPathFor(datasetPath);
  const real = resolveLinks(outPath);
  if (
    same(outPath, datasetPath) ||
    same(outPath, sidecar) ||
    [outPath, real].some((p) => isSidecarPath(p) || /\.lock$/i.test(p))
  )
    throw new Error(`refusing to write the cleaned copy over ${outPath}: choose another file name`);
  if (isFolder(outPath)) throw new Error(`${outPath} is a folder: give the cleaned copy a file name`);
  if (exists(outPath) && !options.replace) throw new OutputExistsError(`${outPath} exists`);
  const excluded = readFlagsForRemoval(sidecar);
  const { bytes, ...counts } = filterDatasetBytes(readFileSync(datasetPath), excluded);
  // a dataset-sized temporary left by an export that was killed, once that process is gone
  cleanStaleTempsOf(outPath);
  // the copy is as private as its source: a replaced copy keeps its mode, a new one takes the
  // dataset's (0644 made a 0600 dataset's copy world-readable)
  writeFileAtomic(outPath, bytes, exists(outPath) ? { keepMode: true } : { mode: statSync(datasetPath).mode & 0o666 });
  return { ...counts, outPath };
}

/** Whether anything is at `path` (a dangling symbolic link included). */
function exists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

function same(a: string, b: string): boolean {
  return realOrResolved(a) === realOrResolved(b);
}
