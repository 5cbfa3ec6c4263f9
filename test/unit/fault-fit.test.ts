// The EK-FAC fit job under faults: killed at every point where it changes its folder, then run
// again; two fits of one folder at once (the same partition, or two partitions). Nothing a killed
// or concurrent fit leaves may be loaded as a complete factor set, and the factors that are
// finally written equal those of one uninterrupted fit, bit for bit (the fit is deterministic).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs, { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { hostname } from 'node:os';
import { join, relative } from 'node:path';
import { before, describe, test } from 'node:test';
import { tryLock } from '../../src/common/owner-lock';
import {
  FACTOR_FILES,
  type Factors,
  loadFactors,
  UnfinishedFitError,
} from '../../src/server/attribution/ekfac/factors-io';
import type { Preconditioner } from '../../src/server/attribution/ekfac/precondition';
import { FitJobError, type FitJobOptions, runFitJob } from '../../src/server/attribution/fit-job';
import { openStage } from '../../src/server/attribution/stage';
import { Model } from '../../src/server/model/engine';
import { InfluenceService, ServiceError } from '../../src/server/service/influence-service';
import { isUserError } from '../../src/server/user-errors';
import { writeTinyCorpus } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const MODEL = 'test/fixtures/models/llama';
const data = join(home, 'train.jsonl');
writeTinyCorpus(data, 12);

/** A pid no process has now (a child that has exited). */
const deadPid = () => spawnSync(process.execPath, ['-e', '']).pid!;

/**
 * What explain and the server open, or their refusal: `openStage` keeps only the preconditioners,
 * so the factors are read again as it reads them (the snapshot does not change in between), with
 * the preconditioners it built from them.
 */
function openedFactors(dir: string, model: Model): Factors & { preconditioners: Map<string, Preconditioner> } {
  const stage = openStage(MODEL, dir, { model });
  return {
    ...loadFactors(dir, { precision: model.precision, covariances: false }),
    preconditioners: stage.preconditioners!,
  };
}

/** Bit-for-bit equality of two loaded factor sets (arguments, fingerprint, every tensor and count;
 * and the opened preconditioners, where both have them). */
function assertSameFactors(got: Factors, want: Factors, what: string) {
  assert.deepEqual(got.args, want.args, `${what}: arguments`);
  assert.equal(got.fingerprint, want.fingerprint, `${what}: fingerprint`);
  assert.deepEqual(Object.keys(got.modules).sort(), Object.keys(want.modules).sort(), `${what}: modules`);
  const bytes = (x: ArrayBufferView) => Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  for (const [name, w] of Object.entries(want.modules)) {
    const g = got.modules[name];
    for (const stage of ['covariance', 'eigen', 'lambda'] as const) {
      const ws = w[stage] as Record<string, unknown> | undefined;
      const gs = g[stage] as Record<string, unknown> | undefined;
      assert.equal(!!gs, !!ws, `${what}: ${name} ${stage} present`);
      if (!ws || !gs) continue;
      for (const [k, v] of Object.entries(ws)) {
        if (typeof v === 'number') assert.equal(gs[k], v, `${what}: ${name}.${stage}.${k}`);
        else
          assert.ok(
            bytes(gs[k] as ArrayBufferView).equals(bytes(v as ArrayBufferView)),
            `${what}: ${name}.${stage}.${k} differs`,
          );
      }
    }
  }
  const opened = (f: Factors) => (f as { preconditioners?: Map<string, Preconditioner> }).preconditioners;
  const [gp, wp] = [opened(got), opened(want)];
  if (!gp || !wp) return;
  assert.deepEqual([...gp.keys()].sort(), [...wp.keys()].sort(), `${what}: preconditioned modules`);
  for (const [name, w] of wp) {
    const g: Preconditioner = gp.get(name)!;
    assert.equal(g.damping, w.damping, `${what}: ${name} damping`);
    for (const k of ['qA', 'qS', 'inverse'] as const)
      assert.ok(bytes(g[k]).equals(bytes(w[k])), `${what}: ${name} preconditioner ${k} differs`);
  }
}

/** What a finished fit must not leave behind: its partials, temporaries or locks. */
function assertClean(dir: string, what: string) {
  const left = readdirSync(dir).filter((n) => n === 'partials' || /\.tmp-\d+|\.lock$/.test(n));
  assert.deepEqual(left, [], `${what}: leftovers in ${dir}`);
}

function cli(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number | null; out: string; err: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', ...args], {
    env: { ...process.env, HOME: home, ...env },
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => {
    out += d;
  });
  child.stderr.on('data', (d) => {
    err += d;
  });
  return new Promise((resolve) => child.on('exit', (code) => resolve({ code, out, err })));
}

/** Names of files and folders under `dir` with their sizes, leaving out temporaries and locks. */
function visibleState(dir: string): string {
  const lines: string[] = [];
  const walk = (d: string) => {
    for (const name of readdirSync(d).sort()) {
      if (/\.tmp-\d+/.test(name) || name.endsWith('.lock')) continue;
      const p = join(d, name);
      const st = statSync(p);
      lines.push(`${relative(dir, p)} ${st.isDirectory() ? 'dir' : st.size}`);
      if (st.isDirectory()) walk(p);
    }
  };
  if (existsSync(dir)) walk(dir);
  return lines.join('\n');
}

/** Makes a copy of a folder look as its process's kill -9 left it: temporaries and locks name a dead pid. */
function asIfKilled(dir: string, dead: number) {
  const walk = (d: string) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      if (name.endsWith('.lock')) {
        const owner = JSON.parse(readFileSync(p, 'utf8'));
        writeFileSync(p, JSON.stringify({ ...owner, pid: dead }));
      }
      const renamed = name.replace(`.tmp-${process.pid}-`, `.tmp-${dead}-`);
      if (renamed !== name) renameSync(p, join(d, renamed));
    }
  };
  walk(dir);
}

const MUTATORS = [
  'renameSync',
  'rmSync',
  'mkdirSync',
  'copyFileSync',
  'linkSync',
  'unlinkSync',
  'rmdirSync',
  'writeFileSync',
  'openSync',
] as const;

/**
 * Calls `before` before every call that changes a file or folder under `root` (an open for
 * writing included). node:fs's own object is patched and the ES module bindings synced, so the
 * product code's named imports see the wrapper. Returns the undo.
 */
function beforeEachChange(root: string, before: (name: string, path: string) => void): () => void {
  const real = fs as unknown as Record<string, (...a: unknown[]) => unknown>;
  const saved = MUTATORS.map((name) => [name, real[name]] as const);
  let busy = false;
  for (const [name, f] of saved)
    real[name] = (...args: unknown[]) => {
      const writes = name !== 'openSync' || /[wax+]/.test(String(args[1] ?? 'r'));
      if (!busy && writes && String(args[0]).startsWith(root)) {
        busy = true;
        try {
          before(name, String(args[0]));
        } finally {
          busy = false;
        }
      }
      return f(...args);
    };
  syncBuiltinESMExports();
  return () => {
    for (const [name, f] of saved) real[name] = f;
    syncBuiltinESMExports();
  };
}

/**
 * Copies of `dir` as a kill -9 just before each change to it would leave it, one per visible
 * state (temporaries and locks naming a dead process), in `<home>/<prefix>-<n>`. Call `undo` after.
 */
function recordKillStates(dir: string, prefix: string) {
  const snaps: string[] = [];
  const seen = new Set<string>();
  const dead = deadPid();
  const undo = beforeEachChange(dir, () => {
    const state = visibleState(dir);
    if (seen.has(state)) return;
    seen.add(state);
    const snap = join(home, `${prefix}-${snaps.length}`);
    if (existsSync(dir)) fs.cpSync(dir, snap, { recursive: true });
    else mkdirSync(snap);
    asIfKilled(snap, dead);
    snaps.push(snap);
  });
  return { snaps, seen, undo };
}

describe('fit job under kill -9 and concurrency', () => {
  let model: Model;
  let job: Omit<FitJobOptions, 'out'>;
  const reference = join(home, 'reference');
  const referencePartitioned = join(home, 'reference-2');
  before(async () => {
    model = Model.open(MODEL);
    job = { modelDir: MODEL, dataPath: data, modules: 'mlp', labels: 'empirical', seed: 3, batchSize: 4, model };
    assert.equal((await runFitJob({ ...job, out: reference })).status, 'done');
    for (const i of [0, 1, 0])
      await runFitJob({ ...job, out: referencePartitioned, partition: { index: i, count: 2 } });
    assert.ok(existsSync(join(referencePartitioned, 'influence_lens_arguments.json')));
  });

  test('a cache the program owns is refitted when its factors are for other data (an older version); a folder the user named is refused', async () => {
    const cache = join(home, 'owned-cache');
    fs.cpSync(reference, cache, { recursive: true });
    // factors of other data, as an older version's fingerprints would leave them
    const args = join(cache, 'influence_lens_arguments.json');
    const a = JSON.parse(fs.readFileSync(args, 'utf8'));
    fs.writeFileSync(
      args,
      JSON.stringify({
        ...a,
        dataFingerprint: 'ffffffffffffffff',
        fingerprint: `${a.modelFingerprint}:ffffffffffffffff`,
      }),
    );
    // (the files say which fit wrote them, so the edited arguments read as a mixed folder too)
    await assert.rejects(
      runFitJob({ ...job, out: cache }),
      /already holds factors fitted on other data|mixes two fits/,
    );
    const lines: string[] = [];
    const r = await runFitJob({ ...job, out: cache, replaceStale: true, log: (l) => lines.push(l) });
    assert.equal(r.status, 'done');
    assert.ok(
      lines.some((l) => /cached factors .* are for (other data|unreadable files).*: fitting them again/.test(l)),
      lines.join('\n'),
    );
    assert.equal(JSON.parse(fs.readFileSync(args, 'utf8')).dataFingerprint, a.dataFingerprint);
    assert.equal((await runFitJob({ ...job, out: cache, replaceStale: true })).status, 'up-to-date');
  });

  test("a folder without its arguments file is refused, not read as kronfluence's", async () => {
    const other = join(home, 'other-seed');
    await runFitJob({ ...job, out: other, seed: 4 });
    const mixed = join(home, 'mixed-noargs');
    fs.cpSync(reference, mixed, { recursive: true });
    fs.copyFileSync(join(other, 'lambda_matrix.safetensors'), join(mixed, 'lambda_matrix.safetensors'));
    fs.rmSync(join(mixed, 'influence_lens_arguments.json'));
    assert.throws(
      () => loadFactors(mixed),
      /were written by influence-lens's fit, but its influence_lens_arguments\.json is missing, so which model and data they belong to cannot be checked/,
    );
    // one fit's files alone neither: the model, data, tokenization and fit version they belong to
    // are in the arguments (another model's factors with it deleted were used, with a vague warning)
    const alone = join(home, 'alone-noargs');
    fs.cpSync(reference, alone, { recursive: true });
    fs.rmSync(join(alone, 'influence_lens_arguments.json'));
    assert.throws(() => loadFactors(alone), /influence_lens_arguments\.json is missing/);
  });

  test('a stale owned cache killed at each step of its refit: never read as factors without their arguments', async () => {
    const cache = join(home, 'owned-stale');
    fs.cpSync(reference, cache, { recursive: true });
    const args = join(cache, 'influence_lens_arguments.json');
    const a = JSON.parse(fs.readFileSync(args, 'utf8'));
    fs.writeFileSync(args, JSON.stringify({ ...a, dataFingerprint: 'ffffffffffffffff' }));
    const { snaps, undo } = recordKillStates(cache, 'stale-snap');
    try {
      assert.equal((await runFitJob({ ...job, out: cache, replaceStale: true })).status, 'done');
    } finally {
      undo();
    }
    let unread = 0;
    for (const snap of snaps) {
      const files = FACTOR_FILES.filter((f) => f.endsWith('.safetensors') && existsSync(join(snap, f)));
      // the stale fit's files without the arguments that name them would read as another tool's factors
      if (!existsSync(join(snap, 'influence_lens_arguments.json')) && files.length) {
        assert.throws(() => loadFactors(snap), UnfinishedFitError, `${snap}: ${files.join(', ')}`);
        unread++;
      }
      const r = await runFitJob({ ...job, out: snap, replaceStale: true });
      assert.ok(r.status === 'done' || r.status === 'up-to-date', `${snap}: ${r.status} ${r.message}`);
      assertSameFactors(loadFactors(snap), loadFactors(reference), `${snap} after the rerun`);
    }
    assert.ok(unread >= 1, `${snaps.length} states, none between the removal of the arguments and of the files`);
  });

  test('killed before any change to its folder, each time: never loaded as complete; the rerun gives the same factors', async () => {
    const out = join(home, 'killed');
    const { snaps, undo, seen } = recordKillStates(out, 'snap');
    try {
      assert.equal((await runFitJob({ ...job, out })).status, 'done');
    } finally {
      undo();
    }
    assertSameFactors(loadFactors(out), loadFactors(reference), 'the observed fit');
    const want = openedFactors(reference, model);
    // every stage was reached: covariance, eigen, Λ, and the final write (some files, no arguments yet)
    const states = [...seen];
    for (const s of [/covariance-0-of-1 dir/, /eigen dir/, /lambda-0-of-1 dir/])
      assert.ok(states.some((x) => s.test(x)));
    assert.ok(states.some((x) => /^lambda_matrix\.safetensors/m.test(x) && !/^influence_lens_arguments/m.test(x)));
    let loaded = 0;
    let complete = 0;
    for (const snap of snaps) {
      if (existsSync(join(snap, 'influence_lens_arguments.json'))) complete++;
      // what explain and the server open: refused, or the complete factors
      let opened: Factors | undefined;
      try {
        opened = openedFactors(snap, model);
      } catch (e) {
        // a final write cut short says so (the CLI prints such an error as its message alone)
        if (existsSync(join(snap, 'activation_covariance.safetensors')))
          assert.ok(e instanceof UnfinishedFitError && isUserError(e), `${snap}: ${e}`);
      }
      if (opened) {
        loaded++;
        assertSameFactors(opened, want, `${snap} loaded after the kill`);
      }
      const r = await runFitJob({ ...job, out: snap });
      assert.ok(r.status === 'done' || r.status === 'up-to-date', `${snap}: ${r.status} ${r.message}`);
      assertSameFactors(loadFactors(snap), loadFactors(reference), `${snap} after the rerun`);
      assertClean(snap, snap);
    }
    // loaded: only once the arguments file (written last) is there, i.e. while the partials are removed
    assert.ok(snaps.length >= 15 && loaded === complete && complete >= 1, `${snaps.length} states, ${loaded} loaded`);
  });

  test('a second fit of the same folder in this process is refused while the first runs; a dead or foreign lock', async () => {
    const out = join(home, 'twice');
    const [a, b] = await Promise.allSettled([runFitJob({ ...job, out }), runFitJob({ ...job, out })]);
    assert.equal(a.status === 'fulfilled' && a.value.status, 'done');
    assert.ok(b.status === 'rejected' && b.reason instanceof FitJobError, String((b as PromiseRejectedResult).reason));
    assert.match(
      (b as PromiseRejectedResult).reason.message,
      /another influence-lens fit, process \d+ on .* is fitting into .*twice; let it finish \(if no such process runs, delete .*\.fit-partition-0-of-1\.lock\)/,
    );
    assertSameFactors(loadFactors(out), loadFactors(reference), 'the first fit');
    assertClean(out, out);

    // a lock of this host whose process is gone is taken over; one of another host is not
    const other = join(home, 'locked');
    mkdirSync(other);
    const lock = join(other, '.fit-partition-0-of-1.lock');
    const owner = { pid: deadPid(), host: hostname(), since: 'then', what: 'fitting' };
    writeFileSync(lock, JSON.stringify({ ...owner, host: 'elsewhere' }));
    await assert.rejects(runFitJob({ ...job, out: other }), /process \d+ on elsewhere \(fitting, since then\)/);
    writeFileSync(lock, JSON.stringify(owner));
    assert.equal((await runFitJob({ ...job, out: other })).status, 'done');
    assertClean(other, other);
  });

  test('finished factors in a folder this process may not write are still up to date; a new fit there fails', async () => {
    // as a read-only file system: an existing folder may be "created" again, nothing else changes
    const readOnly = (name: string, path: string) => {
      if (name === 'mkdirSync' && existsSync(path)) return;
      throw Object.assign(new Error('read-only file system'), { code: 'EROFS' });
    };
    let undo = beforeEachChange(reference, readOnly);
    try {
      assert.equal((await runFitJob({ ...job, out: reference })).status, 'up-to-date');
    } finally {
      undo();
    }
    const fresh = join(home, 'read-only');
    mkdirSync(fresh);
    undo = beforeEachChange(fresh, readOnly);
    try {
      await assert.rejects(runFitJob({ ...job, out: fresh }), /read-only file system/);
    } finally {
      undo();
    }
  });

  test('the lock on a file system without hard links: an exclusive create', () => {
    const dir = join(home, 'no-links');
    mkdirSync(dir);
    const path = join(dir, 'x.lock');
    const undo = beforeEachChange(dir, (name) => {
      if (name === 'linkSync') throw Object.assign(new Error('operation not permitted'), { code: 'EPERM' });
    });
    try {
      const a = tryLock(path, 'first');
      assert.equal(typeof a, 'function');
      const b = tryLock(path, 'second');
      assert.ok(typeof b !== 'function' && b.pid === process.pid && b.what === 'first');
      (a as () => void)();
      assert.deepEqual(readdirSync(dir), []);
    } finally {
      undo();
    }
  });

  test('the shared steps wait for the process that holds them, then check again', async () => {
    const out = join(home, 'shared');
    mkdirSync(out);
    const held = tryLock(join(out, '.fit-shared.lock'), 'a test');
    assert.equal(typeof held, 'function');
    const lines: string[] = [];
    let settled = false;
    const run = runFitJob({ ...job, out, log: (l) => lines.push(l) }).finally(() => {
      settled = true;
    });
    await new Promise((r) => setTimeout(r, 600));
    assert.ok(!settled && lines.some((l) => /waiting for process \d+ .*\(a test, since/.test(l)), lines.join('\n'));
    (held as () => void)();
    assert.equal((await run).status, 'done');
    assertSameFactors(loadFactors(out), loadFactors(reference), 'after the wait');
  });

  test('a server asked to fit a folder another process is fitting says it is busy, not that the factors are broken', async () => {
    const factors = join(home, 'server-busy');
    mkdirSync(factors);
    const cli = tryLock(join(factors, '.fit-partition-0-of-1.lock'), 'a CLI fit');
    assert.equal(typeof cli, 'function');
    const service = new InfluenceService({
      finetuned: { model: MODEL, factors },
      datasets: { train: data },
      modules: 'mlp',
      cacheDir: join(home, 'service-cache'),
    });
    service.open();
    await assert.rejects(
      service.fit('finetuned'),
      (e: Error) =>
        e instanceof ServiceError && e.code === 'not_ready' && /process \d+ on .*\(a CLI fit, since/.test(e.message),
    );
    (cli as () => void)();
    assert.equal((await service.fit('finetuned')).status, 'done');
  });

  test('a second fit of one folder in the same server (another client, or a retry after a cancel) waits for the first', async () => {
    const service = new InfluenceService({
      finetuned: { model: MODEL, factors: join(home, 'server-twice') },
      datasets: { train: data },
      modules: 'mlp',
      cacheDir: join(home, 'service-cache-2'),
    });
    service.open();
    const [a, b] = await Promise.all([service.fit('finetuned'), service.fit('finetuned')]);
    assert.deepEqual([a.status, b.status], ['done', 'up-to-date']);
    // cancelled while it runs, then asked again at once: the retry is not refused as another fit
    const again = new InfluenceService({
      finetuned: { model: MODEL, factors: join(home, 'server-cancel') },
      datasets: { train: data },
      modules: 'mlp',
      cacheDir: join(home, 'service-cache-3'),
    });
    again.open();
    const ac = new AbortController();
    const first = again.fit('finetuned', { signal: ac.signal, progress: () => ac.abort() });
    const retry = again.fit('finetuned');
    await assert.rejects(first, /cancelled/);
    assert.equal((await retry).status, 'done');
  });

  test('two `fit` processes at once on one folder: one writes the factors, the other waits or is refused', async () => {
    const out = join(home, 'cli-same');
    const args = ['fit', '--model', MODEL, '--data', data, '--out', out, '--modules', 'mlp'];
    args.push('--labels', 'empirical', '--seed', '3', '--batch-size', '4');
    const rs = await Promise.all([cli(args), cli(args)]);
    for (const r of rs)
      if (r.code !== 0) assert.match(r.err, /another influence-lens fit, process \d+ .* is fitting into/, r.err);
    assert.ok(
      rs.some((r) => r.code === 0 && /wrote EK-FAC factors/.test(r.out)),
      rs.map((r) => r.err).join('\n'),
    );
    assertSameFactors(loadFactors(out), loadFactors(reference), 'two at once');
    assertClean(out, out);
  });

  test('partitions 0/2 and 1/2 at once, then each again: the factors of a sequential partitioned fit', async () => {
    const out = join(home, 'cli-partitions');
    const args = (i: number) => [
      ...['fit', '--model', MODEL, '--data', data, '--out', out, '--modules', 'mlp', '--labels', 'empirical'],
      ...['--seed', '3', '--batch-size', '4', '--partition', `${i}/2`],
    ];
    for (let round = 0; round < 2 && !existsSync(join(out, 'influence_lens_arguments.json')); round++) {
      const rs = await Promise.all([cli(args(0)), cli(args(1))]);
      for (const r of rs) assert.equal(r.code, 0, r.err);
    }
    assertSameFactors(loadFactors(out), loadFactors(referencePartitioned), 'partitions at once');
    assertClean(out, out);
  });

  /** kill -9 of `fit` in its covariance pass and in its Λ pass, each time run again to the end. */
  async function killAndRerun(out: string, env: Record<string, string>, after?: () => void) {
    const args = ['fit', '--model', MODEL, '--data', data, '--out', out, '--modules', 'mlp'];
    args.push('--labels', 'empirical', '--seed', '3', '--batch-size', '4');
    // in the covariance pass, and in the eigenvalue-correction pass (the eigen stage and the final
    // write, each a few milliseconds here, are covered state by state by the first test)
    for (const [stage, delay] of [
      [/covariance pass/, 20],
      [/eigenvalue-correction pass/, 0],
    ] as const) {
      const child = spawn(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', ...args], {
        env: { ...process.env, HOME: home, ...env },
      });
      const exited = new Promise((resolve) => child.on('exit', resolve));
      // once it says it has started the stage
      await new Promise<void>((resolve) => {
        child.stderr.on('data', (d: Buffer) => {
          if (stage.test(d.toString())) resolve();
        });
        child.on('exit', () => resolve());
      });
      await new Promise((r) => setTimeout(r, delay));
      child.kill('SIGKILL');
      await exited;
      after?.();
      try {
        const f = openedFactors(out, model);
        assertSameFactors(f, openedFactors(reference, model), 'loaded after the kill');
      } catch (e) {
        if (e instanceof assert.AssertionError) throw e;
      }
      const r = await cli(args, env);
      assert.equal(r.code, 0, r.err);
      assertSameFactors(loadFactors(out), loadFactors(reference), `rerun after a kill in ${stage}`);
      assertClean(out, out);
      after?.();
      fs.rmSync(out, { recursive: true });
    }
    return args;
  }

  test('kill -9 of a `fit` process in its covariance pass and in its Λ pass, then the same command again: the same factors', async () => {
    await killAndRerun(join(home, 'cli-killed'), {});
  });

  test('rows over the memory budget in a temporary file: the factors of rows kept in memory, bit for bit; no file left by a finished or a killed fit', async () => {
    const spill = join(home, 'spill');
    mkdirSync(spill);
    const env = { INFLUENCE_LENS_FIT_ROWS_MB: '0.0001', INFLUENCE_LENS_FIT_ROWS_DIR: spill };
    const nothingLeft = () => assert.deepEqual(readdirSync(spill), [], `left in ${spill}`);
    const out = join(home, 'cli-spilled');
    const args = await killAndRerun(out, env, nothingLeft);
    const r = await cli(args, env);
    assert.equal(r.code, 0, r.err);
    assert.match(r.err, /per-token rows \(\d+ MiB\) kept in a temporary file in /);
    assert.match(r.err, /MiB kept in a temporary file; empirical labels/);
    assertSameFactors(loadFactors(out), loadFactors(reference), 'rows from a file');
    nothingLeft();
    // two processes spilling into one folder at once (each fitting its own output): each its own
    // file, the factors of rows in memory, nothing left
    const outs = [join(home, 'cli-spilled-a'), join(home, 'cli-spilled-b')];
    const both = await Promise.all(
      outs.map((o) =>
        cli(
          args.map((a) => (a === out ? o : a)),
          env,
        ),
      ),
    );
    for (const [i, b] of both.entries()) {
      assert.equal(b.code, 0, b.err);
      assert.match(b.err, /per-token rows \(\d+ MiB\) kept in a temporary file in /);
      assertSameFactors(loadFactors(outs[i]), loadFactors(reference), `two spilling at once (${i})`);
    }
    nothingLeft();
  });
});
