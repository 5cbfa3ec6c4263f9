// One spelling per file: the real path (links resolved), or, for a path that does not exist (yet),
// its nearest existing parent's real path with the rest appended. Where two names must be told
// to be the same file (an --out against the inputs, a history entry against an editor's file).
import { realpathSync } from 'node:fs';
import { resolve } from 'node:path';

export function realOrResolved(p: string): string {
  const abs = resolve(p);
  try {
    return realpathSync(abs);
  } catch {
    return abs;
  }
}
