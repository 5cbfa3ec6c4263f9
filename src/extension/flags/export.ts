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

/** Splits text into lines that keep their terminators, so joining them gives the text back. */
export function splitLinesKeepEnds(text: string): string[] {
  const out: string[] = [];
  let start = 0;
  while (start < text.length) {
    const nl = text.indexOf('\n', start);
    const end = nl < 0 ? text.length : nl + 1;
    out.push(text.slice(start, end));
    start = end;
  }
  return out;
}

export interface FilterResult {
  text: string;
  /** records kept */
  kept: number;
  /** the removed records: 1-based line and hash */
  removed: Array<{ line: number; hash: string }>;
  /** excluded hashes that no line of the dataset has (the file changed, or another dataset's flag) */
  missing: string[];
}

/** The dataset text without the records whose content hash is excluded. */
export function filterDataset(text: string, excluded: ReadonlySet<string>): FilterResult {
  const lines = splitLinesKeepEnds(text);
  const found = new Set<string>();
  const removed: FilterResult['removed'] = [];
  let kept = 0;
  let out = '';
  lines.forEach((l, i) => {
    const h = lineHash(l);
    if (h !== undefined && excluded.has(h)) {
      found.add(h);
      removed.push({ line: i + 1, hash: h });
      return;
    }
    if (h !== undefined) kept++;
    out += l;
  });
  // a BOM on a removed first line stays with the file
  if (text.startsWith('\uFEFF') && !out.startsWith('\uFEFF')) out = `\uFEFF${out}`;
  return { text: out, kept, removed, missing: [...excluded].filter((h) => !found.has(h)) };
}

/** 0-based indices of the lines whose record is excluded (for a WorkspaceEdit that deletes them). */
export function linesToRemove(text: string, excluded: ReadonlySet<string>): number[] {
  return filterDataset(text, excluded).removed.map((r) => r.line - 1);
}

export interface ExportResult extends FilterResult {
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
  const r = filterDataset(readFileSync(datasetPath, 'utf8'), excluded);
  writeFileAtomic(outPath, r.text);
  return { ...r, outPath };
}

function same(a: string, b: string): boolean {
  if (resolve(a) === resolve(b)) return true;
  try {
    return existsSync(a) && existsSync(b) && realpathSync(a) === realpathSync(b);
  } catch {
    return false;
  }
}
