// A training example's content hash, exactly as the server computes it: the same code
// (`src/common/ids.ts`: sha256 of the record's canonical JSON, keys sorted recursively, no
// whitespace, first 16 hex digits), so the two can never drift apart. Lines move; hashes don't.
import { canonicalJson, contentHash } from '../../common/ids';

export { canonicalJson, contentHash };

/** The content hash of one JSONL line, or undefined for a blank or malformed line. */
export function lineHash(line: string): string | undefined {
  const t = line.replace(/^\uFEFF/, '').trim();
  if (!t) return undefined;
  try {
    return contentHash(JSON.parse(t));
  } catch {
    return undefined;
  }
}
