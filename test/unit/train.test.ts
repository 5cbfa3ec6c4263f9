// influence-lens train on a tiny model: the loss goes down, the same seed writes the same
// bytes, prompt/completion records are scored on their completion only, the flags sidecar
// removes examples, and the checkpoint it writes loads back.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { trainingExamples, trainJob } from '../../src/server/cli/train';
import { loadDataset } from '../../src/server/data/dataset';
import { buildCorpus } from '../../src/server/embedded/build';
import { writeCorpus } from '../../src/server/embedded/write';
import { Model } from '../../src/server/model/engine';
import { loadTokenizer } from '../../src/server/model/tokenizer';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const data = join(home, 'data');
mkdirSync(data);
writeCorpus(data, buildCorpus({ countries: 10, questionParaphrases: 1 }));
const TINY = { tokenizer: join(data, 'tokenizer'), d: 16, layers: 1, heads: 2, ffn: 32, context: 64 };
const base = { epochs: 8, lr: 1e-2, batchSize: 16, seed: 3, clip: 1, weightDecay: 0.01, threads: 1 };
const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

const cli = cliIn(home);

describe('train', () => {
  test('prompt/completion records train on completion tokens only, text on every token', () => {
    const tok = loadTokenizer(TINY.tokenizer);
    const ds = loadDataset(join(data, 'finetune.jsonl'));
    const e = ds.examples[0];
    const rec = e.record as { prompt: string; completion: string };
    const [ex] = trainingExamples(tok, [e], 64).examples;
    const promptTokens = tok.encode(rec.prompt).ids.length;
    const completionTokens = ex.ids.length - promptTokens;
    // position t predicts token t+1: weights on the positions before each completion token
    assert.deepEqual(ex.weights, [...new Array(promptTokens - 1).fill(0), ...new Array(completionTokens).fill(1), 0]);
    const text = trainingExamples(tok, [{ record: { text: 'The capital of France is Paris.' }, line: 1 }], 64)
      .examples[0];
    assert.deepEqual(text.weights, [...new Array(text.ids.length - 1).fill(1), 0]);
  });

  test('the loss goes down, and the same seed writes the same checkpoint byte for byte', async () => {
    const a = await trainJob({ ...base, data: join(data, 'pretrain.jsonl'), out: join(home, 'a'), init: TINY });
    const b = await trainJob({ ...base, data: join(data, 'pretrain.jsonl'), out: join(home, 'b'), init: TINY });
    assert.deepEqual(b.epochLosses, a.epochLosses);
    assert.equal(a.epochLosses.length, 8);
    assert.ok(a.epochLosses[7] < 0.7 * a.epochLosses[0], `epoch losses ${a.epochLosses.map((l) => l.toFixed(3))}`);
    for (const f of ['model.safetensors', 'config.json', 'training_args.json', 'tokenizer.json'])
      assert.equal(sha(join(home, 'a', f)), sha(join(home, 'b', f)), f);
    assert.ok(!existsSync(join(home, `a.init-${process.pid}`)), 'the initial checkpoint is cleaned up');
    const m = Model.open(join(home, 'a'));
    assert.equal(m.config.hidden_size, 16);
    assert.equal(m.tokenizer.vocabSize, loadTokenizer(TINY.tokenizer).vocabSize);
  });

  test('data_sha256 is the digest of the bytes trained on, even when the file changes while training runs', async () => {
    const file = join(home, 'edited-while-training.jsonl');
    writeFileSync(file, readFileSync(join(data, 'finetune.jsonl')));
    const before = sha(file);
    const out = join(home, 'edited');
    const r = await trainJob({
      ...base,
      epochs: 1,
      data: file,
      out,
      init: TINY,
      // an edit lands in the middle of the run (a flag applied in the editor, a hand edit)
      onStep: (s) => {
        if (s.step === 1) appendFileSync(file, `${JSON.stringify({ text: 'added while training ran' })}\n`);
      },
    });
    assert.notEqual(sha(file), before);
    const args = JSON.parse(readFileSync(join(out, 'training_args.json'), 'utf8'));
    assert.equal(args.examples, r.examples);
    // retrain trusts this digest to say which data the model saw: the file as it was read
    assert.equal(args.data_sha256, before);
  });

  test('--save-steps writes checkpoint-<step> folders inside the output, as transformers does', async () => {
    const out = join(home, 'ck');
    const r = await trainJob({ ...base, epochs: 2, data: join(data, 'finetune.jsonl'), out, init: TINY, saveSteps: 2 });
    const steps = Array.from({ length: Math.floor((r.steps - 1) / 2) }, (_, i) => 2 * (i + 1));
    assert.ok(steps.length >= 1);
    const names = readdirSync(out).filter((n) => n.startsWith('checkpoint-'));
    assert.deepEqual(names.sort(), steps.map((s) => `checkpoint-${s}`).sort());
    const first = JSON.parse(readFileSync(join(out, 'checkpoint-2', 'training_args.json'), 'utf8'));
    assert.equal(first.global_step, 2);
    assert.ok(first.learning_rate > 0);
    // a checkpoint is a model of its own, and differs from the final one
    const m = Model.open(join(out, 'checkpoint-2'));
    assert.equal(m.config.hidden_size, 16);
    assert.notEqual(sha(join(out, 'checkpoint-2', 'model.safetensors')), sha(join(out, 'model.safetensors')));
    assert.deepEqual(
      readdirSync(home).filter((n) => n.startsWith('ck.')),
      [],
      'no staging or initial-weights folder is left beside the output',
    );
  });

  test('--out: a folder that is not a trained model is refused whole; a trained one is replaced whole', async () => {
    const run = (out: string, extra: Record<string, unknown> = {}) =>
      trainJob({ ...base, epochs: 1, data: join(data, 'finetune.jsonl'), out, init: TINY, ...extra });
    // the user's project folder: data, flags and notes
    const project = join(home, 'project');
    mkdirSync(project);
    for (const f of ['train.jsonl', 'train.exclude.jsonl', 'NOTES.md']) writeFileSync(join(project, f), `${f}\n`);
    await assert.rejects(
      run(project),
      /--out .*project exists and is not a model written by influence-lens train \(it holds/,
    );
    assert.deepEqual(readdirSync(project).sort(), ['NOTES.md', 'train.exclude.jsonl', 'train.jsonl']);
    // a model folder nobody trained here (no training_args.json), and the model training starts from
    const theirs = join(home, 'theirs');
    mkdirSync(theirs);
    writeFileSync(join(theirs, 'config.json'), '{}');
    await assert.rejects(run(theirs), /no training_args\.json/);
    await assert.rejects(
      run(join(home, 'a'), { init: undefined, model: join(home, 'a') }),
      /is the model training starts from/,
    );
    // a model an earlier train wrote, with a stale staging folder a killed run left beside it
    const again = join(home, 'again');
    await run(again, { saveSteps: 1, epochs: 2 });
    const firstCheckpoints = readdirSync(again).filter((n) => n.startsWith('checkpoint-'));
    assert.ok(firstCheckpoints.length >= 2);
    const stale = join(home, 'again.tmp-999999999-1x1');
    mkdirSync(join(stale, 'checkpoint-1'), { recursive: true });
    await run(again, { seed: 4 });
    assert.deepEqual(
      readdirSync(again).filter((n) => n.startsWith('checkpoint-')),
      [],
      'the old checkpoints went with the old model',
    );
    assert.ok(!existsSync(stale), "the killed run's staging folder is cleaned");
    assert.equal(JSON.parse(readFileSync(join(again, 'training_args.json'), 'utf8')).seed, 4);
    // a trailing slash, a desktop's .DS_Store, and a user's own backup beside it (not ours: kept)
    writeFileSync(join(again, '.DS_Store'), 'x');
    const backup = join(home, 'again.old-2024');
    mkdirSync(backup);
    writeFileSync(join(backup, 'NOTES.md'), 'mine');
    await run(`${again}/`, { seed: 5 });
    assert.equal(JSON.parse(readFileSync(join(again, 'training_args.json'), 'utf8')).seed, 5);
    assert.equal(readFileSync(join(backup, 'NOTES.md'), 'utf8'), 'mine');
    assert.deepEqual(
      readdirSync(home).filter((n) => n.startsWith('again.')),
      ['again.old-2024'],
    );
    // the model training starts from inside --out (its checkpoint), or --out inside it
    await assert.rejects(
      run(again, { init: undefined, model: join(again, 'checkpoint-1') }),
      /holds the model training starts from/,
    );
  });

  test('--out, what a fault audit found: one writer at a time, never inside a model, checkpoint folders checked, a killed run resumable', async () => {
    const run = (out: string, extra: Record<string, unknown> = {}) =>
      trainJob({ ...base, epochs: 1, data: join(data, 'finetune.jsonl'), out, init: TINY, ...extra });
    // two runs into one folder at once: the second is refused (both used to say 'wrote', one model lost)
    const both = join(home, 'both');
    const first = run(both);
    await assert.rejects(run(both, { seed: 9 }), /another influence-lens run, .*is writing .*both; wait for it/);
    await first;
    assert.equal(JSON.parse(readFileSync(join(both, 'training_args.json'), 'utf8')).seed, base.seed);
    assert.ok(!existsSync(`${both}.lock`), 'the lock goes with the run');
    // a folder inside a trained model reads as its training checkpoint: refused
    await assert.rejects(
      run(join(both, 'checkpoint-5')),
      /is a checkpoint-<step> folder inside the model folder .*both: it would read as one of that model's training checkpoints/,
    );
    assert.ok(!existsSync(join(both, 'checkpoint-5')));
    // a checkpoint-<step> folder holding anything else than a checkpoint's files is not replaced
    const ck = join(both, 'checkpoint-7');
    mkdirSync(ck);
    writeFileSync(join(ck, 'notes.txt'), 'mine');
    await assert.rejects(
      run(both),
      /its checkpoint-7 is not a checkpoint written by influence-lens train \(it holds notes\.txt\)/,
    );
    assert.equal(readFileSync(join(ck, 'notes.txt'), 'utf8'), 'mine');
    // resuming from a checkpoint a killed run left in its staging folder: that folder is kept
    const res = join(home, 'res');
    const stale = join(home, 'res.tmp-999999999-1x1');
    mkdirSync(stale);
    await run(join(stale, 'checkpoint-1'));
    const notes: string[] = [];
    await run(res, { init: undefined, model: join(stale, 'checkpoint-1'), log: (l: string) => notes.push(l) });
    assert.ok(existsSync(join(stale, 'checkpoint-1', 'model.safetensors')), 'the checkpoint trained from is kept');
    assert.ok(existsSync(join(res, 'model.safetensors')));
    assert.ok(
      notes.some((l) =>
        /is inside .*res\.tmp-999999999-1x1, what an interrupted train of .*res left; it is kept/.test(l),
      ),
      notes.join('\n'),
    );
    // retrain's --out is never replaced, checked under the lock, even when a killed train set it aside
    await assert.rejects(run(res, { newOut: true }), /res already holds a model; choose another --out/);
    const { renameSync, symlinkSync } = await import('node:fs');
    renameSync(res, `${res}.old-999999999-1x1`);
    await assert.rejects(run(res, { newOut: true }), /res already holds a model; choose another --out/);
    assert.ok(existsSync(join(res, 'model.safetensors')), 'put back, not replaced');
    // another name inside a model folder is fine (retrain --model runs/ft --out runs/ft/retrained)
    await run(join(res, 'retrained'));
    assert.ok(existsSync(join(res, 'retrained', 'model.safetensors')));
    // a checkpoint-<step> link in an --out (dangling here) is not a checkpoint train wrote
    const linked = join(home, 'linked');
    await run(linked);
    symlinkSync(join(home, 'nowhere'), join(linked, 'checkpoint-3'));
    await assert.rejects(run(linked), /its checkpoint-3 is not a checkpoint written by influence-lens train/);
  });

  test('retrain reads a model a killed train set aside (between its two renames) from where it was put back', async () => {
    const { readTrainingArgs } = await import('../../src/server/cli/retrain');
    const m = join(home, 'aside');
    await trainJob({ ...base, epochs: 1, data: join(data, 'finetune.jsonl'), out: m, init: TINY });
    const { renameSync } = await import('node:fs');
    renameSync(m, `${m}.old-999999999-1x1`);
    assert.equal(readTrainingArgs(m).seed, base.seed);
    assert.ok(existsSync(join(m, 'model.safetensors')));
    assert.ok(!existsSync(`${m}.old-999999999-1x1`));
  });

  test('CLI: continue from a checkpoint without the flagged examples', () => {
    const ds = loadDataset(join(data, 'finetune.jsonl'));
    const flagged = ds.examples.slice(0, 3);
    const sidecar = join(home, 'finetune.exclude.jsonl');
    writeFileSync(
      sidecar,
      flagged.map((e) => `${JSON.stringify({ hash: e.hash, line: e.line, reason: 'test' })}\n`).join(''),
    );
    const out = join(home, 'c');
    const r = cli(
      'train',
      '--model',
      join(home, 'a'),
      '--data',
      join(data, 'finetune.jsonl'),
      '--out',
      out,
      '--epochs',
      '1',
      '--exclude',
      sidecar,
      '--threads',
      '1',
    );
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, new RegExp(`over ${ds.examples.length - 3} examples \\(3 excluded\\)`));
    const args = JSON.parse(readFileSync(join(out, 'training_args.json'), 'utf8'));
    assert.deepEqual(args.excluded_hashes, flagged.map((e) => e.hash).sort());
    assert.equal(args.from.model, 'a');
  });

  test('CLI: one-line errors', () => {
    const ft = join(data, 'finetune.jsonl');
    let r = cli('train', '--out', join(home, 'x'), '--model', join(home, 'a'));
    assert.equal(r.code, 1);
    assert.match(r.err, /--data <train.jsonl> is required/);
    r = cli('train', '--data', ft, '--out', join(home, 'x'), '--model', join(home, 'a'), '--init', 'llama');
    assert.match(r.err, /give either --init llama/);
    r = cli('train', '--data', ft, '--out', join(home, 'x'), '--init', 'llama');
    assert.match(r.err, /needs --tokenizer/);
    r = cli('train', '--data', ft, '--out', join(home, 'x'), '--model', join(home, 'a'), '--lr', 'fast');
    assert.match(r.err, /--lr must be greater than 0 \(the learning rate; 0 would train nothing; got "fast"\)/);
    assert.equal(r.err.trim().split('\n').length, 1);
  });
});

test('a checkpoint written from bf16 weights says float32 in config.json, as its weights are', async () => {
  const { writeCheckpoint, initLlama } = await import('../../src/server/train/trainer');
  const { config, params, shapes } = initLlama(
    { vocab: 320, d: 8, layers: 1, heads: 2, kvHeads: 1, ffn: 12, maxPositions: 32 },
    1,
    { bos: 0, eos: 0, pad: 0 },
  );
  const dir = join(home, 'bf16-out');
  mkdirSync(dir);
  writeCheckpoint(dir, { ...config, torch_dtype: 'bfloat16', dtype: 'bfloat16' }, params, shapes, TINY.tokenizer);
  const saved = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  assert.equal(saved.dtype, 'float32');
  assert.equal(saved.torch_dtype, 'float32');
  // and a config without the keys gets none
  const dir2 = join(home, 'no-dtype-out');
  mkdirSync(dir2);
  const { torch_dtype: _, ...bare } = config;
  writeCheckpoint(dir2, bare, params, shapes, TINY.tokenizer);
  assert.ok(!('dtype' in JSON.parse(readFileSync(join(dir2, 'config.json'), 'utf8'))));
});
