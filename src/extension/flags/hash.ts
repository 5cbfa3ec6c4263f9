// A training example's content hash, exactly as the server computes it: the same code
// (`src/common/json-line.ts`: the line read by the server's rules, then sha256 of the record's
// canonical JSON, keys sorted recursively, no whitespace, first 16 hex digits), so the two can
// never drift apart, and a line the server cannot read as JSON has no hash here (one it refuses
// as a record does: see json-line.ts). Lines move; hashes don't.
import { canonicalJson, contentHash } from '../../common/ids';
import { lineHash } from '../../common/json-line';

export { canonicalJson, contentHash, lineHash };

/**
 * Line `line` (0-based) of an editor document as the server reads it: a byte order mark the
 * editor kept at the document's start is the file's, not the line's; anywhere else it makes the
 * line malformed, on both sides.
 */
export function lineTextAt(doc: { lineAt(line: number): { text: string } }, line: number): string {
  const text = doc.lineAt(line).text;
  return line === 0 ? text.replace(/^\uFEFF/, '') : text;
}

/** The hash of line `line` (0-based) of an editor document (`lineTextAt`), or undefined. */
export function lineHashAt(doc: { lineAt(line: number): { text: string } }, line: number): string | undefined {
  return lineHash(lineTextAt(doc, line));
}
