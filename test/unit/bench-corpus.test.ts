// `npm run bench -- corpus` (tools/bench, not shipped): its generated file is deterministic, keeps
// the fine-tuning lines verbatim, repeats no line and holds only valid prompt/completion records;
// and a small run goes end to end (never a speed: speed goals live in the benchmark's output).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { embeddedDefault } from '../../src/server/defaults';
import { corpusLines } from '../../tools/bench/bench-corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const ROOT = resolve(import.meta.dirname, '../..');

test('the generated corpus: deterministic, the fine-tuning lines kept, no repeats, valid records', () => {
  const a = corpusLines(2000, 0);
  assert.deepEqual(corpusLines(2000, 0), a);
  assert.notDeepEqual(corpusLines(2000, 1), a);
  assert.equal(a.length, 2000);
  assert.equal(new Set(a).size, a.length, 'no line repeats');
  const original = readFileSync(embeddedDefault().finetuneData, 'utf8').split('\n').filter(Boolean);
  const kept = a.filter((l) => original.includes(l));
  assert.deepEqual(kept, original, 'every fine-tuning line, in order');
  for (const l of a) {
    const r = JSON.parse(l);
    assert.deepEqual(Object.keys(r), ['prompt', 'completion']);
    assert.ok(r.prompt.length > 0 && r.completion.length > 1, l);
  }
  assert.throws(() => corpusLines(100, 0), /at least 313/);
});

test('npm run bench -- corpus --examples 600: every step measured, a report written', { timeout: 600_000 }, () => {
  const report = join(home, 'corpus-600');
  const r = spawnSync(
    process.execPath,
    [
      '--import',
      import.meta.resolve('tsx'),
      join(ROOT, 'tools/bench/bench.ts'),
      'corpus',
      '--examples',
      '600',
      '--queries',
      '2',
      '--report',
      report,
    ],
    { cwd: ROOT, encoding: 'utf8', env: { ...process.env, HOME: home, INFLUENCE_LENS_CACHE: join(home, 'cache') } },
  );
  assert.equal(r.status, 0, `${r.stdout.slice(-2000)}\n${r.stderr.slice(-2000)}`);
  const rep = JSON.parse(readFileSync(`${report}.json`, 'utf8'));
  assert.equal(rep.examples, 600);
  assert.ok(rep.in_process.parse_ms > 0 && rep.in_process.tokenize_ms > 0 && rep.in_process.bm25_query.n === 2);
  assert.ok(rep.cold.start_ms > 0 && rep.cold.reload_ms > 0);
  // above the store's minExamples (512): ekfac goes through the store and its exact rerank
  assert.ok(rep.cold.index.bytes_on_disk > 0 && rep.cold.index.bytes_per_example > 0);
  assert.equal(rep.cold.ekfac.n, 2);
  assert.ok(rep.cold.ekfac.rescored_median > 0);
  // the two planted queries' 8 sources, each shown, ranked out by exact EK-FAC, or lost by the store
  const src = rep.cold.ekfac.sources;
  assert.equal(src.planted.sources, 8);
  assert.equal(src.backdoor.sources, 0);
  assert.equal(src.planted.shown + src.planted.below_exact_top10 + src.planted.lost_by_store, 8);
  assert.equal(src.planted.shown / 8, rep.cold.ekfac.recall_at_10.planted);
  // exact EK-FAC over the 313 fine-tuning lines alone puts every planted source in its top 10 (the demo's case)
  assert.equal(src.planted.top10_of_finetune, 8);
  assert.equal(src.planted.lost_by_store, 0, 'the store lost a source that exact scoring would show');
  assert.equal(rep.cold.bm25.n, 2);
  assert.ok(rep.cold.memory.peak_mib > 0 && rep.restart.memory.peak_mib > 0);
  assert.ok(rep.restart.first_ekfac_ms > 0);
  assert.match(readFileSync(`${report}.md`, 'utf8'), /ekfac explain \(store \+ exact rerank\)/);
  assert.match(readFileSync(`${report}.md`, 'utf8'), /true sources checked exactly/);
});
