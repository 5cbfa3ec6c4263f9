// One line, one reading: the server's dataset reader, the cleaned export and the editor's flags
// take a JSONL line by the same rules (common/json-line.ts). A line the server refuses has no
// hash in the editor (so it cannot be flagged and then kept by export).
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { contentHash } from '../../src/common/ids';
import { lineHash, parseJsonLine } from '../../src/common/json-line';
import { filterDatasetBytes } from '../../src/extension/flags/export';
import { readJsonl } from '../../src/server/data/jsonl';

const dir = mkdtempSync(join(tmpdir(), 'il-json-line-'));

test('a line without a number a double cannot hold hashes as contentHash always has (flags on disk still match)', () => {
  for (const line of [
    '{"prompt":"Q","completion":"A"}',
    '{"id": 9007199254740991, "text": "2^53 - 1 is exact"}',
    '{"text": "a long number in a string 123456789012345678901234567890 and 1e999"}',
    '{"x": 1.2345678901234567890123, "y": 1e300, "z": -0}',
    '  {"b": [1, 2, {"c": null}], "a": "x"}\t',
  ])
    assert.equal(lineHash(line), contentHash(JSON.parse(line)), line);
});

test('the server reads each line as the editor hashes it: the same hash, or malformed on both sides', () => {
  const lines = [
    '{"text": "plain"}',
    '\uFEFF{"text": "a stray byte order mark"}',
    '{"text": "a trailing no-break space"}\u00A0',
    '{"text": "64-bit id", "id": 12345678901234567891}',
    '{"text": "overflow", "x": -1e999}',
    `{"text": "deep", "x": ${'['.repeat(200)}${']'.repeat(200)}}`,
    `{"text": "deep and long", "pad": "${'x'.repeat(70_000)}", "x": ${'['.repeat(200)}${']'.repeat(200)}}`,
    '[1, 2, 3]',
    'not json',
    '   ',
  ];
  const file = join(dir, 'mixed.jsonl');
  writeFileSync(file, `${lines.join('\n')}\n`);
  const { rows, skipped } = readJsonl(file, { skipMalformed: true });
  const served = new Map(rows.map((r) => [r.line, r.hash]));
  for (const [i, line] of lines.entries()) assert.equal(lineHash(line), served.get(i + 1), `line ${i + 1}`);
  assert.deepEqual(
    rows.map((r) => r.line),
    [1, 4, 5, 8],
  );
  const bom = skipped.find((s) => s.line === 2);
  assert.match(bom?.message ?? '', /byte order mark: a BOM is read only at the start of the file/);
  assert.match(skipped.find((s) => s.line === 7)?.message ?? '', /more than 100 levels deep/);
  assert.deepEqual(parseJsonLine('   '), { kind: 'blank' });
});

test('export keeps a stray-BOM line that it never counted, and the editor offers no flag on it', () => {
  const a = '{"prompt": "Q", "completion": "A"}';
  const stray = '\uFEFF{"prompt": "Q", "completion": "B"}';
  const r = filterDatasetBytes(Buffer.from(`${a}\n${stray}\n`), new Set([lineHash(a)!]));
  assert.equal(r.bytes.toString(), `${stray}\n`);
  assert.deepEqual(r.removed, [{ line: 1, hash: lineHash(a) }]);
  assert.equal(r.kept, 0, 'the stray-BOM line is kept as bytes, not counted as a record');
  assert.equal(lineHash(stray), undefined);
});

test('a line that is not UTF-8 is found from the text an editor shows for it (U+FFFD for its bad bytes); a real U+FFFD is text', async () => {
  const { invalidLineShownAs } = await import('../../src/common/byte-lines');
  const good = Buffer.from('{"prompt":"Q: a?\\nA:","completion":" b\\n"}\n', 'utf8');
  const latin1 = Buffer.concat([
    Buffer.from('{"prompt":"Q: caf'),
    Buffer.from([0xe9]),
    Buffer.from(' latin1?","completion":" x"}'),
  ]);
  const realFffd = Buffer.from('{"prompt":"Q: caf\uFFFD latin1?","completion":" x"}\n', 'utf8');
  const file = Buffer.concat([good, realFffd, latin1, Buffer.from('\n')]);
  const shown = '{"prompt":"Q: caf\uFFFD latin1?","completion":" x"}';
  // the valid line with a real U+FFFD reads the same in the editor, but only line 3 is bad on disk
  assert.equal(invalidLineShownAs(file, shown)?.line, 3);
  assert.equal(invalidLineShownAs(Buffer.concat([good, realFffd]), shown), undefined);
  assert.equal(invalidLineShownAs(file, '{"prompt":"other"}'), undefined);
});
