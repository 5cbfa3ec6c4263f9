// A training example's content hash, exactly as the server computes it
// (`src/server/data/ids.ts`): sha256 of the record's canonical JSON (keys sorted recursively, no
// whitespace), first 16 hex digits. Lines move; hashes don't. Pure (node:crypto only).
import { createHash } from 'node:crypto';

export function contentHash(value: unknown): string {
  return createHash('sha256').update(canonicalJson(value)).digest('hex').slice(0, 16);
}

export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map((v) => canonicalJson(v ?? null)).join(',')}]`;
  if (typeof value === 'object' && value !== null) {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj)
      .filter((k) => obj[k] !== undefined)
      .sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(',')}}`;
  }
  return JSON.stringify(value) ?? 'null';
}

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
