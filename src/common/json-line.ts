// One JSONL line as text → its value and content hash, by the rules every reader shares: the
// server's dataset reader (server/data/jsonl.ts), the cleaned export, and the editor's hovers,
// flags and Flagged view (extension/flags/hash.ts). A line the server cannot read as JSON is never
// hashable in the editor, so no flag can name a line that is not one value. A value the server
// refuses as a record (an empty completion, an unknown shape) has a hash all the same: it can be
// flagged although the server never scored it, and export leaves a flagged one out and keeps an
// unflagged one byte for byte, as it keeps every line it does not drop.
//   - blank: only whitespace (String.prototype.trim's);
//   - otherwise exactly one JSON value, as JSON.parse reads it: no stray BOM, no non-JSON
//     whitespace around it (a line with a trailing NBSP is malformed, not trimmed);
//   - nested at most MAX_JSON_DEPTH arrays/objects (a long line is checked on its text before
//     parsing: V8 takes seconds to build a 10 MB line of nested brackets).
// The hash is contentHash of the parsed value, numbers as JSON.parse reads them (so records that
// differ only in an integer past 2^53 share one: pinned in ext-sidecar.test.ts, README says so).

import { contentHash, nestingDepth } from './ids';

/**
 * How deeply a record may nest arrays and objects. Real training records nest a few levels
 * (messages → message → content); a line nested thousands of levels deep would overflow the
 * call stack of every recursive JSON walker downstream (JSON.stringify in a response included),
 * so it is a malformed line.
 */
export const MAX_JSON_DEPTH = 100;

/** Lines longer than this are checked for depth on their text before JSON.parse sees them. */
const LONG_LINE_CHARS = 64 * 1024;

export type ParsedLine =
  | { kind: 'blank' }
  | { kind: 'value'; value: unknown; hash: string }
  | { kind: 'malformed'; problem: string };

/** Reads one line (without its ending) as the server does: its value and content hash, or what is wrong. */
export function parseJsonLine(text: string): ParsedLine {
  if (text.trim() === '') return { kind: 'blank' };
  const tooDeep = `the value nests arrays/objects more than ${MAX_JSON_DEPTH} levels deep`;
  if (text.length > LONG_LINE_CHARS && textNestsDeeper(text, MAX_JSON_DEPTH))
    return { kind: 'malformed', problem: tooDeep };
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    const bom = text.startsWith('\uFEFF')
      ? ' (the line starts with a byte order mark: a BOM is read only at the start of the file; remove it from this line)'
      : '';
    // a raw CR cannot be inside a JSON string: lines ending in CR alone (classic Mac) read as one line
    const cr = /\r(?!\n)/.test(text)
      ? " (the line holds a bare carriage return: if the file's lines end in CR alone, convert them to LF or CRLF)"
      : '';
    return { kind: 'malformed', problem: `invalid JSON: ${(e as Error).message}${bom}${cr}` };
  }
  if (nestingDepth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) return { kind: 'malformed', problem: tooDeep };
  try {
    return { kind: 'value', value, hash: contentHash(value) };
  } catch (e) {
    // a record too big to hash (RangeError: the canonical text exceeds a string's length)
    if (!(e instanceof RangeError)) throw e;
    return { kind: 'malformed', problem: `cannot read: ${e.message}` };
  }
}

/** The content hash of a JSONL line, or undefined for a blank or malformed one (`parseJsonLine`). */
export function lineHash(text: string): string | undefined {
  const p = parseJsonLine(text);
  return p.kind === 'value' ? p.hash : undefined;
}

/** Whether the JSON text opens more than `limit` brackets at once (strings skipped). */
function textNestsDeeper(text: string, limit: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c)
        i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      if (++depth > limit) return true;
    } else if (c === 0x5d || c === 0x7d) depth--;
  }
  return false;
}
