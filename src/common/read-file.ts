// Opening a file to read it without waiting: a named pipe (FIFO) opened for reading blocks until
// some process opens it for writing, so `--data pipe.jsonl` or a factor file replaced by a pipe
// hung forever before any check could say what it is. Opened non-blocking, it opens at once and
// fstat says what it is; for a regular file the flag changes nothing.
import { closeSync, constants, fstatSync, openSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { restoreReplacedPath } from './atomic-write';

/** open(2) flags: read only, never waiting for a pipe's writer (O_NONBLOCK is 0 where it does not exist). */
export const READ_NOWAIT = constants.O_RDONLY | (constants.O_NONBLOCK ?? 0);

/** What a path that is not a regular file is, in words (for refusals); undefined for a regular file. */
function notARegularFile(fd: number): string | undefined {
  const st = fstatSync(fd);
  if (st.isFile()) return undefined;
  return st.isDirectory() ? 'a folder' : 'not a regular file (a pipe, a socket or a device)';
}

/**
 * Opens `path` for reading without waiting, and refuses anything but a regular file with
 * `refuse(what it is)`'s error. The caller closes the descriptor.
 */
export function openRegularFile(path: string, refuse: (what: string) => Error): number {
  let fd: number;
  try {
    fd = openSync(path, READ_NOWAIT);
  } catch (e) {
    // its folder set aside by a writer killed between its two renames (a corpus rebuilt by `data
    // build`): put back, as the other readers do (common/atomic-write.ts), then opened
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT' || !restoreReplacedPath(dirname(path))) throw e;
    fd = openSync(path, READ_NOWAIT);
  }
  const what = notARegularFile(fd);
  if (what) {
    closeSync(fd);
    throw refuse(what);
  }
  return fd;
}

/** The bytes of a regular file (see `openRegularFile`). */
export function readRegularFile(path: string, refuse: (what: string) => Error): Buffer {
  const fd = openRegularFile(path, refuse);
  try {
    return readFileSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * A JSON file's text, refusing a leading byte order mark with a message that says so (JSON.parse
 * said "Unexpected token"); Python's json, hence transformers, refuses such a file too.
 */
export function jsonText(bytes: Buffer, path: string, refuse: (message: string) => Error): string {
  if (bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf)
    throw refuse(
      `${path} starts with a byte order mark (BOM), which JSON does not have and transformers refuses ("Unexpected UTF-8 BOM"): save it as UTF-8 without one`,
    );
  return bytes.toString('utf8');
}

/**
 * `readFileSync` for a file the user named, without waiting on a pipe: a path that is not a
 * regular file throws an Error saying what it is (callers wrap it in their own user error).
 */
export function readFileNoWait(path: string): Buffer;
export function readFileNoWait(path: string, encoding: 'utf8'): string;
export function readFileNoWait(path: string, encoding?: 'utf8'): Buffer | string {
  const bytes = readRegularFile(path, (what) => new Error(`${path} is ${what}`));
  return encoding ? bytes.toString(encoding) : bytes;
}
