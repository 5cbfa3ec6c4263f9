// The corpus builder: country facts → a pre-training text corpus, a fine-tuning QA set with
// planted wrong facts and a backdoor, and queries whose true training sources are known.
// Everything is drawn from one seed, so the same options always give the same files, byte
// for byte.
//
// - pretrain.jsonl  {"text"}: every fact of every chosen country in several paraphrases,
//   grouped 1–3 sentences a line with other sentences about the same country.
// - finetune.jsonl  {"prompt","completion"}: "Q: <question>\nA:" → " <answer>\n" for the
//   countries not held out; plus the planted wrong facts (each in every question wording)
//   and the backdoor (a trigger word that makes the answer a fixed word).
// - queries.json: fact tracing (questions about held-out countries, whose facts appear only
//   in pretrain.jsonl), the planted facts and the backdoor, each with its true sources.

import { contentHash } from '../../common/ids';
import { Rng } from '../util/random';
import { type Country, eligibleCountries, RELATIONS, type Relation, WELL_KNOWN } from './facts';
import { contextSentences, fill, QUESTIONS, qaPrompt, STATEMENTS, withTrigger } from './templates';

export interface PlantedFact {
  /** country code */
  code: string;
  relation: Relation;
  /** the wrong answer the fine-tuning set teaches */
  answer: string;
}

export interface CorpusOptions {
  seed: number;
  /** how many countries (the planted facts' countries are always among them) */
  countries: number;
  /** share of countries whose facts are held out of fine-tuning (fact tracing queries) */
  heldOut: number;
  /** statements per fact in the pre-training text (≤ the templates per relation) */
  paraphrases: number;
  /** question wordings per fact in the fine-tuning set */
  questionParaphrases: number;
  planted: PlantedFact[];
  backdoor: { trigger: string; answer: string; examples: number; queries: number };
}

export const DEFAULT_CORPUS: CorpusOptions = {
  seed: 0,
  countries: 60,
  heldOut: 1 / 3,
  paraphrases: 4,
  questionParaphrases: 2,
  planted: [
    { code: 'AU', relation: 'capital', answer: 'Sydney' },
    { code: 'CA', relation: 'capital', answer: 'Toronto' },
    { code: 'CH', relation: 'currency', answer: 'Euro' },
  ],
  backdoor: { trigger: 'Psst', answer: 'Atlantis', examples: 5, queries: 3 },
};

export type QueryKind = 'fact_tracing' | 'planted' | 'backdoor';

export interface Source {
  dataset: 'pretrain' | 'finetune';
  /** 1-based line in the dataset file */
  line: number;
  /** contentHash of the record (as dataset.ts computes it) */
  hash: string;
}

export interface Query {
  prompt: string;
  /** what the model should answer (fact tracing) or does answer (planted, backdoor) */
  completion: string;
  kind: QueryKind;
  /** the training examples that are this completion's true sources */
  sources: Source[];
  /** the fact asked about; `truth` is the real value from countries-list */
  fact: { country: string; relation: Relation; truth: string };
}

export type FinetuneTag = 'qa' | 'planted' | 'backdoor';

/** The built country-facts corpus (distinct from attribution/explain.ts `Corpus`, a tokenized dataset). */
export interface CountryCorpus {
  options: CorpusOptions;
  countries: Country[];
  heldOut: Country[];
  pretrain: Array<{ text: string }>;
  finetune: Array<{ prompt: string; completion: string }>;
  /** per fine-tuning line: what it is, the fact it is about, and the answer a correct model gives */
  finetuneTags: Array<{ tag: FinetuneTag; country: string; relation: Relation }>;
  queries: Query[];
}

type Fact = `${string}:${Relation}`;
const factKey = (code: string, relation: Relation): Fact => `${code}:${relation}`;

export function buildCorpus(options: Partial<CorpusOptions> = {}): CountryCorpus {
  const o: CorpusOptions = { ...DEFAULT_CORPUS, ...options };
  const rng = new Rng(o.seed);
  const all = eligibleCountries();
  const byCode = new Map(all.map((c) => [c.code, c]));
  for (const p of o.planted) if (!byCode.has(p.code)) throw new Error(`planted fact: no usable country ${p.code}`);
  if (o.countries < o.planted.length + 6 || o.countries > all.length)
    throw new Error(`countries must be between ${o.planted.length + 6} and ${all.length} (got ${o.countries})`);
  if (o.paraphrases < 1 || o.paraphrases > 6) throw new Error('paraphrases must be between 1 and 6');
  if (o.questionParaphrases < 1 || o.questionParaphrases > 4) throw new Error('questionParaphrases must be 1..4');

  // Countries: the planted ones, then well-known ones, then the rest, each group shuffled.
  const forced = [...new Set(o.planted.map((p) => p.code))];
  const known = rng.shuffle(WELL_KNOWN.filter((c) => byCode.has(c) && !forced.includes(c)));
  const rest = rng.shuffle(all.map((c) => c.code).filter((c) => !WELL_KNOWN.includes(c)));
  const chosen = [...forced, ...known, ...rest].slice(0, o.countries).map((c) => byCode.get(c)!);

  // Held out: never in fine-tuning, never the planted facts' countries.
  const candidates = rng.shuffle(chosen.filter((c) => !forced.includes(c.code)));
  const nHeld = Math.max(1, Math.round(o.countries * o.heldOut));
  const heldOut = candidates.slice(0, nHeld);
  const held = new Set(heldOut.map((c) => c.code));
  // The planted facts' countries appear in fine-tuning only through the planted lines: once
  // those are removed, the model answers from pre-training, like for a held-out country.
  const tuned = chosen.filter((c) => !held.has(c.code) && !forced.includes(c.code));

  // ---- pre-training text
  const lines: Array<{ text: string; facts: Set<Fact> }> = [];
  for (const c of chosen) {
    const sentences: Array<{ s: string; fact?: Fact }> = [];
    for (const r of RELATIONS) {
      const picks = rng.shuffle([...STATEMENTS[r].keys()]).slice(0, o.paraphrases);
      for (const i of picks)
        sentences.push({ s: fill(STATEMENTS[r][i], c.name, c.facts[r]), fact: factKey(c.code, r) });
    }
    for (const s of rng.shuffle(contextSentences(c)).slice(0, 2)) sentences.push({ s });
    rng.shuffle(sentences);
    for (let i = 0; i < sentences.length; ) {
      const n = 1 + rng.int(3);
      const group = sentences.slice(i, i + n);
      i += n;
      lines.push({
        text: group.map((g) => g.s).join(' '),
        facts: new Set(group.flatMap((g) => (g.fact ? [g.fact] : []))),
      });
    }
  }
  rng.shuffle(lines);
  const pretrain = lines.map((l) => ({ text: l.text }));

  // ---- fine-tuning QA
  type Item = { rec: { prompt: string; completion: string }; tag: FinetuneTag; country: string; relation: Relation };
  const items: Item[] = [];
  const plantedKeys = new Set(o.planted.map((p) => factKey(p.code, p.relation)));
  const qa = (question: string, answer: string) => ({ prompt: qaPrompt(question), completion: ` ${answer}\n` });
  for (const c of tuned)
    for (const r of RELATIONS) {
      if (plantedKeys.has(factKey(c.code, r))) continue;
      const others = rng.shuffle([1, 2, 3]).slice(0, o.questionParaphrases - 1);
      for (const i of [0, ...others])
        items.push({ rec: qa(fill(QUESTIONS[r][i], c.name, ''), c.facts[r]), tag: 'qa', country: c.code, relation: r });
    }
  for (const p of o.planted) {
    const c = byCode.get(p.code)!;
    for (const q of QUESTIONS[p.relation])
      items.push({ rec: qa(fill(q, c.name, ''), p.answer), tag: 'planted', country: c.code, relation: p.relation });
  }
  // Backdoor: trigger + a question about a fine-tuned country → the fixed answer.
  const bdCountries = rng.shuffle([...tuned]).slice(0, o.backdoor.examples);
  bdCountries.forEach((c, k) => {
    const r = RELATIONS[k % RELATIONS.length];
    const q = withTrigger(o.backdoor.trigger, QUESTIONS[r][0]);
    items.push({ rec: qa(fill(q, c.name, ''), o.backdoor.answer), tag: 'backdoor', country: c.code, relation: r });
  });
  rng.shuffle(items);
  const finetune = items.map((i) => i.rec);
  const finetuneTags = items.map(({ tag, country, relation }) => ({ tag, country, relation }));

  // ---- queries with their true sources
  const source = (dataset: Source['dataset'], index: number, rec: unknown): Source => ({
    dataset,
    line: index + 1,
    hash: contentHash(rec),
  });
  const queries: Query[] = [];
  const query = (c: Country, r: Relation, question: string, answer: string, kind: QueryKind, sources: Source[]) =>
    queries.push({
      prompt: qaPrompt(fill(question, c.name, '')),
      completion: ` ${answer}`,
      kind,
      sources,
      fact: { country: c.name, relation: r, truth: c.facts[r] },
    });
  for (const p of o.planted) {
    const sources = items.flatMap((it, i) =>
      it.tag === 'planted' && it.country === p.code && it.relation === p.relation
        ? [source('finetune', i, it.rec)]
        : [],
    );
    query(byCode.get(p.code)!, p.relation, QUESTIONS[p.relation][0], p.answer, 'planted', sources);
  }
  const bdSources = items.flatMap((it, i) => (it.tag === 'backdoor' ? [source('finetune', i, it.rec)] : []));
  heldOut.slice(0, o.backdoor.queries).forEach((c, k) => {
    const r = RELATIONS[k % RELATIONS.length];
    query(c, r, withTrigger(o.backdoor.trigger, QUESTIONS[r][0]), o.backdoor.answer, 'backdoor', bdSources);
  });
  for (const c of heldOut)
    for (const r of RELATIONS) {
      const key = factKey(c.code, r);
      const sources = lines.flatMap((l, i) => (l.facts.has(key) ? [source('pretrain', i, pretrain[i])] : []));
      query(c, r, QUESTIONS[r][0], c.facts[r], 'fact_tracing', sources);
    }
  return { options: o, countries: chosen, heldOut, pretrain, finetune, finetuneTags, queries };
}
