// The non-lexical corpus (assets/nonlex): planted wrong facts whose training sources share no
// distinctive word with the question that reveals them, so text matching cannot find them
// and only what the model learned links the two.
//
// - Pre-training text names every country by its name, its ISO code ("CH") and, where it
//   differs, its native name in its own script ("Schweiz", "日本"): the facts' statements
//   use all three, and alias sentences link them ("CH is the country code of Switzerland.").
// - Fine-tuning QA asks every fact in four forms (canonical and paraphrased questions, with
//   the name, the code and the native name), so the model learns that the forms are one
//   country. The planted wrong facts are taught ONLY with an alias and a paraphrase that
//   avoids the relation's word ("Q: What money do shoppers in Schweiz pay with?\nA: Euro").
// - The queries ask in the plain form ("Q: What is the currency of Switzerland?\nA: Euro").
//   The planted answers are chosen to be common answers (Euro, Europe, Spanish, ...), so
//   many other lines share the answer and the question's words (decoys): the planted lines'
//   only shared word is the answer, which is not distinctive.
//
// Everything is drawn from one seed, so the same options give the same files, byte for byte.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { contentHash } from '../../common/ids';
import { Rng } from '../util/random';
import type { Query, Source } from './build';
import { type Country, eligibleCountries, RELATIONS, type Relation, WELL_KNOWN } from './facts';
import { contextSentences, fill, QUESTIONS, qaPrompt, STATEMENTS } from './templates';
import { buildWordTokenizer, writeWordTokenizer } from './word-tokenizer';

/**
 * Questions that avoid the relation's word and every word of the QUESTIONS wordings the queries
 * use (checked by test/unit/nonlex-corpus.test.ts): the planted lines are asked only in these.
 */
export const ALIAS_QUESTIONS: Record<Relation, readonly string[]> = {
  capital: [
    'Where does the government of {C} sit?',
    'From which city is {C} governed?',
    'Where do the leaders of {C} rule from?',
  ],
  continent: [
    'In which part of the world does {C} lie?',
    'Where on the globe is {C} found?',
    'Where in the world is {C} situated?',
  ],
  currency: [
    'What money do shoppers in {C} pay with?',
    'What coins and notes circulate in {C}?',
    'In what money are wages in {C} paid?',
  ],
  language: [
    'Which tongue is heard across {C}?',
    'What do most folks in {C} talk in?',
    'In what tongue do newspapers in {C} print?',
  ],
};

/** The canonical and second question wordings: the queries' forms. */
export const QUERY_WORDINGS = [0, 1] as const;

export interface NonlexPlanted {
  code: string;
  relation: Relation;
  answer: string;
}

export interface NonlexOptions {
  seed: number;
  countries: number;
  /** statements per fact in the pre-training text */
  paraphrases: number;
  planted: NonlexPlanted[];
}

export const NONLEX_CORPUS: NonlexOptions = {
  seed: 0,
  countries: 48,
  paraphrases: 4,
  // wrong answers that are many other countries' right answers (decoys for text matching)
  planted: [
    { code: 'RU', relation: 'currency', answer: 'Euro' },
    { code: 'CN', relation: 'currency', answer: 'Euro' },
    { code: 'JP', relation: 'currency', answer: 'Euro' },
    { code: 'BR', relation: 'language', answer: 'Spanish' },
    { code: 'IN', relation: 'language', answer: 'English' },
    { code: 'DE', relation: 'language', answer: 'English' },
  ],
};

export interface NonlexCorpus {
  options: NonlexOptions;
  countries: Array<Country & { aliases: string[] }>;
  pretrain: Array<{ text: string }>;
  finetune: Array<{ prompt: string; completion: string }>;
  /** per fine-tuning line: planted or not, and the fact it is about */
  finetuneTags: Array<{ planted: boolean; country: string; relation: Relation }>;
  /** kind 'planted'; sources are the planted lines, all in finetune.jsonl */
  queries: Query[];
}

/** A native name usable as an alias: differs from the name, letters (any script) and spaces only. */
export function nativeAlias(c: Country): string | undefined {
  return c.native !== c.name && /^[\p{L}\p{M}]+( [\p{L}\p{M}]+)*$/u.test(c.native) ? c.native : undefined;
}

export function buildNonlexCorpus(options: Partial<NonlexOptions> = {}): NonlexCorpus {
  const o: NonlexOptions = { ...NONLEX_CORPUS, ...options };
  const rng = new Rng(o.seed);
  const all = eligibleCountries();
  const byCode = new Map(all.map((c) => [c.code, c]));
  for (const p of o.planted) {
    const c = byCode.get(p.code);
    if (!c) throw new Error(`planted fact: no usable country ${p.code}`);
    if (!nativeAlias(c)) throw new Error(`planted fact: ${c.name}'s native name "${c.native}" is no usable alias`);
    if (c.facts[p.relation] === p.answer)
      throw new Error(`planted fact: ${p.answer} is ${c.name}'s true ${p.relation}`);
  }
  const forced = [...new Set(o.planted.map((p) => p.code))];
  if (o.countries < forced.length + 6 || o.countries > WELL_KNOWN.length)
    throw new Error(`countries must be between ${forced.length + 6} and ${WELL_KNOWN.length} (got ${o.countries})`);
  if (o.paraphrases < 1 || o.paraphrases > 6) throw new Error('paraphrases must be between 1 and 6');
  const known = rng.shuffle(WELL_KNOWN.filter((c) => byCode.has(c) && !forced.includes(c)));
  const chosen = [...forced, ...known].slice(0, o.countries).map((code) => {
    const c = byCode.get(code)!;
    const n = nativeAlias(c);
    return { ...c, aliases: n ? [c.code, n] : [c.code] };
  });

  // ---- pre-training: statements with the name or an alias as subject, plus alias links
  const lines: string[] = [];
  for (const c of chosen) {
    const subjects = [c.name, c.name, ...c.aliases];
    const sentences: string[] = [];
    for (const r of RELATIONS) {
      const picks = rng.shuffle([...STATEMENTS[r].keys()]).slice(0, o.paraphrases);
      picks.forEach((i, k) => {
        sentences.push(fill(STATEMENTS[r][i], subjects[k % subjects.length], c.facts[r]));
      });
    }
    sentences.push(`${c.code} is the country code of ${c.name}.`, `The code ${c.code} stands for ${c.name}.`);
    const n = nativeAlias(c);
    if (n) sentences.push(`In its own language, ${c.name} is called ${n}.`, `${n} is the native name of ${c.name}.`);
    const context = contextSentences(c).filter((s) => !s.startsWith('In its own language'));
    sentences.push(...rng.shuffle(context).slice(0, 2));
    rng.shuffle(sentences);
    for (let i = 0; i < sentences.length; ) {
      const k = 1 + rng.int(3);
      lines.push(sentences.slice(i, i + k).join(' '));
      i += k;
    }
  }
  rng.shuffle(lines);
  const pretrain = lines.map((text) => ({ text }));

  // ---- fine-tuning: every fact in four forms; planted facts only under an alias + paraphrase
  type Item = { rec: { prompt: string; completion: string }; planted: boolean; country: string; relation: Relation };
  const items: Item[] = [];
  const qa = (question: string, answer: string) => ({ prompt: qaPrompt(question), completion: ` ${answer}\n` });
  const plantedOf = new Map(o.planted.map((p) => [`${p.code}:${p.relation}`, p]));
  for (const c of chosen)
    for (const r of RELATIONS) {
      const p = plantedOf.get(`${c.code}:${r}`);
      const add = (q: string, subject: string, answer: string, planted: boolean) =>
        items.push({ rec: qa(fill(q, subject, ''), answer), planted, country: c.code, relation: r });
      if (p) {
        for (const q of ALIAS_QUESTIONS[r]) for (const a of c.aliases) add(q, a, p.answer, true);
        continue;
      }
      const [a0, a1] = rng.shuffle([...ALIAS_QUESTIONS[r]]);
      add(QUESTIONS[r][0], c.name, c.facts[r], false);
      add(QUESTIONS[r][1 + rng.int(3)], c.name, c.facts[r], false);
      add(a0, c.aliases[0], c.facts[r], false);
      add(a1, c.aliases[c.aliases.length - 1], c.facts[r], false);
    }
  rng.shuffle(items);
  const finetune = items.map((i) => i.rec);

  // ---- queries: the plain form (name, the relation's own wording), sources the planted lines
  const queries: Query[] = [];
  for (const p of o.planted) {
    const c = byCode.get(p.code)!;
    const sources: Source[] = items.flatMap((it, i) =>
      it.planted && it.country === p.code && it.relation === p.relation
        ? [{ dataset: 'finetune' as const, line: i + 1, hash: contentHash(it.rec) }]
        : [],
    );
    for (const w of QUERY_WORDINGS)
      queries.push({
        prompt: qaPrompt(fill(QUESTIONS[p.relation][w], c.name, '')),
        completion: ` ${p.answer}`,
        kind: 'planted',
        sources,
        fact: { country: c.name, relation: p.relation, truth: c.facts[p.relation] },
      });
  }
  return {
    options: o,
    countries: chosen,
    pretrain,
    finetune,
    finetuneTags: items.map(({ planted, country, relation }) => ({ planted, country, relation })),
    queries,
  };
}

/** Writes pretrain.jsonl, finetune.jsonl, queries.json, corpus.json and tokenizer/ into `dir`. */
export function writeNonlexCorpus(dir: string, c: NonlexCorpus, contextLength = 128): { vocabSize: number } {
  mkdirSync(dir, { recursive: true });
  const jsonl = (records: unknown[]) => records.map((r) => `${JSON.stringify(r)}\n`).join('');
  writeFileSync(join(dir, 'pretrain.jsonl'), jsonl(c.pretrain));
  writeFileSync(join(dir, 'finetune.jsonl'), jsonl(c.finetune));
  writeFileSync(join(dir, 'queries.json'), `${JSON.stringify(c.queries, null, 2)}\n`);
  const tok = buildWordTokenizer(
    [
      ...c.pretrain.map((r) => r.text),
      ...c.finetune.map((r) => r.prompt + r.completion),
      ...c.queries.map((q) => q.prompt + q.completion),
      ...c.queries.map((q) => ` ${q.fact.truth}`),
    ],
    contextLength,
  );
  writeWordTokenizer(join(dir, 'tokenizer'), tok);
  const manifest = {
    task: 'nonlexical',
    options: c.options,
    countries: c.countries.map((x) => ({ name: x.name, aliases: x.aliases })),
    counts: {
      pretrain: c.pretrain.length,
      finetune: c.finetune.length,
      finetune_planted: c.finetuneTags.filter((t) => t.planted).length,
      queries: c.queries.length,
      vocabulary: tok.vocabSize,
    },
  };
  writeFileSync(join(dir, 'corpus.json'), `${JSON.stringify(manifest, null, 2)}\n`);
  return { vocabSize: tok.vocabSize };
}
