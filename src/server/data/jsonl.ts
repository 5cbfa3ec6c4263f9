// Reading JSONL training data. We scan the raw bytes for '\n' rather than decoding the whole
// file into one string: V8 caps strings at ~512 MiB, and byte scanning keeps line numbers exact.
import { createHash } from 'node:crypto';
import { type ByteLine, byteLines, lineText } from '../../common/byte-lines';
import { parseJsonLine } from '../../common/json-line';
import { readRegularFile } from '../../common/read-file';
import { DataError } from './errors';

export { DataError } from './errors';

export interface JsonlRow {
  /** 1-based line number in the file. */
  line: number;
  value: unknown;
  /** the record's content hash (common/json-line.ts: the editor's flags use the same) */
  hash: string;
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

export function readJsonl(path: string, options: ReadJsonlOptions = {}): JsonlResult {
  const buf = readBytes(path);
  // Windows PowerShell (`>`, Out-File) and some editors save UTF-16: every line would read as
  // invalid UTF-8 or bad JSON, without saying why
  if (buf.length >= 2 && ((buf[0] === 0xff && buf[1] === 0xfe) || (buf[0] === 0xfe && buf[1] === 0xff)))
    throw new DataError(
      `${path}: the file is UTF-16 (it starts with the byte order mark ${buf[0] === 0xff ? 'FF FE' : 'FE FF'}); JSON Lines must be UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8 ${path} > converted.jsonl`,
    );
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

/** Parses one line into `rows` (common/json-line.ts); returns what is wrong with it, or undefined. Blank lines are fine. */
function parseLine(buf: Buffer, l: ByteLine, rows: JsonlRow[]): string | undefined {
  const text = lineText(buf, l);
  if (text === undefined) return 'invalid UTF-8';
  const p = parseJsonLine(text);
  if (p.kind === 'malformed') return p.problem;
  if (p.kind === 'value') rows.push({ line: l.line, value: p.value, hash: p.hash });
  return undefined;
}

function readBytes(path: string): Buffer {
  try {
    return readRegularFile(path, (what) => new DataError(`${path}: is ${what}, expected a .jsonl file`));
  } catch (e) {
    if (e instanceof DataError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new DataError(`${path}: no such file`);
    if (code === 'EISDIR') throw new DataError(`${path}: is a directory, expected a .jsonl file`);
    throw new DataError(`${path}: cannot read: ${(e as Error).message}`);
  }
}
