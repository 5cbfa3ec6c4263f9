// Two processes changing one flags sidecar at once (two editor windows on one dataset): every
// change survives, none is duplicated, and a writer killed mid-way (even while holding the lock)
// leaves a valid file that the other one finishes.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { addFlags, lockWaitMs, readSidecar } from '../../src/extension/flags/sidecar';

const dir = mkdtempSync(join(tmpdir(), 'il-sidecar-lock-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const WRITER = join(import.meta.dirname, 'helpers', 'flag-writer.ts');
const N = 200;
const hashOf = (prefix: string, i: number) => `${prefix}${String(i).padStart(15, '0')}`.slice(0, 16);

interface Writer {
  child: ChildProcess;
  /** how many changes have returned */
  done: () => number;
  stderr: () => string;
  exit: Promise<number | null>;
  /** resolves once the child printed this line */
  saw: (line: string) => Promise<void>;
}

function writer(path: string, mode: string, prefix: string, n = N, env: Record<string, string> = {}): Writer {
  const child = spawn(process.execPath, ['--import', 'tsx', WRITER, path, mode, prefix, String(n)], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => {
    err += b.toString();
  });
  let out = '';
  let done = 0;
  const waiters: Array<{ line: string; resolve: () => void }> = [];
  child.stdout!.on('data', (b: Buffer) => {
    out += b.toString();
    done = (out.match(/^done /gm) ?? []).length;
    for (const w of waiters) if (out.includes(`${w.line}\n`)) w.resolve();
  });
  return {
    child,
    stderr: () => err,
    done: () => done,
    exit: new Promise((resolve) => child.on('exit', (code) => resolve(code))),
    saw: (line) => new Promise((resolve) => waiters.push({ line, resolve })),
  };
}

const hashes = (path: string) => readSidecar(path).entries.map((e) => e.hash);

test('two processes adding 200 flags each: all 400 present, none duplicated', async () => {
  const p = join(dir, 'add.exclude.jsonl');
  const [a, b] = [writer(p, 'add', 'a'), writer(p, 'add', 'b')];
  assert.deepEqual(await Promise.all([a.exit, b.exit]), [0, 0]);
  const s = readSidecar(p);
  assert.equal(s.problems.length, 0);
  assert.equal(s.entries.length, 2 * N);
  assert.equal(new Set(hashes(p)).size, 2 * N);
  for (let i = 0; i < N; i++) assert.ok(hashes(p).includes(hashOf('a', i)) && hashes(p).includes(hashOf('b', i)));
  assert.ok(!existsSync(`${p}.lock`), 'the lock is released');
});

test('one process editing reasons while another removes flags: both sets of changes survive', async () => {
  const p = join(dir, 'edit.exclude.jsonl');
  for (const prefix of ['a', 'b'])
    await addFlags(
      p,
      Array.from({ length: N }, (_, i) => ({
        hash: hashOf(prefix, i),
        line: i + 1,
        reason: '',
        score: null,
        query: '',
      })),
    );
  const [a, b] = [writer(p, 'reason', 'a'), writer(p, 'remove', 'b')];
  assert.deepEqual(await Promise.all([a.exit, b.exit]), [0, 0]);
  const s = readSidecar(p);
  assert.equal(s.problems.length, 0);
  assert.deepEqual(
    s.entries.map((e) => e.hash),
    Array.from({ length: N }, (_, i) => hashOf('a', i)),
  );
  assert.ok(s.entries.every((e) => e.reason === 'edited by a'));
  // and both removing at once empties it
  const [c, d] = [writer(p, 'remove', 'a', N / 2), writer(p, 'remove', 'a', N)];
  assert.deepEqual(await Promise.all([c.exit, d.exit]), [0, 0]);
  assert.ok(!existsSync(p), 'the last flag removed: the file goes');
});

test('a writer killed mid-way leaves a valid file; the other finishes', async () => {
  const p = join(dir, 'kill.exclude.jsonl');
  const [a, b] = [writer(p, 'add', 'a'), writer(p, 'add', 'b')];
  await a.saw('done 40');
  a.child.kill('SIGKILL');
  await a.exit;
  const returned = a.done();
  assert.equal(await b.exit, 0);
  const s = readSidecar(p);
  assert.equal(s.problems.length, 0);
  const have = new Set(hashes(p));
  assert.equal(have.size, s.entries.length, 'no duplicates');
  for (let i = 0; i < N; i++) assert.ok(have.has(hashOf('b', i)));
  for (let i = 0; i < returned; i++) assert.ok(have.has(hashOf('a', i)), 'every add that returned is on disk');
});

test("a writer killed while holding the lock: the other one takes the dead process's lock over", async () => {
  const p = join(dir, 'stale.exclude.jsonl');
  const holder = writer(p, 'hold', 'h');
  await holder.saw('locked');
  holder.child.kill('SIGKILL');
  await holder.exit;
  assert.ok(existsSync(`${p}.lock`), 'the dead process left its lock');
  // no waiting allowed: a dead owner's lock is taken at once
  const b = writer(p, 'add', 'b', 20, { INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS: '0' });
  assert.equal(await b.exit, 0, b.stderr());
  assert.equal(readSidecar(p).entries.length, 20);
  assert.ok(!existsSync(`${p}.lock`));
});

test('a suspended holder (SIGSTOP, longer than any age-based staleness) keeps its lock: the other writer fails naming it and writes nothing', async () => {
  const p = join(dir, 'stopped.exclude.jsonl');
  await addFlags(p, [{ hash: hashOf('x', 0), line: 1, reason: '', score: null, query: '' }]);
  const holder = writer(p, 'hold', 'h');
  await holder.saw('locked');
  holder.child.kill('SIGSTOP');
  await new Promise((r) => setTimeout(r, 6000)); // proper-lockfile took such a lock over after 5 s
  const b = writer(p, 'add', 'b', 5, { INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS: '500' });
  assert.notEqual(await b.exit, 0);
  assert.match(b.stderr(), new RegExp(`being changed by process ${holder.child.pid} `));
  assert.deepEqual(hashes(p), [hashOf('x', 0)], 'nothing written while the lock was held');
  holder.child.kill('SIGKILL');
  await holder.exit;
  const c = writer(p, 'add', 'c', 5);
  assert.equal(await c.exit, 0, c.stderr());
  assert.equal(hashes(p).length, 6);
  assert.ok(lockWaitMs() > 1000, 'the default wait outlasts a healthy holder by far');
});

test('a lock folder an older version (proper-lockfile) left: taken over once untouched for 10 s, waited for while fresh', async () => {
  const p = join(dir, 'legacy.exclude.jsonl');
  mkdirSync(`${p}.lock`);
  // fresh: a live older holder may still be writing
  const b = writer(p, 'add', 'b', 1, { INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS: '200' });
  assert.notEqual(await b.exit, 0);
  assert.match(b.stderr(), /an older Influence Lens's lock folder/);
  // untouched for longer than its holders refresh it: dead, taken over
  const old = new Date(Date.now() - 60_000);
  utimesSync(`${p}.lock`, old, old);
  const c = writer(p, 'add', 'c', 3, { INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS: '0' });
  assert.equal(await c.exit, 0, c.stderr());
  assert.equal(hashes(p).length, 3);
  assert.ok(!existsSync(`${p}.lock`));
});

test("waiting for another process's lock does not block this process's thread (the editor's extension host)", async () => {
  const p = join(dir, 'busy.exclude.jsonl');
  const holder = writer(p, 'hold', 'h');
  await holder.saw('locked');
  const before = process.env.INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS;
  process.env.INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS = '1500';
  try {
    const t0 = Date.now();
    const adding = addFlags(p, [{ hash: hashOf('y', 0), line: 1, reason: '', score: null, query: '' }]);
    // a hover, a keystroke: a 50 ms timer fires on time while the flag waits for the lock
    await new Promise((r) => setTimeout(r, 50));
    const late = Date.now() - t0;
    assert.ok(late < 500, `the thread was blocked for ${late} ms`);
    await assert.rejects(adding, new RegExp(`being changed by process ${holder.child.pid} `));
  } finally {
    if (before === undefined) delete process.env.INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS;
    else process.env.INFLUENCE_LENS_FLAGS_LOCK_WAIT_MS = before;
    holder.child.kill('SIGKILL');
    await holder.exit;
  }
  assert.equal(readSidecar(p).entries.length, 0);
});
