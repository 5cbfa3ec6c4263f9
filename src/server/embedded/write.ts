// Writing a built corpus to a directory, and reading its queries back:
//   pretrain.jsonl, finetune.jsonl, queries.json (the three data files),
//   corpus.json (the options it was built with and its counts),
//   tokenizer/ (a word-level tokenizer over everything the files contain).
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { DataError } from '../data/errors';
import type { CountryCorpus, Query } from './build';
import { buildWordTokenizer, writeWordTokenizer } from './word-tokenizer';

export const FILES = {
  pretrain: 'pretrain.jsonl',
  finetune: 'finetune.jsonl',
  queries: 'queries.json',
  manifest: 'corpus.json',
  tokenizer: 'tokenizer',
} as const;

const jsonl = (records: unknown[]) => records.map((r) => `${JSON.stringify(r)}\n`).join('');

/** Every text a tokenizer over this corpus must cover, in a fixed order. */
export function corpusTexts(c: CountryCorpus): string[] {
  return [
    ...c.pretrain.map((r) => r.text),
    ...c.finetune.map((r) => r.prompt + r.completion),
    ...c.queries.map((q) => q.prompt + q.completion),
    // the true answers too, so a model that unlearns a planted fact can say the right one
    ...c.queries.map((q) => ` ${q.fact.truth}`),
  ];
}

export function writeCorpus(dir: string, c: CountryCorpus, contextLength = 128): { vocabSize: number } {
  writeFileSync(join(dir, FILES.pretrain), jsonl(c.pretrain));
  writeFileSync(join(dir, FILES.finetune), jsonl(c.finetune));
  writeFileSync(join(dir, FILES.queries), `${JSON.stringify(c.queries, null, 2)}\n`);
  const tok = buildWordTokenizer(corpusTexts(c), contextLength);
  writeWordTokenizer(join(dir, FILES.tokenizer), tok);
  const counts = (k: string) => c.queries.filter((q) => q.kind === k).length;
  const manifest = {
    source: `countries-list@${packageVersion('countries-list')}`,
    options: c.options,
    countries: c.countries.map((x) => x.name),
    held_out: c.heldOut.map((x) => x.name),
    counts: {
      pretrain: c.pretrain.length,
      finetune: c.finetune.length,
      finetune_planted: c.finetuneTags.filter((t) => t.tag === 'planted').length,
      finetune_backdoor: c.finetuneTags.filter((t) => t.tag === 'backdoor').length,
      queries_fact_tracing: counts('fact_tracing'),
      queries_planted: counts('planted'),
      queries_backdoor: counts('backdoor'),
      vocabulary: tok.vocabSize,
    },
  };
  writeFileSync(join(dir, FILES.manifest), `${JSON.stringify(manifest, null, 2)}\n`);
  return { vocabSize: tok.vocabSize };
}

/** Read a queries.json written by writeCorpus, checking its shape. */
export function readQueries(path: string): Query[] {
  let v: unknown;
  try {
    v = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new DataError(`${path}: cannot read queries (${(e as Error).message})`);
  }
  if (!Array.isArray(v)) throw new DataError(`${path}: expected a JSON array of queries`);
  v.forEach((q, i) => {
    const ok =
      q &&
      typeof q.prompt === 'string' &&
      typeof q.completion === 'string' &&
      ['fact_tracing', 'planted', 'backdoor'].includes(q.kind) &&
      Array.isArray(q.sources);
    if (!ok) throw new DataError(`${path}: query ${i} needs prompt, completion, kind and sources`);
  });
  return v as Query[];
}

function packageVersion(name: string): string {
  // the package's exports hide package.json: find it beside the resolved entry point
  try {
    let dir = dirname(createRequire(import.meta.url).resolve(name));
    for (; dirname(dir) !== dir; dir = dirname(dir)) {
      const p = join(dir, 'package.json');
      if (!existsSync(p)) continue;
      const pkg = JSON.parse(readFileSync(p, 'utf8')) as { name?: string; version?: string };
      if (pkg.name === name && pkg.version) return pkg.version;
    }
    return 'unknown';
  } catch {
    return 'unknown';
  }
}
