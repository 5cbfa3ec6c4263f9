// `influence-lens retrain` repeats `train` from the model's training_args.json without the
// flagged examples: the weights are byte for byte those of `train --exclude` with the same
// arguments (fresh or fine-tuned from a checkpoint found beside the model), and it reports
// answers and log-probabilities before and after. A model trained elsewhere, or other data,
// is refused with the way to go; `export` writes the cleaned copy for other pipelines.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { legacyModelFingerprint, modelFingerprint } from '../../src/server/attribution/fingerprint';
import { loadDataset } from '../../src/server/data/dataset';
import { openCheckpoint } from '../../src/server/model/checkpoint';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const run = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', ...args], {
    encoding: 'utf8',
    env: { ...process.env, HOME: home },
  });
const ok = (r: ReturnType<typeof run>) => {
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
};
const weights = (dir: string) => readFileSync(join(dir, 'model.safetensors'));

test("the embedded fine-tuned model names its starting checkpoint by that checkpoint's fingerprint", () => {
  // retrain of the shipped model checks assets/default/pretrained against it (it was left at the
  // older formula's value when the formula changed, and retrain refused the shipped model)
  const args = JSON.parse(readFileSync('assets/default/finetuned/training_args.json', 'utf8'));
  const start = openCheckpoint('assets/default/pretrained');
  assert.equal(args.from.model, 'pretrained');
  assert.equal(args.from.fingerprint, modelFingerprint(start));
  // the older formula, pinned to the value the version before it wrote for these weights
  assert.equal(legacyModelFingerprint(start), '462e711b9b407c94');
});

test('retrain = train --exclude with the recorded arguments; before/after on the queries', () => {
  const data = join(home, 'qa.jsonl');
  const lines = readFileSync('assets/default/data/finetune.jsonl', 'utf8').split('\n').slice(0, 16);
  writeFileSync(data, `${lines.join('\n')}\n`);
  const flagged = loadDataset(data).examples[2];
  writeFileSync(join(home, 'qa.exclude.jsonl'), `${JSON.stringify({ hash: flagged.hash, line: 3 })}\n`);
  const tiny = ['--d', '16', '--layers', '1', '--heads', '2', '--ffn', '32', '--context', '48'];
  const common = ['--epochs', '2', '--batch-size', '4', '--threads', '1', '--seed', '3'];
  const d = (n: string) => join(home, n);
  ok(
    run(
      'train',
      '--data',
      data,
      '--out',
      d('m0'),
      '--init',
      'llama',
      '--tokenizer',
      'assets/default/data/tokenizer',
      ...tiny,
      ...common,
    ),
  );
  const ref = ['--init', 'llama', '--tokenizer', 'assets/default/data/tokenizer', ...tiny, ...common];
  ok(run('train', '--data', data, '--out', d('ref0'), ...ref, '--exclude', d('qa.exclude.jsonl')));

  const q = d('q.jsonl');
  const rec = flagged.record as { prompt: string; completion: string };
  writeFileSync(q, `${JSON.stringify({ prompt: rec.prompt, expected: rec.completion })}\n`);
  const out = ok(
    run('retrain', '--model', d('m0'), '--exclude', d('qa.exclude.jsonl'), '--out', d('m0r'), '--queries', q),
  );
  assert.match(out, /15 examples \(1 excluded\)/);
  assert.ok(weights(d('m0r')).equals(weights(d('ref0'))), 'retrained weights = train --exclude');
  const lp = /log p\(.*\| prompt\): (-?[\d.]+) → (-?[\d.]+)/.exec(out);
  assert.ok(lp, out);
  // the numbers are the models' own: the flagged example is less likely once it is not trained on
  assert.ok(Number(lp[2]) < Number(lp[1]), out);
  const answers = /answer: (".*") → (".*")/.exec(out)!;
  const gen = (m: string) =>
    JSON.stringify(ok(run('generate', '--model', m, '--prompt', rec.prompt, '--max-tokens', '16')).slice(0, -1));
  assert.deepEqual([answers[1], answers[2]], [gen(d('m0')), gen(d('m0r'))]);

  // the first example unflagged, another flagged: the model's earlier exclusion stays, and is said
  const other = loadDataset(data).examples[5];
  writeFileSync(d('qa2.exclude.jsonl'), `${JSON.stringify({ hash: other.hash, line: 6 })}\n`);
  const again = run(
    'retrain',
    '--model',
    d('m0r'),
    '--exclude',
    d('qa2.exclude.jsonl'),
    '--data',
    data,
    '--out',
    d('m0rr'),
  );
  assert.equal(again.status, 0, again.stderr);
  assert.match(again.stdout, /14 examples \(2 excluded\)/);
  assert.match(
    again.stderr,
    /note: 1 example\(s\) .*m0r was already trained without stay excluded, though .*qa2\.exclude\.jsonl no longer flags them/,
  );

  // fine-tuned from a checkpoint: found beside the model by the recorded name
  ok(run('train', '--data', data, '--out', d('ft'), '--model', d('m0'), ...common));
  ok(
    run('train', '--data', data, '--out', d('ref1'), '--model', d('m0'), ...common, '--exclude', d('qa.exclude.jsonl')),
  );
  ok(run('retrain', '--model', d('ft'), '--exclude', d('qa.exclude.jsonl'), '--out', d('ftr')));
  assert.ok(weights(d('ftr')).equals(weights(d('ref1'))));
  // a training_args.json written before the fingerprint hashed config.json's content names the
  // same starting checkpoint by the older formula: still that checkpoint
  const argsFile = join(d('ft'), 'training_args.json');
  const written = readFileSync(argsFile, 'utf8');
  const legacy = legacyModelFingerprint(openCheckpoint(d('m0')));
  assert.ok(legacy && legacy !== JSON.parse(written).from.fingerprint);
  writeFileSync(argsFile, written.replace(JSON.parse(written).from.fingerprint, legacy!));
  ok(run('retrain', '--model', d('ft'), '--exclude', d('qa.exclude.jsonl'), '--out', d('ftr-legacy')));
  assert.ok(weights(d('ftr-legacy')).equals(weights(d('ref1'))));
  writeFileSync(argsFile, written);
  assert.deepEqual(JSON.parse(readFileSync(join(d('ftr'), 'training_args.json'), 'utf8')).excluded_hashes, [
    flagged.hash,
  ]);
  // a model trained from scratch records the tokenizer's name as train did, not the model's
  assert.deepEqual(
    JSON.parse(readFileSync(join(d('m0r'), 'training_args.json'), 'utf8')).from,
    JSON.parse(readFileSync(join(d('ref0'), 'training_args.json'), 'utf8')).from,
  );
  // the starting checkpoint is checked by its weights, not its name: m0 trained again (another
  // seed) into its own folder, or another model named by --from, is refused
  ok(run('train', '--data', data, '--out', d('m0'), ...ref.slice(0, -1), '4'));
  for (const from of [[], ['--from', d('ref0')]]) {
    const other = run('retrain', '--model', d('ft'), '--exclude', d('qa.exclude.jsonl'), '--out', d('ftx'), ...from);
    assert.equal(other.status, 1, other.stderr);
    assert.match(
      other.stderr,
      /is not the checkpoint .*ft was fine-tuned from: its weights' fingerprint is \w+, training_args\.json records \w+/,
    );
  }

  // refusals: an existing output, other data, a model trained elsewhere
  assert.match(
    run('retrain', '--model', d('m0'), '--exclude', d('qa.exclude.jsonl'), '--out', d('m0r')).stderr,
    /already holds a model/,
  );
  writeFileSync(d('other.jsonl'), `${lines.slice(0, 8).join('\n')}\n`);
  assert.match(
    run('retrain', '--model', d('m0'), '--exclude', d('qa.exclude.jsonl'), '--data', d('other.jsonl'), '--out', d('x'))
      .stderr,
    /other\.jsonl is not the data .* was trained on/,
  );
  cpSync('test/fixtures/models/llama', d('elsewhere'), { recursive: true });
  const foreign = run('retrain', '--model', d('elsewhere'), '--exclude', d('qa.exclude.jsonl'), '--out', d('y'));
  assert.equal(foreign.status, 1);
  assert.match(foreign.stderr, /training_args\.json not found: .*influence-lens export --data <train\.jsonl>/);

  // export: the cleaned copy for any pipeline
  assert.match(ok(run('export', '--data', data)), /qa\.cleaned\.jsonl: 15 examples kept, 1 removed/);
  const cleaned = readFileSync(d('qa.cleaned.jsonl'), 'utf8');
  assert.equal(cleaned, `${lines.filter((_, i) => i !== 2).join('\n')}\n`);

  // a hand-written flag without its hash: which example it means is unknown, so export refuses
  // (it used to go ahead and only warn), and writes nothing
  writeFileSync(d('dup.jsonl'), `${lines.join('\n')}\n${lines[2]}\n`);
  writeFileSync(d('dup.exclude.jsonl'), `${readFileSync(d('qa.exclude.jsonl'), 'utf8')}{"line": 1}\n`);
  const bad = run('export', '--data', d('dup.jsonl'));
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /dup\.exclude\.jsonl line 2 is not a flag \(no "hash" string\): correct or delete/);
  assert.equal(existsSync(d('dup.cleaned.jsonl')), false);
  // a copy of the flagged line is the same example and goes with it
  writeFileSync(d('dup.exclude.jsonl'), readFileSync(d('qa.exclude.jsonl'), 'utf8'));
  assert.match(
    ok(run('export', '--data', d('dup.jsonl'))),
    /15 examples kept, 2 removed \(1 flagged example\(s\); identical copies removed with them\)/,
  );
});
