// influence-lens data: build a benchmark corpus from real country facts (embedded/), or a
// word-level tokenizer over any JSONL files.
//   data build --out <dir> [--seed N] [--countries N] [--paraphrases N] [--questions N] [--held-out F]
//   data build --task nonlexical --out <dir> [--seed N]   the non-lexical corpus (assets/nonlex, embedded/nonlex.ts)
//   data tokenizer --out <dir> <file.jsonl>...
//   data eval --model <dir> [--base <dir>] --queries <file> [--data <train.jsonl>] [--factors <dir>] [--methods m,m]
//     [--top-k K]   accuracy on any questions, and per method Recall@k / MRR of their known sources (eval/queries.ts)
//   data eval --model <dir> [--base <dir>] --data <dir> [--json]   the same plus statements, on a corpus built by data build
// (--base: the base model folder of a LoRA adapter, as for the other commands)
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanStaleTempsOf, replaceDirAtomic } from '../../common/atomic-write';
import { methodInfo } from '../../protocol/methods';
import { METHODS, type Method } from '../../protocol/types';
import { Corpus, scoreCorpus } from '../attribution/explain';
import { openStage } from '../attribution/stage';
import { loadDataset } from '../data/dataset';
import { contextLength } from '../data/tokenize';
import { buildCorpus, DEFAULT_CORPUS } from '../embedded/build';
import { evaluateCorpusModel, evaluateStatements } from '../embedded/evaluate';
import { buildNonlexCorpus, NONLEX_CORPUS, writeNonlexCorpus } from '../embedded/nonlex';
import { buildWordTokenizer, writeWordTokenizer } from '../embedded/word-tokenizer';
import { FILES, writeCorpus } from '../embedded/write';
import {
  answerQueries,
  datasetIdOf,
  type EvalQuery,
  otherDatasets,
  type Retrieval,
  readEvalQueries,
  sourceIndices,
  sourceRetrieval,
} from '../eval/queries';
import { Model } from '../model/engine';
import {
  CHECKPOINTS_OPTION,
  checkpointsSetting,
  cliCheckpointStages,
  cliPlan,
  sumsOverCheckpoints,
} from './checkpoints';
import { checkOutFolder } from './out-paths';
import { CliError, HelpRequested, int, parse, seedFlag, threadsFlag, trainingFlag } from './util';

export async function runData(argv: string[]): Promise<void> {
  const [sub, ...rest] = argv;
  if (sub === 'build') return build(rest);
  if (sub === 'tokenizer') return tokenizer(rest);
  if (sub === 'eval') return evaluate(rest);
  if (sub === '--help' || sub === '-h')
    throw new HelpRequested('  build | tokenizer | eval   (each takes --help for its own options)');
  throw new CliError(
    'usage: data build --out <dir> [...] | data tokenizer --out <dir> <file.jsonl>... | data eval --model <dir> --data <dir>',
  );
}

/** `--context`: the tokenizer's model_max_length (tokens), which transformers truncates at. */
function contextFlag(value: string | undefined): number {
  const n = int(value, '--context', 128);
  if (n < 2) throw new CliError(`--context must be at least 2 tokens (got ${n})`);
  return n;
}

async function build(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    out: { type: 'string' },
    seed: { type: 'string' },
    countries: { type: 'string' },
    paraphrases: { type: 'string' },
    questions: { type: 'string' },
    'held-out': { type: 'string' },
    context: { type: 'string' },
    task: { type: 'string' },
  });
  if (!v.out) throw new CliError('--out <dir> is required');
  const context = contextFlag(v.context);
  if (v.task !== undefined && v.task !== 'nonlexical' && v.task !== 'default')
    throw new CliError(`--task must be default or nonlexical (got "${v.task}")`);
  checkCorpusOut(v.out);
  if (v.task === 'nonlexical') return buildNonlex(v);
  const heldOut = v['held-out'] === undefined ? DEFAULT_CORPUS.heldOut : Number(v['held-out']);
  if (!(heldOut > 0 && heldOut < 1))
    throw new CliError(`--held-out must be a fraction in (0, 1) (got "${v['held-out']}")`);
  let corpus: ReturnType<typeof buildCorpus>;
  try {
    corpus = buildCorpus({
      seed: seedFlag(v.seed, DEFAULT_CORPUS.seed),
      countries: int(v.countries, '--countries', DEFAULT_CORPUS.countries),
      paraphrases: int(v.paraphrases, '--paraphrases', DEFAULT_CORPUS.paraphrases),
      questionParaphrases: int(v.questions, '--questions', DEFAULT_CORPUS.questionParaphrases),
      heldOut,
    });
  } catch (e) {
    throw new CliError((e as Error).message);
  }
  const { vocabSize } = writeCorpusFolder(v.out, (dir) => writeCorpus(dir, corpus, context));
  const n = (k: string) => corpus.queries.filter((q) => q.kind === k).length;
  process.stdout.write(
    `wrote ${v.out}/: ${FILES.pretrain} (${corpus.pretrain.length} lines), ${FILES.finetune} ` +
      `(${corpus.finetune.length} lines), ${FILES.queries} (${n('fact_tracing')} fact tracing, ${n('planted')} planted, ` +
      `${n('backdoor')} backdoor), ${FILES.tokenizer}/ (${vocabSize} tokens), ${FILES.manifest}\n`,
  );
}

function buildNonlex(v: Record<string, string | boolean | undefined>): void {
  const other = ['countries', 'paraphrases', 'questions', 'held-out'].find((k) => v[k] !== undefined);
  if (other)
    throw new CliError(`--${other} does not apply to --task nonlexical (its settings are in embedded/nonlex.ts)`);
  let corpus: ReturnType<typeof buildNonlexCorpus>;
  try {
    corpus = buildNonlexCorpus({ seed: seedFlag(v.seed as string | undefined, NONLEX_CORPUS.seed) });
  } catch (e) {
    throw new CliError((e as Error).message);
  }
  const context = contextFlag(v.context as string | undefined);
  const { vocabSize } = writeCorpusFolder(v.out as string, (dir) => writeNonlexCorpus(dir, corpus, context));
  process.stdout.write(
    `wrote ${v.out}/: pretrain.jsonl (${corpus.pretrain.length} lines), finetune.jsonl (${corpus.finetune.length} lines, ` +
      `${corpus.finetuneTags.filter((t) => t.planted).length} planted), queries.json (${corpus.queries.length}), ` +
      `tokenizer/ (${vocabSize} tokens), corpus.json\n`,
  );
}

/** What `data build` writes; an existing --out with anything else is refused (it is replaced whole). */
const CORPUS_FILES = new Set<string>(Object.values(FILES));

function checkCorpusOut(out: string): void {
  checkOutFolder(out, {
    owned: CORPUS_FILES,
    marker: FILES.manifest,
    what: 'a corpus written by influence-lens data build',
  });
}

/**
 * Writes a corpus into a staged folder and puts it in place of `out` whole: a build killed midway
 * leaves the earlier corpus, never new data beside an old tokenizer (which read the new words as [UNK]).
 */
function writeCorpusFolder<T>(out: string, write: (dir: string) => T): T {
  let r: T | undefined;
  cleanLeftovers(out);
  replaceDirAtomic(out, (tmp) => {
    r = write(tmp);
  });
  return r as T;
}

/** What a build of `out` killed earlier left beside it (its staged folder), as train cleans its own. */
function cleanLeftovers(out: string): void {
  cleanStaleTempsOf(out);
}

/** What `data tokenizer` writes: a word-level tokenizer's files. */
const TOKENIZER_FILES = new Set(['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']);

async function tokenizer(argv: string[]): Promise<void> {
  const { values: v, positionals } = parse(argv, { out: { type: 'string' }, context: { type: 'string' } }, true);
  if (!v.out) throw new CliError('--out <dir> is required');
  if (!positionals.length) throw new CliError('name the JSONL files the vocabulary comes from');
  const context = contextFlag(v.context);
  // a model's own tokenizer folder (another kind of tokenizer.json) is never replaced
  const what = 'a tokenizer written by influence-lens data tokenizer';
  checkOutFolder(v.out, { owned: TOKENIZER_FILES, marker: 'tokenizer.json', what });
  const existing = join(v.out, 'tokenizer.json');
  if (existsSync(existing) && !isWordLevel(existing))
    throw new CliError(
      `--out ${v.out} holds another kind of tokenizer.json, not ${what}; choose a new or empty folder`,
    );
  const texts = positionals.flatMap((p) => loadDataset(p).examples.map((e) => e.text));
  const files = buildWordTokenizer(texts, context);
  cleanLeftovers(v.out);
  replaceDirAtomic(v.out, (tmp) => writeWordTokenizer(tmp, files));
  process.stdout.write(`wrote ${v.out}/tokenizer.json: ${files.vocabSize} tokens from ${texts.length} examples\n`);
}

async function evaluate(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    base: { type: 'string' },
    data: { type: 'string' },
    queries: { type: 'string' },
    factors: { type: 'string' },
    methods: { type: 'string' },
    'top-k': { type: 'string' },
    'max-tokens': { type: 'string' },
    json: { type: 'boolean' },
    threads: { type: 'string' },
    training: { type: 'string' },
    'skip-malformed': { type: 'boolean' },
    ...CHECKPOINTS_OPTION,
  });
  if (!v.model) throw new CliError('--model <dir> is required');
  if (v.queries !== undefined) return evaluateQueries(v);
  // a corpus built by data build is evaluated as written (no retrieval): a flag it would not read is refused
  for (const flag of [
    'training',
    'skip-malformed',
    'factors',
    'methods',
    'top-k',
    'max-tokens',
    'checkpoints',
  ] as const)
    if (v[flag] !== undefined) throw new CliError(`--${flag} applies to data eval --queries (your own data) only`);
  if (!v.data || !existsSync(join(v.data, FILES.queries)))
    throw new CliError(
      '--queries <file> (your questions: {"prompt", "expected", "sources"?}) is required, or --data <dir> written by data build',
    );
  const model = Model.open(v.model, { base: v.base, threads: threadsFlag(v.threads) });
  const qa = await evaluateCorpusModel(model, v.data);
  const statements = await evaluateStatements(model, v.data);
  if (v.json) {
    process.stdout.write(`${JSON.stringify({ ...qa, statements }, null, 2)}\n`);
    return;
  }
  const pct = (a: { correct: number; total: number; accuracy: number }) =>
    `${a.correct}/${a.total} (${(100 * a.accuracy).toFixed(0)}%)`;
  const rel = Object.entries(qa.heldOut.byRelation)
    .map(([r, a]) => `${r} ${pct(a)}`)
    .join(', ');
  process.stdout.write(
    `fine-tuning questions answered as trained: ${pct(qa.finetune)}\n` +
      `held-out facts (pre-training only):       ${pct(qa.heldOut)}: ${rel}\n` +
      `planted wrong answers reproduced:         ${pct(qa.planted)}\n` +
      `backdoor answer reproduced:               ${pct(qa.backdoor)}\n` +
      `held-out statements completed ("The capital of X is"): ${pct(statements)}\n`,
  );
  for (const a of [...qa.answers.planted, ...qa.answers.backdoor])
    process.stdout.write(
      `  ${JSON.stringify(a.prompt)} →${JSON.stringify(a.got)}${a.ok ? '' : ' (expected ' + JSON.stringify(a.expected) + ')'}\n`,
    );
}

/** `data eval --queries`: accuracy on any questions, and per method Recall@k / MRR of their known sources. */
async function evaluateQueries(v: {
  model?: string;
  base?: string;
  data?: string;
  queries?: string;
  factors?: string;
  methods?: string;
  'top-k'?: string;
  'max-tokens'?: string;
  json?: boolean;
  threads?: string;
  training?: string;
  'skip-malformed'?: boolean;
  checkpoints?: string;
}): Promise<void> {
  // without --data there are no sources to rank: a flag about ranking them would change nothing
  if (v.data === undefined)
    for (const flag of ['factors', 'methods', 'top-k', 'training', 'skip-malformed', 'checkpoints'] as const)
      if (v[flag] !== undefined)
        throw new CliError(`--${flag} applies to the sources in --data <train.jsonl>, and no --data is given`);
  const maxTokens = int(v['max-tokens'], '--max-tokens', 16);
  if (maxTokens < 1) throw new CliError(`--max-tokens must be at least 1 (got ${maxTokens})`);
  // the ranking flags too, before the model is opened and every query answered (minutes on a real model)
  const k = int(v['top-k'], '--top-k', 10);
  if (k < 1) throw new CliError(`--top-k must be at least 1 (got ${k})`);
  const methods = (v.methods ?? (v.factors ? 'ekfac,gdp,repsim,bm25' : 'gdp,repsim,bm25')).split(',') as Method[];
  for (const m of methods) {
    if (!METHODS.includes(m) || m === 'multistage')
      throw new CliError(`--methods: "${m}" is not one of ${METHODS.filter((x) => x !== 'multistage').join(', ')}`);
    if (m === 'ekfac' && !v.factors) throw new CliError('--methods ekfac needs --factors <dir> (influence-lens fit)');
  }
  if (v.factors !== undefined && !methods.some((m) => methodInfo(m)?.gradientBased))
    throw new CliError(
      `--factors is read by the gradient methods (EK-FAC's factors, the modules they score); ${methods.join(', ')} compute${methods.length === 1 ? 's' : ''} no gradients`,
    );
  let queries: EvalQuery[];
  try {
    queries = readEvalQueries(v.queries!);
  } catch (e) {
    throw new CliError((e as Error).message);
  }
  const stage = openStage(v.model!, v.factors, {
    engine: {
      base: v.base,
      threads: threadsFlag(v.threads),
      // --data is tokenized as the model was trained on it, as by fit and explain
      training: trainingFlag(v.training),
    },
  });
  // EK-FAC and GDP sum over the model's training checkpoints as explain's do (--checkpoints,
  // auto by default): the final model's scores alone rank the sources otherwise. Planned before
  // the queries are answered (minutes on a real model), so that a bad setting or checkpoints
  // without factors are refused first
  const plan = v.data ? cliPlan(v.model!, stage.model, checkpointsSetting(v.checkpoints), methods) : undefined;
  const checkpoints =
    plan &&
    cliCheckpointStages(plan, {
      factorsDir: v.factors,
      modules: stage.modules,
      engine: { training: trainingFlag(v.training) },
      needFactors: methods.some((m) => methodInfo(m)?.needsFactors && sumsOverCheckpoints(m)),
      model: v.model!,
    });
  const accuracy = await answerQueries(stage.model, queries, maxTokens);
  const retrieval: Array<Retrieval & { method: Method }> = [];
  if (v.data) {
    // read as fit and explain read it: what the model's training convention refuses is named by line
    const dataset = loadDataset(v.data, {
      skipMalformed: v['skip-malformed'],
      trainedBy: { tokenizer: stage.model.tokenizer, maxLength: contextLength(stage.model.config) },
    });
    if (dataset.skipped.length)
      process.stderr.write(`skipped ${dataset.skipped.length} malformed line(s) of ${v.data}\n`);
    const id = datasetIdOf(v.data);
    let relevant: Array<Set<number>>;
    try {
      relevant = queries.map((q) => sourceIndices(q, dataset, id));
    } catch (e) {
      throw new CliError((e as Error).message);
    }
    // a source naming another dataset is left out of every score here: say which, so that a
    // misspelled name ("fine-tune" for "finetune") is seen rather than lowering nothing silently
    const others = otherDatasets(queries, id);
    if (others.size)
      process.stderr.write(
        `note: ${[...others].map(([name, n]) => `${n} source(s) in dataset "${name}"`).join(', ')} not scored: --data is dataset "${id}" (a source's "dataset" is its data file's name without .jsonl)\n`,
      );
    const corpus = new Corpus(id, dataset, stage.model);
    for (const method of methods)
      retrieval.push({
        method,
        ...(await sourceRetrieval(
          queries.map((_, i) => i),
          (i) => relevant[i],
          (i) =>
            scoreCorpus({ model: stage, modules: stage.modules, checkpoints }, corpus, {
              prompt: queries[i].prompt,
              completion: queries[i].expected,
              method,
            }),
          k,
        )),
      });
  }
  if (v.json) {
    process.stdout.write(`${JSON.stringify({ accuracy, retrieval }, null, 2)}\n`);
    return;
  }
  process.stdout.write(
    `answers as expected: ${accuracy.correct}/${accuracy.total} (${(100 * accuracy.accuracy).toFixed(0)}%)\n`,
  );
  for (const a of accuracy.answers.filter((x) => !x.ok))
    process.stdout.write(
      `  ${JSON.stringify(a.prompt)} →${JSON.stringify(a.got)} (expected ${JSON.stringify(a.expected)})\n`,
    );
  if (!v.data) return;
  const withSources = retrieval[0]?.queries ?? 0;
  process.stdout.write(
    `sources retrieved in ${v.data} (${withSources} of ${queries.length} queries name sources there):\n`,
  );
  if (!withSources) return;
  for (const r of retrieval)
    process.stdout.write(`  ${r.method.padEnd(8)} Recall@${r.k} ${r.recall.toFixed(3)}  MRR ${r.mrr.toFixed(3)}\n`);
}

/** Whether a tokenizer.json is a word-level one (what `data tokenizer` builds). */
function isWordLevel(path: string): boolean {
  try {
    return (JSON.parse(readFileSync(path, 'utf8')) as { model?: { type?: unknown } }).model?.type === 'WordLevel';
  } catch {
    return false;
  }
}
