// influence-lens gradients: per-token module inputs (a) and output gradients (g) of one
// text or prompt/completion, written as safetensors. Tensor names (documented in README):
//   <module>.a [T, d_in], <module>.g [T, d_out], token_nll [T], input_ids [T],
//   target_ids [T], target_weights [T]   (position t predicts token t+1)
import { cleanStaleTempsOf } from '../../common/atomic-write';
import { renderForModel } from '../data/format';
import { contextLength, tokenizeTrained } from '../data/tokenize';
import { Model, makeBatch } from '../model/engine';
import { readSafetensorsHeader, type TensorToWrite, writeSafetensors } from '../model/safetensors';
import { nonFiniteMessage } from '../model/weight-health';
import { Rng } from '../util/random';
import { checkOutFile } from './out-paths';
import { CliError, oneOf, parse, seedFlag, trainingFlag } from './util';

export async function runGradients(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    base: { type: 'string' },
    text: { type: 'string' },
    prompt: { type: 'string' },
    completion: { type: 'string' },
    modules: { type: 'string' },
    training: { type: 'string' },
    labels: { type: 'string' },
    seed: { type: 'string' },
    out: { type: 'string' },
  });
  if (!v.model) throw new CliError('--model <dir> is required');
  if (!v.out) throw new CliError('--out <file.safetensors> is required');
  // never over a dataset, a flags file or a model's weights: only over gradients written before
  checkOutFile(v.out, { what: 'a gradients file written by influence-lens gradients', ours: isGradientsFile });
  const hasText = v.text !== undefined;
  const hasPair = v.prompt !== undefined || v.completion !== undefined;
  if (hasText === hasPair) throw new CliError('give either --text, or --prompt and --completion');
  if (hasPair && (v.prompt === undefined || v.completion === undefined))
    throw new CliError('--prompt and --completion go together');
  const modules = oneOf(v.modules, ['mlp', 'all'] as const, '--modules', 'all');
  const labels = oneOf(v.labels, ['data', 'sampled'] as const, '--labels', 'data');
  const seed = seedFlag(
    v.seed,
    0,
    '--seed',
    labels === 'data' ? 'with --labels data the text gives the labels, nothing is sampled' : undefined,
  );

  const model = Model.open(v.model, { base: v.base, training: trainingFlag(v.training) });
  // the same rendering and masking as fit gives a training record (a --text or a prompt/completion
  // one; a trailing EOS the tokenizer appends is scored, as in training, where explain's query leaves it out)
  const record = hasText ? { text: v.text } : { prompt: v.prompt, completion: v.completion };
  const r = renderForModel(record, 'the command line', undefined);
  const enc = tokenizeTrained(model.tokenizer, r, Number.POSITIVE_INFINITY, 'the command line');
  if (enc.ids.length < 2) throw new CliError('the text must be at least two tokens long');
  // beyond the model's context a learned position table has no row (GPT-2: an ONNX Runtime
  // index error), and fit would cut the same record there: refuse rather than differ from it
  const context = contextLength(model.config);
  const cut = Math.min(context, model.tokenizer.training.maxLength ?? context);
  if (enc.ids.length > cut)
    throw new CliError(
      `the text is ${enc.ids.length} tokens; ${cut < context ? `the training convention's maxLength is ${cut}` : `the model takes ${context} (its config.json)`}; fit cuts such a record to its first ${cut} tokens: pass those`,
    );
  const weights = enc.weights;
  if (!weights.some((w) => w > 0)) throw new CliError('no token to score: the completion is empty after tokenization');
  const batch = makeBatch([{ ids: enc.ids, weights }], model.tokenizer.padTokenId ?? 0);
  const graph = await model.compile({
    labels,
    modules,
    perToken: true,
    tokenLoss: true,
    sampledIds: labels === 'sampled',
  });
  const out = await graph.run(batch, { uniforms: labels === 'sampled' ? new Rng(seed).uniforms(batch.T) : undefined });

  // a NaN loss (a damaged weight of the model or its adapter) would be written out as values
  const loss = (out.loss.data as Float32Array)[0];
  if (!Number.isFinite(loss)) throw new CliError(nonFiniteMessage(model.checkpoint, `the loss of this text (${loss})`));
  const T = batch.T;
  const tensors: Record<string, TensorToWrite> = {
    input_ids: { dtype: 'I64', shape: [T], data: batch.inputIds },
    target_ids: {
      dtype: 'I64',
      shape: [T],
      data: labels === 'sampled' ? (out.sampled_ids.data as BigInt64Array) : batch.targetIds,
    },
    target_weights: { dtype: 'F32', shape: [T], data: batch.targetWeights },
    token_nll: { dtype: 'F32', shape: [T], data: out.token_nll.data as Float32Array },
  };
  for (const m of graph.moduleInfo) {
    tensors[`${m.name}.a`] = { dtype: 'F32', shape: [T, m.dIn], data: out[`a.${m.name}`].data as Float32Array };
    tensors[`${m.name}.g`] = { dtype: 'F32', shape: [T, m.dOut], data: out[`g.${m.name}`].data as Float32Array };
  }
  writeSafetensors(v.out, tensors, {
    model: v.model,
    labels,
    seed: String(seed),
    loss: String((out.loss.data as Float32Array)[0]),
    offsets: JSON.stringify(enc.offsets),
  });
  cleanStaleTempsOf(v.out); // what a run killed mid-write left beside it
  process.stdout.write(
    `wrote ${v.out}: ${graph.moduleInfo.length} modules × ${T} tokens, loss ${(out.loss.data as Float32Array)[0].toFixed(4)}\n`,
  );
}

/** Whether `path` is a safetensors file `gradients` wrote (its token_nll tensor and offsets). */
function isGradientsFile(path: string): boolean {
  try {
    const h = readSafetensorsHeader(path);
    return h.tensors.has('token_nll') && typeof h.metadata.offsets === 'string';
  } catch {
    return false;
  }
}
