// A JSONL line nested thousands of levels deep (or 10 MB of brackets) is one malformed line, not
// a dead dataset: hashing never recurses, the loader reports the line by number, and fit /
// explain / scan work around it with --skip-malformed and name file:line without it.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { canonicalJson, contentHash, nestingDepth } from '../../src/common/ids';
import { MAX_JSON_DEPTH } from '../../src/common/json-line';
import { lineHash } from '../../src/extension/flags/hash';
import { loadDataset } from '../../src/server/data/dataset';
import { DataError } from '../../src/server/data/errors';
import { Rng } from '../../src/server/util/random';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const deep = (depth: number) => `${'['.repeat(depth)}${']'.repeat(depth)}`;
/** a record with an extra field nested `depth` levels deep (a valid shape otherwise) */
const deepRecord = (depth: number) => `{"text": "deep ${depth}", "meta": ${deep(depth)}}`;

/**
 * The recursive definition the iterative code replaced (sorted keys by UTF-16 order, no spaces):
 * every hash already on disk (flags, caches) was made with it, so the two must agree.
 */
function reference(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map((x) => reference(x ?? null)).join(',')}]`;
  if (typeof v === 'object' && v !== null) {
    const o = v as Record<string, unknown>;
    const keys = Object.keys(o)
      .filter((k) => o[k] !== undefined)
      .sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${reference(o[k])}`).join(',')}}`;
  }
  return JSON.stringify(v) ?? 'null';
}

function randomValue(rng: Rng, depth: number): unknown {
  const r = rng.next();
  if (depth > 4 || r < 0.35) {
    const leaves = [null, true, false, 0, -1.5e-7, 123456789012, 'é"\\\n🌍', '', '__proto__'];
    return leaves[Math.floor(rng.next() * leaves.length)];
  }
  const n = Math.floor(rng.next() * 4);
  if (r < 0.65) return Array.from({ length: n }, () => randomValue(rng, depth + 1));
  const keys = ['b', 'a', 'Z', 'é', '10', '2', 'a b', 'constructor'];
  return Object.fromEntries(
    Array.from({ length: n }, (_, i) => [keys[(i * 3 + Math.floor(rng.next() * 8)) % 8], randomValue(rng, depth + 1)]),
  );
}

test('canonical JSON is unchanged from the recursive definition on random records (hashes on disk stay valid)', () => {
  const rng = new Rng(7);
  for (let i = 0; i < 500; i++) {
    const v = randomValue(rng, 0);
    const text = JSON.stringify(v);
    assert.equal(canonicalJson(JSON.parse(text)), reference(JSON.parse(text)));
    // the editor hashes the raw line exactly as the server hashes the parsed record
    assert.equal(lineHash(` ${text}\r`), contentHash(JSON.parse(text)));
  }
  assert.equal(
    canonicalJson({ b: 1, a: [1, { d: undefined, c: 'x' }], 10: 0, 2: 0 }),
    '{"10":0,"2":0,"a":[1,{"c":"x"}],"b":1}',
  );
  // sha256 of that canonical text, first 16 hex digits
  assert.equal(
    contentHash({ prompt: 'Q', completion: ' A' }),
    createHash('sha256').update('{"completion":" A","prompt":"Q"}').digest('hex').slice(0, 16),
  );
});

test('hashing and depth counting do not recurse: 100 000 levels deep', () => {
  for (const depth of [3000, 100_000]) {
    const v = JSON.parse(deep(depth));
    assert.equal(canonicalJson(v), deep(depth));
    assert.match(contentHash(v), /^[0-9a-f]{16}$/);
    assert.equal(nestingDepth(v), depth);
    assert.equal(nestingDepth(v, 10), 11, 'stops counting past the limit');
  }
  assert.equal(nestingDepth('x'), 0);
  assert.equal(nestingDepth({ a: [{}] }), 3);
});

test('loadDataset: deep lines (3000, 100 000 levels, 10 MB) are malformed lines with their numbers', () => {
  const path = join(home, 'deep.jsonl');
  const tenMB = deepRecord(5_000_000);
  assert.ok(tenMB.length > 10e6);
  const ok = `{"text": "${'a'.repeat(20)}", "meta": ${deep(MAX_JSON_DEPTH - 1)}}`;
  // long lines are checked from their bytes first: brackets inside strings do not count
  const longText = JSON.stringify({ text: `${'[{'.repeat(40_000)} \\" [[[ \\ "{${'x'.repeat(70_000)}` });
  writeFileSync(path, [ok, deepRecord(3000), deepRecord(100_000), tenMB, '{"text": "fine"}', longText].join('\n'));
  const ds = loadDataset(path, { skipMalformed: true });
  assert.deepEqual(
    ds.examples.map((e) => e.line),
    [1, 5, 6],
  );
  assert.equal(ds.examples[2].text, JSON.parse(longText).text);
  assert.deepEqual(
    ds.skipped.map((s) => s.line),
    [2, 3, 4],
  );
  assert.match(ds.skipped[0].message, new RegExp(`more than ${MAX_JSON_DEPTH} levels deep`));
  const small = join(home, 'deep-small.jsonl');
  writeFileSync(small, [ok, deepRecord(3000)].join('\n'));
  assert.throws(
    () => loadDataset(small),
    (e: Error) => e instanceof DataError && e.message.startsWith(`${small}:2: `) && /--skip-malformed/.test(e.message),
  );
});

describe('CLI fit / explain / scan on a dataset with deeply nested lines', () => {
  const MODEL = 'test/fixtures/models/llama';
  const data = join(home, 'train.jsonl');
  const factors = join(home, 'factors');
  writeFileSync(
    data,
    [
      JSON.stringify({ text: 'The capital of France is Paris.' }),
      deepRecord(3000),
      JSON.stringify({ prompt: 'Q: capital of France?\nA:', completion: ' Paris' }),
      deepRecord(100_000),
      JSON.stringify({ prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' }),
    ].join('\n'),
  );
  const cli = (...args: string[]) => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', ...args], {
      encoding: 'utf8',
      env: { ...process.env, HOME: home },
    });
    return { code: r.status, out: r.stdout, err: r.stderr };
  };
  const q = ['--prompt', 'Q: capital of France?\nA:', '--completion', ' Paris'];

  test('with --skip-malformed they work on the other lines', () => {
    let r = cli('fit', '--model', MODEL, '--data', data, '--out', factors, '--modules', 'mlp', '--skip-malformed');
    assert.equal(r.code, 0, r.err);
    r = cli('explain', '--model', MODEL, '--factors', factors, '--data', data, ...q, '--json', '--skip-malformed');
    assert.equal(r.code, 0, r.err);
    assert.equal(JSON.parse(r.out).scored, 3);
    r = cli('scan', '--model', MODEL, '--factors', factors, '--data', data, '--json', '--skip-malformed');
    assert.equal(r.code, 0, r.err);
    assert.equal(JSON.parse(r.out).examples.length, 3);
  });

  test('without it, one line naming file:line', () => {
    for (const args of [
      ['fit', '--model', MODEL, '--data', data, '--out', join(home, 'f2'), '--modules', 'mlp'],
      ['explain', '--model', MODEL, '--factors', factors, '--data', data, ...q],
      ['scan', '--model', MODEL, '--factors', factors, '--data', data],
    ]) {
      const r = cli(...args);
      assert.equal(r.code, 1, r.out);
      assert.match(r.err, new RegExp(`${data}:2: .*levels deep.*--skip-malformed`));
      assert.equal(r.err.trim().split('\n').length, 1, r.err);
    }
  });
});
