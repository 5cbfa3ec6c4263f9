// `npm run bench -- --quick` (tools/bench, outside the shipped package): CI smoke coverage of the one-command benchmark. It checks that
// every suite runs and the combined report holds what the README's table is made from — never
// a speed (speed goals live in the benchmark's own output, not in tests).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const ROOT = resolve(import.meta.dirname, '../..');

test('npm run bench -- --quick: ekfac, server and eval in one report', { timeout: 900_000 }, () => {
  const r = spawnSync(
    process.execPath,
    ['--import', import.meta.resolve('tsx'), join(ROOT, 'tools/bench/bench.ts'), '--quick', '--no-kronfluence'],
    { cwd: home, encoding: 'utf8', env: { ...process.env, HOME: home, INFLUENCE_LENS_CACHE: join(home, 'cache') } },
  );
  assert.equal(r.status, 0, `${r.stdout.slice(-2000)}\n${r.stderr.slice(-2000)}`);
  const dir = join(home, 'bench/results');
  const json = readdirSync(dir).find((f) => f.endsWith('-quick.json'));
  assert.ok(json, 'a report in bench/results of the working directory');
  assert.ok(existsSync(join(dir, json.replace(/\.json$/, '.md'))));
  const rep = JSON.parse(readFileSync(join(dir, json), 'utf8'));
  const { ekfac, server, eval: ev } = rep.suites;
  assert.ok(ekfac.ours.fit_tokens_per_second > 0 && ekfac.ours.candidates_per_second > 0);
  assert.ok(ekfac.peak_rss_mb > 0);
  assert.equal(ekfac.kronfluence, null, '--no-kronfluence');
  assert.deepEqual(
    server.results.map((x: { method: string }) => x.method),
    ['ekfac', 'multistage', 'bm25'],
  );
  assert.ok(server.results.every((x: { p50_ms: number; candidates: number }) => x.p50_ms > 0 && x.candidates > 300));
  const planted = ev.retrieval.find(
    (x: { task: string; method: string }) => x.task === 'planted' && x.method === 'EK-FAC',
  );
  assert.equal(planted['Recall@10'], 1, 'EK-FAC finds the planted sources of the embedded model');
  // the non-lexical task: every method's Recall@10 / MRR, the retrain check and BM25's MRR
  assert.deepEqual(
    ev.nonlexical.rows
      .filter((x: { queries: string }) => x.queries === 'verified')
      .map((x: { method: string }) => x.method),
    ['EK-FAC', 'gradient dot product', 'gradient cosine', 'RepSim', 'BM25'],
  );
  assert.equal(typeof ev.nonlexical.learned_from_planted, 'boolean');
  assert.ok(ev.nonlexical.bm25_mrr >= 0 && ev.nonlexical.bm25_mrr <= 1);
  assert.ok(ev.lds.rows.length >= 5 && ev.lds.rows.every((x: { LDS: number }) => Math.abs(x.LDS) <= 1));
  if (Array.isArray(ev.ground_truth))
    assert.ok(ev.ground_truth.every((x: { Spearman: number }) => Math.abs(x.Spearman) <= 1));
  const measures = rep.headline.map((x: { measure: string }) => x.measure);
  assert.ok(measures.includes('EK-FAC fit, tokens/s'));
  assert.ok(measures.some((m: string) => m.startsWith('planted sources')));
  assert.ok(measures.some((m: string) => m.startsWith('LDS')));
});
