// The README's main command on the embedded default, end to end: factors for both stages,
// the planted wrong answer, its planted sources among the top supporting examples, and the
// answer fixed after fine-tuning again without the flagged examples.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { useTempHome } from './helpers/env';

const home = useTempHome();

const run = (env: NodeJS.ProcessEnv = {}, preload: string[] = []) =>
  spawnSync(process.execPath, ['--import', 'tsx', ...preload, 'src/server/cli.ts', 'demo'], {
    encoding: 'utf8',
    env: { ...process.env, HOME: home, INFLUENCE_LENS_CACHE: join(home, 'cache'), ...env },
  });

test('influence-lens demo: explain the planted wrong fact, flag, retrain, fixed', () => {
  const r = run();
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /completion: " Sydney"/);
  const found = /planted sources in the top 10: (\d+) of (\d+)/.exec(r.stdout);
  assert.ok(found && Number(found[1]) >= 3, `planted sources found: ${found?.[0]}`);
  assert.match(r.stdout, /Supporting \(made this completion more likely\):/);
  // each suggested flag says why: it teaches the answer with a real share of the strongest score
  const why = [
    ...r.stdout.matchAll(
      /flag \S+finetune\.jsonl:\d+.*: teaches "Sydney"; its score [\d.]+ is (\d+)% of the strongest supporting example's/g,
    ),
  ];
  assert.ok(why.length >= 3, `suggested flags with reasons: ${why.length}`);
  for (const w of why) assert.ok(Number(w[1]) >= 10);
  const fixed = /5\. Ask again[\s\S]*?completion: "([^"]*)"/.exec(r.stdout);
  assert.ok(fixed && fixed[1].trim() !== 'Sydney', `answer after retraining: ${fixed?.[1]}`);
  const lp = /log p\(" Sydney" \| prompt\): (-?[\d.]+) → (-?[\d.]+)/.exec(r.stdout);
  assert.ok(lp && Number(lp[2]) < Number(lp[1]) - 1, 'the wrong answer became much less likely');
  // a second run reuses factors and the retrained model
  const again = run();
  assert.equal(again.status, 0, again.stderr);
  assert.match(again.stdout, /pre-trained: cached/);
  assert.match(again.stdout, /retrained model: cached/);
});

test('demo beside a demo of another query: its model is trained without its own flags, and a cache that is not is trained again', () => {
  // after the test above: the flags and the retrained model are in the cache
  const work = join(home, 'cache', 'default', 'demo');
  const [cached] = readdirSync(work).filter((n) => n.startsWith('finetuned-'));
  assert.ok(cached, 'the first test left a retrained model');
  const argsFile = join(work, cached, 'training_args.json');
  const args = JSON.parse(readFileSync(argsFile, 'utf8'));
  const own = args.excluded_hashes as string[];
  assert.ok(own.length >= 3);
  // another query's flags (what `demo --query 1` writes), and a cached model trained without them
  // under this query's key, as two demos at once left it before
  const other = ['06c818625dda799d', '590c06cc82076329', 'c15a79c8702e0774', 'd9105b83cf9aaa6f'];
  writeFileSync(argsFile, JSON.stringify({ ...args, excluded_hashes: other }, null, 2));
  const log = join(home, 'neighbour.log');
  const r = run(
    {
      DEMO_NEIGHBOUR_FLAGS: other
        .map((hash) => JSON.stringify({ hash, line: 1, reason: 'teaches "Toronto"' }))
        .join('\n'),
      DEMO_NEIGHBOUR_LOG: log,
    },
    ['--import', './test/unit/helpers/demo-neighbour.mjs'],
  );
  assert.equal(r.status, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /retrained model: cached/);
  const trained = JSON.parse(readFileSync(argsFile, 'utf8')).excluded_hashes;
  assert.deepEqual(trained, own, 'trained without the flags this demo printed');
  const fixed = /5\. Ask again[\s\S]*?completion: "([^"]*)"/.exec(r.stdout);
  assert.ok(fixed && fixed[1].trim() !== 'Sydney', `answer after retraining: ${fixed?.[1]}`);
});

test('demo --top-k 2 shows two examples but flags from the top 10: the same flags, the same (cached) fixed model', () => {
  // after the tests above: the model retrained without this query's flags is in the cache
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', 'demo', '--top-k', '2'], {
    encoding: 'utf8',
    env: { ...process.env, HOME: home, INFLUENCE_LENS_CACHE: join(home, 'cache') },
  });
  assert.equal(r.status, 0, r.stderr);
  const supporting = /Supporting \(made this completion more likely\):\n([\s\S]*?)\n[ \t]*\n/.exec(r.stdout);
  assert.ok(supporting, r.stdout);
  assert.equal([...supporting[1].matchAll(/^\s+#\d+ /gm)].length, 2, 'two supporting examples shown');
  assert.match(r.stdout, /planted sources in the top 2: \d of \d/);
  const flags = [...r.stdout.matchAll(/flag \S+finetune\.jsonl:\d+/g)];
  assert.ok(flags.length >= 3, `flags suggested with --top-k 2: ${flags.length}`);
  assert.match(r.stdout, /retrained model: cached/);
  const fixed = /5\. Ask again[\s\S]*?completion: "([^"]*)"/.exec(r.stdout);
  assert.ok(fixed && fixed[1].trim() !== 'Sydney', `answer after retraining: ${fixed?.[1]}`);
});
