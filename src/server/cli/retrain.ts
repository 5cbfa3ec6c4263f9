// influence-lens retrain: train a model again without the examples a flags sidecar lists, with
// the arguments it was trained with (its training_args.json, written by `influence-lens train`),
// and compare the answers and log-probabilities before and after on given questions.
//   retrain --model <dir> --exclude <data.exclude.jsonl> --out <dir> [--data <train.jsonl>]
//     [--from <dir>] [--queries <file>]
// A model trained elsewhere has no training_args.json: it is refused with the way to go instead
// (export the cleaned dataset and train it with your own pipeline).
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { restoreReplacedPath } from '../../common/atomic-write';
import { readFileNoWait } from '../../common/read-file';
import { legacyModelFingerprint, modelFingerprint } from '../attribution/fingerprint';
import { loadDataset } from '../data/dataset';
import { contextLength, tokenizeQuery } from '../data/tokenize';
import { answerQueries, type EvalQuery, readEvalQueries } from '../eval/queries';
import { openCheckpoint } from '../model/checkpoint';
import { Model, makeBatch } from '../model/engine';
import { exclusionNote, noneFlaggedIn, readExclusions, trainJob } from './train';
import { CliError, Progress, parse } from './util';

/** What `influence-lens train` records (train.ts); only the fields retraining needs are read. */
export interface TrainingArgs {
  data: string;
  data_sha256: string;
  excluded_hashes: string[];
  from:
    | { model: string; fingerprint?: string }
    | { init: 'llama'; tokenizer: string; d: number; layers: number; heads: number; ffn: number; context: number };
  epochs: number;
  lr: number;
  batch_size: number;
  seed: number;
  warmup: number | null;
  clip: number;
  weight_decay: number;
  threads: number | null;
}

export async function runRetrain(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    exclude: { type: 'string' },
    out: { type: 'string' },
    data: { type: 'string' },
    from: { type: 'string' },
    queries: { type: 'string' },
  });
  if (!v.model) throw new CliError('--model <dir> (a model trained by influence-lens train) is required');
  if (!v.exclude) throw new CliError('--exclude <data.exclude.jsonl> (the flags sidecar) is required');
  if (!v.out) throw new CliError('--out <dir> (where the retrained model goes) is required');
  if (existsSync(join(v.out, 'model.safetensors')))
    throw new CliError(`${v.out} already holds a model; choose another --out`);
  const args = readTrainingArgs(v.model);
  // the data: --data, else the file the sidecar sits beside (<name>.exclude.jsonl → <name>.jsonl)
  const data = v.data ?? join(dirname(v.exclude), basename(v.exclude).replace(/\.exclude\.jsonl$/i, '.jsonl'));
  if (!v.data && !existsSync(data))
    throw new CliError(`${data} (the data beside ${v.exclude}) does not exist; name the training data with --data`);
  const sha = createHash('sha256').update(readFileNoWait(data)).digest('hex');
  if (sha !== args.data_sha256)
    throw new CliError(
      `${data} is not the data ${v.model} was trained on (sha256 ${sha.slice(0, 12)}…, training_args.json says ` +
        `${args.data_sha256.slice(0, 12)}… for ${args.data}); retraining on other data would change more than the flags`,
    );
  // where training started: the recorded checkpoint (beside the model, or --from), or a fresh model
  let from: { model: string } | { init: NonNullable<Parameters<typeof trainJob>[0]['init']> };
  if ('model' in args.from) {
    const dir = v.from ?? join(dirname(v.model), args.from.model);
    if (!existsSync(join(dir, 'config.json')))
      throw new CliError(
        `${v.model} was fine-tuned from "${args.from.model}", which is not at ${dir}; name that checkpoint with --from <dir>`,
      );
    // the name alone does not say it is the same checkpoint (pre-training run again into that folder)
    const start = openCheckpoint(dir);
    const got = modelFingerprint(start);
    // written before the fingerprint hashed config.json's content rather than its bytes: the same
    // checkpoint then matches the older formula
    const recorded = args.from.fingerprint;
    if (recorded !== undefined && got !== recorded && legacyModelFingerprint(start) !== recorded)
      throw new CliError(
        `${dir} is not the checkpoint ${v.model} was fine-tuned from: its weights' fingerprint is ${got}, training_args.json records ${args.from.fingerprint} (that folder was written again since?); name the checkpoint it started from with --from <dir>`,
      );
    if (args.from.fingerprint === undefined)
      process.stderr.write(
        `note: ${v.model}'s training_args.json records no fingerprint of its starting weights (written by an earlier version): ${dir} is taken to be "${args.from.model}" unchecked\n`,
      );
    from = { model: dir };
  } else {
    if (v.from) throw new CliError(`${v.model} was trained from a fresh model; --from does not apply`);
    const { d, layers, heads, ffn, context } = args.from;
    // the trained model carries a copy of the tokenizer it was initialised with
    from = { init: { tokenizer: v.model, tokenizerName: args.from.tokenizer, d, layers, heads, ffn, context } };
  }
  // the new flags plus any the model was already trained without
  const flagged = readExclusions(v.exclude);
  // flags of another dataset would add nothing: the retrained model would be the same one
  const examples = loadDataset(data).examples;
  if (flagged.size && !examples.some((e) => flagged.has(e.hash)))
    throw new CliError(noneFlaggedIn(v.exclude, flagged.size, data));
  const note = exclusionNote(v.exclude, flagged, examples, data);
  if (note) process.stderr.write(`${note}\n`);
  const excluded = new Set([...args.excluded_hashes, ...flagged]);
  // an example unflagged since the model was trained without it stays out: retrain only removes
  const kept = args.excluded_hashes.filter((h) => !flagged.has(h)).length;
  if (kept)
    process.stderr.write(
      `note: ${kept} example(s) ${v.model} was already trained without stay excluded, though ${v.exclude} no longer flags them; to train with them again, run train from the starting checkpoint with --exclude ${v.exclude}\n`,
    );
  const queries = v.queries ? readQueriesOrFail(v.queries) : [];
  let bar: Progress | undefined;
  const r = await trainJob({
    data,
    out: v.out,
    newOut: true,
    ...from,
    ...recordedTraining(args),
    // the hashes themselves, not a temporary sidecar (a retrain killed midway left one in /tmp)
    excludeHashes: excluded,
    onStep: (s) => {
      bar ??= new Progress('retrain'.padEnd(8), s.total);
      bar.tick(s.step, `loss ${s.loss.toFixed(3)}`);
    },
  });
  bar?.done();
  process.stdout.write(
    `wrote ${v.out}: ${r.examples} examples (${r.excluded} excluded), ${r.steps} steps, ${r.seconds.toFixed(1)} s\n`,
  );
  if (!queries.length) return;
  const before = Model.open(v.model);
  const after = Model.open(v.out);
  const a0 = await answerQueries(before, queries);
  const a1 = await answerQueries(after, queries);
  const lp0 = await logProbs(before, queries);
  const lp1 = await logProbs(after, queries);
  for (const [i, q] of queries.entries()) {
    process.stdout.write(
      `${JSON.stringify(q.prompt)}\n  answer: ${JSON.stringify(a0.answers[i].got)} → ${JSON.stringify(a1.answers[i].got)}\n` +
        `  log p(${JSON.stringify(q.expected)} | prompt): ${lp0[i].toFixed(3)} → ${lp1[i].toFixed(3)}\n`,
    );
  }
}

function readQueriesOrFail(file: string): EvalQuery[] {
  try {
    return readEvalQueries(file);
  } catch (e) {
    throw new CliError((e as Error).message);
  }
}

/** The training settings `train` recorded, as `trainJob` takes them: the same run again. */
export function recordedTraining(args: TrainingArgs) {
  return {
    epochs: args.epochs,
    lr: args.lr,
    batchSize: args.batch_size,
    seed: args.seed,
    warmup: args.warmup ?? undefined,
    clip: args.clip,
    weightDecay: args.weight_decay,
    // ONNX Runtime's thread count changes float rounding: train as the model was trained
    threads: args.threads ?? undefined,
  };
}

export function readTrainingArgs(modelDir: string): TrainingArgs {
  // a train of this folder killed between its two renames set the model aside: put it back, as
  // every command that opens a model does
  restoreReplacedPath(modelDir);
  const file = join(modelDir, 'training_args.json');
  if (!existsSync(file))
    throw new CliError(
      `${file} not found: retrain only repeats training done by influence-lens train. For a model trained ` +
        'elsewhere, export the cleaned dataset (influence-lens export --data <train.jsonl>, or "Export cleaned ' +
        'dataset" in the editor) and train it again with your own pipeline',
    );
  let a: Record<string, unknown>;
  try {
    a = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new CliError(`${file}: not JSON (${(e as Error).message})`);
  }
  const need = ['data_sha256', 'from', 'epochs', 'lr', 'batch_size', 'seed', 'clip', 'weight_decay'];
  const missing = need.filter((k) => a[k] === undefined);
  if (missing.length || !Array.isArray(a.excluded_hashes))
    throw new CliError(
      `${file} lacks ${[...missing, ...(Array.isArray(a.excluded_hashes) ? [] : ['excluded_hashes'])].join(', ')}: ` +
        'not written by influence-lens train; export the cleaned dataset and train with your own pipeline',
    );
  return a as unknown as TrainingArgs;
}

/** log p(expected | prompt) per query (the sum over the expected text's tokens). */
async function logProbs(model: Model, queries: EvalQuery[]): Promise<number[]> {
  const graph = await model.compile({ tokenLoss: true });
  const out: number[] = [];
  for (const q of queries) {
    const t = tokenizeQuery(model.tokenizer, q.prompt, q.expected, contextLength(model.config));
    const r = await graph.run(makeBatch([{ ids: t.ids, weights: t.weights }], model.tokenizer.padTokenId ?? 0));
    out.push(-(r.loss.data as Float32Array)[0]);
  }
  return out;
}
