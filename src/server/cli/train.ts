// influence-lens train: train a small model on a JSONL dataset with the engine's
// all-parameter gradient graphs (train/trainer.ts), from a fresh seeded Llama-style model
// (--init llama --tokenizer <dir>) or from a checkpoint (--model <dir>, e.g. to fine-tune a
// pre-trained model). Prompt/completion and chat records train on the completion (assistant)
// tokens only, text records on every token, exactly the loss the influence commands use.
// --exclude drops the examples a flags sidecar (`<dataset>.exclude.jsonl`, one {"hash", ...}
// per line) names, by content hash: the counterfactual "train again without them".
import { existsSync, lstatSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import {
  cleanStaleTempsOf,
  commitDir,
  resolveLinks,
  restoreReplacedPath,
  stageDir,
  tempPathFor,
} from '../../common/atomic-write';
import { describeOwner, tryLock, waitLock } from '../../common/owner-lock';
import { realOrResolved } from '../../common/real-path';
import { modelFingerprint } from '../attribution/fingerprint';
import { loadDataset } from '../data/dataset';
import { readJsonl } from '../data/jsonl';
import { contextLength, tokenizeRecord } from '../data/tokenize';
import { Model } from '../model/engine';
import { loadTokenizer, type TokenizerHandle } from '../model/tokenizer';
import { DEFAULTS } from '../settings';
import {
  CHECKPOINT_TOKENIZER_FILES,
  initLlama,
  loadParams,
  saveCheckpoint,
  type TrainExample,
  train,
  writeCheckpoint,
} from '../train/trainer';
import { checkOutFolder, DESKTOP_FILES, within } from './out-paths';
import { CliError, int, Progress, parse, seedFlag, threadsFlag } from './util';

export interface TrainJobOptions {
  data: string;
  out: string;
  /** start from a fresh model ... */
  init?: {
    tokenizer: string;
    /** the tokenizer's name to record (retrain passes the recorded one; default: the folder's name) */
    tokenizerName?: string;
    d: number;
    layers: number;
    heads: number;
    ffn: number;
    context: number;
  };
  /** ... or from a checkpoint */
  model?: string;
  epochs: number;
  lr: number;
  batchSize: number;
  seed: number;
  warmup?: number;
  clip: number;
  weightDecay: number;
  /** a flags sidecar: examples whose hash it lists are left out */
  exclude?: string;
  /** the hashes to leave out, given directly (the demo's flags: a sidecar another run may rewrite meanwhile) */
  excludeHashes?: Iterable<string>;
  /** refuse an --out that already holds a model (retrain: a retrained model is never replaced) */
  newOut?: boolean;
  /** the caller holds --out's lock (`trainOutLock`): the demo checks its cache and trains under one lock */
  outLocked?: boolean;
  /** also write `<out>/checkpoint-<step>` every this many steps (as transformers' Trainer), for influence over training */
  saveSteps?: number;
  threads?: number;
  onStep?: (s: { step: number; total: number; loss: number; epoch: number }) => void;
  log?: (line: string) => void;
}

export interface TrainJobResult {
  examples: number;
  excluded: number;
  truncated: number;
  steps: number;
  finalLoss: number;
  /** mean loss of each epoch */
  epochLosses: number[];
  seconds: number;
}

/** Content hashes a flags sidecar lists (one JSON object with a "hash" per line). */
export function readExclusions(path: string): Set<string> {
  const hashes = new Set<string>();
  for (const { line, value } of readJsonl(path, { skippable: false }).rows) {
    const h = (value as { hash?: unknown } | null)?.hash;
    if (typeof h !== 'string') throw new CliError(`${path}:${line}: expected {"hash": "...", ...}`);
    hashes.add(h);
  }
  return hashes;
}

/** The refusal of a flags sidecar none of whose examples is in the data. */
export function noneFlaggedIn(sidecar: string, flags: number, data: string): string {
  return (
    `none of the ${flags} example(s) flagged in ${sidecar} is in ${data} (the flags of another dataset, ` +
    'or lines edited since they were flagged); nothing would be excluded'
  );
}

/**
 * What a run without the flagged examples should say besides its counts: flags that match no
 * example of the data (lines edited since they were flagged, or another dataset's flags) exclude
 * nothing, and a flag excludes every identical copy of its example. Undefined when neither holds.
 */
export function exclusionNote(
  sidecar: string,
  flagged: ReadonlySet<string>,
  examples: ReadonlyArray<{ hash: string }>,
  data: string,
): string | undefined {
  const matched = new Set<string>();
  let copies = 0;
  for (const e of examples)
    if (flagged.has(e.hash)) {
      if (matched.has(e.hash)) copies++;
      matched.add(e.hash);
    }
  const parts: string[] = [];
  const missing = flagged.size - matched.size;
  if (missing && matched.size)
    parts.push(
      `${missing} of the ${flagged.size} example(s) flagged in ${sidecar} are not in ${data} (lines edited since they were flagged?) and exclude nothing`,
    );
  if (copies) parts.push(`${copies} identical cop${copies === 1 ? 'y' : 'ies'} of flagged examples excluded with them`);
  return parts.length ? `note: ${parts.join('; ')}` : undefined;
}

/**
 * Token ids and loss weights of each example: the weights come from the record's spans (the
 * completion or assistant turns, or all of a text), as the influence commands compute them.
 * Examples left with no weighted token are dropped.
 */
export function trainingExamples(
  tok: TokenizerHandle,
  examples: ReadonlyArray<{ record: unknown; line: number }>,
  maxLength: number,
  where = 'line',
): { examples: TrainExample[]; truncated: number } {
  let truncated = 0;
  const out: TrainExample[] = [];
  for (const e of examples) {
    const t = tokenizeRecord(tok, e.record, `${where}:${e.line}`, maxLength);
    if (t.truncated) truncated++;
    if (t.weights.some((w) => w > 0)) out.push({ ids: t.ids, weights: t.weights });
  }
  return { examples: out, truncated };
}

/** What a model folder written by `train` holds; an existing --out with anything else is refused. */
const TRAINED_FILES = new Set([
  'config.json',
  'model.safetensors',
  'training_args.json',
  ...CHECKPOINT_TOKENIZER_FILES,
]);
/** Files that make a folder a model checkpoint, beside its config.json. */
const MODEL_FILES = ['model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'training_args.json'];

/**
 * `--out` is replaced as a whole folder, so it must be new, empty, or a model an earlier `train`
 * wrote (training_args.json and only a trained model's files and checkpoint-<step> folders that
 * hold nothing else): never a folder that holds the user's data, flags or notes, nor the model
 * training starts from (or one inside the other: `--model runs/ft/checkpoint-500 --out runs/ft`),
 * nor a folder inside another model (`<model>/checkpoint-5` reads as one of that model's
 * training checkpoints, and goes when that model is trained again).
 */
export function checkTrainOut(out: string, from?: string): void {
  if (from) {
    const [o, f] = [realOrResolved(out), realOrResolved(from)];
    if (within(o, f) || within(f, o))
      throw new CliError(
        `--out ${out} ${o === f ? 'is' : within(f, o) ? 'holds' : 'is inside'} the model training starts from (${from}); choose a folder outside it`,
      );
  }
  const parent = dirname(realOrResolved(out));
  if (
    /^checkpoint-\d+$/.test(basename(realOrResolved(out))) &&
    existsSync(join(parent, 'config.json')) &&
    MODEL_FILES.some((f) => existsSync(join(parent, f)))
  )
    throw new CliError(
      `--out ${out} is a checkpoint-<step> folder inside the model folder ${parent}: it would read as one of that model's training checkpoints (--checkpoints auto) and go when that model is trained again; choose another name or a folder outside it`,
    );
  checkOutFolder(out, {
    owned: TRAINED_FILES,
    ownedPattern: /^checkpoint-\d+$/,
    marker: 'training_args.json',
    what: 'a model written by influence-lens train',
  });
  // its checkpoint-<step> folders go with it: they must hold a checkpoint's files and nothing else
  if (!existsSync(out)) return;
  for (const name of readdirSync(out).filter((n) => /^checkpoint-\d+$/.test(n))) {
    const dir = join(out, name);
    // a link (dangling or not) is not a folder train wrote
    const foreign = lstatSync(dir).isDirectory()
      ? readdirSync(dir).filter((n) => !TRAINED_FILES.has(n) && !DESKTOP_FILES.has(n))
      : [name];
    if (foreign.length)
      throw new CliError(
        `--out ${out} exists and its ${name} is not a checkpoint written by influence-lens train (it holds ${foreign.slice(0, 5).join(', ')}${foreign.length > 5 ? ', …' : ''}); the whole folder would be replaced, so choose a new or empty folder`,
      );
  }
}

/**
 * The staging folder of an earlier, interrupted train of `out` (`<out>.tmp-<pid>-…`, where a
 * killed run's checkpoints are) that `model` is inside, if any: resuming from one of those
 * checkpoints must not clean that folder away first.
 */
function stagingHolding(out: string, model: string | undefined): string | undefined {
  if (!model) return undefined;
  const target = resolveLinks(out);
  const prefix = `${basename(target)}.tmp-`;
  for (let p = realOrResolved(model); dirname(p) !== p; p = dirname(p))
    if (dirname(p) === dirname(target) && basename(p).startsWith(prefix)) return p;
  return undefined;
}

export async function trainJob(o: TrainJobOptions): Promise<TrainJobResult> {
  const t0 = Date.now();
  const log = o.log ?? (() => {});
  const out = resolve(o.out); // no trailing slash: temporaries go beside it, not inside
  // one writer of --out at a time, and its checks made under the lock: two runs into one folder
  // both said 'wrote' while the second replaced the first's model
  mkdirSync(dirname(resolveLinks(out)), { recursive: true });
  if (o.outLocked) return trainLocked(o, out, t0, log);
  const lockPath = trainOutLockPath(out);
  const lock = tryLock(lockPath, `training into ${out}`);
  if (typeof lock !== 'function')
    throw new CliError(
      `another influence-lens run, ${describeOwner(lock)}, is writing ${o.out}; wait for it to finish or choose another --out (delete ${lockPath} only if no such process runs)`,
    );
  try {
    return await trainLocked(o, out, t0, log);
  } finally {
    lock();
  }
}

/** The lock file a train of `out` holds while it runs (beside the folder a link names). */
function trainOutLockPath(out: string): string {
  return `${resolveLinks(resolve(out))}.lock`;
}

/** Waits for --out's lock (another run training into it), saying whom it waits for; for `outLocked` runs. */
export function trainOutLock(out: string, log: (line: string) => void): Promise<() => void> {
  mkdirSync(dirname(resolveLinks(resolve(out))), { recursive: true });
  return waitLock(trainOutLockPath(out), `training into ${out}`, { log });
}

async function trainLocked(
  o: TrainJobOptions,
  out: string,
  t0: number,
  log: (line: string) => void,
): Promise<TrainJobResult> {
  // a model a killed train set aside between its two renames is put back before it is judged
  // (else a retrain's --out would look new and the model be replaced, a user's folder be lost)
  restoreReplacedPath(out);
  if (o.newOut && existsSync(join(out, 'model.safetensors')))
    throw new CliError(`${o.out} already holds a model; choose another --out`);
  checkTrainOut(out, o.model);
  // what a train killed earlier left beside this output (its staging and initial-weights folders),
  // except a staging folder this run starts from (--model <out>.tmp-…/checkpoint-20)
  const keep = stagingHolding(out, o.model);
  if (keep)
    log(
      `note: --model ${o.model} is inside ${keep}, what an interrupted train of ${o.out} left; it is kept (delete it yourself once this run is done)`,
    );
  cleanStaleTempsOf(out, keep ? [keep] : []);
  // the digest of the very bytes trained on: the file may change while training runs (an edit, a
  // flag applied in the editor), and retrain trusts data_sha256 to say what the model saw
  const ds = loadDataset(o.data, { sha256: true });
  const excludedHashes = new Set<string>([...(o.exclude ? readExclusions(o.exclude) : []), ...(o.excludeHashes ?? [])]);
  const kept = ds.examples.filter((e) => !excludedHashes.has(e.hash));
  const excluded = ds.examples.length - kept.length;
  // flags of another dataset (or of lines all edited since) would exclude nothing: the model
  // would be trained on every example while the run looks like one without the flagged ones
  if (excludedHashes.size && !excluded)
    throw new CliError(noneFlaggedIn(o.exclude ?? 'the exclusions given', excludedHashes.size, o.data));
  if (!kept.length) throw new CliError(`${o.data}: every example is excluded`);
  const note = o.exclude ? exclusionNote(o.exclude, excludedHashes, ds.examples, o.data) : undefined;
  if (note) log(note);

  let config: Record<string, unknown>;
  let params: Map<string, Float32Array>;
  let shapes: Map<string, number[]>;
  let tokenizerDir: string;
  let model: Model;
  let startFingerprint: string | undefined;
  let initDir: string | undefined;
  const engine = { weights: 'inputs' as const, threads: o.threads };
  if (o.init) {
    const tok = loadTokenizer(o.init.tokenizer);
    const { d, layers, heads, ffn, context } = o.init;
    if (d % heads) throw new CliError(`--d (${d}) must be a multiple of --heads (${heads})`);
    ({ config, params, shapes } = initLlama(
      { vocab: tok.vocabSize, d, layers, heads, kvHeads: heads, ffn, maxPositions: context },
      o.seed,
      { bos: tok.bosTokenId, eos: tok.eosTokenId, pad: tok.padTokenId },
    ));
    tokenizerDir = o.init.tokenizer;
    // The engine opens checkpoints from disk: write the initial weights beside the output.
    initDir = tempPathFor(out);
    saveCheckpoint(initDir, config, params, shapes, tokenizerDir);
    model = Model.open(initDir, engine);
  } else if (o.model) {
    model = Model.open(o.model, engine);
    startFingerprint = modelFingerprint(model.checkpoint, model.options.cacheDir);
    // it would write the base and the adapter's tensors as one full checkpoint
    if (model.checkpoint.adapter)
      throw new CliError(
        `${o.model} is a LoRA adapter (adapter_config.json): train fine-tunes full checkpoints only; train the adapter with PEFT`,
      );
    config = model.config;
    params = loadParams(model);
    shapes = new Map(model.parameters().map((p) => [p.name, p.shape]));
    tokenizerDir = o.model;
  } else throw new CliError('give --init llama --tokenizer <dir>, or --model <dir>');

  // the output is built in a staged folder (checkpoints as they are saved, the final model last)
  // and swapped in whole: a run killed at any moment leaves the old --out as it was
  let staging: string | undefined;
  try {
    staging = stageDir(out);
    const maxLen = contextLength(config);
    const { examples, truncated } = trainingExamples(model.tokenizer, kept, maxLen, o.data);
    if (!examples.length) throw new CliError(`${o.data}: no example has a token to train on`);
    log(
      `${examples.length} examples (${excluded} excluded, ${truncated} cut to ${maxLen} tokens), ` +
        `${[...params.values()].reduce((a, p) => a + p.length, 0).toLocaleString('en-US')} parameters`,
    );
    const perEpoch = Math.ceil(examples.length / o.batchSize);
    const epochLosses: number[] = [];
    let sum = 0;
    const result = await train(model, params, examples, {
      epochs: o.epochs,
      batchSize: o.batchSize,
      lr: o.lr,
      warmupSteps: o.warmup,
      weightDecay: o.weightDecay,
      clip: o.clip,
      seed: o.seed,
      onStep: (s) => {
        sum += s.loss;
        o.onStep?.(s);
        if (s.step === 1 && o.saveSteps && o.saveSteps >= s.total)
          log(
            `note: --save-steps ${o.saveSteps} is not below the run's ${s.total} steps: no intermediate checkpoint is written (the final model is)`,
          );
        if (o.saveSteps && s.step % o.saveSteps === 0 && s.step < s.total) {
          const name = `checkpoint-${s.step}`;
          saveCheckpoint(join(staging!, name), config, params, shapes, tokenizerDir, {
            global_step: s.step,
            learning_rate: s.lr,
          });
        }
        if (s.step % perEpoch === 0) {
          epochLosses.push(sum / perEpoch);
          sum = 0;
          log(`epoch ${epochLosses.length}/${o.epochs}: mean loss ${epochLosses.at(-1)!.toFixed(4)}`);
        }
      },
    });
    // Everything here is a function of the inputs (no times, no paths), so reruns write identical files.
    const args = {
      data: basename(o.data),
      data_sha256: ds.sha256,
      excluded_hashes: [...excludedHashes].sort(),
      examples: examples.length,
      from: o.init
        ? (({ tokenizerName, ...init }) => ({
            init: 'llama',
            ...init,
            tokenizer: tokenizerName ?? basename(init.tokenizer),
          }))(o.init)
        : // the starting weights' fingerprint: retrain refuses another checkpoint under the same name
          { model: basename(o.model!), fingerprint: startFingerprint },
      epochs: o.epochs,
      lr: o.lr,
      batch_size: o.batchSize,
      seed: o.seed,
      warmup: o.warmup ?? null,
      clip: o.clip,
      weight_decay: o.weightDecay,
      // ONNX Runtime's thread count changes float rounding: pass it again to reproduce these weights exactly
      threads: o.threads ?? null,
      steps: result.steps,
      final_loss: result.finalLoss,
    };
    writeCheckpoint(staging, config, params, shapes, tokenizerDir, args);
    try {
      commitDir(staging, out);
    } catch (e) {
      const kept = staging;
      staging = undefined; // the finished model stays where it is
      throw new CliError(
        `could not put the trained model in place of ${out} (${(e as Error).message}); it is complete in ${kept}: move it there yourself`,
      );
    }
    staging = undefined;
    return {
      examples: examples.length,
      excluded,
      truncated,
      steps: result.steps,
      finalLoss: result.finalLoss,
      epochLosses,
      seconds: (Date.now() - t0) / 1000,
    };
  } finally {
    if (initDir) rmSync(initDir, { recursive: true, force: true });
    if (staging) rmSync(staging, { recursive: true, force: true });
  }
}

export async function runTrain(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    data: { type: 'string' },
    out: { type: 'string' },
    init: { type: 'string' },
    tokenizer: { type: 'string' },
    model: { type: 'string' },
    d: { type: 'string' },
    layers: { type: 'string' },
    heads: { type: 'string' },
    ffn: { type: 'string' },
    context: { type: 'string' },
    epochs: { type: 'string' },
    lr: { type: 'string' },
    'batch-size': { type: 'string' },
    seed: { type: 'string' },
    warmup: { type: 'string' },
    clip: { type: 'string' },
    'weight-decay': { type: 'string' },
    exclude: { type: 'string' },
    'save-steps': { type: 'string' },
    threads: { type: 'string' },
  });
  if (!v.data) throw new CliError('--data <train.jsonl> is required');
  if (!v.out) throw new CliError('--out <dir> is required');
  if ((v.init === undefined) === (v.model === undefined))
    throw new CliError(
      'give either --init llama --tokenizer <dir> (a fresh model) or --model <dir> (continue training)',
    );
  if (v.init !== undefined && v.init !== 'llama') throw new CliError(`--init must be llama (got "${v.init}")`);
  if (v.init && !v.tokenizer) throw new CliError('--init llama needs --tokenizer <dir> (a tokenizer.json directory)');
  if (v.model && (v.tokenizer || v.d || v.layers || v.heads || v.ffn || v.context))
    throw new CliError('--tokenizer/--d/--layers/--heads/--ffn/--context only go with --init (the model has its own)');
  const positive = (s: string | undefined, flag: string, fallback: number) => {
    const n = int(s, flag, fallback);
    if (n < 1) throw new CliError(`${flag} must be at least 1`);
    return n;
  };
  const num = (s: string | undefined, flag: string, fallback: number) => {
    if (s === undefined) return fallback;
    const n = s.trim() ? Number(s) : Number.NaN; // Number("") is 0: --lr "" would train nothing
    if (!Number.isFinite(n) || n < 0) throw new CliError(`${flag} must be a non-negative number (got "${s}")`);
    return n;
  };
  const nonNegative = (n: number, flag: string) => {
    if (n < 0) throw new CliError(`${flag} must be at least 0 (got ${n})`);
    return n;
  };
  // a negative value is refused with the same words as 0: "non-negative" would invite a 0
  const aboveZero = (s: string | undefined, flag: string, fallback: number, what: string) => {
    if (s === undefined) return fallback;
    const n = s.trim() ? Number(s) : Number.NaN;
    if (!(Number.isFinite(n) && n > 0)) throw new CliError(`${flag} must be greater than 0 (${what}; got "${s}")`);
    return n;
  };
  // the largest gradient norm: 0 would scale every gradient to 0 (the weights would not move)
  const clip = (s: string | undefined) => aboveZero(s, '--clip', 1, 'the largest gradient norm; 0 would train nothing');
  const epochs = positive(v.epochs, '--epochs', 3);
  let bar: Progress | undefined;
  const t0 = Date.now();
  const r = await trainJob({
    data: v.data,
    out: v.out,
    init: v.init
      ? {
          tokenizer: v.tokenizer!,
          d: positive(v.d, '--d', 128),
          layers: positive(v.layers, '--layers', 2),
          heads: positive(v.heads, '--heads', 4),
          ffn: positive(v.ffn, '--ffn', 512),
          context: positive(v.context, '--context', 128),
        }
      : undefined,
    model: v.model,
    epochs,
    lr: aboveZero(v.lr, '--lr', 1e-3, 'the learning rate; 0 would train nothing'),
    batchSize: positive(v['batch-size'], '--batch-size', DEFAULTS.trainBatchSize),
    seed: seedFlag(v.seed, 0),
    warmup: v.warmup === undefined ? undefined : nonNegative(int(v.warmup, '--warmup', 0), '--warmup'),
    clip: clip(v.clip),
    weightDecay: num(v['weight-decay'], '--weight-decay', 0.01),
    exclude: v.exclude,
    saveSteps: v['save-steps'] === undefined ? undefined : positive(v['save-steps'], '--save-steps', 1),
    threads: threadsFlag(v.threads),
    log: (line) => {
      if (bar && process.stderr.isTTY) process.stderr.write('\r\x1b[K');
      process.stderr.write(`${line}\n`);
    },
    onStep: (s) => {
      bar ??= new Progress('train'.padEnd(8), s.total);
      bar.tick(s.step, `loss ${s.loss.toFixed(3)}`);
    },
  });
  bar?.done();
  process.stdout.write(
    `wrote ${v.out}: ${r.steps} steps over ${r.examples} examples` +
      (r.excluded ? ` (${r.excluded} excluded)` : '') +
      `, final epoch loss ${r.finalLoss.toFixed(4)}, ${((Date.now() - t0) / 1000).toFixed(1)} s\n`,
  );
}
