// An --out never replaces what the user wrote: gradients and tokenize refuse a dataset, a flags
// file or a file they did not write (and replace their own earlier output); data build and data
// tokenizer replace a folder whole, so one holding anything else (flags, notes, a model's own
// tokenizer) is refused, and a build killed midway leaves the earlier corpus, not a mix.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  copyFileSync,
  cpSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const cli = cliIn(home);
const MODEL = 'assets/default/finetuned';

function data(): string {
  const d = join(home, `data-${Math.random().toString(36).slice(2)}`);
  mkdirSync(d);
  const lines = readFileSync('assets/default/data/finetune.jsonl', 'utf8').split('\n').slice(0, 6);
  writeFileSync(join(d, 'd.jsonl'), `${lines.join('\n')}\n`);
  writeFileSync(join(d, 'd.exclude.jsonl'), '{"hash":"0123456789abcdef","line":2,"reason":"mine"}\n');
  return d;
}

function refusedUnchanged(r: ReturnType<typeof cli>, re: RegExp, file: string, before: Buffer) {
  assert.equal(r.code, 1, `expected a refusal: ${r.out} ${r.err}`);
  assert.match(r.err, re);
  assert.ok(readFileSync(file).equals(before), `${file} unchanged`);
}

test('gradients --out: never over a dataset, a flags file or a model; over its own output, yes', () => {
  const d = data();
  const q = [
    'gradients',
    '--model',
    MODEL,
    '--prompt',
    'Q: What is the capital of Australia?\nA:',
    '--completion',
    ' Sydney',
  ];
  for (const f of ['d.jsonl', 'd.exclude.jsonl']) {
    const file = join(d, f);
    const before = readFileSync(file);
    refusedUnchanged(
      cli(...q, '--out', file),
      f.includes('exclude')
        ? /is a flags file/
        : /exists and is not a gradients file written by influence-lens gradients/,
      file,
      before,
    );
  }
  // a model's weights are a safetensors file too, but not gradients
  const model = join(home, 'model-copy');
  cpSync(MODEL, model, { recursive: true });
  const weights = join(model, 'model.safetensors');
  refusedUnchanged(cli(...q, '--out', weights), /is not a gradients file/, weights, readFileSync(weights));
  const out = join(d, 'g.safetensors');
  assert.equal(cli(...q, '--out', out).code, 0);
  const again = cli(...q, '--out', out);
  assert.equal(again.code, 0, again.err);
});

test('tokenize --out: never over the data, a flags file or another file; over its own output, yes', () => {
  const d = data();
  const t = ['tokenize', '--model', MODEL, '--data', join(d, 'd.jsonl')];
  const flags = join(d, 'd.exclude.jsonl');
  refusedUnchanged(cli(...t, '--out', flags), /is a flags file/, flags, readFileSync(flags));
  const ds = join(d, 'd.jsonl');
  refusedUnchanged(cli(...t, '--out', ds), /is an input of this command/, ds, readFileSync(ds));
  const other = join(d, 'other.jsonl');
  copyFileSync(ds, other);
  refusedUnchanged(
    cli(...t, '--out', other),
    /exists and is not a tokens file written by influence-lens tokenize/,
    other,
    readFileSync(other),
  );
  // a pipe: recognising it by reading would block forever (and nothing writes it): refused at once
  const fifo = join(d, 'fifo');
  if (spawnSync('mkfifo', [fifo]).status === 0) {
    const r = cliIn(home, {}, 60_000)(...t, '--out', fifo);
    assert.equal(r.code, 1, `refused, not hung: ${r.err}`);
    assert.match(r.err, /is not a regular file \(a pipe or a device\)/);
  }
  const out = join(d, 'tokens.jsonl');
  assert.equal(cli(...t, '--out', out).code, 0);
  const again = cli(...t, '--out', out);
  assert.equal(again.code, 0, again.err);
  assert.ok(JSON.parse(readFileSync(out, 'utf8').split('\n')[0]).input_ids.length > 0);
});

test('data build / data tokenizer --out: a folder with anything else is refused; an earlier build is replaced whole', () => {
  const out = join(home, 'corpus');
  const build = (seed: string) => cli('data', 'build', '--out', out, '--countries', '12', '--seed', seed);
  // what a build killed earlier left beside it (its staged folder; a process that is gone)
  const gone = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  const staged = join(home, `corpus.tmp-${gone.stdout}-0x1`);
  mkdirSync(staged);
  // a copy of the user's named like an older version's temporary (`.tmp-<a number no process has>`)
  const usersCopy = join(home, 'corpus.tmp-20240101');
  mkdirSync(usersCopy);
  writeFileSync(join(usersCopy, 'edited.jsonl'), 'mine');
  assert.equal(build('1').code, 0);
  assert.equal(existsSync(staged), false, 'a killed build leaves nothing behind for long');
  assert.equal(readFileSync(join(usersCopy, 'edited.jsonl'), 'utf8'), 'mine', "the user's copy stays");
  rmSync(usersCopy, { recursive: true });
  const first = readFileSync(join(out, 'finetune.jsonl'));
  const again = build('2');
  assert.equal(again.code, 0, again.err);
  assert.ok(!readFileSync(join(out, 'finetune.jsonl')).equals(first), 'the new build');
  assert.deepEqual(readdirSync(out).sort(), [
    'corpus.json',
    'finetune.jsonl',
    'pretrain.jsonl',
    'queries.json',
    'tokenizer',
  ]);
  assert.deepEqual(
    readdirSync(home).filter((n) => n.startsWith('corpus.')),
    [],
    'no staging folder left',
  );
  // the user flagged examples of the built data: those flags would go with the folder
  const flags = join(out, 'finetune.exclude.jsonl');
  writeFileSync(flags, '{"hash":"0123456789abcdef","line":2}\n');
  const now = readFileSync(join(out, 'finetune.jsonl'));
  refusedUnchanged(
    build('3'),
    /exists and is not a corpus written by influence-lens data build \(it holds finetune\.exclude\.jsonl\)/,
    join(out, 'finetune.jsonl'),
    now,
  );
  assert.ok(readFileSync(flags).length > 0);
  // a folder of the user's data
  const mine = data();
  const ds = join(mine, 'd.jsonl');
  refusedUnchanged(
    cli('data', 'build', '--out', mine, '--countries', '12'),
    /is not a corpus written by influence-lens data build/,
    ds,
    readFileSync(ds),
  );

  // data tokenizer: a model's own tokenizer folder is not replaced; its own output is
  const model = join(home, 'tok-model');
  mkdirSync(model);
  copyFileSync(join(MODEL, 'tokenizer.json'), join(model, 'tokenizer.json'));
  writeFileSync(join(model, 'tokenizer.json'), JSON.stringify({ model: { type: 'BPE' } }));
  const tj = join(model, 'tokenizer.json');
  refusedUnchanged(
    cli('data', 'tokenizer', '--out', model, ds),
    /holds another kind of tokenizer\.json, not a tokenizer written by influence-lens data tokenizer/,
    tj,
    readFileSync(tj),
  );
  const tokOut = join(home, 'word-tok');
  assert.equal(cli('data', 'tokenizer', '--out', tokOut, ds).code, 0);
  const twice = cli('data', 'tokenizer', '--out', tokOut, ds);
  assert.equal(twice.code, 0, twice.err);
});

test('data build --out a symbolic link to a folder on another disk: the linked folder is replaced, the link stays', () => {
  const disk = join(home, 'other-disk');
  mkdirSync(disk);
  const target = join(disk, 'corpus');
  const link = join(home, 'corpus-link');
  symlinkSync(target, link);
  // a link to a folder not made yet: the build makes it there
  assert.equal(cli('data', 'build', '--out', link, '--countries', '12', '--seed', '1').code, 0);
  assert.ok(lstatSync(link).isSymbolicLink(), 'the link is still a link');
  const first = readFileSync(join(target, 'finetune.jsonl'));
  const again = cli('data', 'build', '--out', link, '--countries', '12', '--seed', '2');
  assert.equal(again.code, 0, again.err);
  assert.ok(lstatSync(link).isSymbolicLink(), 'the link is still a link');
  assert.ok(!readFileSync(join(target, 'finetune.jsonl')).equals(first), 'the new build is in the linked folder');
  assert.deepEqual(
    [
      ...readdirSync(home).filter((n) => n.startsWith('corpus-link.')),
      ...readdirSync(disk).filter((n) => n !== 'corpus'),
    ],
    [],
    'no staging or set-aside folder left on either side',
  );
  // the check and the write judge the same folder: flags in the linked folder stop the build
  writeFileSync(join(target, 'finetune.exclude.jsonl'), '{"hash":"0123456789abcdef","line":2}\n');
  const now = readFileSync(join(target, 'finetune.jsonl'));
  refusedUnchanged(
    cli('data', 'build', '--out', link, '--countries', '12', '--seed', '3'),
    /is not a corpus written by influence-lens data build \(it holds finetune\.exclude\.jsonl\)/,
    join(target, 'finetune.jsonl'),
    now,
  );
});

test('--out through a linked folder and `..` (par/../x, par a link): judged and written where the system resolves it, never over the textual x', () => {
  // par -> deep/real: the system reads par/../x as deep/x; path.resolve reads it as x
  const d = join(home, 'dotdot');
  mkdirSync(join(d, 'deep', 'real'), { recursive: true });
  symlinkSync(join(d, 'deep', 'real'), join(d, 'par'));
  mkdirSync(join(d, 'victim'));
  writeFileSync(join(d, 'victim', 'thesis.txt'), 'mine');
  const ds = join(data(), 'd.jsonl');
  const tok = cli('data', 'tokenizer', '--out', `${d}/par/../victim`, ds);
  assert.equal(tok.code, 0, tok.err);
  assert.deepEqual(readdirSync(join(d, 'victim')), ['thesis.txt']);
  assert.ok(existsSync(join(d, 'deep', 'victim', 'tokenizer.json')));
  // a Hugging Face tokenizer folder where the textual path points is not the folder --out names
  mkdirSync(join(d, 'tok'));
  copyFileSync(join(MODEL, 'tokenizer.json'), join(d, 'tok', 'tokenizer.json'));
  writeFileSync(join(d, 'tok', 'tokenizer.json'), JSON.stringify({ model: { type: 'BPE' } }));
  const hf = readFileSync(join(d, 'tok', 'tokenizer.json'));
  assert.equal(cli('data', 'tokenizer', '--out', `${d}/par/../tok`, ds).code, 0);
  assert.ok(readFileSync(join(d, 'tok', 'tokenizer.json')).equals(hf), 'the textual tok/ is untouched');
  // and the one it names, once it holds such a tokenizer, is refused as a plain path would be
  writeFileSync(join(d, 'deep', 'tok', 'tokenizer.json'), JSON.stringify({ model: { type: 'BPE' } }));
  const refused = cli('data', 'tokenizer', '--out', `${d}/par/../tok`, ds);
  assert.equal(refused.code, 1);
  assert.match(refused.err, /holds another kind of tokenizer\.json/);
  // export: an existing file at the textual path is not the one --out names, and is not replaced
  writeFileSync(join(d, 'mine.jsonl'), 'my own file\n');
  const ex = cli('export', '--data', ds, '--out', `${d}/par/../mine.jsonl`);
  assert.equal(ex.code, 0, ex.err);
  assert.equal(readFileSync(join(d, 'mine.jsonl'), 'utf8'), 'my own file\n');
  assert.ok(existsSync(join(d, 'deep', 'mine.jsonl')));
  // and where the system's reading does hold a file, export refuses without --force
  const again = cli('export', '--data', ds, '--out', `${d}/par/../mine.jsonl`);
  assert.equal(again.code, 1);
  assert.match(again.err, /--force/);
});
