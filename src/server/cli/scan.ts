// influence-lens scan: training examples ranked by self-influence ⟨P(G_z), G_z⟩, the examples
// the model finds most surprising or memorized — a review list for cleaning without a query.
import { relative } from 'node:path';
import { describeAttribution, recordText } from '../../common/display';
import { selfInfluence } from '../attribution/checkpoints';
import { attributionOf, Corpus } from '../attribution/explain';
import { openStage, otherDataWarning, parseDamping } from '../attribution/stage';
import { loadDataset } from '../data/dataset';
import { contextLength } from '../data/tokenize';
import { DEFAULTS } from '../settings';
import { CHECKPOINTS_OPTION, checkpointsSetting, cliCheckpointStages, cliPlan } from './checkpoints';
import { oneLine } from './heatmap';
import { CliError, int, Progress, parse, trainingFlag } from './util';

export async function runScan(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    base: { type: 'string' },
    factors: { type: 'string' },
    data: { type: 'string' },
    'top-k': { type: 'string' },
    damping: { type: 'string' },
    'batch-size': { type: 'string' },
    'skip-malformed': { type: 'boolean' },
    training: { type: 'string' },
    json: { type: 'boolean' },
    ...CHECKPOINTS_OPTION,
  });
  if (!v.model) throw new CliError('--model <dir> is required');
  if (!v.factors) throw new CliError('--factors <dir> is required (make them with: influence-lens fit ...)');
  if (!v.data) throw new CliError('--data <train.jsonl> is required');
  const topK = int(v['top-k'], '--top-k', 20);
  if (topK < 1) throw new CliError('--top-k must be at least 1');
  const batchSize = int(v['batch-size'], '--batch-size', DEFAULTS.batchSize);
  if (batchSize < 1) throw new CliError('--batch-size must be at least 1');
  const damping = parseDamping(v.damping);
  const training = trainingFlag(v.training);
  const stage = openStage(v.model, v.factors, { damping, engine: { base: v.base, training } });
  const plan = cliPlan(v.model, stage.model, checkpointsSetting(v.checkpoints));
  const checkpoints =
    plan &&
    cliCheckpointStages(plan, {
      factorsDir: v.factors,
      damping,
      modules: stage.modules,
      engine: { training },
      needFactors: true,
      model: v.model,
    });
  for (const w of stage.warnings) process.stderr.write(`warning: ${w}\n`);
  const dataset = loadDataset(v.data, {
    skipMalformed: v['skip-malformed'],
    trainedBy: { tokenizer: stage.model.tokenizer, maxLength: contextLength(stage.model.config) },
  });
  if (dataset.skipped.length) process.stderr.write(`skipped ${dataset.skipped.length} malformed line(s)\n`);
  const corpus = new Corpus(v.data, dataset, stage.model);
  const stale = otherDataWarning(v.factors, { path: v.data, hashes: dataset.examples.map((e) => e.hash) }, stage.model);
  if (stale) process.stderr.write(`warning: ${stale}\n`);
  let bar: Progress | undefined;
  let label = '';
  const scores = await selfInfluence(stage, checkpoints, corpus.tokens, {
    modules: stage.modules,
    batchSize,
    onProgress: (s, d, t) => {
      if (s !== label) {
        bar?.done();
        label = s;
        bar = new Progress(s, t);
      }
      bar!.tick(d);
    },
  });
  bar?.done();
  const order = Array.from(scores.keys()).sort((a, b) => scores[b] - scores[a]);
  const top = order.slice(0, topK).map((i, r) => {
    const e = dataset.examples[i];
    // --json: as the model saw it (a chat rendered with its chat template), as explain shows examples
    return {
      rank: r + 1,
      selfInfluence: scores[i],
      line: e.line,
      hash: e.hash,
      text: corpus.token(i).text,
      record: e.record,
    };
  });
  const attribution = attributionOf('ekfac', { model: stage, modules: stage.modules, checkpoints });
  if (v.json) {
    process.stdout.write(
      `${JSON.stringify({ dataset: v.data, scored: corpus.size, attribution, examples: top }, null, 2)}\n`,
    );
    return;
  }
  const rel = relative(process.cwd(), v.data);
  const where = rel && !rel.startsWith('..') ? rel : v.data;
  process.stdout.write(
    `highest self-influence of ${corpus.size} examples (unusual or memorized: review these first)\n` +
      `scores: ${describeAttribution(attribution)}\n`,
  );
  for (const t of top)
    process.stdout.write(
      // the record as written (a chat's rendered text opens with its template's preamble)
      `  #${String(t.rank).padEnd(4)} ${t.selfInfluence.toExponential(3).padStart(10)}  ${where}:${t.line}  ${t.hash}\n        ${oneLine(recordText(t.record) ?? t.text, 160)}\n`,
    );
}
