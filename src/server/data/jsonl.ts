// Reading JSONL training data. We scan the raw bytes for '\n' rather than decoding the whole
// file into one string: V8 caps strings at ~512 MiB, and byte scanning keeps line numbers exact.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { type ByteLine, byteLines, lineText } from '../../common/byte-lines';
import { nestingDepth } from '../../common/ids';
import { DataError } from './errors';

export { DataError } from './errors';

export interface JsonlRow {
  /** 1-based line number in the file. */
  line: number;
  value: unknown;
}

export interface SkippedLine {
  line: number;
  message: string;
}

export interface JsonlResult {
  rows: JsonlRow[];
  skipped: SkippedLine[];
  /** sha256 of the bytes read, when asked for (`sha256: true`) */
  sha256?: string;
}

export interface ReadJsonlOptions {
  /** Record malformed lines in `skipped` instead of throwing. */
  skipMalformed?: boolean;
  /** Stop after this many rows (lets `--max-examples` avoid parsing a huge file to the end). */
  limit?: number;
  /** Also digest the bytes read (the server tells a metadata-only change from a new file by it). */
  sha256?: boolean;
  /**
   * false: a file whose lines are never skipped (explain's queries, a flags file), so a refusal
   * does not suggest --skip-malformed, which would not help. Default true.
   */
  skippable?: boolean;
}

export const SKIP_HINT = '(pass --skip-malformed to skip such lines)';

/**
 * How deeply a record may nest arrays and objects. Real training records nest a few levels
 * (messages → message → content); a line nested thousands of levels deep would overflow the
 * call stack of every recursive JSON walker downstream (JSON.stringify in a response included),
 * so it is a malformed line.
 */
export const MAX_JSON_DEPTH = 100;

export function readJsonl(path: string, options: ReadJsonlOptions = {}): JsonlResult {
  const buf = readBytes(path);
  const rows: JsonlRow[] = [];
  const skipped: SkippedLine[] = [];
  const limit = options.limit ?? Number.POSITIVE_INFINITY;
  // lines as common/byte-lines.ts splits them (a BOM, as some Windows editors write, and CRLF endings)
  for (const l of byteLines(buf)) {
    if (rows.length >= limit) break;
    const problem = parseLine(buf, l, rows);
    if (problem !== undefined) {
      if (!options.skipMalformed)
        throw new DataError(`${path}:${l.line}: ${problem}${options.skippable === false ? '' : ` ${SKIP_HINT}`}`);
      skipped.push({ line: l.line, message: problem });
    }
  }
  return options.sha256 ? { rows, skipped, sha256: createHash('sha256').update(buf).digest('hex') } : { rows, skipped };
}

/** Parses one line into `rows`; returns what is wrong with it, or undefined. Blank lines are fine. */
function parseLine(buf: Buffer, l: ByteLine, rows: JsonlRow[]): string | undefined {
  const { start, end, line } = l;
  const text = lineText(buf, l);
  if (text === undefined) return 'invalid UTF-8';
  if (text.trim() === '') return undefined;
  const tooDeep = `the value nests arrays/objects more than ${MAX_JSON_DEPTH} levels deep`;
  // V8 takes seconds to build a 10 MB line of nested brackets: refuse a long line that nests too
  // deep from its bytes first (short lines skip this scan; the check after parsing covers them)
  if (end - start > LONG_LINE_BYTES && bytesNestDeeper(buf, start, end, MAX_JSON_DEPTH)) return tooDeep;
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    // a raw CR cannot be inside a JSON string: lines ending in CR alone (classic Mac) read as one line
    const cr = /\r(?!\n)/.test(text)
      ? " (the line holds a bare carriage return: if the file's lines end in CR alone, convert them to LF or CRLF)"
      : '';
    return `invalid JSON: ${(e as Error).message}${cr}`;
  }
  if (nestingDepth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) return tooDeep;
  rows.push({ line, value });
  return undefined;
}

const LONG_LINE_BYTES = 64 * 1024;

/** Whether the JSON text in buf[start, end) opens more than `limit` brackets at once (strings skipped). */
function bytesNestDeeper(buf: Buffer, start: number, end: number, limit: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = start; i < end; i++) {
    const c = buf[i];
    if (inString) {
      if (c === 0x5c)
        i++; // backslash: skip the escaped byte
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      if (++depth > limit) return true;
    } else if (c === 0x5d || c === 0x7d) depth--;
  }
  return false;
}

function readBytes(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new DataError(`${path}: no such file`);
    if (code === 'EISDIR') throw new DataError(`${path}: is a directory, expected a .jsonl file`);
    throw new DataError(`${path}: cannot read: ${(e as Error).message}`);
  }
}
