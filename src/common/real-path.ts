// One spelling per file: the real path (links resolved), or, for a path that does not exist (yet),
// its nearest existing parent's real path with the rest appended. Where two names must be told
// to be the same file (an --out against the inputs, a history entry against an editor's file).
import { lstatSync, realpathSync } from 'node:fs';
import { dirname, isAbsolute, join, parse, sep } from 'node:path';

export function realOrResolved(p: string): string {
  const abs = physicalPath(p);
  try {
    return realpathSync(abs);
  } catch {
    return abs;
  }
}

/**
 * The absolute path the system means by `p`, resolved as the system resolves it: each folder on
 * the way has its links followed before a `..` after it applies. `path.resolve` drops `link/..` as
 * text, so for a link into another folder it names another file than the one the system opens:
 * a check that read `out` through the system and a writer that started from `path.resolve(out)`
 * judged one folder and replaced another (`--out par/../x` with `par` a link replaced the user's
 * own `x`). The last name is kept as written, not followed (a writer decides whether to write
 * through a link there); names past one that does not exist are appended as they are.
 */
export function physicalPath(p: string): string {
  const abs = isAbsolute(p) ? p : `${process.cwd()}${sep}${p}`;
  const root = parse(abs).root;
  const names = abs
    .slice(root.length)
    .split(/[\\/]+/)
    .filter((n) => n !== '' && n !== '.');
  const last = names.pop();
  let cur = root;
  let missing = false;
  const step = (name: string) => {
    if (name === '..') {
      cur = dirname(cur);
      return;
    }
    const next = join(cur, name);
    if (missing) {
      cur = next;
      return;
    }
    try {
      cur = lstatSync(next).isSymbolicLink() ? realpathSync.native(next) : next;
    } catch {
      // absent (or a dangling link, or not a folder): the system would stop here; keep the text
      missing = true;
      cur = next;
    }
  };
  for (const name of names) step(name);
  if (last === undefined) return cur;
  if (last === '..') return dirname(cur);
  return join(cur, last);
}
