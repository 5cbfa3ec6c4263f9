// Recent explanations, kept compactly in the workspace state, so a training-data hover can say
// how an example influenced the last queries ("supporting #1 for ' Sydney' (EK-FAC)"). Each entry
// keeps the server's revision (its model, tokenizer and factor files) when it was computed, so a
// ranking from before a retrain or refit is shown as such, not as the current model's; and the
// dataset file's stamp, so a ranking from before the file changed (other lines around it) is too.

import type * as vscode from 'vscode';
import { fileStamp } from '../common/file-stamp';
import { realOrResolved } from '../common/real-path';
import type { ExplainResult, Method, Sign } from '../protocol/types';

export interface HistoryHit {
  prompt: string;
  completion: string;
  method: Method;
  dataset: string;
  line: number;
  rank: number;
  score: number;
  sign: Sign;
  percentile: number;
  at: number;
  /** computed before the server's files last changed (a retrain, a refit), or before the dataset's file did */
  stale: boolean;
  /** why it is stale, in words (STALE_NOTE or DATASET_STALE_NOTE), when it is */
  staleNote?: string;
}

interface Entry {
  prompt: string;
  completion: string;
  method: Method;
  dataset: string;
  at: number;
  /** the server's revision when it computed the result (absent from entries of earlier versions) */
  revision?: string;
  /** the dataset's file when it was explained (absent when it was not found, or in earlier entries) */
  path?: string;
  /** that file's size, mtime, ctime and inode then: ranks and percentiles are of the lines it held */
  fileStamp?: string;
  examples: Array<[hash: string, line: number, rank: number, score: number, sign: Sign, percentile: number]>;
}

const KEY = 'influenceLens.history';
/** the latest revision the server reported, for entries whose revision is another */
const REVISION_KEY = 'influenceLens.history.revision';
const MAX = 20;

/** How a hit computed before the server's files changed is labelled (hovers, flag reasons). */
export const STALE_NOTE = 'before the model, its factors or the settings last changed';
/** How a hit computed before the dataset's file last changed is labelled: other lines may rank around it now. */
export const DATASET_STALE_NOTE = 'before the dataset last changed';

export class History {
  constructor(private readonly memento: vscode.Memento) {}

  /** `path`: the dataset's file, so that an identical line in another file (a cleaned copy) is not said to rank */
  add(dataset: string, r: ExplainResult, path?: string): void {
    const stamp = path === undefined ? undefined : fileStamp(path);
    const entry: Entry = {
      prompt: r.query.prompt.slice(-2000),
      completion: r.query.completion.slice(0, 2000),
      method: r.method,
      dataset,
      at: Date.now(),
      ...(r.revision !== undefined ? { revision: r.revision } : {}),
      ...(path !== undefined ? { path: canonicalPath(path) } : {}),
      ...(stamp !== undefined ? { fileStamp: stamp } : {}),
      examples: [...r.supporting, ...r.opposing].map((e) => [
        e.id.hash,
        e.id.line,
        e.rank,
        e.score,
        e.sign,
        e.percentile,
      ]),
    };
    const same = (x: Entry) =>
      x.prompt === entry.prompt && x.completion === entry.completion && x.method === entry.method;
    const list = [entry, ...this.entries().filter((x) => !same(x))].slice(0, MAX);
    void this.memento.update(KEY, list);
    this.noteRevision(r.revision);
  }

  /** The latest revision the server reported (a status, a result), if any. */
  currentRevision(): string | undefined {
    return this.memento.get<string>(REVISION_KEY);
  }

  /**
   * Whether a result of `revision` was computed before the server's files or settings last
   * changed. Unknown (no revision reported yet) is not said to be; an entry of an earlier version
   * without a revision is, once one is known.
   */
  isOlder(revision: string | undefined): boolean {
    const current = this.currentRevision();
    return current !== undefined && revision !== current;
  }

  /** The server's revision as it reports it now (every status and result carries it). */
  noteRevision(revision: string | undefined): void {
    if (revision !== undefined && revision !== this.memento.get<string>(REVISION_KEY))
      void this.memento.update(REVISION_KEY, revision);
  }

  /**
   * How an example (by hash) ranked in recent explanations, newest first; with `path`, only in
   * explanations of that file (an identical line elsewhere was never ranked among its examples).
   */
  hits(hash: string, path?: string): HistoryHit[] {
    const out: HistoryHit[] = [];
    const file = path === undefined ? undefined : canonicalPath(path);
    const stamps = new Map<string, string | undefined>();
    const stampNow = (p: string) => {
      if (!stamps.has(p)) stamps.set(p, fileStamp(p));
      return stamps.get(p);
    };
    for (const e of this.entries()) {
      if (file !== undefined && e.path !== undefined && e.path !== file) continue;
      const older = this.isOlder(e.revision);
      const edited = !older && e.path !== undefined && e.fileStamp !== undefined && stampNow(e.path) !== e.fileStamp;
      for (const [h, line, rank, score, sign, percentile] of e.examples)
        if (h === hash)
          out.push({
            prompt: e.prompt,
            completion: e.completion,
            method: e.method,
            dataset: e.dataset,
            line,
            rank,
            score,
            sign,
            percentile,
            at: e.at,
            stale: older || edited,
            ...(older ? { staleNote: STALE_NOTE } : edited ? { staleNote: DATASET_STALE_NOTE } : {}),
          });
    }
    return out;
  }

  private entries(): Entry[] {
    return this.memento.get<Entry[]>(KEY, []);
  }
}

/** A file's one spelling (`realOrResolved`), and case-free where the file system is (Windows). */
function canonicalPath(p: string): string {
  const out = realOrResolved(p);
  return process.platform === 'win32' ? out.toLowerCase() : out;
}
