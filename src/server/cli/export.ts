// influence-lens export: the editor's "Export cleaned dataset" on the command line: a copy of a
// JSONL dataset without the examples its `<name>.exclude.jsonl` sidecar flags (kept lines byte
// for byte), for training with any pipeline. The source is never overwritten, nor any flags file;
// another existing file only with --force.
//   export --data <train.jsonl> [--out <file>] [--force]   (default <name>.cleaned.jsonl beside it)
import { existsSync } from 'node:fs';
import { cleanedPathFor, exportCleaned, OutputExistsError } from '../../extension/flags/export';
import { sidecarPathFor } from '../../extension/flags/sidecar';
import { CliError, parse } from './util';

export async function runExport(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    data: { type: 'string' },
    out: { type: 'string' },
    force: { type: 'boolean' },
  });
  if (!v.data) throw new CliError('--data <train.jsonl> is required');
  if (!existsSync(v.data)) throw new CliError(`${v.data} does not exist`);
  const sidecar = sidecarPathFor(v.data);
  if (!existsSync(sidecar)) throw new CliError(`${sidecar} does not exist: nothing is flagged in ${v.data}`);
  let r: ReturnType<typeof exportCleaned>;
  try {
    r = exportCleaned(v.data, v.out ?? cleanedPathFor(v.data), { replace: v.force === true });
  } catch (e) {
    if (e instanceof OutputExistsError)
      throw new CliError(`${e.message}: pass --force to replace it, or --out another file`);
    throw new CliError((e as Error).message);
  }
  // a flag is an example's content hash: every line with that content is the same example and goes
  const flagged = new Set(r.removed.map((x) => x.hash)).size;
  process.stdout.write(
    `wrote ${r.outPath}: ${r.kept} examples kept, ${r.removed.length} removed` +
      (r.other ? ` (and ${r.other} line(s) that are not records, kept as they are)` : '') +
      (r.removed.length > flagged ? ` (${flagged} flagged example(s); identical copies removed with them)` : '') +
      (r.missing.length ? `; ${r.missing.length} flagged hash(es) not in ${v.data} (the file changed?)` : '') +
      '\n',
  );
}
