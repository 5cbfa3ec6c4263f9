// influence-lens fit: EK-FAC factors for a model over a training JSONL, resumable and
// splittable into data partitions (attribution/fit-job.ts).
import { runFitJob } from '../attribution/fit-job';
import { DEFAULTS } from '../settings';
import { CliError, int, oneOf, Progress, parse } from './util';

export async function runFit(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    base: { type: 'string' },
    data: { type: 'string' },
    out: { type: 'string' },
    modules: { type: 'string' },
    labels: { type: 'string' },
    'max-examples': { type: 'string' },
    partition: { type: 'string' },
    'batch-size': { type: 'string' },
    seed: { type: 'string' },
    'skip-malformed': { type: 'boolean' },
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
  let bar: Progress | undefined;
  let stage = '';
  const result = await runFitJob({
    modelDir: v.model,
    base: v.base,
    dataPath: v.data,
    out: v.out,
    modules: oneOf(v.modules, ['mlp', 'all'] as const, '--modules', 'all'),
    labels: oneOf(v.labels, ['sampled', 'empirical'] as const, '--labels', 'sampled'),
    seed: int(v.seed, '--seed', 0),
    maxExamples,
    partition,
    batchSize,
    skipMalformed: v['skip-malformed'],
    log: (line) => process.stderr.write(`${line}\n`),
    onProgress: (s, done, total) => {
      if (s !== stage) {
        bar?.done();
        stage = s;
        bar = new Progress(s.padEnd(18), total);
      }
      bar!.tick(done);
    },
  });
  bar?.done();
  process.stdout.write(
    `${result.message}\n${result.examples} examples, ${result.tokens} tokens, ${result.seconds.toFixed(1)} s` +
      (result.status === 'done' ? ` (${Math.round(result.tokens / result.seconds)} tokens/s per pass pair)\n` : '\n'),
  );
}
