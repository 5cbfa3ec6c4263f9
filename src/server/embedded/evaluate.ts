// How well a model trained on a built corpus answers (greedy decoding): the fine-tuning
// questions, the held-out facts it only read in pre-training, the planted wrong facts and
// the backdoor. Also, for a pre-trained model that has never seen the QA format, whether it
// completes the facts' statements ("The capital of France is" → " Paris").
import { join } from 'node:path';
import { loadDataset } from '../data/dataset';
import type { Model } from '../model/engine';
import { generate } from '../model/generate';
import type { Query, QueryKind } from './build';
import { RELATIONS, type Relation } from './facts';
import { FILES, readQueries } from './write';

export interface Answer {
  prompt: string;
  expected: string;
  got: string;
  ok: boolean;
}

export interface Accuracy {
  correct: number;
  total: number;
  accuracy: number;
}

export interface CorpusEvaluation {
  /** fine-tuning QA lines (planted and backdoor lines left out): answered as trained */
  finetune: Accuracy;
  /** fact-tracing queries: the true answer, read only in pre-training */
  heldOut: Accuracy & { byRelation: Record<Relation, Accuracy> };
  /** planted-fact queries: answered with the planted wrong answer */
  planted: Accuracy;
  /** backdoor queries: answered with the backdoor's fixed answer */
  backdoor: Accuracy;
  answers: Record<QueryKind | 'finetune', Answer[]>;
}

const acc = (answers: Answer[]): Accuracy => {
  const correct = answers.filter((a) => a.ok).length;
  return { correct, total: answers.length, accuracy: answers.length ? correct / answers.length : 0 };
};

async function answer(model: Model, items: Array<{ prompt: string; expected: string }>): Promise<Answer[]> {
  const gens = await generate(
    model,
    items.map((i) => i.prompt),
    { maxNewTokens: 8 },
  );
  return items.map((it, k) => ({ ...it, got: gens[k].text, ok: gens[k].text.trim() === it.expected.trim() }));
}

export async function evaluateCorpusModel(model: Model, dataDir: string): Promise<CorpusEvaluation> {
  const queries = readQueries(join(dataDir, FILES.queries));
  const other = queries.find((q) => q.kind === 'fact_tracing' && !RELATIONS.includes(q.fact?.relation));
  if (other)
    throw new Error(
      `${join(dataDir, FILES.queries)}: relation "${other.fact?.relation}" is not one of data build's (${RELATIONS.join(', ')}); ` +
        'evaluate other data with: data eval --model <dir> --queries <file> [--data <train.jsonl>]',
    );
  const special = new Set(
    queries.filter((q) => q.kind !== 'fact_tracing').flatMap((q) => q.sources.map((s) => `${s.dataset}:${s.line}`)),
  );
  const ft = loadDataset(join(dataDir, FILES.finetune))
    .examples.filter((e) => !special.has(`finetune:${e.line}`))
    .map((e) => {
      const r = e.record as { prompt: string; completion: string };
      return { prompt: r.prompt, expected: r.completion };
    });
  const of = (kind: QueryKind) =>
    queries.filter((q) => q.kind === kind).map((q: Query) => ({ prompt: q.prompt, expected: q.completion, q }));
  const finetune = await answer(model, ft);
  const heldItems = of('fact_tracing');
  const held = await answer(model, heldItems);
  const planted = await answer(model, of('planted'));
  const backdoor = await answer(model, of('backdoor'));
  const byRelation = Object.fromEntries(
    RELATIONS.map((r) => [r, acc(held.filter((_, i) => heldItems[i].q.fact.relation === r))]),
  ) as Record<Relation, Accuracy>;
  return {
    finetune: acc(finetune),
    heldOut: { ...acc(held), byRelation },
    planted: acc(planted),
    backdoor: acc(backdoor),
    answers: { finetune, fact_tracing: held, planted, backdoor },
  };
}

/** Statement completion for every fact of the queries' countries and relations: "The capital of X is" → " Y". */
export async function evaluateStatements(model: Model, dataDir: string): Promise<Accuracy & { answers: Answer[] }> {
  const stems: Record<Relation, (c: string) => string> = {
    capital: (c) => `The capital of ${c} is`,
    continent: (c) => `${c} is located in`,
    currency: (c) => `The currency of ${c} is the`,
    language: (c) => `The main language of ${c} is`,
  };
  const queries = readQueries(join(dataDir, FILES.queries)).filter((q) => q.kind === 'fact_tracing');
  for (const q of queries)
    if (!Object.hasOwn(stems, q.fact.relation))
      throw new Error(
        `${join(dataDir, FILES.queries)}: relation "${q.fact.relation}" is not one of data build's (${RELATIONS.join(', ')}); ` +
          'evaluate other data with: data eval --model <dir> --queries <file> [--data <train.jsonl>]',
      );
  const items = queries.map((q) => ({ prompt: stems[q.fact.relation](q.fact.country), expected: ` ${q.fact.truth}` }));
  const gens = await generate(
    model,
    items.map((i) => i.prompt),
    { maxNewTokens: 8 },
  );
  // A statement goes on after the fact ("... is Paris. Paris is ..."): compare the fact's length only.
  const answers = items.map((it, k) => {
    const got = gens[k].text;
    const ok = got.startsWith(it.expected) && !/^[\p{L}\p{N}]/u.test(got.slice(it.expected.length));
    return { ...it, got, ok };
  });
  return { ...acc(answers), answers };
}
