// Loading a dataset end to end, plus content hashes that identify examples independent of line.
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { canonicalJson, contentHash } from '../../src/common/ids';
import { loadDataset } from '../../src/server/data/dataset';
import { DataError } from '../../src/server/data/errors';

const write = (lines: string[]) => {
  const p = join(mkdtempSync(join(tmpdir(), 'il-')), 'train.jsonl');
  writeFileSync(p, lines.join('\n'));
  return p;
};
const j = (v: unknown) => JSON.stringify(v);

test('contentHash: independent of key order, sensitive to content', () => {
  const a = { prompt: 'p', completion: 'c', meta: { x: 1, y: [1, { b: 2, a: 1 }] } };
  const b = { meta: { y: [1, { a: 1, b: 2 }], x: 1 }, completion: 'c', prompt: 'p' };
  assert.equal(contentHash(a), contentHash(b));
  assert.match(contentHash(a), /^[0-9a-f]{16}$/);
  assert.notEqual(contentHash(a), contentHash({ ...a, completion: 'C' }));
  assert.notEqual(contentHash({ x: [1, 2] }), contentHash({ x: [2, 1] }));
  assert.equal(canonicalJson(b), '{"completion":"c","meta":{"x":1,"y":[1,{"a":1,"b":2}]},"prompt":"p"}');
});

test('dataset: examples carry index, line, hash, kind, text, spans and record', () => {
  const p = write([
    j({ text: 'hello' }),
    '',
    j({ prompt: 'Q:', completion: ' A' }),
    j({
      messages: [
        { role: 'user', content: 'u' },
        { role: 'assistant', content: 'a' },
      ],
    }),
  ]);
  const ds = loadDataset(p);
  assert.equal(ds.path, p);
  assert.deepEqual(
    ds.examples.map((e) => [e.index, e.line, e.kind]),
    [
      [0, 1, 'text'],
      [1, 3, 'prompt_completion'],
      [2, 4, 'messages'],
    ],
  );
  const pc = ds.examples[1];
  assert.equal(pc.text, 'Q: A');
  assert.deepEqual(pc.spans, [[2, 4]]);
  assert.deepEqual(pc.record, { prompt: 'Q:', completion: ' A' });
  assert.equal(pc.hash, contentHash({ completion: ' A', prompt: 'Q:' }));
  assert.equal(ds.duplicates, 0);
  assert.deepEqual(ds.skipped, []);
});

test('dataset: duplicates are kept and counted', () => {
  const p = write([j({ text: 'x' }), j({ text: 'y' }), '{"text": "x"}', j({ text: 'x' })]);
  const ds = loadDataset(p);
  assert.equal(ds.examples.length, 4);
  assert.equal(ds.duplicates, 2);
  assert.equal(ds.examples[0].hash, ds.examples[2].hash);
  assert.notEqual(ds.examples[0].hash, ds.examples[1].hash);
});

test('dataset: maxExamples keeps the first N', () => {
  const p = write([j({ text: 'a' }), j({ text: 'b' }), j({ text: 'c' }), 'broken']);
  const ds = loadDataset(p, { maxExamples: 2 });
  assert.deepEqual(
    ds.examples.map((e) => e.text),
    ['a', 'b'],
  );
  // Lines beyond the cut are not read, so the broken last line does not matter.
  assert.deepEqual(ds.skipped, []);
  assert.throws(() => loadDataset(p, { maxExamples: 0 }), DataError);
});

test('dataset: maxExamples with skipping counts only valid examples', () => {
  const p = write(['nope', j({ text: 'a' }), j({ foo: 1 }), j({ text: 'b' }), j({ text: 'c' }), 'bad']);
  const ds = loadDataset(p, { maxExamples: 2, skipMalformed: true });
  assert.deepEqual(
    ds.examples.map((e) => [e.line, e.text]),
    [
      [2, 'a'],
      [4, 'b'],
    ],
  );
  assert.deepEqual(
    ds.skipped.map((s) => s.line),
    [1, 3],
  );
});

test('dataset: a bad shape names file:line; skip mode records it in file order', () => {
  const p = write([j({ text: 'ok' }), j({ prompt: 'no completion' }), '{oops', j({ text: 'ok2' })]);
  assert.throws(
    () => loadDataset(p),
    (e: unknown) => {
      assert.ok(e instanceof DataError);
      assert.ok(e.message.startsWith(`${p}:2: `), e.message);
      assert.match(e.message, /--skip-malformed/);
      return true;
    },
  );
  const ds = loadDataset(p, { skipMalformed: true });
  assert.deepEqual(
    ds.examples.map((e) => [e.index, e.line]),
    [
      [0, 1],
      [1, 4],
    ],
  );
  assert.deepEqual(
    ds.skipped.map((s) => s.line),
    [2, 3],
  );
  assert.match(ds.skipped[0].message, /without "completion"/);
});

test('dataset: an empty file or one with only skipped lines is a DataError', () => {
  assert.throws(() => loadDataset(write(['', '  '])), /no training examples/);
  assert.throws(() => loadDataset(write(['bad']), { skipMalformed: true }), /no training examples \(1 malformed/);
  // every line skipped: their reasons are in the message
  assert.throws(
    () => loadDataset(write(['{"conversations": []}', '{"text": 3}']), { skipMalformed: true }),
    /no training examples \(2 malformed line\(s\) skipped: line 1: a ShareGPT record.*; line 2: /,
  );
});

test('dataset: without skipping, the first error in the file is reported, JSON or shape', () => {
  const p = write([j({ text: 'ok' }), '{oops', j({ prompt: 'no completion' })]);
  assert.throws(() => loadDataset(p), /train\.jsonl:2: invalid JSON.*--skip-malformed/);
});

test('dataset: a file in another format (a JSON array, CSV) is named as not JSON Lines, with what is expected', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ds-format-'));
  const array = join(dir, 'data.json');
  writeFileSync(array, '[{"text": "a"},\n {"text": "b"}]\n');
  assert.throws(
    () => loadDataset(array),
    (e: Error) =>
      e instanceof DataError &&
      /not JSON Lines/.test(e.message) &&
      /jq -c '\.\[\]'/.test(e.message) &&
      !/skip-malformed/.test(e.message),
  );
  const csv = join(dir, 'data.csv');
  writeFileSync(csv, 'prompt,completion\nQ,A\n');
  assert.throws(() => loadDataset(csv), /data\.csv: not JSON Lines .*one JSON object per line/);
  // an array written one object per line (its last line is a valid object), after a blank line
  const pretty = join(dir, 'pretty.json');
  writeFileSync(pretty, '\n[\n{"text": "a"},\n{"text": "b"}\n]\n');
  assert.throws(() => loadDataset(pretty), /pretty\.json: not JSON Lines \(line 2: .*jq -c/);
  // a JSON Lines file with one bad line still points at that line and the flag to skip it
  const one = join(dir, 'one.jsonl');
  writeFileSync(one, '{"text": "a"}\n{"text": oops}\n');
  assert.throws(() => loadDataset(one), /one\.jsonl:2: .*--skip-malformed/);
});
