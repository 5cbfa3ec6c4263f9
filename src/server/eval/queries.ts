// Evaluation on any data: a queries file of {prompt, expected, sources?} gives the model's
// answer accuracy (greedy) and, per attribution method, how well the known sources are
// retrieved (Recall@k, MRR). `data eval --queries` runs it on a user's own corpus; `bench eval`
// uses the same retrieval loop on the embedded default's queries.
import { basename } from 'node:path';
import { readFileNoWait } from '../../common/read-file';
import type { Dataset } from '../data/dataset';
import type { Model } from '../model/engine';
import { generate } from '../model/generate';
import { mean, rankingOf, recallAtK, reciprocalRank } from './metrics';

/** A training example known to cause a query's answer: by content hash, by 1-based line, or both. */
export interface SourceRef {
  /** the dataset it is in (the JSONL file's name without `.jsonl`); absent = any */
  dataset?: string;
  line?: number;
  hash?: string;
}

export interface EvalQuery {
  prompt: string;
  expected: string;
  sources: SourceRef[];
  /** `file:line` (JSON lines) or `file[index]` (a JSON array), for error messages */
  where: string;
}

export class QueriesError extends Error {}

/**
 * Reads a JSON array or JSON lines of {prompt, expected, sources?}. `completion` is accepted
 * for `expected` (the field name of `data build`'s queries.json); anything else unclear is refused.
 */
export function readEvalQueries(file: string): EvalQuery[] {
  let text: string;
  try {
    text = readFileNoWait(file, 'utf8');
  } catch (e) {
    throw new QueriesError(`cannot read queries file ${file}: ${(e as Error).message}`);
  }
  const items: Array<{ rec: unknown; where: string }> = [];
  if (text.trimStart().startsWith('[')) {
    let arr: unknown[];
    try {
      arr = JSON.parse(text);
    } catch (e) {
      throw new QueriesError(`${file}: not JSON (${(e as Error).message})`);
    }
    for (const [i, rec] of arr.entries()) items.push({ rec, where: `${file}[${i}]` });
  } else
    text.split('\n').forEach((line, i) => {
      if (!line.trim()) return;
      try {
        items.push({ rec: JSON.parse(line), where: `${file}:${i + 1}` });
      } catch (e) {
        throw new QueriesError(`${file}:${i + 1}: not JSON (${(e as Error).message})`);
      }
    });
  if (!items.length) throw new QueriesError(`${file}: no queries`);
  return items.map(({ rec, where }) => parseQuery(rec, where));
}

function parseQuery(rec: unknown, where: string): EvalQuery {
  const r = rec as Record<string, unknown> | null;
  if (!r || typeof r !== 'object' || Array.isArray(r)) throw new QueriesError(`${where}: expected an object`);
  if (typeof r.prompt !== 'string' || !r.prompt)
    throw new QueriesError(`${where}: "prompt" must be a non-empty string`);
  const expected = r.expected ?? r.completion;
  if (typeof expected !== 'string' || !expected.trim())
    throw new QueriesError(`${where}: "expected" must be a non-empty string`);
  if (r.expected !== undefined && r.completion !== undefined && r.expected !== r.completion)
    throw new QueriesError(`${where}: "expected" and "completion" differ; give one`);
  const raw = r.sources ?? [];
  if (!Array.isArray(raw)) throw new QueriesError(`${where}: "sources" must be an array`);
  const sources = raw.map((s, k): SourceRef => {
    const o = s as Record<string, unknown> | null;
    const at = `${where}: sources[${k}]`;
    if (!o || typeof o !== 'object') throw new QueriesError(`${at} must be an object with "line" and/or "hash"`);
    if (o.dataset !== undefined && typeof o.dataset !== 'string')
      throw new QueriesError(`${at}.dataset must be a string`);
    if (o.line !== undefined && !(Number.isInteger(o.line) && (o.line as number) >= 1))
      throw new QueriesError(`${at}.line must be a 1-based line number`);
    if (o.hash !== undefined && !(typeof o.hash === 'string' && /^[0-9a-f]{16}$/.test(o.hash)))
      throw new QueriesError(`${at}.hash must be 16 hex digits (as in an exclude sidecar)`);
    if (o.line === undefined && o.hash === undefined) throw new QueriesError(`${at} needs "line" or "hash"`);
    return {
      dataset: o.dataset as string | undefined,
      line: o.line as number | undefined,
      hash: o.hash as string | undefined,
    };
  });
  return { prompt: r.prompt, expected, sources, where };
}

/** The id a dataset file answers to in `sources[].dataset`: its file name without `.jsonl`. */
export function datasetIdOf(path: string): string {
  return basename(path).replace(/\.jsonl$/, '');
}

/** How many sources of these queries name each dataset other than `id` (they are not scored here). */
export function otherDatasets(queries: readonly EvalQuery[], id: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const q of queries)
    for (const s of q.sources)
      if (s.dataset !== undefined && s.dataset !== id) out.set(s.dataset, (out.get(s.dataset) ?? 0) + 1);
  return out;
}

/**
 * Indices (into `dataset.examples`) of a query's sources in this dataset. Sources naming
 * another dataset are skipped; a source that is not in this file, or whose line and hash
 * disagree (the file changed since the queries were written), is refused.
 */
export function sourceIndices(q: EvalQuery, dataset: Dataset, id: string): Set<number> {
  // identical copies share a hash: a hash names the first (identical scores tie, and the first
  // wins the tie, so it is the copy that ranks best); a Map of all would keep the last
  const byHash = new Map<string, number>();
  for (const [i, e] of dataset.examples.entries()) if (!byHash.has(e.hash)) byHash.set(e.hash, i);
  const byLine = new Map(dataset.examples.map((e, i) => [e.line, i]));
  const out = new Set<number>();
  for (const s of q.sources) {
    if (s.dataset !== undefined && s.dataset !== id) {
      // "finetune.jsonl" or "data/finetune.jsonl" for "finetune": a near miss would otherwise be
      // skipped as another dataset's source, and the recall computed without it
      if (datasetIdOf(s.dataset) === id)
        throw new QueriesError(
          `${q.where}: source dataset "${s.dataset}": write "${id}" (the data file's name without .jsonl and without folders)`,
        );
      continue;
    }
    const h = s.hash === undefined ? undefined : byHash.get(s.hash);
    const l = s.line === undefined ? undefined : byLine.get(s.line);
    if (s.hash !== undefined && h === undefined)
      throw new QueriesError(`${q.where}: source hash ${s.hash} is not in ${dataset.path}`);
    if (s.line !== undefined && l === undefined)
      throw new QueriesError(`${q.where}: source line ${s.line} is not an example of ${dataset.path}`);
    // a line and a hash that agree name that line, whichever copy it is
    if (l !== undefined && s.hash !== undefined && dataset.examples[l].hash !== s.hash)
      throw new QueriesError(
        `${q.where}: source line ${s.line} of ${dataset.path} has hash ${dataset.examples[l].hash}, not ${s.hash} (the file changed?)`,
      );
    out.add((l ?? h) as number);
  }
  return out;
}

export interface Answer {
  prompt: string;
  expected: string;
  got: string;
  ok: boolean;
}

/** Greedy answers; correct when the answer equals `expected` up to surrounding whitespace. */
export async function answerQueries(model: Model, queries: EvalQuery[], maxNewTokens = 16) {
  const gens = await generate(
    model,
    queries.map((q) => q.prompt),
    { maxNewTokens },
  );
  const answers: Answer[] = queries.map((q, i) => ({
    prompt: q.prompt,
    expected: q.expected,
    got: gens[i].text,
    ok: gens[i].text.trim() === q.expected.trim(),
  }));
  const correct = answers.filter((a) => a.ok).length;
  return { correct, total: answers.length, accuracy: answers.length ? correct / answers.length : 0, answers };
}

export interface Retrieval {
  /** queries with at least one source in the scored data */
  queries: number;
  k: number;
  recall: number;
  mrr: number;
  /** (query, source) pairs ranked in the bottom 10% (a true source labelled most opposing) */
  bottom10: number;
}

/**
 * Mean Recall@k and MRR over the queries that have sources here: `relevant(q)` gives their
 * indices, `scores(q)` one score per example (higher = more responsible).
 */
export async function sourceRetrieval<Q>(
  queries: Q[],
  relevant: (q: Q) => Set<number>,
  scores: (q: Q) => Promise<ArrayLike<number>>,
  k: number,
): Promise<Retrieval> {
  const rec: number[] = [];
  const rr: number[] = [];
  let bottom10 = 0;
  for (const q of queries) {
    const rel = relevant(q);
    if (!rel.size) continue;
    const r = rankingOf(await scores(q));
    rec.push(recallAtK(r, rel, k));
    rr.push(reciprocalRank(r, rel));
    r.forEach((i, pos) => {
      if (rel.has(i) && pos + 1 > 0.9 * r.length) bottom10++;
    });
  }
  return { queries: rec.length, k, recall: mean(rec), mrr: mean(rr), bottom10 };
}
