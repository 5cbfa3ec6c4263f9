// "Export cleaned dataset": a filtered copy of a JSONL dataset without the flagged examples, in
// the same format (every kept line byte for byte, line endings and blank or malformed lines
// included), written next to the original; the source is never overwritten. Also the line
// list that "Apply removal to file" deletes. Pure Node (no `vscode`), unit-tested.
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import { lineHash } from './hash';
import { readSidecar, sidecarPathFor, writeFileAtomic } from './sidecar';

/** `data/train.jsonl` → `data/train.cleaned.jsonl`. */
export function cleanedPathFor(datasetPath: string): string {
  return datasetPath.replace(/\.jsonl$/i, '') + '.cleaned.jsonl';
}

export interface FilterCounts {
  /** records kept */
  kept: number;
  /** the removed records: 1-based line and hash */
  removed: Array<{ line: number; hash: string }>;
  /** excluded hashes that no line of the dataset has (the file changed, or another dataset's flag) */
  missing: string[];
}

export interface FilterResult extends FilterCounts {
  text: string;
}

// ignoreBOM: a byte order mark inside the file stays in the line's text, which then is not JSON,
// as the server reads it (data/jsonl.ts); only the file's first three bytes are its BOM
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const BOM = Buffer.from([0xef, 0xbb, 0xbf]);

/**
 * The dataset's bytes without the records whose content hash is excluded: every other line is
 * copied byte for byte (its line ending, the file's BOM, and bytes that are not UTF-8 included). A
 * line that is not valid UTF-8, or starts with a stray BOM, is malformed as the server reads it
 * (data/jsonl.ts): kept, not counted.
 */
export function filterDatasetBytes(data: Uint8Array, excluded: ReadonlySet<string>): FilterCounts & { bytes: Buffer } {
  let buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const bom = buf.subarray(0, 3).equals(BOM);
  if (bom) buf = buf.subarray(3);
  const found = new Set<string>();
  const removed: FilterCounts['removed'] = [];
  const out: Buffer[] = bom ? [BOM] : [];
  let kept = 0;
  let line = 0;
  for (let start = 0; start < buf.length; line++) {
    const nl = buf.indexOf(0x0a, start);
    const end = nl < 0 ? buf.length : nl + 1;
    const bytes = buf.subarray(start, end);
    start = end;
    let h: string | undefined;
    try {
      const text = UTF8.decode(bytes);
      h = text.startsWith('\uFEFF') ? undefined : lineHash(text);
    } catch {
      h = undefined; // not UTF-8: malformed
    }
    if (h !== undefined && excluded.has(h)) {
      found.add(h);
      removed.push({ line: line + 1, hash: h });
      continue;
    }
    if (h !== undefined) kept++;
    out.push(bytes);
  }
  return { bytes: Buffer.concat(out), kept, removed, missing: [...excluded].filter((h) => !found.has(h)) };
}

/** The dataset text without the records whose content hash is excluded (an editor's text). */
export function filterDataset(text: string, excluded: ReadonlySet<string>): FilterResult {
  const { bytes, ...counts } = filterDatasetBytes(Buffer.from(text, 'utf8'), excluded);
  return { ...counts, text: bytes.toString('utf8') };
}

/** 0-based indices of the lines whose record is excluded (for a WorkspaceEdit that deletes them). */
export function linesToRemove(text: string, excluded: ReadonlySet<string>): number[] {
  return filterDataset(text, excluded).removed.map((r) => r.line - 1);
}

export interface ExportResult extends FilterCounts {
  outPath: string;
}

/**
 * Writes the cleaned copy of `datasetPath` (without the examples its sidecar flags) to `outPath`
 * (default `<name>.cleaned.jsonl` beside it). Refuses to write over the dataset or its sidecar.
 */
export function exportCleaned(datasetPath: string, outPath = cleanedPathFor(datasetPath)): ExportResult {
  const sidecar = sidecarPathFor(datasetPath);
  if (same(outPath, datasetPath) || same(outPath, sidecar))
    throw new Error(`refusing to write the cleaned copy over ${outPath}: choose another file name`);
  const excluded = new Set(readSidecar(sidecar).entries.map((e) => e.hash));
  const { bytes, ...counts } = filterDatasetBytes(readFileSync(datasetPath), excluded);
  writeFileAtomic(outPath, bytes);
  return { ...counts, outPath };
}

function same(a: string, b: string): boolean {
  if (resolve(a) === resolve(b)) return true;
  try {
    return existsSync(a) && existsSync(b) && realpathSync(a) === realpathSync(b);
  } catch {
    return false;
  }
}
