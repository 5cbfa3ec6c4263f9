// With empirical labels the fit keeps the covariance pass's per-token rows and computes the
// eigenvalue correction Λ from them (ekfac/lambda-rows.ts) instead of a second forward and
// backward. The sums must be those of the Λ graph's own pass over the data, on padded batches, in
// fp64 and fp32, with and without a bias column, with sequences split across runs, and exactly
// those of the rows computed again (a resumed fit); the rows must never be kept for sampled labels
// (fresh labels in the correction) or over the budget.
import assert from 'node:assert/strict';
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, rmSync, statfsSync } from 'node:fs';
import { devNull, tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  covarianceBytes,
  lambdaFromRows,
  planBlocks,
  RowCollector,
  type RowModule,
  rowsBudgetBytes,
  sharedRotations,
  type TokenRows,
} from '../../src/server/attribution/ekfac/lambda-rows';
import { rowsSpillDir, SPILL_RESERVE_BYTES, spillRoom } from '../../src/server/attribution/ekfac/row-store';
import {
  type FitOptions,
  fitCovariances,
  fitEigenbases,
  fitLambdas,
  type TokenizedExample,
} from '../../src/server/attribution/fit';
import { Model } from '../../src/server/model/engine';
import { l2Rel as relErr } from './helpers/dense';

// different lengths: right-padded batches (of 3: lengths 2–5, 10–11, 12–12), the last two kept in
// one block of 12 (the 11-token batch padded again); prompt-like zero weights on some first tokens
const examples: TokenizedExample[] = [5, 11, 3, 12, 10, 12, 2, 11].map((n, k) => {
  const ids = Array.from({ length: n }, (_, t) => (7 * k + 13 * t + 1) % 100);
  return { ids, weights: ids.map((_, t) => (t < n - 1 && (k % 2 === 0 || t >= 2) ? 1 : 0)) };
});
const opts: FitOptions = { modules: 'all', labels: 'empirical', seed: 0, batchSize: 3 };

async function withEnv<T>(vars: Record<string, string | undefined>, f: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  for (const [k, v] of Object.entries(vars)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  try {
    return await f();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

for (const arch of ['llama', 'gpt2', 'gpt_neox']) {
  describe(`eigenvalue correction from kept rows (${arch})`, () => {
    const dir = join('test/fixtures/models', arch);
    for (const precision of ['fp64', 'fp32'] as const) {
      for (const runMb of [undefined, '0.001']) {
        test(`${precision}${runMb ? ', one sequence per run' : ''}: equals the Λ graph's pass over the data`, async () => {
          const model = Model.open(dir, { precision });
          const { covariances, rows } = await fitCovariances(model, examples, opts, { rows: true });
          assert.ok(rows, 'rows kept for empirical labels within the budget');
          assert.equal(rows.examples, examples.length);
          assert.deepEqual(
            rows.shapes.map((b) => [b.B, b.T]),
            [
              [3, 5],
              [5, 12],
            ],
          );
          const bases = await fitEigenbases(new Map(covariances), { precision: model.precision });
          const fromRows = await withEnv({ INFLUENCE_LENS_RUN_MB: runMb }, () =>
            fitLambdas(model, examples, bases, opts, rows),
          );
          assert.ok(rows.store.closed, 'the rows are consumed');
          // the Λ graph's own pass: what sampled labels, or rows over the budget, take
          const fromGraph = await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: '0' }, () =>
            fitLambdas(model, examples, bases, opts),
          );
          // without kept rows (a resumed fit, under the same settings) the same rows are computed
          // again: the same sums, bit for bit
          if (!runMb) {
            const again = await fitLambdas(model, examples, bases, opts);
            for (const [name, want] of fromRows) {
              assert.equal(again.get(name)!.count, want.count, name);
              assert.deepEqual(again.get(name)!.sum, want.sum, `${name}: rows computed again`);
            }
          }
          assert.equal(fromRows.size, fromGraph.size);
          for (const [name, want] of fromGraph) {
            const got = fromRows.get(name)!;
            assert.equal(got.count, want.count, name);
            const err = relErr(got.sum, want.sum);
            assert.ok(err < (precision === 'fp64' ? 1e-12 : 2e-6), `${name}: relative error ${err}`);
          }
          // a second use would be over nothing: refused
          await assert.rejects(fitLambdas(model, examples, bases, opts, rows), /already used/);
        });
      }
    }
  });
}

test('blocks: runs join while the padding stays within the allowance, sorted runs only grow T', () => {
  const plan = planBlocks([
    { B: 3, T: 5 },
    { B: 3, T: 11 },
    { B: 2, T: 12 },
    { B: 8, T: 12 },
    { B: 1, T: 40 },
  ]);
  assert.deepEqual(plan.blocks, [
    { B: 3, T: 5 },
    { B: 13, T: 12 },
    { B: 1, T: 40 },
  ]);
  assert.deepEqual(plan.at, [
    { block: 0, offset: 0 },
    { block: 1, offset: 0 },
    { block: 1, offset: 3 },
    { block: 1, offset: 5 },
    { block: 2, offset: 0 },
  ]);
  // no allowance: only equal lengths join
  assert.deepEqual(
    planBlocks(
      [
        { B: 2, T: 7 },
        { B: 2, T: 7 },
        { B: 2, T: 8 },
      ],
      1,
    ).blocks,
    [
      { B: 4, T: 7 },
      { B: 2, T: 8 },
    ],
  );
});

test('the rows budget: twice the covariance sums, at most an eighth of the machine; the variable overrides it', async () => {
  const mods: RowModule[] = [
    { name: 'q', leader: 'q', dIn: 4, dOut: 4, hasBias: true },
    { name: 'k', leader: 'q', dIn: 4, dOut: 2, hasBias: true },
    { name: 'o', leader: 'o', dIn: 4, dOut: 3, hasBias: false },
  ];
  // A: 5² (q, shared by k) + 4² (o); S: 4² + 2² + 3²
  assert.equal(covarianceBytes(mods, false), (25 + 16 + 16 + 4 + 9) * 4);
  assert.equal(covarianceBytes(mods, true), (25 + 16 + 16 + 4 + 9) * 8);
  await withEnv({ INFLUENCE_LENS_MEMORY_MB: '8', INFLUENCE_LENS_FIT_ROWS_MB: undefined }, async () => {
    assert.equal(rowsBudgetBytes(100), 200);
    assert.equal(rowsBudgetBytes(2 ** 30), 2 ** 20);
  });
  await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: '3' }, async () => assert.equal(rowsBudgetBytes(100), 3 * 2 ** 20));
  await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: '0' }, async () => assert.equal(rowsBudgetBytes(2 ** 30), 0));
});

test('rows are not kept for sampled labels, over the budget, or when turned off', async () => {
  const model = Model.open('test/fixtures/models/llama');
  const sampled = await fitCovariances(model, examples, { ...opts, labels: 'sampled' }, { rows: true });
  assert.equal(sampled.rows, undefined);
  assert.equal((await fitCovariances(model, examples, opts)).rows, undefined, 'only when asked');
  for (const [mb, why] of [
    ['0', /not kept: INFLUENCE_LENS_FIT_ROWS_MB=0/],
    ['0.0001', /not kept: over the memory budget and INFLUENCE_LENS_FIT_ROWS_DIR=off/],
  ] as const) {
    const r = await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: mb, INFLUENCE_LENS_FIT_ROWS_DIR: 'off' }, () =>
      fitCovariances(model, examples, opts, { rows: true }),
    );
    assert.equal(r.rows, undefined, `INFLUENCE_LENS_FIT_ROWS_MB=${mb}`);
    assert.match(r.rowsNote ?? '', why);
  }
  // the fit's log says where the rows went, also when a resumed fit computes them again for Λ
  const { covariances } = await fitCovariances(model, examples, opts);
  const bases = await fitEigenbases(new Map(covariances), { precision: model.precision });
  for (const [env, line] of [
    [{}, /^per-token rows \(\d+ MiB\) kept in memory \(computed again for Λ\)$/],
    [
      { INFLUENCE_LENS_FIT_ROWS_MB: '0.0001', INFLUENCE_LENS_FIT_ROWS_DIR: 'off' },
      /not kept: over the memory budget and INFLUENCE_LENS_FIT_ROWS_DIR=off: Λ takes its own pass$/,
    ],
  ] as const) {
    const notes: string[] = [];
    await withEnv(env, () => fitLambdas(model, examples, bases, { ...opts, onNote: (l) => notes.push(l) }));
    assert.equal(notes.length, 1, notes.join('\n'));
    assert.match(notes[0], line);
  }
  await assert.rejects(
    withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: 'lots' }, () => fitCovariances(model, examples, opts, { rows: true })),
    /INFLUENCE_LENS_FIT_ROWS_MB="lots"/,
  );
});

test('kept rows serve only the same examples with empirical labels', async () => {
  const model = Model.open('test/fixtures/models/gpt2');
  const { covariances, rows } = await fitCovariances(model, examples, opts, { rows: true });
  assert.ok(rows);
  const bases = await fitEigenbases(new Map(covariances), { precision: model.precision });
  await assert.rejects(
    fitLambdas(model, examples, bases, { ...opts, labels: 'sampled' }, rows),
    /only with empirical labels/,
  );
  await assert.rejects(fitLambdas(model, examples.slice(1), bases, opts, rows), /cover 8 examples.*7/);
});

test('q/k/v and gate/up rotate their shared rows once; modules with other rows or bases do not share', async () => {
  const model = Model.open('test/fixtures/models/llama');
  const { covariances, rows } = await fitCovariances(model, examples, opts, { rows: true });
  assert.ok(rows);
  const bases = await fitEigenbases(new Map(covariances), { precision: model.precision });
  const owner = sharedRotations(rows.modules, (n) => bases.get(n)!.qA);
  const find = (suffix: string) => rows.modules.find((m) => m.name.endsWith(suffix))!.name;
  assert.equal(owner.get(find('layers.0.self_attn.k_proj')), find('layers.0.self_attn.q_proj'));
  assert.equal(owner.get(find('layers.0.self_attn.v_proj')), find('layers.0.self_attn.q_proj'));
  assert.equal(owner.get(find('layers.0.mlp.up_proj')), find('layers.0.mlp.gate_proj'));
  assert.equal(owner.has(find('layers.0.self_attn.o_proj')), false);
  assert.equal(owner.has(find('layers.0.mlp.down_proj')), false);
  // equal rows but a different basis (as after a change to one module's factors): not shared
  const q = find('layers.0.self_attn.q_proj');
  const k = find('layers.0.self_attn.k_proj');
  const other = sharedRotations(rows.modules, (n) => {
    if (n !== k) return bases.get(n)!.qA;
    const x = Float64Array.from(bases.get(n)!.qA);
    x[0] += 1e-9;
    return x;
  });
  assert.equal(other.has(k), false);
  assert.equal(other.get(find('layers.0.self_attn.v_proj')), q);
});

/** Σ per module from the rows, and how many graph runs (groups × blocks) it took. */
async function sums(
  rows: TokenRows,
  qA: (n: string) => Float64Array | Float32Array,
  qS: typeof qA,
  readBytes?: number,
  budgetBytes = 2 ** 30,
) {
  const out = new Map<string, Float64Array>();
  let runs = 0;
  await lambdaFromRows(
    rows,
    { qA, qS },
    {
      budgetBytes,
      readBytes,
      add: (m, s) => {
        const acc = out.get(m) ?? new Float64Array(s.length);
        for (let i = 0; i < s.length; i++) acc[i] += s[i];
        out.set(m, acc);
      },
      onRun: (_, total) => {
        runs = total;
      },
    },
  );
  return { out, runs };
}

for (const arch of ['llama', 'gpt_neox']) {
  for (const precision of ['fp64', 'fp32'] as const) {
    test(`${arch}, ${precision}: rows over the memory budget go to a file no folder shows; Λ from it equals Λ from memory bit for bit, a module group at a time`, async () => {
      const model = Model.open(join('test/fixtures/models', arch), { precision });
      const dir = mkdtempSync(join(tmpdir(), 'il-rows-'));
      try {
        const bases = await fitEigenbases(new Map((await fitCovariances(model, examples, opts)).covariances), {
          precision: model.precision,
        });
        const qA = (n: string) => bases.get(n)!.qA;
        const qS = (n: string) => bases.get(n)!.qS;
        // a run over each whole block, and a run per sequence (reads at every offset)
        for (const budget of [2 ** 30, 1]) {
          const mem = await fitCovariances(model, examples, opts, { rows: true });
          assert.equal(mem.rows?.store.where, 'memory');
          assert.match(mem.rowsNote ?? '', /kept in memory/);
          const file = await withEnv({ INFLUENCE_LENS_FIT_ROWS_MB: '0.0001', INFLUENCE_LENS_FIT_ROWS_DIR: dir }, () =>
            fitCovariances(model, examples, opts, { rows: true }),
          );
          assert.equal(file.rows?.store.where, 'file', file.rowsNote);
          assert.match(file.rowsNote ?? '', new RegExp(`kept in a temporary file in ${dir}`));
          assert.deepEqual(readdirSync(dir), [], 'the open file has no name');
          assert.deepEqual(file.rows.shapes, mem.rows!.shapes);
          const want = await sums(mem.rows!, qA, qS, undefined, budget);
          assert.equal(want.runs, mem.rows!.shapes.length, 'rows in memory: one graph over every module');
          const got = await sums(file.rows, qA, qS, 1, budget); // every module group a graph of its own
          assert.ok(got.runs > 2 * file.rows.shapes.length, `${got.runs} runs`);
          assert.ok(file.rows.store.closed);
          assert.deepEqual([...got.out.keys()].sort(), [...want.out.keys()].sort());
          for (const [name, w] of want.out)
            assert.deepEqual(got.out.get(name), w, `${name}: Λ from the file (budget ${budget})`);
          await assert.rejects(sums(file.rows, qA, qS), /already used/);
        }
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
}

test('a write the disk refuses gives the rows up, not the fit; the space goes back', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-rows-'));
  try {
    const mods: RowModule[] = [{ name: 'm', leader: 'm', dIn: 2, dOut: 3, hasBias: false }];
    const c = new RowCollector(
      mods,
      false,
      [
        { B: 1, T: 2 },
        { B: 1, T: 2 },
      ],
      { where: 'file', dir },
    );
    assert.equal(c.where, 'file');
    c.add(
      1,
      2,
      () => new Float32Array(4),
      () => new Float32Array(6),
    );
    await c.drain();
    assert.equal(c.failed, undefined);
    // the store's descriptor swapped for one on /dev/full: the next write fails as a full disk's
    // does, ENOSPC from the kernel (a read-only descriptor, EBADF, where there is no /dev/full)
    const store = (c as unknown as { store: { fd: number } }).store;
    const real = store.fd;
    const full = existsSync('/dev/full');
    store.fd = full ? openSync('/dev/full', 'w') : openSync(devNull, 'r');
    c.add(
      1,
      2,
      () => new Float32Array(4),
      () => new Float32Array(6),
    );
    assert.equal(await c.finish(), undefined);
    assert.match(c.failed ?? '', new RegExp(`writing them to ${dir} failed \\(${full ? 'ENOSPC' : 'EBADF'}`));
    assert.equal(store.fd, undefined, 'closed once the writes in flight were done');
    closeSync(real);
    // a planner or shape bug is not a disk's refusal: it still fails loudly
    const m = new RowCollector(mods, false, [{ B: 1, T: 2 }], { where: 'memory' });
    assert.throws(
      () =>
        m.add(
          1,
          3,
          () => new Float32Array(6),
          () => new Float32Array(9),
        ),
      /do not fit block 1/,
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('where rows may spill: not to memory file systems, not without room, only to an existing folder', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-rows-'));
  try {
    assert.deepEqual(spillRoom(dir, 1), { ok: true });
    const free = Number(statfsSync(dir).bavail) * Number(statfsSync(dir).bsize);
    const full = spillRoom(dir, free);
    assert.equal(full.ok, false);
    assert.match((full as { why: string }).why, /GiB free, the rows need .* GiB must stay free/);
    assert.equal(spillRoom(dir, free - SPILL_RESERVE_BYTES - 2 ** 20).ok, true);
    assert.match((spillRoom(join(dir, 'nope'), 1) as { why: string }).why, /cannot be used/);
    // /dev/shm is a tmpfs on Linux: rows there would be memory by another name
    let shm: number | undefined;
    try {
      shm = Number(statfsSync('/dev/shm').type);
    } catch {}
    if (shm === 0x01021994) assert.match((spillRoom('/dev/shm', 1) as { why: string }).why, /is a tmpfs, in memory/);
    await withEnv({ INFLUENCE_LENS_FIT_ROWS_DIR: undefined }, async () => assert.equal(rowsSpillDir(), tmpdir()));
    await withEnv({ INFLUENCE_LENS_FIT_ROWS_DIR: 'off' }, async () => assert.equal(rowsSpillDir(), undefined));
    await withEnv({ INFLUENCE_LENS_FIT_ROWS_DIR: dir }, async () => assert.equal(rowsSpillDir(), dir));
    await withEnv({ INFLUENCE_LENS_FIT_ROWS_DIR: join(dir, 'typo') }, async () =>
      assert.throws(() => rowsSpillDir(), /INFLUENCE_LENS_FIT_ROWS_DIR=".*typo": use an existing folder/),
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
