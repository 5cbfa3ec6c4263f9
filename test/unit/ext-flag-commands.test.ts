// The flag commands (flag/unflag a line, export, apply removal) run against a fake `vscode`
// (helpers/vscode-stub.ts): what they act on is the flags file and the dataset as they are on
// disk and in the editor, never a stale copy; what they cannot be sure of they refuse.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, test } from 'node:test';
import { lineHash } from '../../src/extension/flags/hash';
import { addFlags, type FlagEntry, readSidecar, removeFlags, sidecarPathFor } from '../../src/extension/flags/sidecar';
import { fake, globMatches, loadWithVscodeStub, memento, Uri } from './helpers/vscode-stub';

type FlagsModule = typeof import('../../src/extension/commands/flags');
type StoreModule = typeof import('../../src/extension/flags/flag-store');
const { registerFlagCommands } = await loadWithVscodeStub<FlagsModule>(
  new URL('../../src/extension/commands/flags.ts', import.meta.url),
);
const { FlagStore } = await loadWithVscodeStub<StoreModule>(
  new URL('../../src/extension/flags/flag-store.ts', import.meta.url),
);

const rec = (i: number) => JSON.stringify({ prompt: `Q: fact number ${i}?\nA:`, completion: ` ${i}\n` });
const hashOf = (i: number) => lineHash(rec(i)) as string;
const entry = (i: number): FlagEntry => ({ hash: hashOf(i), line: i, reason: 'test', score: null, query: '' });

let dir: string;
let dataset: string;
let store: InstanceType<typeof FlagStore>;
const run = (id: string, ...args: unknown[]) => fake.commands.get(`influenceLens.${id}`)?.(...args);

beforeEach(async () => {
  fake.reset();
  dir = mkdtempSync(join(tmpdir(), 'il-flagcmd-'));
  fake.workspaceFolder = dir;
  dataset = join(dir, 'data.jsonl');
  writeFileSync(dataset, `${[1, 2, 3, 4, 5].map(rec).join('\n')}\n`);
  store = new FlagStore(memento() as never);
  registerFlagCommands({ flags: store, history: { hits: () => [] } } as never);
});
/** What the extension does at start: read the workspace's flags files. */
const startUp = () => store.init();
afterEach(() => rmSync(dir, { recursive: true, force: true }));

test('export and apply removal refuse while the flags file has unsaved edits, saying to save or revert', async () => {
  await addFlags(sidecarPathFor(dataset), [entry(2), entry(3)]);
  await startUp();
  await fake.open(dataset);
  // the person unflags record 2 by deleting its line in the flags file, and does not save
  const sidecarDoc = await fake.open(sidecarPathFor(dataset));
  sidecarDoc.edit((t) => t.split('\n').slice(1).join('\n'));
  await fake.open(dataset);
  await run('exportCleaned');
  assert.equal(existsSync(join(dir, 'data.cleaned.jsonl')), false, 'no copy written');
  assert.match(fake.messages('error').join('\n'), /data\.exclude\.jsonl has unsaved changes: save or revert them/);
  fake.shown = [];
  await run('applyRemoval');
  assert.match(fake.messages('error').join('\n'), /data\.exclude\.jsonl has unsaved changes/);
  const doc = await fake.open(dataset);
  assert.equal(doc.isDirty, false, 'nothing removed from the dataset');
  // flagging is refused too: a later save of that editor would overwrite the new flag
  fake.shown = [];
  await fake.open(dataset, 4);
  await run('flagLine');
  assert.match(fake.messages('error').join('\n'), /unsaved changes/);
  assert.equal(readSidecar(sidecarPathFor(dataset)).entries.length, 2);
});

test('apply removal removes what the flags file on disk flags now, not what the tree showed', async () => {
  const sidecar = sidecarPathFor(dataset);
  await fake.open(dataset, 2);
  await run('flagLine');
  await fake.open(dataset, 3);
  await run('flagLine');
  const [group] = store.all();
  assert.equal(group.entries.length, 2);
  // another window or a script unflags record 3; no watcher event reaches this store
  await removeFlags(sidecar, [hashOf(3)]);
  // from the tree's node (read before the change) and from the palette
  await run('applyRemoval', { kind: 'dataset', group });
  const doc = await fake.open(dataset);
  assert.deepEqual(doc.getText().split('\n'), [rec(1), rec(2), rec(3), rec(5), '']);
  assert.match(fake.messages('info').join('\n'), /removed 1 flagged example/);
  assert.deepEqual(
    store.all()[0].entries.map((e) => e.hash),
    [hashOf(4)],
  );
});

test('export and apply removal refuse a merge-conflicted flags file, naming the line', async () => {
  const sidecar = sidecarPathFor(dataset);
  const e = (i: number) => JSON.stringify(entry(i));
  writeFileSync(sidecar, `${e(1)}\n<<<<<<< HEAD\n${e(2)}\n=======\n${e(3)}\n>>>>>>> other\n`);
  await startUp();
  await fake.open(dataset);
  await run('exportCleaned');
  assert.equal(existsSync(join(dir, 'data.cleaned.jsonl')), false, 'no copy written');
  assert.match(
    fake.messages('error').join('\n'),
    /line 2 is not a flag \(a merge conflict marker\).*resolve the merge conflict/,
  );
  fake.shown = [];
  await run('applyRemoval');
  assert.match(fake.messages('error').join('\n'), /resolve the merge conflict/);
  assert.equal((await fake.open(dataset)).isDirty, false);
});

test("the hover's Flag link acts on the example it showed: refused once another record holds that line", async () => {
  const { JsonlHoverProvider } = await loadWithVscodeStub<typeof import('../../src/extension/hovers/jsonl-hover')>(
    new URL('../../src/extension/hovers/jsonl-hover.ts', import.meta.url),
  );
  const hovers = new JsonlHoverProvider(store, { hits: () => [] } as never);
  const doc = await fake.open(dataset);
  const hover = hovers.provideHover(doc as never, { line: 2, character: 0 } as never);
  assert.ok(hover);
  const link = /command:influenceLens\.flagLine\?([^ )]+)/.exec((hover.contents as unknown as { value: string }).value);
  assert.ok(link, 'a Flag link');
  const args = JSON.parse(decodeURIComponent(link[1])) as unknown[];
  assert.equal(args.at(-1), hashOf(3), 'the link names the example by its hash');
  // the hover stays open while a line is inserted above (a git pull): line 3 now holds record 2
  doc.edit((t) => `${rec(0)}\n${t}`);
  await run('flagLine', ...args);
  assert.match(fake.messages('error').join('\n'), /line 3 of data\.jsonl no longer holds the example the hover showed/);
  assert.deepEqual(readSidecar(sidecarPathFor(dataset)).entries, [], 'record 2 was not flagged');
  // with the line unchanged it flags
  doc.edit((t) => t.slice(t.indexOf('\n') + 1));
  await run('flagLine', ...args);
  assert.deepEqual(
    readSidecar(sidecarPathFor(dataset)).entries.map((e) => e.hash),
    [hashOf(3)],
  );
});

test('Unflag on an edited flagged line says it is not flagged, and offers to unflag its earlier version', async () => {
  const sidecar = sidecarPathFor(dataset);
  const doc = await fake.open(dataset, 4);
  await run('flagLine');
  assert.equal(readSidecar(sidecar).entries.length, 1);
  // the person edits the flagged line (and saves): its content, so its hash, changed
  doc.edit((t) => t.replace(rec(5), rec(5).replace('?', '? (fixed)')));
  fake.shown = [];
  fake.answers = [undefined]; // dismisses the offer
  await run('unflagLine');
  assert.deepEqual(fake.messages('status'), [], 'no "Unflagged line 5"');
  assert.match(
    fake.messages('warning').join('\n'),
    /line 5 of data\.jsonl is not flagged as it is now\. Its earlier content, flagged at line 5 \(hash [0-9a-f]{16}: flagged by hand\), is still flagged/,
  );
  assert.equal(readSidecar(sidecar).entries.length, 1, 'dismissed: nothing changed');
  fake.answers = ['Unflag the earlier version'];
  await run('unflagLine');
  assert.equal(readSidecar(sidecar).entries.length, 0);
  // a line that never was flagged: said so, nothing changed
  fake.shown = [];
  await fake.open(dataset, 0);
  await run('unflagLine');
  assert.deepEqual(fake.messages(), ['Influence Lens: line 1 of data.jsonl is not flagged; nothing was changed.']);
});

test('export and apply removal from a dataset without flags ask which flagged dataset, never pick one silently', async () => {
  await addFlags(sidecarPathFor(dataset), [entry(2)]);
  await startUp();
  const other = join(dir, 'other.jsonl');
  writeFileSync(other, `${rec(7)}\n`);
  await fake.open(other);
  await run('applyRemoval'); // the pick is dismissed
  assert.deepEqual(fake.messages('pick'), ['Remove the flagged examples from which dataset?']);
  assert.equal(fake.shown[0].detail, 'other.jsonl has no flags: pick a flagged dataset, or Escape');
  assert.equal(fake.documents.find((d) => d.uri.fsPath === dataset)?.isDirty ?? false, false);
  await run('exportCleaned');
  assert.equal(existsSync(join(dir, 'data.cleaned.jsonl')), false);
  // picked: it goes ahead on the one chosen
  fake.answers = [(items: Array<{ g: unknown }>) => items[0]];
  await run('exportCleaned');
  assert.equal(existsSync(join(dir, 'data.cleaned.jsonl')), true);
});

test('apply removal refuses a file the editor would save with other bytes (mixed line endings, bad UTF-8), offering Export', async () => {
  const latin1 = Buffer.concat([
    Buffer.from('{"prompt":"caf'),
    Buffer.from([0xe9]),
    Buffer.from('","completion":"x"}\n'),
  ]);
  const cases = [
    {
      name: 'mixed line endings',
      bytes: Buffer.from(`${rec(1)}\r\n${rec(2)}\n${rec(3)}\r\n${rec(4)}\n`),
      why: /mixed line endings \(2 CRLF, 2 LF/,
    },
    {
      name: 'not UTF-8',
      bytes: Buffer.concat([Buffer.from(`${rec(1)}\n`), latin1, Buffer.from(`${rec(4)}\n`)]),
      why: /not UTF-8/,
    },
  ];
  for (const c of cases) {
    fake.reset();
    writeFileSync(dataset, c.bytes);
    rmSync(join(dir, 'data.cleaned.jsonl'), { force: true });
    rmSync(sidecarPathFor(dataset), { force: true });
    await addFlags(sidecarPathFor(dataset), [entry(4)]);
    await startUp();
    await fake.open(dataset);
    await run('applyRemoval');
    assert.match(fake.messages('warning').join('\n'), c.why, c.name);
    assert.match(fake.messages('warning').join('\n'), /Nothing was changed: Export cleaned dataset writes a copy/);
    const doc = await fake.open(dataset);
    assert.equal(doc.isDirty, false, c.name);
    // the offered Export writes the byte-exact copy
    fake.answers = ['Export cleaned dataset'];
    await run('applyRemoval');
    assert.deepEqual(
      readFileSync(join(dir, 'data.cleaned.jsonl')),
      c.bytes.subarray(0, c.bytes.lastIndexOf(rec(4))),
      c.name,
    );
    assert.deepEqual(readFileSync(dataset), c.bytes, 'the dataset is untouched');
  }
});

test('Unflag on an edited line that also moved: says it is not flagged, and lets the person pick the stale flag', async () => {
  const sidecar = sidecarPathFor(dataset);
  const doc = await fake.open(dataset, 4);
  await run('flagLine');
  // two lines inserted above, then the flagged line (now line 7) edited
  doc.edit((t) => `${rec(8)}\n${rec(9)}\n${t.replace(rec(5), rec(5).replace('?', '? (fixed)'))}`);
  await fake.open(dataset, 6);
  fake.shown = [];
  fake.answers = ['Unflag one of them…', (items: Array<{ label: string }>) => items[0]];
  await run('unflagLine');
  assert.deepEqual(fake.messages('status'), []);
  assert.match(
    fake.messages('warning')[0],
    /line 7 of data\.jsonl is not flagged; nothing was changed\. 1 flag\(s\) of data\.jsonl match no line now/,
  );
  assert.equal(fake.messages('pick')[0], 'Unflag which example of data.jsonl (it matches no line now)?');
  assert.equal(readSidecar(sidecar).entries.length, 0);
});

/** The dataset open with line 5 flagged, its Flagged examples view, and the view's redraws counted. */
async function flaggedLine5() {
  const { FlaggedTree } = await loadWithVscodeStub<typeof import('../../src/extension/views/flagged-tree')>(
    new URL('../../src/extension/views/flagged-tree.ts', import.meta.url),
  );
  const doc = await fake.open(dataset, 4);
  await run('flagLine');
  const tree = new FlaggedTree(store);
  const counted = { count: 0 };
  tree.onDidChangeTreeData(() => counted.count++);
  const view = () => {
    const [group] = tree.getChildren();
    const [flag] = tree.getChildren(group);
    return {
      dataset: tree.getTreeItem(group),
      flag: tree.getTreeItem(flag),
      now: flag.kind === 'flag' ? flag.now : undefined,
    };
  };
  return { tree, view, doc, redraws: () => counted.count };
}

test('the Flagged examples view redraws when a flagged dataset is saved or changed on disk', async () => {
  const { tree, view, redraws } = await flaggedLine5();
  const flagNow = () => view().now;
  assert.equal(flagNow()?.line, 5);
  // two lines inserted above it by another program
  writeFileSync(dataset, `${rec(8)}\n${rec(9)}\n${readFileSync(dataset, 'utf8')}`);
  for (const w of fake.watchers) if (globMatches(dataset, w.glob)) w.change.fire({ fsPath: dataset } as never);
  fake.saved.fire({ uri: { fsPath: join(dir, 'unrelated.txt') } } as never);
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(redraws(), 1, 'one redraw for the dataset, none for another file');
  assert.equal(flagNow()?.line, 7);
  // the flagged line edited and saved in the editor: shown as no longer in the file
  writeFileSync(dataset, readFileSync(dataset, 'utf8').replace(rec(5), rec(6)));
  fake.saved.fire({ uri: { fsPath: dataset } } as never);
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(redraws(), 2);
  assert.equal(flagNow(), undefined);
  tree.dispose();
});

test('the Flagged examples view reads a dataset replaced under the same size and mtime (mv + touch -r, rsync -t) again', async () => {
  const { tree, view } = await flaggedLine5();
  assert.equal(view().now?.line, 5);
  // another version of the file, the flagged line edited to one of the same length, renamed over
  // it with the old mtime put back, and no watcher event (a file outside the workspace, or a lag)
  const next = join(dir, 'data.next.jsonl');
  writeFileSync(next, readFileSync(dataset, 'utf8').replace(rec(5), rec(6)));
  execFileSync('touch', ['-r', dataset, next]);
  renameSync(next, dataset);
  assert.equal(view().now, undefined, 'the flagged example is no longer in the file');
  assert.match(String(view().flag.label), /no longer in the file/);
  tree.dispose();
});

test('flags rewritten in place with the same size and mtime (cp -p, rsync -t) and no watcher event are read again', async () => {
  const sidecar = sidecarPathFor(dataset);
  await addFlags(sidecar, [entry(5)]);
  assert.deepEqual([...store.flagsOf(dataset).keys()], [hashOf(5)]);
  const ref = `${sidecar}.ref`;
  execFileSync('cp', ['-p', sidecar, ref]);
  // the same inode, another flag of the same length, the old mtime put back
  writeFileSync(sidecar, readFileSync(sidecar, 'utf8').replace(hashOf(5), hashOf(6)));
  execFileSync('touch', ['-r', ref, sidecar]);
  rmSync(ref);
  assert.deepEqual([...store.flagsOf(dataset).keys()], [hashOf(6)]);
});

test('the Flagged examples view shows the unsaved editor text of a dataset, and the file again once its edits are dropped', async () => {
  const { tree, view, redraws, doc } = await flaggedLine5();
  assert.equal(view().now?.line, 5);
  assert.doesNotMatch(String(view().dataset.description), /unsaved/);
  // two lines typed above it, not saved: the view follows the editor (the file is unchanged)
  const onDisk = readFileSync(dataset, 'utf8');
  doc.edit((t) => `${rec(8)}\n${rec(9)}\n${t}`);
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(redraws(), 1);
  assert.equal(view().now?.line, 7);
  assert.match(String(view().flag.label), /^7: /);
  assert.match(String(view().dataset.description), /1 flagged · as in the unsaved editor/);
  // the flagged line deleted in the editor
  doc.edit((t) => t.replace(`${rec(5)}\n`, ''));
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(view().now, undefined);
  assert.match(String(view().flag.label), /\(not in the unsaved editor text\)/);
  // closed without saving: the file's line again
  doc.close();
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(redraws(), 3);
  assert.equal(readFileSync(dataset, 'utf8'), onDisk);
  assert.equal(view().now?.line, 5);
  assert.doesNotMatch(String(view().dataset.description), /unsaved/);
  tree.dispose();
});

test('a dataset above 50 MB (VS Code gives extensions no text of it): Open finds the example on disk, Apply removal offers Export', async () => {
  // 51 lines of 1 MiB
  const big = (i: number) => JSON.stringify({ prompt: `Q: big ${i}?`, completion: 'x'.repeat(1024 * 1024) });
  writeFileSync(dataset, `${Array.from({ length: 51 }, (_, i) => big(i)).join('\n')}\n`);
  const hash = lineHash(big(40)) as string;
  await addFlags(sidecarPathFor(dataset), [{ hash, line: 38, reason: 'r', score: null, query: '' }]);
  await startUp();
  const [group] = store.all();
  await run('openFlag', { kind: 'flag', group, entry: group.entries[0] });
  assert.deepEqual(fake.messages('error'), []);
  assert.deepEqual(fake.messages('info'), ['The example moved from line 38 to line 41.']);
  const open = fake.executed.find((c) => c.id === 'vscode.open');
  assert.ok(open);
  assert.equal((open.args[1] as { selection: { start: { line: number } } }).selection.start.line, 40);
  fake.shown = [];
  await run('applyRemoval');
  assert.match(
    fake.messages('warning').join('\n'),
    /data\.jsonl is above 50 MB, which VS Code does not let extensions edit\. Nothing was changed/,
  );
  assert.deepEqual(fake.messages('error'), []);
});

test('a dataset renamed in VS Code takes its flags along; never over an existing flags file', async () => {
  await fake.open(dataset, 1);
  await run('flagLine');
  const renamed = join(dir, 'data2.jsonl');
  renameSync(dataset, renamed);
  await store.followRenames([{ oldUri: Uri.file(dataset), newUri: Uri.file(renamed) }] as never);
  assert.equal(existsSync(sidecarPathFor(dataset)), false);
  assert.deepEqual(
    readSidecar(sidecarPathFor(renamed)).entries.map((e) => e.hash),
    [hashOf(2)],
  );
  assert.deepEqual(
    store.all().map((g) => g.dataset),
    [renamed],
  );
  // the new name already has flags: both files stay, and it says so
  const third = join(dir, 'data3.jsonl');
  renameSync(renamed, third);
  writeFileSync(sidecarPathFor(third), `${JSON.stringify(entry(5))}\n`);
  await store.followRenames([{ oldUri: Uri.file(renamed), newUri: Uri.file(third) }] as never);
  assert.match(
    fake.messages('warning').join('\n'),
    /data3\.exclude\.jsonl exists, so the flags of data2\.jsonl stay in data2\.exclude\.jsonl/,
  );
  assert.equal(readSidecar(sidecarPathFor(renamed)).entries.length, 1);
  assert.equal(readSidecar(sidecarPathFor(third)).entries[0].hash, hashOf(5));
});

test("a renamed folder takes no dataset's flags; a linked flags file moves as a link to the same file", async () => {
  await fake.open(dataset, 1);
  await run('flagLine');
  // a folder "data/" beside data.jsonl renamed: one event for the folder, not a dataset's rename
  mkdirSync(join(dir, 'data2'));
  await store.followRenames([{ oldUri: Uri.file(join(dir, 'data')), newUri: Uri.file(join(dir, 'data2')) }] as never);
  assert.equal(readSidecar(sidecarPathFor(dataset)).entries.length, 1, 'data.jsonl keeps its flags');
  assert.equal(existsSync(join(dir, 'data2.exclude.jsonl')), false);
  // flags shared through a relative link, the dataset moved to a subfolder
  mkdirSync(join(dir, 'shared'));
  renameSync(sidecarPathFor(dataset), join(dir, 'shared', 'flags.jsonl'));
  symlinkSync(join('shared', 'flags.jsonl'), sidecarPathFor(dataset));
  mkdirSync(join(dir, 'sub'));
  const moved = join(dir, 'sub', 'data.jsonl');
  renameSync(dataset, moved);
  await store.followRenames([{ oldUri: Uri.file(dataset), newUri: Uri.file(moved) }] as never);
  assert.ok(lstatSync(sidecarPathFor(moved)).isSymbolicLink());
  assert.deepEqual(
    readSidecar(sidecarPathFor(moved)).entries.map((e) => e.hash),
    [hashOf(2)],
  );
  assert.equal(existsSync(sidecarPathFor(dataset)), false);
});

test('apply removal says when identical copies of a flagged line went with it', async () => {
  writeFileSync(dataset, `${rec(1)}\n${rec(2)}\n${rec(2)}\n${rec(3)}\n`);
  const doc = await fake.open(dataset, 1);
  await run('flagLine');
  fake.shown = [];
  await run('applyRemoval');
  assert.match(
    fake.messages('info')[0],
    /removed 2 flagged example\(s\) from data\.jsonl \(1 flagged; identical copies go with them\)/,
  );
  assert.equal(doc.getText(), `${rec(1)}\n${rec(3)}\n`);
});

test('the Flagged examples view says when a flagged dataset is missing (renamed outside VS Code?)', async () => {
  const { FlaggedTree } = await loadWithVscodeStub<typeof import('../../src/extension/views/flagged-tree')>(
    new URL('../../src/extension/views/flagged-tree.ts', import.meta.url),
  );
  await fake.open(dataset, 1);
  await run('flagLine');
  renameSync(dataset, join(dir, 'data2.jsonl')); // git mv
  const tree = new FlaggedTree(store);
  const [group] = tree.getChildren();
  const item = tree.getTreeItem(group);
  assert.equal(item.description, '1 flagged · dataset missing (renamed or deleted?)');
  assert.match(String((item.tooltip as { value: string }).value), /rename `data\.exclude\.jsonl` to match/);
  assert.match(String(tree.getTreeItem(tree.getChildren(group)[0]).label), /^2: \(dataset missing\)$/);
  tree.dispose();
});

test('a line the server refuses (a stray BOM from concatenated files) offers no flag, and flagging it says why', async () => {
  const { JsonlHoverProvider } = await loadWithVscodeStub<typeof import('../../src/extension/hovers/jsonl-hover')>(
    new URL('../../src/extension/hovers/jsonl-hover.ts', import.meta.url),
  );
  // the first line's BOM is the file's: that line is a record like any other
  writeFileSync(dataset, `\uFEFF${rec(1)}\n\uFEFF${rec(2)}\n${rec(3)}\n`);
  const hovers = new JsonlHoverProvider(store, { hits: () => [] } as never);
  const doc = await fake.open(dataset);
  const at = (line: number) => hovers.provideHover(doc as never, { line, character: 0 } as never);
  assert.ok(at(0), 'line 1 (the BOM at the start of the file) has a hover');
  assert.equal(at(1), undefined, 'line 2 (a stray BOM) has none');
  await run('flagLine', doc.uri.toString(), 1);
  assert.match(
    fake.messages('error').join('\n'),
    /line 2 is not a JSON record \(invalid JSON: .*byte order mark.*\); the server skips it too/,
  );
  assert.deepEqual(readSidecar(sidecarPathFor(dataset)).entries, []);
  await run('flagLine', doc.uri.toString(), 0);
  assert.deepEqual(
    readSidecar(sidecarPathFor(dataset)).entries.map((e) => e.hash),
    [hashOf(1)],
  );
});

test('a ranking from before the dataset file changed (same size and mtime too) is said to be so in the hover', async () => {
  const { History, DATASET_STALE_NOTE } = await import('../../src/extension/history');
  const { JsonlHoverProvider } = await loadWithVscodeStub<typeof import('../../src/extension/hovers/jsonl-hover')>(
    new URL('../../src/extension/hovers/jsonl-hover.ts', import.meta.url),
  );
  const history = new History(memento() as never);
  const hovers = new JsonlHoverProvider(store, history);
  const doc = await fake.open(dataset);
  const text = () =>
    (hovers.provideHover(doc as never, { line: 2, character: 0 } as never)!.contents as unknown as { value: string })
      .value;
  history.add(
    'data',
    {
      query: { prompt: 'Q: x?\nA:', completion: ' Sydney' },
      method: 'ekfac',
      supporting: [
        { id: { dataset: 'data', line: 3, hash: hashOf(3) }, rank: 1, score: 9, sign: 'supporting', percentile: 99 },
      ],
      opposing: [],
      revision: 'rev-a',
    } as never,
    dataset,
  );
  history.noteRevision('rev-a');
  assert.match(text(), /supporting\*\* #1 for “Sydney” \(EK-FAC, [^)]*\)\n/);
  assert.doesNotMatch(text(), /before the/);
  // another line rewritten at the same length, the mtime put back (touch -r): ranks may have moved
  const before = statSync(dataset);
  writeFileSync(dataset, readFileSync(dataset, 'utf8').replace(rec(5), rec(5).replace(/5/g, '6')));
  utimesSync(dataset, before.atime, before.mtime);
  assert.equal(statSync(dataset).size, before.size);
  assert.match(text(), new RegExp(`#1 for “Sydney” \\(EK-FAC, [^)]*\\) · \\*${DATASET_STALE_NOTE}\\*`));
});

test('a ranking from before a retrain or refit is said to be so, in the hover and in the flag reason', async () => {
  const { History } = await import('../../src/extension/history');
  const { JsonlHoverProvider } = await loadWithVscodeStub<typeof import('../../src/extension/hovers/jsonl-hover')>(
    new URL('../../src/extension/hovers/jsonl-hover.ts', import.meta.url),
  );
  const history = new History(memento() as never);
  const example = (i: number, rank: number) => ({
    id: { dataset: 'data', line: i, hash: hashOf(i) },
    rank,
    score: 10 - rank,
    sign: 'supporting',
    percentile: 99,
  });
  const result = (revision: string, completion: string) =>
    ({
      query: { prompt: 'Q: x?\nA:', completion },
      method: 'ekfac',
      supporting: [example(3, 1)],
      opposing: [],
      revision,
    }) as never;
  registerFlagCommands({ flags: store, history } as never);
  const hovers = new JsonlHoverProvider(store, history);
  const doc = await fake.open(dataset);
  const text = () => {
    const hover = hovers.provideHover(doc as never, { line: 2, character: 0 } as never);
    assert.ok(hover);
    return (hover.contents as unknown as { value: string }).value;
  };
  history.add('data', result('rev-a', ' Sydney'));
  assert.match(text(), /supporting\*\* #1 for “Sydney” \(EK-FAC, [^)]*\)\n/);
  assert.doesNotMatch(text(), /before the model/);
  // the server reports other files (a retrain): the same entry is now an earlier model's ranking
  history.noteRevision('rev-b');
  assert.match(
    text(),
    /#1 for “Sydney” \(EK-FAC, [^)]*\) · \*before the model, its factors or the settings last changed\*/,
  );
  await fake.open(dataset, 2);
  await run('flagLine');
  const [flag] = readSidecar(sidecarPathFor(dataset)).entries;
  assert.equal(
    flag.reason,
    'supporting #1 for "Sydney" (EK-FAC, before the model, its factors or the settings last changed)',
  );
  // a ranking by the current model is preferred for the reason
  await run('unflagLine');
  history.add('data', result('rev-b', ' Perth'));
  await run('flagLine');
  assert.equal(readSidecar(sidecarPathFor(dataset)).entries[0].reason, 'supporting #1 for "Perth" (EK-FAC)');
});

test('a ranking is shown on the file it ranked, not on an identical line of another file (a cleaned copy)', async () => {
  const { History } = await import('../../src/extension/history');
  const { JsonlHoverProvider } = await loadWithVscodeStub<typeof import('../../src/extension/hovers/jsonl-hover')>(
    new URL('../../src/extension/hovers/jsonl-hover.ts', import.meta.url),
  );
  const history = new History(memento() as never);
  history.add(
    'data',
    {
      query: { prompt: 'Q: x?\nA:', completion: ' Sydney' },
      method: 'ekfac',
      supporting: [
        { id: { dataset: 'data', line: 3, hash: hashOf(3) }, rank: 1, score: 9, sign: 'supporting', percentile: 99 },
      ],
      opposing: [],
      revision: 'r',
    } as never,
    // as the server's configured path may spell it: through a link, with a "./"
    (() => {
      const link = join(dir, 'link');
      symlinkSync(dir, link);
      return `${link}/./data.jsonl`;
    })(),
  );
  const copy = join(dir, 'data.cleaned.jsonl');
  writeFileSync(copy, readFileSync(dataset));
  const hovers = new JsonlHoverProvider(store, history);
  const text = async (path: string) => {
    const hover = hovers.provideHover((await fake.open(path)) as never, { line: 2, character: 0 } as never);
    assert.ok(hover);
    return (hover.contents as unknown as { value: string }).value;
  };
  assert.match(await text(dataset), /supporting\*\* #1 for “Sydney”/);
  assert.match(await text(copy), /Not among the examples of a recent explanation/);
  // and a flag there gets no reason from the other file's ranking
  registerFlagCommands({ flags: store, history } as never);
  await fake.open(copy, 2);
  await run('flagLine');
  assert.equal(readSidecar(sidecarPathFor(copy)).entries[0].reason, 'flagged by hand');
});
