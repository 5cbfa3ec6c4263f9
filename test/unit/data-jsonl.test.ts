// JSONL reading: line numbers stay right through blank lines, CRLF and a BOM, and malformed
// lines either stop the load with file:line or are recorded when skipping.
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { DataError, readJsonl } from '../../src/server/data/jsonl';

const write = (content: string | Buffer, name = 'd.jsonl') => {
  const p = join(mkdtempSync(join(tmpdir(), 'il-')), name);
  writeFileSync(p, content);
  return p;
};

test('jsonl: rows with 1-based line numbers, blank lines ignored, no trailing newline', () => {
  const p = write('{"a":1}\n\n   \n{"a":2}\n[3]');
  const { rows, skipped } = readJsonl(p);
  assert.deepEqual(
    rows.map(({ line, value }) => ({ line, value })),
    [
      { line: 1, value: { a: 1 } },
      { line: 4, value: { a: 2 } },
      { line: 5, value: [3] },
    ],
  );
  assert.deepEqual(skipped, []);
});

test('jsonl: malformed JSON throws DataError naming path:line and the skip flag', () => {
  const p = write('{"a":1}\n\n{"a":\n{"a":3}\n');
  assert.throws(
    () => readJsonl(p),
    (e: unknown) => {
      assert.ok(e instanceof DataError);
      assert.ok(e.message.startsWith(`${p}:3: `), e.message);
      assert.match(e.message, /invalid JSON/);
      assert.match(e.message, /--skip-malformed/);
      return true;
    },
  );
});

test('jsonl: skip mode records malformed lines with correct numbers after blanks and CRLF', () => {
  const p = write('{"a":1}\r\n\r\nnot json\r\n{"a":2}\r\n\r\n{bad}\r\n{"a":3}');
  const { rows, skipped } = readJsonl(p, { skipMalformed: true });
  assert.deepEqual(
    rows.map((r) => [r.line, r.value]),
    [
      [1, { a: 1 }],
      [4, { a: 2 }],
      [7, { a: 3 }],
    ],
  );
  assert.deepEqual(
    skipped.map((s) => s.line),
    [3, 6],
  );
  assert.match(skipped[0].message, /invalid JSON/);
});

test('jsonl: CRLF does not leak a carriage return into string values', () => {
  const p = write('{"text":"x"}\r\n{"text":"y"}\r\n');
  assert.deepEqual(
    readJsonl(p).rows.map((r) => r.value),
    [{ text: 'x' }, { text: 'y' }],
  );
});

test('jsonl: a UTF-8 BOM is skipped and non-ASCII text survives', () => {
  const body = Buffer.from('{"text":"héllo 🌍"}\n{"text":"日本"}\n', 'utf8');
  const p = write(Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), body]));
  const { rows } = readJsonl(p);
  assert.deepEqual(
    rows.map(({ line, value }) => ({ line, value })),
    [
      { line: 1, value: { text: 'héllo 🌍' } },
      { line: 2, value: { text: '日本' } },
    ],
  );
});

test('jsonl: invalid UTF-8 is a malformed line', () => {
  const p = write(Buffer.concat([Buffer.from('{"a":1}\n{"t":"'), Buffer.from([0xff, 0xfe]), Buffer.from('"}\n')]));
  assert.throws(() => readJsonl(p), /:2: invalid UTF-8/);
  assert.deepEqual(readJsonl(p, { skipMalformed: true }).skipped, [{ line: 2, message: 'invalid UTF-8' }]);
});

test('jsonl: limit stops after that many rows', () => {
  const p = write('{"a":1}\n{"a":2}\nbroken\n');
  assert.deepEqual(
    readJsonl(p, { limit: 2 }).rows.map((r) => r.line),
    [1, 2],
  );
});

test('jsonl: a missing file is a DataError naming the path', () => {
  const p = join(mkdtempSync(join(tmpdir(), 'il-')), 'nope.jsonl');
  assert.throws(
    () => readJsonl(p),
    (e: unknown) => e instanceof DataError && e.message.includes(p),
  );
});

test('jsonl: an empty file gives no rows', () => {
  assert.deepEqual(readJsonl(write('')), { rows: [], skipped: [] });
});

test('jsonl: lines ending in CR alone read as one line, and the error says so', () => {
  const p = write('{"a":1}\r{"a":2}\r');
  assert.throws(
    () => readJsonl(p),
    /d\.jsonl:1: invalid JSON: .*\(the line holds a bare carriage return: if the file's lines end in CR alone, convert them to LF or CRLF\)/,
  );
  // CRLF is fine, and a plain error has no such hint
  assert.deepEqual(readJsonl(write('{"a":1}\r\n{"a":2}\r\n')).rows.length, 2);
  assert.throws(
    () => readJsonl(write('{"a":\r\n')),
    (e: Error) => !/carriage/.test(e.message),
  );
});

test('jsonl: a UTF-16 file (as Windows PowerShell saves it) is named as such, with the way to convert it', () => {
  const text = '{"text":"hello"}\n{"text":"world"}\n';
  const le = Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(text, 'utf16le')]);
  const be = Buffer.from(le);
  be.swap16();
  for (const [bytes, bom] of [
    [le, 'FF FE'],
    [be, 'FE FF'],
  ] as const) {
    const p = write(bytes);
    for (const skipMalformed of [false, true])
      assert.throws(
        () => readJsonl(p, { skipMalformed }),
        (e: Error) =>
          e.message.startsWith(
            `${p}: the file is UTF-16 (it starts with the byte order mark ${bom}); JSON Lines must be UTF-8`,
          ) && e.message.includes('iconv -f UTF-16 -t UTF-8'),
      );
  }
});
