// influence-lens fit: EK-FAC factors for a model over a training JSONL, resumable and
// splittable into data partitions (attribution/fit-job.ts).

import { fitCheckpoints } from '../attribution/checkpoints';
import { runFitJob } from '../attribution/fit-job';
import { Model } from '../model/engine';
import { DEFAULTS } from '../settings';
import { CHECKPOINTS_OPTION, checkpointsSetting, cliPlan } from './checkpoints';
import { CliError, int, oneOf, Progress, parse, seedFlag, trainingFlag } from './util';

export async function runFit(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    base: { type: 'string' },
    data: { type: 'string' },
    out: { type: 'string' },
    modules: { type: 'string' },
    training: { type: 'string' },
    labels: { type: 'string' },
    'max-examples': { type: 'string' },
    partition: { type: 'string' },
    'batch-size': { type: 'string' },
    seed: { type: 'string' },
    'eigendecomposition-dtype': { type: 'string' },
    'skip-malformed': { type: 'boolean' },
    ...CHECKPOINTS_OPTION,
  });
  if (!v.model) throw new CliError('--model <dir> is required');
  if (!v.data) throw new CliError('--data <train.jsonl> is required');
  if (!v.out) throw new CliError('--out <factors-dir> is required');
  let partition: { index: number; count: number } | undefined;
  if (v.partition !== undefined) {
    const m = /^(\d+)\/(\d+)$/.exec(v.partition);
    if (!m) throw new CliError(`--partition must look like i/n, e.g. 0/4 (got "${v.partition}")`);
    partition = { index: Number(m[1]), count: Number(m[2]) };
  }
  const maxExamples = v['max-examples'] === undefined ? undefined : int(v['max-examples'], '--max-examples', 0);
  if (maxExamples !== undefined && maxExamples < 1) throw new CliError('--max-examples must be at least 1');
  const batchSize = int(v['batch-size'], '--batch-size', DEFAULTS.batchSize);
  if (batchSize < 1) throw new CliError('--batch-size must be at least 1');
  // every value checked before the model is opened (and its checkpoints are announced)
  const modules = oneOf(v.modules, ['mlp', 'all'] as const, '--modules', 'all');
  const labels = oneOf(v.labels, ['sampled', 'empirical'] as const, '--labels', 'sampled');
  const seed = seedFlag(
    v.seed,
    0,
    '--seed',
    labels === 'empirical' ? 'with --labels empirical the data gives the labels, nothing is sampled' : undefined,
  );
  const eigendecompositionDtype = oneOf(
    v['eigendecomposition-dtype'],
    ['float64', 'float32'] as const,
    '--eigendecomposition-dtype',
    'float64',
  );
  let bar: Progress | undefined;
  let stage = '';
  const training = trainingFlag(v.training);
  const model = Model.open(v.model, { base: v.base, training });
  // the training checkpoints explain sums over get the same fit (checked before the long final fit)
  const plan = cliPlan(v.model, model, checkpointsSetting(v.checkpoints));
  const common = {
    dataPath: v.data,
    modules,
    labels,
    seed,
    eigendecompositionDtype,
    maxExamples,
    partition,
    batchSize,
    skipMalformed: v['skip-malformed'],
    log: (line: string) => process.stderr.write(`${line}\n`),
    onProgress: (s: string, done: number, total: number) => {
      if (s !== stage) {
        bar?.done();
        stage = s;
        bar = new Progress(s.padEnd(18), total);
      }
      bar!.tick(done);
    },
  };
  const result = await runFitJob({ ...common, modelDir: v.model, base: v.base, model, out: v.out });
  bar?.done();
  const say = (r: typeof result, prefix = '') =>
    process.stdout.write(
      `${prefix}${r.message}\n${r.examples} examples, ${r.tokens} tokens, ${r.seconds.toFixed(1)} s` +
        (r.status === 'done' ? ` (${Math.round(r.tokens / r.seconds)} tokens/s per pass pair)\n` : '\n'),
    );
  say(result);
  if (!plan) return;
  for (const { name, result: r } of await fitCheckpoints(plan, {
    ...common,
    factorsDir: v.out,
    engine: { training },
  })) {
    bar?.done();
    bar = undefined;
    stage = '';
    say(r, `${name}: `);
  }
}
