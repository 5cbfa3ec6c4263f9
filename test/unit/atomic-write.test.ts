// The one atomic-write helper: a process killed at any moment of a write leaves the old file (or
// folder) or the new one, never a torn one; its temporaries are removed once it is gone, and only
// ours (name pattern + a pid that no longer runs).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  cpSync,
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
import { after, test } from 'node:test';
import {
  cleanStaleTemps,
  cleanStaleTempsOf,
  processAlive,
  processStart,
  replaceDirAtomic,
  restoreReplacedDir,
  tempPathFor,
  writeFileAtomic,
} from '../../src/common/atomic-write';
import { openRegularFile } from '../../src/common/read-file';
import { physicalPath } from '../../src/common/real-path';
import { loadFactors } from '../../src/server/attribution/ekfac/factors-io';
import { openCheckpoint } from '../../src/server/model/checkpoint';
import { loadTokenizer } from '../../src/server/model/tokenizer';
import { InfluenceService } from '../../src/server/service/influence-service';
import { useTempHome } from './helpers/env';

useTempHome();

const root = mkdtempSync(join(tmpdir(), 'il-atomic-'));
after(() => rmSync(root, { recursive: true, force: true }));
const WRITER = join(import.meta.dirname, 'helpers', 'atomic-writer.ts');

/** the id of a process that has exited */
function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
  const pid = Number(r.stdout.toString());
  assert.ok(!processAlive(pid));
  return pid;
}

function assertWhole(file: string, bytes: number) {
  const b = readFileSync(file);
  assert.equal(b.length, bytes, `${file} is torn`);
  assert.ok(
    b.every((x) => x === b[0]),
    `${file} mixes two versions`,
  );
}

test('writeFileAtomic: replaces the file; a failing write keeps the old one and leaves nothing', () => {
  const d = join(root, 'basic');
  mkdirSync(d);
  const p = join(d, 'f.json');
  writeFileSync(p, 'old');
  writeFileAtomic(p, 'new');
  assert.equal(readFileSync(p, 'utf8'), 'new');
  assert.throws(
    () => writeFileAtomic(join(d, 'missing', 'f.json'), 'x'),
    (e: NodeJS.ErrnoException) =>
      e.code === 'ENOENT' && e.message === `cannot write f.json: its folder ${join(d, 'missing')} does not exist`,
  );
  assert.throws(() =>
    replaceDirAtomic(join(d, 'dir'), () => {
      throw new Error('disk full');
    }),
  );
  assert.deepEqual(readdirSync(d), ['f.json']);
});

for (const kind of ['file', 'dir'] as const) {
  test(`kill -9 in the middle of writing a ${kind}: the old or the new one, then the leftovers are cleaned`, async () => {
    const d = join(root, `kill-${kind}`);
    mkdirSync(d);
    const target = join(d, kind === 'file' ? 'factors.safetensors' : 'stage');
    const bytes = 8 << 20;
    let leftovers = 0;
    // at least 3 rounds, and until one kill landed mid-write (so the cleanup is exercised)
    for (let round = 0; round < 3 || (leftovers === 0 && round < 12); round++) {
      const child = spawn(process.execPath, ['--import', 'tsx', WRITER, kind, target, String(bytes)], {
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      const exited = new Promise((resolve) => child.on('exit', resolve));
      // let it finish a couple of writes, then kill it at a moment that varies per round
      await new Promise<void>((resolve) =>
        child.stdout.on('data', (b: Buffer) => {
          if (/wrote 2\n/.test(b.toString())) resolve();
        }),
      );
      await new Promise((r) => setTimeout(r, 7 * round));
      child.kill('SIGKILL');
      await exited;
      // what every reader of a replaced folder does first (openCheckpoint, loadFactors)
      if (kind === 'dir') restoreReplacedDir(target);
      if (kind === 'file') assertWhole(target, bytes);
      else for (const f of ['a.bin', 'b.bin']) assertWhole(join(target, f), bytes);
      if (kind === 'dir') {
        const a = readFileSync(join(target, 'a.bin'))[0];
        assert.equal(readFileSync(join(target, 'b.bin'))[0], a, 'both files are of one version');
      }
      // the next start removes what the killed process left, and only that
      leftovers += cleanStaleTemps(d).length;
      assert.deepEqual(readdirSync(d), [kind === 'file' ? 'factors.safetensors' : 'stage']);
    }
    assert.ok(leftovers > 0, 'some kill landed in the middle of a write');
  });
}

test('a folder replace killed between its two renames: readers and the cleanup put the old folder back', () => {
  const d = join(root, 'between');
  const dead = deadPid();
  const target = join(d, 'checkpoint');
  const setAside = () => {
    mkdirSync(join(d, `checkpoint.old-${dead}-0x2`), { recursive: true });
    writeFileSync(join(d, `checkpoint.old-${dead}-0x2`, 'model.safetensors'), 'old');
    mkdirSync(join(d, `checkpoint.tmp-${dead}-0x1`));
    writeFileSync(join(d, `checkpoint.tmp-${dead}-0x1`, 'model.safetensors'), 'new');
  };
  // a reader finds the folder missing and its old version set aside by a dead writer
  setAside();
  assert.equal(restoreReplacedDir(target), true);
  assert.equal(readFileSync(join(target, 'model.safetensors'), 'utf8'), 'old');
  assert.equal(restoreReplacedDir(target), false, 'nothing to do once it is back');
  cleanStaleTemps(d);
  assert.deepEqual(readdirSync(d), ['checkpoint']);
  // the cleanup at a server's start does the same
  rmSync(target, { recursive: true });
  setAside();
  cleanStaleTemps(d);
  assert.deepEqual(readdirSync(d), ['checkpoint']);
  assert.equal(readFileSync(join(target, 'model.safetensors'), 'utf8'), 'old');
  // a set-aside copy beside a folder that is in place is the old version: removed, the new one stays
  mkdirSync(join(d, `checkpoint.old-${dead}-0x3`));
  cleanStaleTemps(d);
  assert.deepEqual(readdirSync(d), ['checkpoint']);
  // a live writer's set-aside copy is never touched (it is about to rename the new one in)
  rmSync(target, { recursive: true });
  mkdirSync(join(d, `checkpoint.old-${process.pid}-0x4`));
  assert.equal(restoreReplacedDir(target), false);
  assert.deepEqual(cleanStaleTemps(d), []);
  assert.deepEqual(readdirSync(d), [`checkpoint.old-${process.pid}-0x4`]);
  // a user's own backup named like ours but without our tail is never touched
  mkdirSync(join(d, 'checkpoint.old-2024'));
  assert.deepEqual(cleanStaleTemps(d), []);
  rmSync(join(d, 'checkpoint.old-2024'), { recursive: true });
  // and a later replace by this process (not killed) still lands whole
  rmSync(join(d, `checkpoint.old-${process.pid}-0x4`), { recursive: true });
  replaceDirAtomic(target, (tmp) => writeFileSync(join(tmp, 'model.safetensors'), 'v2'));
  replaceDirAtomic(target, (tmp) => writeFileSync(join(tmp, 'model.safetensors'), 'v3'));
  assert.deepEqual(readdirSync(d), ['checkpoint']);
  assert.equal(readFileSync(join(target, 'model.safetensors'), 'utf8'), 'v3');
});

test('a folder named by a symbolic link is replaced through it, and put back through it after a kill between the renames', () => {
  const d = join(root, 'linked');
  const disk = join(d, 'disk');
  mkdirSync(disk, { recursive: true });
  const target = join(disk, 'checkpoint');
  const link = join(d, 'out');
  symlinkSync(target, link);
  replaceDirAtomic(link, (tmp) => writeFileSync(join(tmp, 'model.safetensors'), 'v1'));
  replaceDirAtomic(link, (tmp) => writeFileSync(join(tmp, 'model.safetensors'), 'v2'));
  assert.ok(lstatSync(link).isSymbolicLink(), 'the link stays a link');
  assert.equal(readFileSync(join(target, 'model.safetensors'), 'utf8'), 'v2');
  assert.deepEqual(readdirSync(disk), ['checkpoint']);
  assert.deepEqual(readdirSync(d).sort(), ['disk', 'out']);
  // a writer killed between its two renames set the linked folder aside: a reader that names the
  // link puts it back
  const dead = deadPid();
  cpSync(target, join(disk, `checkpoint.old-${dead}-0x2`), { recursive: true });
  rmSync(target, { recursive: true });
  assert.equal(restoreReplacedDir(link), true);
  assert.equal(readFileSync(join(link, 'model.safetensors'), 'utf8'), 'v2');
  assert.deepEqual(readdirSync(disk), ['checkpoint']);
});

test('a linked folder reached through a linked parent, its target relative: replaced where the system resolves it', () => {
  const d = join(root, 'linked-parent');
  mkdirSync(join(d, 'disk', 'proj'), { recursive: true });
  mkdirSync(join(d, 'disk', 'data', 'out'), { recursive: true });
  writeFileSync(join(d, 'disk', 'data', 'out', 'old.txt'), 'old');
  symlinkSync(join(d, 'disk', 'proj'), join(d, 'projlink')); // projlink -> disk/proj
  symlinkSync('../data/out', join(d, 'disk', 'proj', 'out')); // disk/proj/out -> ../data/out
  const out = join(d, 'projlink', 'out');
  replaceDirAtomic(out, (tmp) => writeFileSync(join(tmp, 'new.txt'), 'new'));
  assert.deepEqual(
    readdirSync(join(d, 'disk', 'data', 'out')),
    ['new.txt'],
    'the folder the system resolves is replaced',
  );
  assert.equal(existsSync(join(d, 'data')), false, 'nothing written where a textual ../ points');
  assert.ok(lstatSync(join(d, 'disk', 'proj', 'out')).isSymbolicLink());
});

test('`..` after a linked folder is read as the system reads it: writes land where the checks looked, never on the textual sibling', () => {
  // d/par -> d/deep/real; the system reads d/par/../x as d/deep/x, path.resolve as d/x
  const d = join(root, 'dotdot');
  mkdirSync(join(d, 'deep', 'real'), { recursive: true });
  mkdirSync(join(d, 'victim'));
  writeFileSync(join(d, 'victim', 'thesis.txt'), 'mine');
  writeFileSync(join(d, 'notes.txt'), 'mine too');
  symlinkSync(join(d, 'deep', 'real'), join(d, 'par'));
  assert.equal(physicalPath(`${d}/par/../victim`), join(d, 'deep', 'victim'));
  assert.equal(physicalPath(`${d}/par/..`), join(d, 'deep'));
  assert.equal(physicalPath(`${d}/par/./x/`), join(d, 'deep', 'real', 'x'));
  assert.equal(physicalPath(`${d}/absent/../y`), join(d, 'y'), 'past a missing name the text is kept');
  // a folder replace and a file write through such a path
  replaceDirAtomic(`${d}/par/../victim`, (tmp) => writeFileSync(join(tmp, 'tokenizer.json'), '{}'));
  writeFileAtomic(`${d}/par/../notes.txt`, 'new');
  assert.deepEqual(readdirSync(join(d, 'victim')), ['thesis.txt']);
  assert.equal(readFileSync(join(d, 'notes.txt'), 'utf8'), 'mine too');
  assert.deepEqual(readdirSync(join(d, 'deep', 'victim')), ['tokenizer.json']);
  assert.equal(readFileSync(join(d, 'deep', 'notes.txt'), 'utf8'), 'new');
});

test("the leftovers cleaned beside an output are only this version's full temporary names: a user's corpus.tmp-20240101 stays", () => {
  const d = join(root, 'user-tmp');
  mkdirSync(join(d, 'corpus.tmp-20240101'), { recursive: true });
  writeFileSync(join(d, 'corpus.tmp-20240101', 'edited.jsonl'), 'mine');
  const dead = deadPid();
  mkdirSync(join(d, `corpus.tmp-${dead}-0x1`));
  assert.deepEqual(cleanStaleTempsOf(join(d, 'corpus')), [join(d, `corpus.tmp-${dead}-0x1`)]);
  assert.deepEqual(readdirSync(d), ['corpus.tmp-20240101']);
});

test('a data file and a tokenizer in a folder a killed replace left set aside are put back by their readers', () => {
  const d = join(root, 'readers-data');
  mkdirSync(d);
  const dead = deadPid();
  mkdirSync(join(d, `corpus.old-${dead}-0x1`));
  writeFileSync(join(d, `corpus.old-${dead}-0x1`, 'train.jsonl'), '{"text": "a"}\n');
  const fd = openRegularFile(join(d, 'corpus', 'train.jsonl'), (what) => new Error(what));
  closeSync(fd);
  cpSync('test/fixtures/models/llama', join(d, `tok.old-${dead}-0x2`), { recursive: true });
  assert.ok(loadTokenizer(join(d, 'tok')));
  assert.deepEqual(readdirSync(d).sort(), ['corpus', 'tok']);
  // a tokenizer inside a corpus folder set aside whole: the corpus is put back
  mkdirSync(join(d, `built.old-${dead}-0x3`));
  cpSync('test/fixtures/models/llama', join(d, `built.old-${dead}-0x3`, 'tokenizer'), { recursive: true });
  assert.ok(loadTokenizer(join(d, 'built', 'tokenizer')));
  assert.deepEqual(readdirSync(d).sort(), ['built', 'corpus', 'tok']);
});

test('a folder set aside by a killed writer whose pid this process now has (a restarted container) is put back', {
  skip: processStart(process.pid) === undefined ? 'needs /proc' : false,
}, () => {
  const d = join(root, 'reused-pid');
  mkdirSync(d);
  const target = join(d, 'model');
  // our own name for it, with the former process's start time: same pid and host, another start
  const mine = tempPathFor(target, 'old');
  const former = mine.replace(/-s(\d+)$/, (_, t: string) => `-s${Number(t) - 1000}`);
  assert.notEqual(former, mine);
  mkdirSync(former);
  writeFileSync(join(former, 'model.safetensors'), 'old');
  assert.equal(restoreReplacedDir(target), true, 'the former process is gone although its pid is ours');
  assert.equal(readFileSync(join(target, 'model.safetensors'), 'utf8'), 'old');
  // a temporary this very process is writing is left alone
  rmSync(target, { recursive: true });
  mkdirSync(mine);
  assert.equal(restoreReplacedDir(target), false);
  assert.deepEqual(cleanStaleTemps(d), []);
});

test('openCheckpoint and loadFactors put back a folder a killed replace left set aside', () => {
  const d = join(root, 'readers');
  mkdirSync(d);
  const dead = deadPid();
  cpSync('test/fixtures/models/llama', join(d, `model.old-${dead}-0x1`), { recursive: true });
  assert.equal(openCheckpoint(join(d, 'model')).modelType, 'llama');
  assert.deepEqual(readdirSync(d), ['model']);
  cpSync('test/fixtures/kronfluence/ours-llama-fp32/factors', join(d, `factors.old-${dead}-0x2`), { recursive: true });
  assert.ok(Object.keys(loadFactors(join(d, 'factors')).modules).length > 0);
  assert.deepEqual(readdirSync(d).sort(), ['factors', 'model']);
  // a model inside a folder set aside whole (a train --out holding its checkpoints)
  mkdirSync(join(d, `run.old-${dead}-0x3`));
  cpSync('test/fixtures/models/llama', join(d, `run.old-${dead}-0x3`, 'checkpoint-1'), { recursive: true });
  assert.equal(openCheckpoint(join(d, 'run', 'checkpoint-1')).modelType, 'llama');
  assert.deepEqual(readdirSync(d).sort(), ['factors', 'model', 'run']);
});

test('cleanStaleTemps: only our names, only dead pids, nested folders, never through links', () => {
  const d = join(root, 'clean');
  const dead = deadPid();
  mkdirSync(join(d, 'partials', `cov-0.tmp-${dead}`), { recursive: true });
  writeFileSync(join(d, 'partials', `cov-0.tmp-${dead}`, 'x.safetensors'), 'x');
  writeFileSync(join(d, `lambda.safetensors.tmp-${dead}`), 'x');
  writeFileSync(join(d, `eigen.safetensors.tmp-${dead}-0x3`), 'x');
  writeFileSync(join(d, `mine.tmp-${process.pid}-0x1`), 'x'); // a live process's write in progress
  writeFileSync(join(d, 'notes.tmp'), 'x'); // not ours
  writeFileSync(join(d, 'data.tmp-abc'), 'x'); // not ours
  const removed = cleanStaleTemps(d)
    .map((p) => p.slice(d.length + 1))
    .sort();
  assert.deepEqual(removed, [
    `eigen.safetensors.tmp-${dead}-0x3`,
    `lambda.safetensors.tmp-${dead}`,
    join('partials', `cov-0.tmp-${dead}`),
  ]);
  assert.ok(existsSync(join(d, `mine.tmp-${process.pid}-0x1`)));
  assert.ok(existsSync(join(d, 'notes.tmp')) && existsSync(join(d, 'data.tmp-abc')));
  assert.deepEqual(cleanStaleTemps(join(d, 'absent')), []);
});

test('cleanStaleTemps and restoreReplacedDir never judge the writes of another host sharing the folder by its pid', () => {
  const d = join(root, 'shared');
  mkdirSync(d);
  // a stage being written, and a folder set aside mid-replace, by a process of another machine
  // (a fit partition there): its pid means nothing here; then the same by a process of this host
  const write = (host?: string) => {
    const code = [
      "import { stageDir, tempPathFor } from './src/common/atomic-write';",
      "import { mkdirSync } from 'node:fs';",
      `const t = stageDir(${JSON.stringify(join(d, `stage-${host ?? 'here'}`))});`,
      `mkdirSync(tempPathFor(${JSON.stringify(join(d, `eigen-${host ?? 'here'}`))}, 'old'));`,
      'console.log(t);',
    ].join('\n');
    const r = spawnSync(
      process.execPath,
      [
        '--import',
        'tsx',
        ...(host ? ['--import', './test/unit/helpers/other-host.mjs'] : []),
        '--input-type=module',
        '-e',
        code,
      ],
      { encoding: 'utf8', env: { ...process.env, OTHER_HOST: host } },
    );
    assert.equal(r.status, 0, r.stderr);
  };
  write('machine-b');
  write();
  // the writers have exited: here both pids are gone
  assert.equal(restoreReplacedDir(join(d, 'eigen-machine-b')), false);
  assert.equal(restoreReplacedDir(join(d, 'eigen-here')), true);
  cleanStaleTemps(d);
  const left = readdirSync(d).sort();
  assert.ok(
    left.some((n) => n.startsWith('stage-machine-b.tmp-')),
    `another host's stage is kept: ${left}`,
  );
  assert.ok(
    left.some((n) => n.startsWith('eigen-machine-b.old-')),
    `another host's set-aside folder is kept: ${left}`,
  );
  assert.ok(!left.some((n) => n.startsWith('stage-here.tmp-')), `this host's leftover is removed: ${left}`);
  assert.ok(left.includes('eigen-here'), `this host's set-aside folder is put back: ${left}`);
});

test('the server cleans what a killed fit or server left in its factors and cache folders when it starts', () => {
  const factors = join(root, 'factors');
  const cacheDir = join(root, 'cache');
  const dead = deadPid();
  const left = [
    join(factors, `lambda.safetensors.tmp-${dead}`),
    join(factors, 'partials', `cov-0.tmp-${dead}-0x1`, 'x.safetensors'),
    join(cacheDir, 'stores', 'train-abc', `store.safetensors.tmp-${dead}-0x2`),
  ];
  for (const f of left) {
    mkdirSync(join(f, '..'), { recursive: true });
    writeFileSync(f, 'partial');
  }
  const data = join(root, 'train.jsonl');
  writeFileSync(data, '{"text": "Paris is in France."}\n');
  new InfluenceService({
    finetuned: { model: 'test/fixtures/models/llama', factors },
    datasets: { train: data },
    modules: 'mlp',
    cacheDir,
  }).open();
  assert.deepEqual(readdirSync(factors).sort(), ['partials']);
  assert.deepEqual(readdirSync(join(factors, 'partials')), []);
  assert.deepEqual(readdirSync(join(cacheDir, 'stores', 'train-abc')), []);
});

test('a cache write over a symbolic link replaces the link (only a userFile write goes through it, keeping its mode)', () => {
  const d = mkdtempSync(join(tmpdir(), 'atomic-link-'));
  try {
    const theirs = join(d, 'theirs.json');
    writeFileSync(theirs, 'theirs');
    chmodSync(theirs, 0o640);
    symlinkSync(theirs, join(d, 'cache.json'));
    writeFileAtomic(join(d, 'cache.json'), 'ours');
    assert.ok(!lstatSync(join(d, 'cache.json')).isSymbolicLink());
    assert.equal(readFileSync(theirs, 'utf8'), 'theirs', 'the linked file is untouched');
    symlinkSync(theirs, join(d, 'flags.jsonl'));
    writeFileAtomic(join(d, 'flags.jsonl'), 'flags', { userFile: true });
    assert.ok(lstatSync(join(d, 'flags.jsonl')).isSymbolicLink());
    assert.equal(readFileSync(theirs, 'utf8'), 'flags');
    assert.equal(statSync(theirs).mode & 0o777, 0o640);
    // a file its owner may write but not read (0200) is still replaced: the flush reads the
    // temporary before it takes that mode
    const writeOnly = join(d, 'w.jsonl');
    writeFileSync(writeOnly, 'x');
    chmodSync(writeOnly, 0o200);
    writeFileAtomic(writeOnly, 'y', { userFile: true });
    assert.equal(statSync(writeOnly).mode & 0o777, 0o200);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});
