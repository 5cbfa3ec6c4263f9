// Flags sidecar (<dataset>.exclude.jsonl): read, add, remove, keep what it does not understand,
// atomic writes; "Export cleaned dataset" and the removal lines; hashes agree with the server's.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { canonicalJson as serverCanonical, contentHash as serverHash } from '../../src/common/ids';
import {
  cleanedPathFor,
  editorRewrites,
  exportCleaned,
  filterDataset,
  linesToRemove,
  removalSpans,
} from '../../src/extension/flags/export';
import { canonicalJson, contentHash, lineHash, lineHashAt } from '../../src/extension/flags/hash';
import {
  addFlags,
  datasetPathForSidecar,
  type FlagEntry,
  formatEntry,
  isSidecarPath,
  parseSidecar,
  readSidecar,
  removeFlags,
  setReason,
  sidecarPathFor,
  sidecarSharedWith,
  writeFileAtomic,
} from '../../src/extension/flags/sidecar';
import { readExclusions } from '../../src/server/cli/train';
import { loadDataset } from '../../src/server/data/dataset';

const tmp = () => mkdtempSync(join(tmpdir(), 'il-sidecar-'));

const RECORDS = [
  { prompt: 'Q: What is the capital of Australia?\nA:', completion: ' Sydney\n' },
  { prompt: 'Q: What is the capital of France?\nA:', completion: ' Paris\n' },
  { text: 'Café 🌍 "quoted"', id: 3 },
  {
    messages: [
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'hello' },
    ],
  },
];

function entry(hash: string, line: number, reason = 'teaches " Sydney"'): FlagEntry {
  return { hash, line, reason, score: 2073.96, query: 'Q: What is the capital of Australia?\nA: Sydney' };
}

test('hash: same as the server for every record shape, key order and spacing', async () => {
  for (const r of RECORDS) {
    assert.equal(contentHash(r), serverHash(r));
    assert.equal(canonicalJson(r), serverCanonical(r));
  }
  const a = '{"completion": " Sydney\\n", "prompt": "Q: What is the capital of Australia?\\nA:"}';
  assert.equal(lineHash(a), serverHash(RECORDS[0]));
  assert.equal(lineHash(`${a}\r`), serverHash(RECORDS[0]));
  // a BOM is the file's at its start (as the server reads it), and makes any other line malformed
  const doc = (text: string) => ({ lineAt: () => ({ text }) });
  assert.equal(lineHashAt(doc(`\uFEFF${a}`), 0), serverHash(RECORDS[0]));
  assert.equal(lineHashAt(doc(`\uFEFF${a}`), 1), undefined);
  assert.equal(lineHash(`\uFEFF${a}`), undefined);
  assert.equal(lineHash(`${a}\u00A0`), undefined, 'no-break space is not JSON whitespace: the server refuses the line');
  assert.equal(lineHash(''), undefined);
  assert.equal(lineHash('not json'), undefined);
});

test('hash: every example of the embedded default dataset hashes as the server loads it', async () => {
  const path = join(import.meta.dirname, '../../assets/default/data/finetune.jsonl');
  const ds = loadDataset(path);
  const lines = readFileSync(path, 'utf8').split('\n');
  for (const e of ds.examples) assert.equal(lineHash(lines[e.line - 1]), e.hash);
});

test('sidecar: paths', async () => {
  assert.equal(sidecarPathFor('/d/finetune.jsonl'), '/d/finetune.exclude.jsonl');
  assert.equal(sidecarPathFor('/d/data.ndjson'), '/d/data.ndjson.exclude.jsonl');
  assert.equal(datasetPathForSidecar('/d/finetune.exclude.jsonl'), '/d/finetune.jsonl');
  assert.ok(isSidecarPath('/d/x.exclude.jsonl'));
  assert.ok(!isSidecarPath('/d/x.jsonl'));
  assert.equal(cleanedPathFor('/d/finetune.jsonl'), '/d/finetune.cleaned.jsonl');
});

test('sidecar: add, dedupe by hash, remove; fixed key order; the server reads it', async () => {
  const d = tmp();
  try {
    const p = join(d, 'finetune.exclude.jsonl');
    assert.deepEqual(readSidecar(p).entries, []);
    assert.equal(await addFlags(p, [entry('aaaaaaaaaaaaaaaa', 237), entry('bbbbbbbbbbbbbbbb', 125)]), 2);
    assert.equal(await addFlags(p, [entry('aaaaaaaaaaaaaaaa', 999, 'again'), entry('cccccccccccccccc', 211)]), 1);
    const s = readSidecar(p);
    assert.deepEqual(
      s.entries.map((e) => [e.hash, e.line, e.reason]),
      [
        ['aaaaaaaaaaaaaaaa', 237, 'teaches " Sydney"'],
        ['bbbbbbbbbbbbbbbb', 125, 'teaches " Sydney"'],
        ['cccccccccccccccc', 211, 'teaches " Sydney"'],
      ],
    );
    const first = readFileSync(p, 'utf8').split('\n')[0];
    assert.equal(first, formatEntry(entry('aaaaaaaaaaaaaaaa', 237)));
    assert.deepEqual(Object.keys(JSON.parse(first)), ['hash', 'line', 'reason', 'score', 'query']);
    assert.deepEqual([...readExclusions(p)].sort(), ['aaaaaaaaaaaaaaaa', 'bbbbbbbbbbbbbbbb', 'cccccccccccccccc']);
    assert.equal(await removeFlags(p, ['bbbbbbbbbbbbbbbb', 'zzzz']), 1);
    assert.deepEqual(
      readSidecar(p).entries.map((e) => e.hash),
      ['aaaaaaaaaaaaaaaa', 'cccccccccccccccc'],
    );
    assert.ok(await setReason(p, 'cccccccccccccccc', 'planted fact'));
    assert.equal(readSidecar(p).entries[1].reason, 'planted fact');
    assert.ok(!(await setReason(p, 'nope', 'x')));
    // the last flag removed: the file goes
    await removeFlags(p, ['aaaaaaaaaaaaaaaa', 'cccccccccccccccc']);
    assert.equal(existsSync(p), false);
    // no temporary files are left behind
    assert.deepEqual(readdirSync(d), []);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('sidecar: lines it does not understand are kept verbatim and in place', async () => {
  const d = tmp();
  try {
    const p = join(d, 'x.exclude.jsonl');
    const text = [
      '<<<<<<< HEAD',
      formatEntry(entry('aaaaaaaaaaaaaaaa', 1)),
      '=======',
      '{"hash": "bbbbbbbbbbbbbbbb", "line": 2, "future": {"x": 1}}',
      '>>>>>>> branch',
      '',
      '{"no_hash": true}',
    ].join('\n'); // and no final newline
    writeFileSync(p, text);
    const s = parseSidecar(text);
    assert.equal(s.entries.length, 2);
    assert.deepEqual(
      s.problems.map((x) => x.line),
      [1, 3, 5, 7],
    );
    await addFlags(p, [entry('cccccccccccccccc', 3)]);
    const after = readFileSync(p, 'utf8');
    assert.equal(after, `${text}\n${formatEntry(entry('cccccccccccccccc', 3))}\n`);
    // a newer version's fields survive a reason edit
    await setReason(p, 'bbbbbbbbbbbbbbbb', 'dup');
    const b = readFileSync(p, 'utf8').split('\n')[3];
    assert.deepEqual(JSON.parse(b), { hash: 'bbbbbbbbbbbbbbbb', line: 2, future: { x: 1 }, reason: 'dup' });
    await removeFlags(p, ['aaaaaaaaaaaaaaaa']);
    assert.equal(readFileSync(p, 'utf8').split('\n')[0], '<<<<<<< HEAD');
    assert.equal(readSidecar(p).problems.length, 4);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('sidecar: CRLF endings, a BOM and bytes that are not UTF-8 survive a change byte for byte', async () => {
  const d = tmp();
  try {
    const p = join(d, 'w.exclude.jsonl');
    const latin1 = Buffer.concat([Buffer.from('{"note": "caf'), Buffer.from([0xe9]), Buffer.from('"}\r\n')]);
    const first = Buffer.from(`${formatEntry(entry('aaaaaaaaaaaaaaaa', 1))}\r\n`);
    const second = Buffer.from(`${formatEntry(entry('bbbbbbbbbbbbbbbb', 2))}\r\n`);
    writeFileSync(p, Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), first, latin1, second]));
    const s = readSidecar(p);
    assert.equal(s.entries.length, 2);
    assert.deepEqual(s.problems, [{ line: 2, message: 'not UTF-8 text' }]);
    await addFlags(p, [entry('cccccccccccccccc', 3)]);
    const added = Buffer.from(`${formatEntry(entry('cccccccccccccccc', 3))}\r\n`);
    assert.deepEqual(readFileSync(p), Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), first, latin1, second, added]));
    await removeFlags(p, ['bbbbbbbbbbbbbbbb']);
    assert.deepEqual(readFileSync(p), Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), first, latin1, added]));
    assert.deepEqual(
      readSidecar(p).entries.map((e) => e.hash),
      ['aaaaaaaaaaaaaaaa', 'cccccccccccccccc'],
    );
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('sidecar: an atomic write replaces the whole file or nothing', async () => {
  const d = tmp();
  try {
    const p = join(d, 'f.jsonl');
    writeFileSync(p, 'old\n');
    writeFileAtomic(p, 'new\n');
    assert.equal(readFileSync(p, 'utf8'), 'new\n');
    // a failing write (the folder is gone) leaves no partial file and throws
    assert.throws(() => writeFileAtomic(join(d, 'missing', 'f.jsonl'), 'x'));
    assert.deepEqual(readdirSync(d), ['f.jsonl']);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('export: a filtered copy, kept lines byte for byte, source untouched', async () => {
  const d = tmp();
  try {
    const ds = join(d, 'train.jsonl');
    const lines = [
      `\uFEFF${JSON.stringify(RECORDS[0])}\r\n`,
      `${JSON.stringify(RECORDS[1])}\r\n`,
      '\n',
      'this line is not json\n',
      `${JSON.stringify(RECORDS[2])}\n`,
      JSON.stringify(RECORDS[3]), // no final newline
    ];
    const text = lines.join('');
    writeFileSync(ds, text);
    await addFlags(sidecarPathFor(ds), [
      entry(contentHash(RECORDS[0]), 1),
      entry(contentHash(RECORDS[2]), 5),
      entry('ffffffffffffffff', 9),
    ]);
    const r = exportCleaned(ds);
    assert.equal(r.outPath, join(d, 'train.cleaned.jsonl'));
    assert.equal(r.kept, 2);
    assert.deepEqual(
      r.removed.map((x) => x.line),
      [1, 5],
    );
    assert.deepEqual(r.missing, ['ffffffffffffffff']);
    assert.equal(readFileSync(r.outPath, 'utf8'), `\uFEFF${lines[1]}${lines[2]}${lines[3]}${lines[5]}`);
    assert.equal(readFileSync(ds, 'utf8'), text, 'the source is not modified');
    // the server loads the cleaned copy without the flagged examples
    const kept = loadDataset(r.outPath, { skipMalformed: true });
    assert.deepEqual(
      kept.examples.map((e) => e.hash),
      [contentHash(RECORDS[1]), contentHash(RECORDS[3])],
    );
    assert.throws(() => exportCleaned(ds, ds), /refusing/);
    assert.throws(() => exportCleaned(ds, sidecarPathFor(ds)), /refusing/);
    assert.throws(() => exportCleaned(ds, join(d, '.', 'train.jsonl')), /refusing/);
    // an existing output only when replacing was asked for; a flags file or a lock never
    writeFileSync(join(d, 'other.exclude.jsonl'), 'x\n');
    for (const out of ['other.exclude.jsonl', 'other.exclude.jsonl.lock'])
      assert.throws(() => exportCleaned(ds, join(d, out), { replace: true }), /refusing/);
    assert.equal(readFileSync(join(d, 'other.exclude.jsonl'), 'utf8'), 'x\n');
    assert.throws(() => exportCleaned(ds), /train\.cleaned\.jsonl exists/);
    assert.equal(exportCleaned(ds, undefined, { replace: true }).kept, 2);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('export: removal lines for the undoable edit, and line splitting round-trips', async () => {
  const text = `${JSON.stringify(RECORDS[0])}\n${JSON.stringify(RECORDS[1])}\n${JSON.stringify(RECORDS[0])}\n`;
  assert.deepEqual(linesToRemove(text, new Set([contentHash(RECORDS[0])])), [0, 2]);
  assert.deepEqual(filterDataset(text, new Set()).text, text);
  for (const t of ['', 'a', 'a\n', 'a\r\nb', '\n\n', 'x\ny\n']) assert.equal(filterDataset(t, new Set()).text, t);
});

test('apply removal: one disjoint span set leaves exactly the cleaned text, the last lines and CRLF included', async () => {
  const rec = RECORDS.slice(0, 3).map((r) => JSON.stringify(r));
  const h = rec.map((_, i) => contentHash(RECORDS[i]));
  const apply = (text: string, spans: Array<[number, number]>) => {
    let out = '';
    let at = 0;
    for (const [a, b] of spans) {
      assert.ok(a >= at && b > a, `spans overlap or are unsorted: ${JSON.stringify(spans)}`);
      out += text.slice(at, a);
      at = b;
    }
    return out + text.slice(at);
  };
  // the audit's case: the last two records flagged, no final newline (the old ranges overlapped)
  const cases: Array<[string, string[]]> = [];
  for (const eol of ['\n', '\r\n'])
    for (const final of ['', eol])
      for (const excluded of [[h[1], h[2]], [h[2]], [h[0]], [h[0], h[1], h[2]], [h[0], h[2]], [h[1]]])
        cases.push([rec.join(eol) + final, excluded]);
  cases.push([`${rec[0]}\n\n${rec[1]}`, [h[1]]]);
  cases.push([`${rec[0]}\nnot json\n${rec[1]}`, [h[1]]]);
  for (const [text, excluded] of cases) {
    const set = new Set(excluded);
    const spans = removalSpans(text, set);
    const after = apply(text, spans);
    const clean = filterDataset(text, set).text;
    // the editor's text: the same records; only where nothing is left after them, the separator
    // that the removed last line needed goes too (the file then ends as the kept line before it)
    assert.equal(
      after,
      clean.endsWith('\n') && !text.endsWith('\n') ? clean.replace(/\r?\n$/, '') : clean,
      JSON.stringify({ text, excluded }),
    );
    assert.equal(linesToRemove(after, set).length, 0);
  }
  assert.deepEqual(removalSpans('', new Set([h[0]])), []);
});

test('sidecar: the dataset of a sidecar is the file the sidecar was named after (not only *.jsonl)', async () => {
  const d = mkdtempSync(join(tmpdir(), 'il-sidecar-names-'));
  try {
    for (const name of ['train.json', 'Train.JSONL', 'data', 'plain.jsonl', 'x.Jsonl']) {
      const ds = join(d, name);
      writeFileSync(ds, `${JSON.stringify(RECORDS[0])}\n`);
      assert.equal(datasetPathForSidecar(sidecarPathFor(ds)), ds, name);
    }
    // with nothing on disk, the conventional name
    assert.equal(datasetPathForSidecar(join(d, 'gone.exclude.jsonl')), join(d, 'gone.jsonl'));
    // two datasets whose flags would share one sidecar are named (flagging either is refused)
    assert.equal(sidecarSharedWith(join(d, 'plain.jsonl')), undefined);
    writeFileSync(join(d, 'train.json.jsonl'), `${JSON.stringify(RECORDS[1])}\n`);
    assert.equal(sidecarSharedWith(join(d, 'train.json')), join(d, 'train.json.jsonl'));
    assert.equal(sidecarSharedWith(join(d, 'train.json.jsonl')), join(d, 'train.json'));
    assert.equal(sidecarSharedWith(join(d, 'data.jsonl')), join(d, 'data'));
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('export: kept lines are copied byte for byte, a line that is not UTF-8 included (and not counted, as the server skips it)', async () => {
  const d = mkdtempSync(join(tmpdir(), 'il-export-bytes-'));
  try {
    const ds = join(d, 'train.jsonl');
    const good = (i: number) => Buffer.from(`${JSON.stringify(RECORDS[i])}\r\n`);
    // {"text":"caf<E9>"}: Latin-1 é, not UTF-8; decoded leniently it would become a valid record
    const latin1 = Buffer.concat([Buffer.from('{"text":"caf'), Buffer.from([0xe9]), Buffer.from('"}\n')]);
    // a stray BOM mid-file (two files concatenated): not JSON to the server either
    const strayBom = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), good(3)]);
    const bytes = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), good(0), latin1, good(1), good(2), strayBom]);
    writeFileSync(ds, bytes);
    await addFlags(sidecarPathFor(ds), [entry(contentHash(RECORDS[1]), 3), entry(contentHash(RECORDS[3]), 5)]);
    const r = exportCleaned(ds);
    assert.equal(r.kept, 2, 'the Latin-1 and stray-BOM lines are not examples');
    assert.equal(loadDataset(ds, { skipMalformed: true }).examples.length, 3, 'the server counts the same lines');
    assert.deepEqual(
      r.removed.map((x) => x.line),
      [3],
    );
    assert.deepEqual(
      readFileSync(r.outPath),
      Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), good(0), latin1, good(2), strayBom]),
    );
    assert.deepEqual(readFileSync(ds), bytes, 'the source is not modified');
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('export: a flags file with lines that are not flags (a merge conflict, a bad hand edit) is refused; nothing written', async () => {
  const d = tmp();
  try {
    const ds = join(d, 'train.jsonl');
    writeFileSync(ds, `${RECORDS.map((r) => JSON.stringify(r)).join('\n')}\n`);
    const e = (i: number) => formatEntry(entry(contentHash(RECORDS[i]), i + 1));
    const sidecar = sidecarPathFor(ds);
    writeFileSync(sidecar, `${e(0)}\n<<<<<<< HEAD\n${e(1)}\n=======\n${e(2)}\n>>>>>>> theirs\n`);
    assert.throws(
      () => exportCleaned(ds),
      /train\.exclude\.jsonl line 2 is not a flag \(a merge conflict marker\), and 2 more line\(s\): resolve the merge conflict/,
    );
    writeFileSync(sidecar, `${e(0)}\n{"hsah": "typo"}\n`);
    assert.throws(() => exportCleaned(ds), /line 2 is not a flag \(no "hash" string\): correct or delete/);
    assert.equal(existsSync(cleanedPathFor(ds)), false);
    // once resolved, it exports
    writeFileSync(sidecar, `${e(0)}\n${e(2)}\n`);
    assert.equal(exportCleaned(ds).removed.length, 2);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test("the sidecar is written through a symbolic link with its mode kept; export replaces a link; killed writers' temporaries are cleared", async () => {
  const d = tmp();
  try {
    // a flags file shared through a link, group-writable
    const shared = join(d, 'shared-flags.jsonl');
    writeFileSync(shared, `${formatEntry(entry('aaaaaaaaaaaaaaaa', 1))}\n`);
    chmodSync(shared, 0o664);
    const link = join(d, 'p.exclude.jsonl');
    symlinkSync('shared-flags.jsonl', link);
    await addFlags(link, [entry('bbbbbbbbbbbbbbbb', 2)]);
    assert.ok(lstatSync(link).isSymbolicLink(), 'the link is kept');
    assert.deepEqual(
      readSidecar(shared).entries.map((e) => e.hash),
      ['aaaaaaaaaaaaaaaa', 'bbbbbbbbbbbbbbbb'],
    );
    assert.equal(statSync(shared).mode & 0o777, 0o664);
    // a writer killed mid-write (its process gone) left its temporaries: the next write removes them
    const pid = Number(spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']).stdout);
    const ds = join(d, 'train.jsonl');
    writeFileSync(ds, `${JSON.stringify(RECORDS[0])}\n${JSON.stringify(RECORDS[1])}\n`);
    await addFlags(sidecarPathFor(ds), [entry(contentHash(RECORDS[0]), 1)]);
    const leftovers = [
      `train.exclude.jsonl.tmp-${pid}-0x1`,
      `shared-flags.jsonl.tmp-${pid}-0x2`,
      `train.cleaned.jsonl.tmp-${pid}-0x3`,
    ];
    for (const f of leftovers) writeFileSync(join(d, f), 'half');
    await removeFlags(sidecarPathFor(ds), ['ffffffffffffffff']); // a write of nothing changed still cleans
    await addFlags(sidecarPathFor(ds), [entry('cccccccccccccccc', 2)]);
    await setReason(link, 'aaaaaaaaaaaaaaaa', 'x');
    // an export over a link (here to another dataset) replaces the link, never the file it points
    // at: "Replace" names the link, and writing through it destroyed another dataset
    mkdirSync(join(d, 'other'));
    writeFileSync(join(d, 'other', 'valid.jsonl'), 'old\n');
    symlinkSync(join(d, 'other', 'valid.jsonl'), cleanedPathFor(ds));
    exportCleaned(ds, undefined, { replace: true });
    assert.ok(!lstatSync(cleanedPathFor(ds)).isSymbolicLink());
    assert.equal(readFileSync(cleanedPathFor(ds), 'utf8'), `${JSON.stringify(RECORDS[1])}\n`);
    assert.equal(readFileSync(join(d, 'other', 'valid.jsonl'), 'utf8'), 'old\n');
    // a folder as the output is refused before anything is written
    assert.throws(
      () => exportCleaned(ds, join(d, 'other'), { replace: true }),
      /is a folder: give the cleaned copy a file name/,
    );
    // a person's own file named like an old temporary is not ours to clean
    writeFileSync(join(d, 'train.exclude.jsonl.tmp-20261205'), 'my backup');
    for (const f of leftovers) assert.equal(existsSync(join(d, f)), false, f);
    await addFlags(sidecarPathFor(ds), [entry('dddddddddddddddd', 2)]);
    assert.equal(readFileSync(join(d, 'train.exclude.jsonl.tmp-20261205'), 'utf8'), 'my backup');
    // a link named like a dataset but pointing at a flags file is refused like the flags file
    symlinkSync('train.exclude.jsonl', join(d, 'out.jsonl'));
    assert.throws(() => exportCleaned(ds, join(d, 'out.jsonl'), { replace: true }), /refusing/);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('apply removal: a file the editor keeps byte for byte passes; one it would rewrite is named', async () => {
  const b = (t: string) => Buffer.from(t, 'utf8');
  // uniform endings, a BOM, no final newline, non-ASCII text: saved as read
  assert.equal(editorRewrites(b('\uFEFFa\r\nb\r\n'), 'a\r\nb\r\n'), undefined);
  assert.equal(editorRewrites(b('café\nb'), 'café\nb'), undefined);
  assert.equal(
    editorRewrites(b('a\r\nb\n'), undefined),
    'mixed line endings (1 CRLF, 1 LF; the editor would save one kind)',
  );
  assert.match(editorRewrites(b('a\rb\n')) ?? '', /carriage returns without a line feed/);
  assert.match(editorRewrites(Buffer.from([0x61, 0xe9, 0x0a])) ?? '', /not UTF-8/);
  // the editor's text differs from the bytes (another encoding setting)
  assert.match(editorRewrites(b('café\n'), 'cafÃ©\n') ?? '', /holds differently/);
});
test('hash: a record keeps the hash it had before (flags written by earlier versions still find their examples)', () => {
  // values from the code before 2026-12-06 (commit 2846630); a change to how records hash would
  // orphan every flag users have written, so it needs a migration, not a silent change
  const pinned: Array<[string, string]> = [
    ['{"score":0.10000000000000001}', '5ad4ab8d7a53f2ab'],
    ['{"x":9223372036854775808}', '5fc714f27e689ba6'],
    ['{"id": 1234567890123456789, "prompt": "a", "completion": "b"}', 'b61bbaa187486ddb'],
    [
      '{"prompt":"order 1234567890123456789","completion":" ok","id":123456789012345,"w":0.30000000000000004}',
      'ff49a7829188e045',
    ],
  ];
  for (const [line, hash] of pinned) assert.equal(lineHash(line), hash, line);
});

// root ignores permissions: the writes then run as `nobody`
const asUser =
  process.getuid?.() === 0 ? ['runuser', '-u', 'nobody', '--', 'env', 'HOME=/tmp', 'TSX_DISABLE_CACHE=1'] : [];
test('a folder this user cannot write: export and flagging name the file and its folder, not a temporary', {
  skip: asUser.length > 0 && !existsSync('/usr/sbin/runuser') && 'runs as root without runuser',
}, () => {
  const d = tmp();
  try {
    const ds = join(d, 'train.jsonl');
    writeFileSync(ds, `${JSON.stringify(RECORDS[0])}\n${JSON.stringify(RECORDS[1])}\n`);
    writeFileSync(sidecarPathFor(ds), `${formatEntry(entry(contentHash(RECORDS[0]), 1))}\n`);
    chmodSync(d, 0o555);
    const node = (...args: string[]) =>
      spawnSync(
        asUser[0] ?? process.execPath,
        [...asUser.slice(1), ...(asUser.length ? [process.execPath] : []), '--import', 'tsx', ...args],
        {
          encoding: 'utf8',
        },
      );
    const exported = node('src/server/cli.ts', 'export', '--data', ds);
    assert.equal(exported.status, 1);
    assert.match(
      exported.stderr,
      new RegExp(`cannot write train\\.cleaned\\.jsonl: its folder ${d} is not writable by this user \\(EACCES\\)`),
    );
    const flag = node(
      '-e',
      `import(${JSON.stringify(join(process.cwd(), 'src/extension/flags/sidecar.ts'))}).then((m) => m.addFlags(${JSON.stringify(sidecarPathFor(ds))}, [{ hash: 'ffffffffffffffff', line: 2, reason: '', score: null, query: '' }])).catch((e) => console.log(e.message))`,
    );
    assert.match(
      flag.stdout,
      new RegExp(`^cannot write train\\.exclude\\.jsonl: its folder ${d} is not writable by this user \\(EACCES\\)`),
    );
    assert.doesNotMatch(exported.stderr + flag.stdout, /\.tmp-|\.lock/);
  } finally {
    chmodSync(d, 0o755);
    rmSync(d, { recursive: true, force: true });
  }
});

test('the cleaned copy is as private as its dataset: a new copy takes its mode, a replaced copy keeps its own', () => {
  const d = tmp();
  const ds = join(d, 'private.jsonl');
  writeFileSync(ds, '{"text": "a"}\n{"text": "b"}\n');
  chmodSync(ds, 0o600);
  const mode = (p: string) => statSync(p).mode & 0o777;
  const out = exportCleaned(ds).outPath;
  assert.equal(mode(out), 0o600, 'a 0600 dataset gets a 0600 copy (it was 0644: readable by every user)');
  chmodSync(out, 0o640);
  exportCleaned(ds, out, { replace: true });
  assert.equal(mode(out), 0o640, 'replacing (--force, "Replace") keeps the mode the person gave the copy');
});

test('a cleaned copy into a folder that does not exist names the folder, not a temporary', () => {
  const d = tmp();
  const ds = join(d, 'train.jsonl');
  writeFileSync(ds, '{"text": "a"}\n');
  assert.throws(
    () => exportCleaned(ds, join(d, 'nodir', 'x.jsonl')),
    (e: Error) =>
      e.message === `cannot write x.jsonl: its folder ${join(d, 'nodir')} does not exist` && !/\.tmp-/.test(e.message),
  );
});

test('export counts records only: JSON values that are not objects (the server reads no example from them) are kept and said apart', async () => {
  const d = tmp();
  try {
    const ds = join(d, 'train.jsonl');
    const lines = [
      JSON.stringify(RECORDS[0]),
      '[1, 2]',
      '',
      JSON.stringify(RECORDS[1]),
      '42',
      JSON.stringify(RECORDS[2]),
    ];
    writeFileSync(ds, `${lines.join('\n')}\n`);
    await addFlags(sidecarPathFor(ds), [entry(contentHash(RECORDS[1]), 4)]);
    const r = exportCleaned(ds);
    assert.equal(r.kept, 2);
    assert.equal(r.other, 2, 'the array and the number; the blank line is not counted');
    assert.equal(loadDataset(ds, { skipMalformed: true }).examples.length, 3, 'the server reads the 3 records');
    const cli = spawnSync(
      process.execPath,
      ['--import', 'tsx', 'src/server/cli.ts', 'export', '--data', ds, '--out', join(d, 'out.jsonl')],
      { encoding: 'utf8' },
    );
    assert.equal(cli.status, 0, cli.stderr);
    assert.match(cli.stdout, /2 examples kept, 1 removed \(and 2 line\(s\) that are not records, kept as they are\)/);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});
