// influence-lens inspect <model-dir>: what the engine sees in a checkpoint.
import { dirname } from 'node:path';
import { Model } from '../model/engine';
import { CliError, parse } from './util';

export async function runInspect(argv: string[]): Promise<void> {
  const { values, positionals } = parse(argv, { json: { type: 'boolean' }, base: { type: 'string' } }, true);
  const dir = positionals[0];
  if (!dir) throw new CliError('usage: influence-lens inspect <model-dir> [--base <dir>] [--json]');
  // one model a run: a second folder was silently left uninspected
  if (positionals.length > 1)
    throw new CliError(`inspect takes one model folder (got ${positionals.length}: ${positionals.join(', ')})`);
  const model = Model.open(dir, { base: values.base as string | undefined });
  const params = model.parameters();
  const count = params.reduce((s, p) => s + p.shape.reduce((a, b) => a * b, 1), 0);
  const modules = model.modules('all');
  const ad = model.checkpoint.adapter;
  const adapter = ad && {
    type: 'LoRA',
    r: ad.r,
    alpha: ad.alpha,
    scaling: ad.scaling,
    rslora: ad.config.use_rslora === true,
    base: dirname(model.checkpoint.configFiles[0]),
  };
  // integer/bool buffers (old causal masks) the model does not read, as transformers ignores them
  const ignored = model.checkpoint.ignored ?? [];
  // float tensors the forward pass never reads: transformers warns of them as unused weights
  const unread = model.unreadWeights();
  if (values.json) {
    process.stdout.write(
      `${JSON.stringify({ dir, modelType: model.checkpoint.modelType, architecture: model.describe(), parameters: count, ...(adapter ? { adapter } : {}), ...(ignored.length ? { ignoredTensors: ignored } : {}), ...(unread.length ? { unreadTensors: unread } : {}), modules }, null, 2)}\n`,
    );
    return;
  }
  const lines = [
    `model:        ${dir}`,
    `architecture: ${model.describe()}`,
    ...(adapter
      ? [
          `adapter:      LoRA r=${adapter.r}, alpha=${adapter.alpha}, scaling ${adapter.scaling}${adapter.rslora ? ' (rsLoRA)' : ''}, over ${adapter.base}`,
        ]
      : []),
    `parameters:   ${count.toLocaleString('en-US')} in ${params.length} tensors (${(model.checkpoint.totalBytes / 2 ** 20).toFixed(1)} MiB on disk)`,
    ...(ignored.length
      ? [
          `not read:     ${ignored.length} integer/bool buffer(s), e.g. ${ignored[0].name} (${ignored[0].dtype}): old causal masks, which transformers ignores too`,
        ]
      : []),
    ...(unread.length
      ? [
          `unused:       ${unread.length} float tensor(s) the model does not read, e.g. ${unread[0]}: transformers loads such a checkpoint with an unused-weights warning; another model's weights beside this one's?`,
        ]
      : []),
    `tracked modules (${modules.length}; "mlp" selects ${modules.filter((m) => m.kind === 'mlp').length}):`,
    ...modules.map(
      (m) =>
        `  ${m.name.padEnd(48)} ${m.kind.padEnd(9)} ${`${m.dOut} × ${m.dIn}`.padEnd(12)}${m.hasBias ? ' +bias' : ''}`,
    ),
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
}
