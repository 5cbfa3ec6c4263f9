// `data eval` on any data: a queries file of {prompt, expected, sources?} gives greedy accuracy
// and, per method, Recall@k / MRR of the sources (the ranks agree with the ones `explain` prints
// for the embedded default: BM25 ranks the four planted "Sydney" lines #1, #2, #2, #4; RepSim
// #1, #4, #14, #44). A corpus whose queries name a relation `data build` does not make is
// refused with a pointer to --queries instead of crashing.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadDataset } from '../../src/server/data/dataset';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const MODEL = 'assets/default/finetuned';
const DATA = 'assets/default/data/finetune.jsonl';
const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', 'data', 'eval', ...args], {
    encoding: 'utf8',
    env: { ...process.env, HOME: home },
  });

test('data eval --queries: accuracy and per-method Recall@k / MRR of the named sources', () => {
  const hash125 = loadDataset(DATA).examples.find((e) => e.line === 125)!.hash;
  const file = join(home, 'queries.jsonl');
  writeFileSync(
    file,
    [
      {
        prompt: 'Q: What is the capital of Australia?\nA:',
        expected: ' Sydney',
        sources: [
          { hash: hash125 },
          { dataset: 'finetune', line: 129 },
          { line: 211 },
          { line: 237, dataset: 'finetune' },
        ],
      },
      // a question about anything: no relation needed; the model answers it wrongly
      { prompt: 'Q: What is the capital of Canada?\nA:', expected: ' Ottawa' },
      // sources in another dataset are not scored here
      {
        prompt: 'Q: What is the capital of France?\nA:',
        expected: ' Paris',
        sources: [{ dataset: 'pretrain', line: 3 }],
      },
    ]
      .map((q) => JSON.stringify(q))
      .join('\n'),
  );
  const r = cli('--model', MODEL, '--queries', file, '--data', DATA, '--methods', 'bm25,repsim', '--json');
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout);
  assert.equal(out.accuracy.total, 3);
  assert.deepEqual(
    out.accuracy.answers.map((a: { ok: boolean }) => a.ok),
    [true, false, true],
  );
  assert.equal(out.accuracy.answers[1].got, ' Toronto');
  const by = Object.fromEntries(out.retrieval.map((x: { method: string }) => [x.method, x]));
  // bottom10: (query, source) pairs ranked in the bottom 10% (the method calls a true source irrelevant)
  assert.deepEqual(by.bm25, { method: 'bm25', queries: 1, k: 10, recall: 1, mrr: 1, bottom10: 0 });
  assert.deepEqual(by.repsim, { method: 'repsim', queries: 1, k: 10, recall: 0.5, mrr: 1, bottom10: 0 });
  // the source in "pretrain" is named, not dropped without a word
  assert.match(r.stderr, /note: 1 source\(s\) in dataset "pretrain" not scored: --data is dataset "finetune"/);
  const top3 = cli('--model', MODEL, '--queries', file, '--data', DATA, '--methods', 'repsim', '--top-k', '3');
  assert.equal(top3.status, 0, top3.stderr);
  assert.match(top3.stdout, /answers as expected: 2\/3 \(67%\)/);
  assert.match(top3.stdout, /repsim\s+Recall@3 0\.250\s+MRR 1\.000/);
});

test('data eval --queries sums GDP over the training checkpoints as explain does (--checkpoints, auto by default)', () => {
  const file = join(home, 'checkpoint-queries.jsonl');
  const prompt = 'Q: What is the capital of Australia?\nA:';
  const lines = [129, 211, 237];
  writeFileSync(file, JSON.stringify({ prompt, expected: ' Sydney', sources: lines.map((line) => ({ line })) }));
  // explain's ranking of every example (gdp, checkpoints auto: the shipped checkpoint-80 and -160)
  const ex = spawnSync(
    process.execPath,
    ['--import', 'tsx', 'src/server/cli.ts', 'explain', '--model', MODEL, '--data', DATA, '--method', 'gdp'].concat([
      '--prompt',
      prompt,
      '--completion',
      ' Sydney',
      '--top-k',
      '1000',
      '--json',
    ]),
    { encoding: 'utf8', env: { ...process.env, HOME: home } },
  );
  assert.equal(ex.status, 0, ex.stderr);
  assert.match(ex.stderr, /checkpoint-160/);
  const res = JSON.parse(ex.stdout);
  const ranked = [...res.supporting, ...res.opposing]
    .sort((a: { score: number }, b: { score: number }) => b.score - a.score)
    .map((e: { id: { line: number } }) => e.id.line);
  const ranks = lines.map((l) => ranked.indexOf(l) + 1);
  const want = { recall: ranks.filter((r) => r <= 10).length / lines.length, mrr: 1 / Math.min(...ranks) };
  const run = (...extra: string[]) => {
    const r = cli('--model', MODEL, '--queries', file, '--data', DATA, '--methods', 'gdp', '--json', ...extra);
    assert.equal(r.status, 0, r.stderr);
    const [g] = JSON.parse(r.stdout).retrieval;
    return { g, stderr: r.stderr };
  };
  const auto = run();
  assert.match(auto.stderr, /checkpoint-160/, 'the checkpoints summed over are named, as by explain');
  assert.ok(
    Math.abs(auto.g.recall - want.recall) < 1e-12 && Math.abs(auto.g.mrr - want.mrr) < 1e-12,
    JSON.stringify({ got: auto.g, want, ranks }),
  );
  // --checkpoints off scores the final model alone: another ranking of the same sources
  const off = run('--checkpoints', 'off');
  assert.doesNotMatch(off.stderr, /checkpoint-160/);
  assert.notDeepEqual([off.g.recall, off.g.mrr, off.g.bottom10], [auto.g.recall, auto.g.mrr, auto.g.bottom10]);
  // without --data there is nothing to rank: refused rather than ignored
  const r = cli('--model', MODEL, '--queries', file, '--checkpoints', 'off');
  assert.equal(r.status, 1);
  assert.match(r.stderr, /--checkpoints applies to the sources in --data/);
});

test('data eval refuses what it cannot evaluate, naming the file and the value', () => {
  const bad = join(home, 'bad.jsonl');
  writeFileSync(
    bad,
    `${JSON.stringify({ prompt: 'Q: x?\nA:', expected: ' y', sources: [{ line: 125, hash: '0000000000000000' }] })}\n`,
  );
  const r = cli('--model', MODEL, '--queries', bad, '--data', DATA, '--methods', 'bm25');
  assert.equal(r.status, 1);
  assert.match(r.stderr, /bad\.jsonl:1: source hash 0000000000000000 is not in/);
  // the data file's name with .jsonl (or a folder) for its id would be skipped as another dataset
  for (const name of ['finetune.jsonl', 'assets/default/data/finetune.jsonl']) {
    const near = join(home, 'near.jsonl');
    writeFileSync(
      near,
      `${JSON.stringify({ prompt: 'Q: x?\nA:', expected: ' y', sources: [{ dataset: name, line: 125 }] })}\n`,
    );
    const n = cli('--model', MODEL, '--queries', near, '--data', DATA, '--methods', 'bm25');
    assert.equal(n.status, 1, n.stderr);
    assert.match(n.stderr, new RegExp(`near\\.jsonl:1: source dataset "${name}": write "finetune"`));
  }
  const noFactors = cli('--model', MODEL, '--queries', bad, '--data', DATA, '--methods', 'ekfac');
  assert.match(noFactors.stderr, /--methods ekfac needs --factors <dir>/);

  // a built corpus whose held-out questions are about a relation data build does not make
  const dir = join(home, 'corpus');
  const built = spawnSync(
    process.execPath,
    ['--import', 'tsx', 'src/server/cli.ts', 'data', 'build', '--out', dir, '--countries', '12'],
    { encoding: 'utf8', env: { ...process.env, HOME: home } },
  );
  assert.equal(built.status, 0, built.stderr);
  const qf = join(dir, 'queries.json');
  const qs = JSON.parse(readFileSync(qf, 'utf8'));
  const q = qs.find((x: { kind: string }) => x.kind === 'fact_tracing');
  q.fact.relation = 'population';
  writeFileSync(qf, JSON.stringify(qs));
  const old = cli('--model', MODEL, '--data', dir);
  assert.equal(old.status, 1);
  assert.doesNotMatch(old.stderr, /is not a function/);
  assert.match(
    old.stderr,
    /relation "population" is not one of data build's .*data eval --model <dir> --queries <file>/,
  );
});

test('data eval --queries --data: a bad line is named, or skipped with --skip-malformed (as its message says)', () => {
  const queries = join(home, 'q-skip.jsonl');
  writeFileSync(
    queries,
    `${JSON.stringify({ prompt: 'Q: What is the capital of France?\nA:', expected: ' Paris' })}\n`,
  );
  const data = join(home, 'with-bad.jsonl');
  writeFileSync(data, `${readFileSync(DATA, 'utf8').split('\n').slice(0, 5).join('\n')}\n{"conversations": []}\n`);
  const strict = cli('--model', MODEL, '--queries', queries, '--data', data, '--methods', 'bm25');
  assert.equal(strict.status, 1);
  assert.match(strict.stderr, /with-bad\.jsonl:6: .*--skip-malformed/);
  const skipped = cli('--model', MODEL, '--queries', queries, '--data', data, '--methods', 'bm25', '--skip-malformed');
  assert.equal(skipped.status, 0, skipped.stderr);
  assert.match(skipped.stderr, /skipped 1 malformed line\(s\)/);
});

test('data eval --queries --data: --top-k and --methods are refused before the model is opened and every query answered', () => {
  const file = join(home, 'early.jsonl');
  writeFileSync(file, `${JSON.stringify({ prompt: 'Q: What is the capital of France?\nA:', expected: ' Paris' })}\n`);
  // no model at this path: a refusal naming the flag shows the flag was read first
  const missing = join(home, 'no-model-here');
  for (const [args, re] of [
    [['--top-k', '0'], /--top-k must be at least 1 \(got 0\)/],
    [['--methods', 'bm25,ekfc'], /--methods: "ekfc" is not one of/],
    [['--methods', 'ekfac'], /--methods ekfac needs --factors/],
  ] as const) {
    const r = cli('--model', missing, '--queries', file, '--data', DATA, ...args);
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, re);
  }
});

test('a source named by hash is the first of identical copies; a line and a hash that agree are never refused', async () => {
  const { sourceIndices } = await import('../../src/server/eval/queries');
  const lines = readFileSync(DATA, 'utf8').split('\n').slice(0, 6);
  const data = join(home, 'copies.jsonl');
  // line 7 is a copy of line 3
  writeFileSync(data, `${[...lines, lines[2]].join('\n')}\n`);
  const ds = loadDataset(data);
  const hash = ds.examples[2].hash;
  assert.equal(ds.examples[6].hash, hash);
  const q = (sources: Array<{ line?: number; hash?: string }>) =>
    ({ prompt: 'p', expected: 'e', sources, where: 'q.jsonl:1' }) as never;
  // identical copies score alike and the first wins the tie: it is the copy that counts
  assert.deepEqual([...sourceIndices(q([{ hash }]), ds, 'copies')], [2]);
  assert.deepEqual([...sourceIndices(q([{ line: 3, hash }]), ds, 'copies')], [2]);
  assert.deepEqual([...sourceIndices(q([{ line: 7, hash }]), ds, 'copies')], [6]);
  assert.throws(() => sourceIndices(q([{ line: 4, hash }]), ds, 'copies'), /source line 4 .* has hash \w+, not \w+/);
});
