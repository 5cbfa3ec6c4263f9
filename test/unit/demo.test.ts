// The README's main command on the embedded default, end to end: factors for both stages,
// the planted wrong answer, its planted sources among the top supporting examples, and the
// answer fixed after fine-tuning again without the flagged examples.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';
import { useTempHome } from './helpers/env';

const home = useTempHome();

test('influence-lens demo: explain the planted wrong fact, flag, retrain, fixed', () => {
  const run = () =>
    spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', 'demo'], {
      encoding: 'utf8',
      env: { ...process.env, HOME: home, INFLUENCE_LENS_CACHE: join(home, 'cache') },
    });
  const r = run();
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /completion: " Sydney"/);
  const found = /planted sources in the top 10: (\d+) of (\d+)/.exec(r.stdout);
  assert.ok(found && Number(found[1]) >= 3, `planted sources found: ${found?.[0]}`);
  assert.match(r.stdout, /Supporting \(made this completion more likely\):/);
  // each suggested flag says why: it teaches the answer and its removal is predicted to lower it
  const why = [
    ...r.stdout.matchAll(
      /flag \S+finetune\.jsonl:\d+.*: teaches "Sydney"; removing it is predicted to lower log p by ([\d.]+)/g,
    ),
  ];
  assert.ok(why.length >= 3, `suggested flags with reasons: ${why.length}`);
  for (const w of why) assert.ok(Number(w[1]) >= 0.1);
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
