// One file's identity as far as a cache of its contents may trust it without reading it: size,
// mtime, ctime and inode. ctime and inode too: a file replaced or rewritten with its size and
// mtime kept (mv + touch -r, rsync -t, cp -p) keeps those two, and its old contents were shown.
import { statSync } from 'node:fs';

/** `size:mtime:ctime:inode` of `path`, or undefined when it cannot be read. */
export function fileStamp(path: string): string | undefined {
  try {
    const st = statSync(path);
    return `${st.size}:${st.mtimeMs}:${st.ctimeMs}:${st.ino}`;
  } catch {
    return undefined;
  }
}
