// Where a command may write: an `--out` is never a file or folder the user wrote (a dataset, a
// flags sidecar, a model, notes), nor one of the command's own inputs. A file is replaced only
// when it is this command's own earlier output; a folder (replaced as a whole, atomically) only
// when it holds nothing but this command's files. Everything else is refused, saying what it is.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { isAbsolute, relative } from 'node:path';
import { realOrResolved } from '../../common/real-path';
import { isSidecarPath } from '../../extension/flags/sidecar';
import { CliError } from './util';

/** Files a desktop puts in any folder it shows; they do not make a folder someone else's. */
export const DESKTOP_FILES = new Set(['.DS_Store', 'Thumbs.db', 'desktop.ini']);

/** Whether `a` is `b` or inside it. */
export function within(a: string, b: string): boolean {
  const rel = relative(b, a);
  return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel));
}

/**
 * An `--out` file: refused when it is one of `inputs`, a flags sidecar, a folder, or an existing
 * file that `ours` does not recognise as this command's output (`what` names that output).
 */
export function checkOutFile(
  out: string,
  o: { inputs?: ReadonlyArray<string | undefined>; what: string; ours: (path: string) => boolean; flag?: string },
): void {
  const flag = o.flag ?? '--out';
  const real = realOrResolved(out);
  for (const input of o.inputs ?? [])
    if (input !== undefined && realOrResolved(input) === real)
      throw new CliError(`${flag} ${out} is an input of this command (${input}); choose another file`);
  if (isSidecarPath(out))
    throw new CliError(`${flag} ${out} is a flags file (<dataset>.exclude.jsonl); choose another file`);
  if (!existsSync(out)) return;
  const st = statSync(out);
  if (st.isDirectory()) throw new CliError(`${flag} ${out} is a folder; name a file`);
  // a FIFO or a device: reading it to recognise it would block, and the write replaces files only
  if (!st.isFile()) throw new CliError(`${flag} ${out} is not a regular file (a pipe or a device); name a file`);
  if (!o.ours(out))
    throw new CliError(
      `${flag} ${out} exists and is not ${o.what}: it would be replaced, so choose another file (or remove it yourself)`,
    );
}

/**
 * An `--out` folder that is replaced as a whole: it must be new, empty, or hold only `owned`
 * names (and `marker`, which says this command wrote it), so that nothing else in it is lost.
 */
export function checkOutFolder(
  out: string,
  o: { owned: ReadonlySet<string>; ownedPattern?: RegExp; marker: string; what: string; flag?: string },
): void {
  const flag = o.flag ?? '--out';
  if (!existsSync(out)) return;
  if (!statSync(out).isDirectory()) throw new CliError(`${flag} ${out} exists and is not a folder`);
  const names = readdirSync(out).filter((n) => !DESKTOP_FILES.has(n));
  if (!names.length) return;
  const foreign = names.filter((n) => !o.owned.has(n) && !o.ownedPattern?.test(n));
  if (foreign.length || !names.includes(o.marker))
    throw new CliError(
      `${flag} ${out} exists and is not ${o.what} (${
        foreign.length
          ? `it holds ${foreign.slice(0, 5).join(', ')}${foreign.length > 5 ? ', …' : ''}`
          : `no ${o.marker}`
      }); the whole folder would be replaced, so choose a new or empty folder`,
    );
}
