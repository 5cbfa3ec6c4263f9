// influence-lens explain: which training examples made this completion likely? Prints the
// ranked supporting and opposing examples (or the documented ExplainResult JSON with --json).
import { relative } from 'node:path';
import { describeAttribution } from '../../common/display';
import { ACCEPTED_SHAPES } from '../../common/records/shape';
import { methodInfo } from '../../protocol/methods';
import { type ExplainedExample, type ExplainResult, METHODS, type Method } from '../../protocol/types';
import { Corpus, type ExplainSetup, explain, explainMany } from '../attribution/explain';
import {
  checkSameTokenizer,
  openStage,
  otherDataWarning,
  parseDamping,
  stagesConfigWarning,
} from '../attribution/stage';
import { loadDataset } from '../data/dataset';
import { formatRecord, parseRecord } from '../data/format';
import { readJsonl } from '../data/jsonl';
import { contextLength, sameTokenization } from '../data/tokenize';
import { describeTraining } from '../data/training';
import { DEFAULTS } from '../settings';
import {
  CHECKPOINTS_OPTION,
  checkpointsSetting,
  cliCheckpointStages,
  cliPlan,
  sumsOverCheckpoints,
} from './checkpoints';
import { heatmap, oneLine } from './heatmap';
import { CliError, int, oneOf, Progress, parse, trainingFlag } from './util';

const EXPLAIN_OPTIONS = {
  model: { type: 'string' },
  base: { type: 'string' },
  factors: { type: 'string' },
  data: { type: 'string' },
  prompt: { type: 'string' },
  completion: { type: 'string' },
  queries: { type: 'string' },
  'top-k': { type: 'string' },
  method: { type: 'string' },
  compare: { type: 'string' },
  candidates: { type: 'string' },
  damping: { type: 'string' },
  'pretrained-model': { type: 'string' },
  'pretrained-factors': { type: 'string' },
  'pretrained-base': { type: 'string' },
  'batch-size': { type: 'string' },
  rank: { type: 'string' },
  modules: { type: 'string' },
  training: { type: 'string' },
  'pretrained-training': { type: 'string' },
  'skip-malformed': { type: 'boolean' },
  json: { type: 'boolean' },
  ...CHECKPOINTS_OPTION,
} as const;

export async function runExplain(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, EXPLAIN_OPTIONS);
  if (!v.model) throw new CliError('--model <dir> is required');
  if (!v.data) throw new CliError('--data <train.jsonl> is required');
  if (v.queries !== undefined && (v.prompt !== undefined || v.completion !== undefined))
    throw new CliError('give either --queries <file.jsonl> or --prompt and --completion, not both');
  if (v.queries === undefined && (v.prompt === undefined || v.completion === undefined))
    throw new CliError(
      '--prompt and --completion are required (the completion is what gets explained), or --queries <file.jsonl>',
    );
  const queries = v.queries === undefined ? undefined : readQueries(v.queries);
  const method = oneOf(v.method, METHODS, '--method', v.factors ? 'ekfac' : 'gdp');
  if (v.compare !== undefined && !v.compare.trim())
    throw new CliError(`--compare must name one or more methods, comma-separated (${METHODS.join(', ')})`);
  const named = (v.compare ? v.compare.split(',') : []).map((m) => oneOf(m.trim(), METHODS, '--compare', 'ekfac'));
  // the method itself is the result: comparing with it adds nothing, and saying so beats a silent drop
  if (named.includes(method)) process.stderr.write(`note: --compare ${method} is the --method itself: left out\n`);
  const compare = [...new Set(named)].filter((m) => m !== method) as Method[];
  const needsFactors = [method, ...compare].some((m) => methodInfo(m)?.needsFactors);
  if (needsFactors && !v.factors) {
    // name the method that needs them: `--compare ekfac` beside the default gdp is what asked for them
    const which = methodInfo(method)?.needsFactors
      ? `--method ${method}`
      : `--compare ${compare.filter((m) => methodInfo(m)?.needsFactors).join(',')}`;
    throw new CliError(`${which} needs --factors <dir> (make them with: influence-lens fit ...)`);
  }
  const needsPretrained = [method, ...compare].includes('multistage');
  if (needsPretrained && !(v['pretrained-model'] && v['pretrained-factors']))
    throw new CliError('multistage needs --pretrained-model <dir> and --pretrained-factors <dir>');
  // a flag no chosen method reads is refused: it would look as if it had changed the result
  const all = [method, ...compare];
  if (v.damping !== undefined && !needsFactors)
    throw new CliError(
      `--damping sets EK-FAC's damping; ${all.join(', ')} use${all.length === 1 ? 's' : ''} no factors`,
    );
  if (v.rank !== undefined && !all.some((m) => methodInfo(m)?.gradientBased))
    throw new CliError(
      `--rank is a low-rank query gradient; ${all.join(', ')} compute${all.length === 1 ? 's' : ''} no gradients`,
    );
  if (v.factors !== undefined && !all.some((m) => methodInfo(m)?.gradientBased))
    throw new CliError(
      `--factors is read by the gradient methods (EK-FAC's factors, the modules they score); ${all.join(', ')} compute${all.length === 1 ? 's' : ''} no gradients`,
    );
  if (v.modules !== undefined && !all.some((m) => methodInfo(m)?.gradientBased))
    throw new CliError(
      `--modules chooses the layers whose gradients are scored; ${all.join(', ')} compute${all.length === 1 ? 's' : ''} no gradients`,
    );
  for (const flag of ['pretrained-model', 'pretrained-factors', 'pretrained-base', 'pretrained-training'] as const)
    if (v[flag] !== undefined && !needsPretrained)
      throw new CliError(`--${flag} is read by --method multistage only (or --compare multistage)`);
  const damping = parseDamping(v.damping);
  const topK = int(v['top-k'], '--top-k', 10);
  if (topK < 1) throw new CliError('--top-k must be at least 1');
  const batchSize = int(v['batch-size'], '--batch-size', DEFAULTS.batchSize);
  if (batchSize < 1) throw new CliError('--batch-size must be at least 1');
  // the modules scored, by every method: --modules, else the factors' (so that a comparison with
  // ekfac is on the same modules), else all; factors over other modules than --modules are refused
  const modules = v.modules === undefined ? undefined : oneOf(v.modules, ['mlp', 'all'] as const, '--modules', 'all');

  const training = trainingFlag(v.training);
  const ft = openStage(v.model, v.factors, {
    damping,
    engine: { base: v.base, training },
    modules,
    modulesFrom: '--modules',
  });
  const pt = needsPretrained
    ? openStage(v['pretrained-model']!, v['pretrained-factors'], {
        damping,
        engine: {
          base: v['pretrained-base'],
          training: trainingFlag(v['pretrained-training'], '--pretrained-training'),
        },
        modules: ft.modules,
        modulesFrom: "the fine-tuned model's factors",
        trainingFlag: '--pretrained-training',
      })
    : undefined;
  if (pt) {
    checkSameTokenizer(ft.model, pt.model);
    const configs = stagesConfigWarning(ft.model, pt.model);
    if (configs) pt.warnings.push(configs);
    if (pt.modules !== ft.modules)
      throw new CliError(
        `the two factor sets track different modules (${ft.modules} vs ${pt.modules}); fit both with the same --modules`,
      );
  }
  for (const w of [...ft.warnings, ...(pt?.warnings ?? [])]) process.stderr.write(`warning: ${w}\n`);
  // multistage traces into the pre-training data (--data): tokenized as the pre-trained model was
  // trained on it (its --pretrained-training), as the server does for a "pretrained" dataset
  const dataModel = method === 'multistage' && pt ? pt.model : ft.model;
  // one tokenization of --data serves every method: multistage beside a single-stage method
  // needs both models to read it alike (--compare multistage scored it under the fine-tuned
  // model's convention, without the EOS the pre-trained factors were fitted with)
  // (BM25 reads the text alone, as in the server's checkReadAlike)
  const singleStage = all.filter((m) => m !== 'multistage' && methodInfo(m)?.usesModel);
  if (
    pt &&
    singleStage.length &&
    all.includes('multistage') &&
    !sameTokenization(ft.model.tokenizer, pt.model.tokenizer)
  )
    throw new CliError(
      `multistage reads --data as the pre-trained model was trained on it (${describeTraining(pt.model.tokenizer.training)}), ${singleStage.join(', ')} as the fine-tuned one was (${describeTraining(ft.model.tokenizer.training)}; another chat template counts too): one run cannot score both; explain with each --method separately`,
    );
  const dataset = loadDataset(v.data, {
    skipMalformed: v['skip-malformed'],
    trainedBy: { tokenizer: dataModel.tokenizer, maxLength: contextLength(dataModel.config) },
  });
  const skipped = dataset.skipped.length
    ? `skipped ${dataset.skipped.length} malformed line(s) of ${v.data}`
    : undefined;
  if (skipped) process.stderr.write(`${skipped}\n`);
  const corpus = new Corpus(v.data, dataset, dataModel);
  // the factors that meet these candidates: the pre-trained model's under multistage
  const hashes = dataset.examples.map((e) => e.hash);
  const stale =
    method === 'multistage'
      ? otherDataWarning(v['pretrained-factors'], { path: v.data, hashes }, dataModel)
      : needsFactors
        ? otherDataWarning(v.factors, { path: v.data, hashes }, ft.model)
        : undefined;
  if (stale) process.stderr.write(`warning: ${stale}\n`);
  // examples cut to the context, and those with no trained token (which gradient methods score 0)
  const notes = corpus.notes(true);
  for (const n of notes) process.stderr.write(`${n}\n`);
  // the same lines travel with each --json result (ExplainResult.warnings, as the server sends
  // them): a script that reads the JSON alone must see that the factors are of other data
  const warnings = [ft.warnings, pt?.warnings ?? [], [stale, skipped], notes].flat().filter((w) => w !== undefined);
  // a query's own warnings (words outside the vocabulary) are said on stderr and kept first in --json
  const withWarnings = <R extends { warnings?: string[] }>(r: R, where?: string): R => {
    for (const w of r.warnings ?? []) process.stderr.write(`warning: ${where ? `${where}: ` : ''}${w}\n`);
    const all = [...(r.warnings ?? []), ...warnings];
    return all.length ? { ...r, warnings: all } : r;
  };
  const plan = cliPlan(v.model, ft.model, checkpointsSetting(v.checkpoints), [method, ...compare]);
  const checkpoints =
    plan &&
    cliCheckpointStages(plan, {
      factorsDir: v.factors,
      damping,
      modules: ft.modules,
      engine: { training },
      needFactors: [method, ...compare].some((m) => methodInfo(m)?.needsFactors && sumsOverCheckpoints(m)),
      model: v.model,
    });
  const setup: ExplainSetup = { model: ft, pretrained: pt, modules: ft.modules, checkpoints };
  let bar: Progress | undefined;
  let stage = '';
  const common = {
    method,
    topK,
    compare,
    candidates: oneOf(v.candidates, ['all', 'retrieved'] as const, '--candidates', 'all'),
    batchSize,
    rank: v.rank === undefined ? undefined : positive(int(v.rank, '--rank', 0), '--rank'),
    onProgress: (s: string, done: number, total: number) => {
      if (s !== stage) {
        bar?.done();
        stage = s;
        bar = new Progress(s, total);
      }
      bar!.tick(done);
    },
  };
  if (queries) {
    // one scoring pass for all queries; one ExplainResult per line, in the file's order, each
    // written as soon as it is final (a run stopped midway keeps the lines it wrote)
    await explainMany(
      setup,
      corpus,
      queries.map((q) => ({ ...q, ...common })),
      (res, i) => {
        // a bar left open would share the terminal's line with the result
        bar?.done();
        bar = undefined;
        stage = '';
        // which line it answers (blank lines are not queries, so the k-th result need not be line k)
        const r = withWarnings({ ...res, query: { ...res.query, where: queries[i].where } }, queries[i].where);
        process.stdout.write(v.json ? `${JSON.stringify(r)}\n` : `${formatResult(r, process.stdout.isTTY === true)}\n`);
      },
    );
    bar?.done();
    return;
  }
  const result = await explain(setup, corpus, { prompt: v.prompt!, completion: v.completion!, ...common });
  bar?.done();
  if (v.json) {
    process.stdout.write(`${JSON.stringify(withWarnings(result), null, 2)}\n`);
    return;
  }
  process.stdout.write(formatResult(withWarnings(result), process.stdout.isTTY === true));
}

const SIGN_WORDS: Record<string, string> = {
  supporting: 'made this completion more likely',
  opposing: 'made this completion less likely',
};

export function formatResult(r: ExplainResult, color: boolean, marks?: (e: ExplainedExample) => string): string {
  const lines: string[] = [];
  const p = (s = '') => lines.push(s);
  if (r.query.where) p(`query:      ${r.query.where}`);
  p(`prompt:     ${oneLine(r.query.prompt, 100)}`);
  p(`completion: ${oneLine(r.query.completion, 100)}   (−log p = ${r.query.loss.toFixed(3)})`);
  p(`method: ${r.method}; ${r.scored} training examples scored in ${(r.timings.total_ms / 1000).toFixed(2)} s`);
  if (r.attribution) p(`scores: ${describeAttribution(r.attribution)}`);
  if (r.multiStage) {
    const { distance: dist, threshold } = r.multiStage;
    p(
      `fine-tune vs pre-trained weights, ‖W_ft − W_pt‖/‖W_pt‖ per linear module: median ${dist.median.toFixed(3)}, max ${dist.max.toFixed(3)} (measured to work up to ${threshold})`,
    );
    if (r.multiStage.warning) p(`warning: ${r.multiStage.warning}`);
  }
  const signed = r.supporting.some((e) => e.sign !== 'neutral') || r.opposing.length > 0;
  const block = (title: string, list: ExplainedExample[]) => {
    p();
    p(title);
    if (!list.length) p('  (none)');
    for (const e of list) {
      const rel = relative(process.cwd(), e.id.dataset);
      const where = `${rel && !rel.startsWith('..') ? rel : e.id.dataset}:${e.id.line}`;
      const mark = marks?.(e) ?? '';
      p(
        `  #${String(e.rank).padEnd(4)} ${fmt(e.score).padStart(10)}  ${e.sign.padEnd(10)} ${where}  ${e.id.hash}  p${Math.round(e.percentile)}${mark}`,
      );
      const text = e.tokenScores ? heatmap(e.text, e.tokenScores, color) : e.text;
      p(`        ${oneLine(text, color ? 2000 : 160)}`);
      if (e.perModule) {
        const top = Object.entries(e.perModule)
          .sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]))
          .slice(0, 2)
          .map(([m, s]) => `${m} ${fmt(s)}`);
        p(`        strongest layers: ${top.join(', ')}`);
      }
      if (e.otherRanks && Object.keys(e.otherRanks).length)
        p(
          `        rank under other methods: ${Object.entries(e.otherRanks)
            .map(([m, k]) => `${m} #${k}`)
            .join(', ')}`,
        );
    }
  };
  if (signed) {
    block(`Supporting (${SIGN_WORDS.supporting}):`, r.supporting);
    block(`Opposing (${SIGN_WORDS.opposing}):`, r.opposing);
  } else {
    block(`Most similar (${r.method} has no sign):`, r.supporting);
  }
  p();
  return `${lines.join('\n')}\n`;
}

function positive(n: number, flag: string): number {
  if (n < 1) throw new CliError(`${flag} must be at least 1`);
  return n;
}

function fmt(x: number): string {
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(3) : x.toFixed(4);
}

const QUERY_SHAPES =
  'a query is {"prompt": string, "completion": string}, {"messages": [..., {"role": "assistant", "content": string}]} or {"prompt": [messages], "completion": [messages]}';

/**
 * Queries, one JSON object a line: {"prompt", "completion"}, or {"messages": [...]} whose last
 * message is the assistant's reply to explain (rendered with the training data's chat template).
 */
export function readQueries(
  path: string,
): Array<{ prompt: string; completion: string; messages?: unknown; where: string }> {
  // every query gets its result, in order: a bad line stops the command (--skip-malformed is for the data)
  const { rows } = readJsonl(path, { skippable: false });
  if (!rows.length) throw new CliError(`${path}: no queries`);
  const leftAside = new Map<string, number>();
  const queries = rows.map(({ line, value }) => {
    const where = `${path}:${line}`;
    let r: ReturnType<typeof formatRecord>;
    try {
      r = formatRecord(value, where);
    } catch (e) {
      // a query's shapes, not a dataset record's (a "text" record has no completion to explain)
      if (e instanceof Error && e.message.includes(ACCEPTED_SHAPES))
        e.message = e.message.replace(ACCEPTED_SHAPES, QUERY_SHAPES);
      throw e;
    }
    if (r.kind === 'text') throw new CliError(`${where}: a query needs a completion to explain ("text" has none)`);
    const last = r.spans[r.spans.length - 1];
    // the completion is the last assistant turn, and nothing may follow it
    if (last[1] !== r.text.length)
      throw new CliError(`${where}: the last message must be the assistant's (the completion to explain)`);
    // `where` names the line in a refusal of the query itself (too long for the model, ...)
    const split = { prompt: r.text.slice(0, last[0]), completion: r.text.slice(last[0], last[1]), where };
    // a chat is explained as explain's `messages` renders it: with the model's chat template, as
    // its training records are (the stand-in split above only where the model has none)
    // (a conversational prompt/completion line is one conversation: the completion's messages follow the prompt's)
    const v = parseRecord(value, where);
    for (const k of queryKeys(value as Record<string, unknown>, where)) leftAside.set(k, (leftAside.get(k) ?? 0) + 1);
    return v.kind === 'messages' ? { ...split, messages: v.messages } : split;
  });
  if (leftAside.size)
    process.stderr.write(
      `note: ${path}: ${[...leftAside].map(([k, n]) => `"${k}" (${n} line${n === 1 ? '' : 's'})`).join(', ')} left aside: a query is read from "prompt"/"completion" or "messages"\n`,
    );
  return queries;
}

/** the keys a query line is made of (the rest, a record's metadata, are left aside) */
const QUERY_KEYS = new Set(['prompt', 'completion', 'messages']);

/**
 * explain's per-query settings, as a query line might spell them ("topK", "top_k"), and their
 * flags. Only these: "model", "rank" or "data" are metadata in real chat exports (LMSYS-Chat's
 * "model", OpenAssistant's "rank").
 */
const QUERY_SETTINGS: Record<string, string> = {
  method: '--method',
  topk: '--top-k',
  damping: '--damping',
  compare: '--compare',
  candidates: '--candidates',
  batchsize: '--batch-size',
};

/**
 * A query line that carries one of explain's per-query settings ("method", "topK", "damping", ...)
 * is refused: the settings apply to every query and come from the command line, and the line's
 * value was dropped without a word. Returns the other keys (an id, a model name: metadata), which
 * the caller names in one note; a null field counts as absent, as in a dataset record.
 */
function queryKeys(value: Record<string, unknown>, where: string): string[] {
  const spelt = (k: string) => k.toLowerCase().replace(/[-_]/g, '');
  const extra = Object.keys(value).filter((k) => !QUERY_KEYS.has(k) && value[k] !== null);
  const settings = extra.filter((k) => spelt(k) in QUERY_SETTINGS);
  if (settings.length)
    throw new CliError(
      `${where}: ${settings.map((k) => `"${k}"`).join(', ')} in a query line: explain's settings apply to every query of --queries and come from the command line (${settings.map((k) => QUERY_SETTINGS[spelt(k)]).join(', ')}); run the queries that need other settings in a file of their own`,
    );
  return extra;
}
