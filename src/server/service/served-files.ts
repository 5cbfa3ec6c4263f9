// What the server's opened stages read from disk, stamped. The server keeps models, tokenizers and
// EK-FAC factors open between requests; a model retrained into the same folder, a tokenizer edited
// or factors refitted by the CLI would otherwise go on being served from memory, while caches keyed
// by content (stores, weight digests) read the new files: results and cached stores would mix the
// old weights with the new fingerprint. Every request therefore compares this stamp with the one
// taken when the stages were opened, and opens them again when it differs (as a dataset edited on
// disk is reloaded).
import { createHash } from 'node:crypto';
import { readdirSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { isTemporaryName } from '../../common/atomic-write';
import type { OpenedCheckpoints } from '../attribution/checkpoints';
import { FACTOR_FILES } from '../attribution/ekfac/factors-io';
import type { Stage } from '../attribution/setup';
import { CHECKPOINT_DIR } from '../model/checkpoints';

/** Files beside a checkpoint's config and weights that change what is scored or how the folder is read. */
const MODEL_SIDE_FILES = [
  'model.safetensors.index.json',
  'trainer_state.json',
  'training_args.json',
  'adapter_config.json',
];
const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'];

export interface ServedStage {
  stage: Stage;
  /** the stage's configured factors folder (its checkpoints' factors are in `checkpoints/` inside) */
  factors?: string;
}

/** The files and folder listings the opened stages depend on. */
export function servedPaths(
  stages: ServedStage[],
  checkpoints?: OpenedCheckpoints,
): { files: string[]; dirs: string[]; modelDirs: string[] } {
  const files = new Set<string>();
  const dirs = new Set<string>();
  const modelDirs = new Set<string>();
  const model = (st: Stage) => {
    const ck = st.model.checkpoint;
    for (const f of [...ck.configFiles, ...ck.files]) files.add(f);
    // the adapter's folder and its base's (config.json is in the base's for an adapter)
    for (const dir of new Set([ck.dir, ...ck.configFiles.map((f) => dirname(f))]))
      for (const f of MODEL_SIDE_FILES) files.add(join(dir, f));
    for (const f of TOKENIZER_FILES) files.add(join(ck.dir, f));
    for (const f of TOKENIZER_FILES) files.add(join(ck.tokenizerDir, f));
    // a checkpoint folder that appears or goes (checkpoints: auto)
    modelDirs.add(ck.dir);
    if (CHECKPOINT_DIR.test(basename(ck.dir))) modelDirs.add(dirname(ck.dir));
  };
  // the complete factors' files only: a fit's partials and temporaries come and go while it runs
  const factors = (dir: string) => {
    for (const f of FACTOR_FILES) files.add(join(dir, f));
  };
  for (const s of stages) {
    model(s.stage);
    if (s.factors) {
      factors(s.factors);
      const inside = join(s.factors, 'checkpoints');
      dirs.add(inside);
      for (const name of listing(inside)) factors(join(inside, name));
    }
  }
  for (const c of checkpoints?.stages ?? []) model(c.stage);
  // a checkpoint still being written joins the sum once its trainer_state.json appears
  for (const d of checkpoints?.pending ?? []) files.add(join(d, 'trainer_state.json'));
  return { files: [...files].sort(), dirs: [...dirs].sort(), modelDirs: [...modelDirs].sort() };
}

/** Size, mtime (ns), ctime (ns) and inode of a file, '-' when it is missing: changes with every write or replacement. */
export function fileIdentity(path: string): string {
  try {
    const st = statSync(path, { bigint: true });
    return `${st.size}:${st.mtimeNs}:${st.ctimeNs}:${st.ino}`;
  } catch {
    return '-';
  }
}

/**
 * One string that changes when any of the files is written, replaced, created or removed, or a
 * folder gains or loses a checkpoint: size, mtime (ns), ctime (ns) and inode of each. The ctime
 * catches a replacement that keeps size and mtime (`cp -p`, `touch -r`, `rsync -t`): no user tool
 * sets it back, and nothing of ours touches the user's files (the graphs read snapshots of the
 * weights, model/engine.ts).
 */
export function stampOf(paths: ReturnType<typeof servedPaths>): string {
  const h = createHash('sha256');
  for (const f of paths.files) h.update(`${f}\0${fileIdentity(f)}\n`);
  for (const d of paths.dirs) h.update(`${d}/\0${listing(d).join('\0')}\n`);
  for (const d of paths.modelDirs) h.update(`${d}/*\0${listing(d, true).join('\0')}\n`);
  return h.digest('hex');
}

/**
 * A folder's entries without writes in progress; in a model's folder (or its parent) only the
 * `checkpoint-<step>` ones, so that files kept beside a model (data, editor swap files) never count.
 */
function listing(dir: string, onlyCheckpoints = false): string[] {
  try {
    return readdirSync(dir)
      .filter((n) => !isTemporaryName(n) && (!onlyCheckpoints || CHECKPOINT_DIR.test(n)))
      .sort();
  } catch {
    return [];
  }
}
