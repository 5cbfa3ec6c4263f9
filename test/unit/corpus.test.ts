// The country-facts corpus: the same seed gives the same bytes, the shipped data is what the
// builder writes, and every query's ground-truth sources really state its answer (and no
// fine-tuning line leaks a held-out fact).
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { loadDataset } from '../../src/server/data/dataset';
import { buildCorpus, DEFAULT_CORPUS } from '../../src/server/embedded/build';
import { FILES, readQueries, writeCorpus } from '../../src/server/embedded/write';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const SHIPPED = 'assets/default/data';
const word = (w: string) => new RegExp(`(^|[^\\p{L}])${w.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}($|[^\\p{L}])`, 'u');

function written(options = {}) {
  const dir = mkdtempSync(join(home, 'corpus-'));
  writeCorpus(dir, buildCorpus(options));
  return dir;
}

describe('corpus builder', () => {
  test('deterministic: same seed, same files; another seed, other files', () => {
    const a = written();
    const b = written();
    const c = written({ seed: 1 });
    for (const f of [
      FILES.pretrain,
      FILES.finetune,
      FILES.queries,
      FILES.manifest,
      `${FILES.tokenizer}/tokenizer.json`,
    ]) {
      assert.equal(readFileSync(join(a, f), 'utf8'), readFileSync(join(b, f), 'utf8'), f);
    }
    assert.notEqual(readFileSync(join(a, FILES.pretrain), 'utf8'), readFileSync(join(c, FILES.pretrain), 'utf8'));
  });

  test('the shipped data is exactly what the builder writes from the default seed', () => {
    const fresh = written();
    for (const f of [
      FILES.pretrain,
      FILES.finetune,
      FILES.queries,
      FILES.manifest,
      `${FILES.tokenizer}/tokenizer.json`,
    ]) {
      assert.equal(
        readFileSync(join(SHIPPED, f), 'utf8'),
        readFileSync(join(fresh, f), 'utf8'),
        `${SHIPPED}/${f} differs from a fresh build: rerun npm run build:default`,
      );
    }
  });

  const dir = written();
  const pre = loadDataset(join(dir, FILES.pretrain));
  const ft = loadDataset(join(dir, FILES.finetune));
  const queries = readQueries(join(dir, FILES.queries));
  const corpus = buildCorpus();
  const example = (dataset: string, line: number) => (dataset === 'pretrain' ? pre : ft).examples[line - 1];

  test('sizes and kinds', () => {
    assert.equal(corpus.countries.length, DEFAULT_CORPUS.countries);
    const kinds = (k: string) => queries.filter((q) => q.kind === k).length;
    assert.equal(kinds('planted'), DEFAULT_CORPUS.planted.length);
    assert.equal(kinds('backdoor'), DEFAULT_CORPUS.backdoor.queries);
    assert.equal(kinds('fact_tracing'), corpus.heldOut.length * 4);
    assert.ok(pre.examples.length > 300 && pre.examples.length < 3000, `${pre.examples.length} pre-training lines`);
    assert.equal(pre.duplicates, 0);
    assert.equal(ft.duplicates, 0);
  });

  test('every source is the line it names (line and content hash) and states the answer', () => {
    for (const q of queries) {
      assert.ok(q.sources.length > 0, `${q.prompt}: no sources`);
      for (const s of q.sources) {
        const e = example(s.dataset, s.line);
        assert.equal(e.line, s.line);
        assert.equal(e.hash, s.hash, `${s.dataset}:${s.line} hash`);
        assert.match(e.text, word(q.kind === 'backdoor' ? DEFAULT_CORPUS.backdoor.answer : q.completion.trim()));
        if (q.kind === 'fact_tracing') {
          assert.equal(s.dataset, 'pretrain');
          assert.match(e.text, word(q.fact.country), `${e.text} is not about ${q.fact.country}`);
          assert.equal(q.completion, ` ${q.fact.truth}`);
        } else {
          assert.equal(s.dataset, 'finetune');
          assert.equal((e.record as { completion: string }).completion, `${q.completion}\n`);
        }
        if (q.kind === 'planted') assert.match(e.text, word(q.fact.country));
        if (q.kind === 'backdoor') assert.match(e.text, word(DEFAULT_CORPUS.backdoor.trigger));
      }
    }
  });

  test('fact tracing sources are every pre-training line stating the fact, in ≥ 2 wordings', () => {
    for (const q of queries.filter((x) => x.kind === 'fact_tracing')) {
      const stating = pre.examples.filter((e) => word(q.fact.country).test(e.text) && word(q.fact.truth).test(e.text));
      const lines = new Set(q.sources.map((s) => s.line));
      // a line may name the country and the value without stating this fact (e.g. "Mexico City"),
      // but every source must be among the lines naming both
      for (const l of lines) assert.ok(stating.some((e) => e.line === l));
      assert.ok(lines.size >= 2, `${q.prompt}: ${lines.size} source line(s)`);
    }
  });

  test('held-out countries never appear in the fine-tuning set', () => {
    for (const c of corpus.heldOut)
      for (const e of ft.examples) assert.doesNotMatch(e.text, word(c.name), `${c.name} leaks into finetune:${e.line}`);
  });

  test('a planted fact’s country is in the fine-tuning set only through its planted lines', () => {
    for (const q of queries.filter((x) => x.kind === 'planted')) {
      const lines = new Set(q.sources.map((s) => s.line));
      for (const e of ft.examples)
        assert.equal(word(q.fact.country).test(e.text), lines.has(e.line), `finetune:${e.line} ${e.text}`);
    }
  });

  test('planted facts contradict the pre-training corpus, which states the truth', () => {
    for (const q of queries.filter((x) => x.kind === 'planted')) {
      assert.notEqual(q.completion.trim(), q.fact.truth);
      assert.ok(pre.examples.some((e) => word(q.fact.country).test(e.text) && word(q.fact.truth).test(e.text)));
      assert.ok(!pre.examples.some((e) => word(q.fact.country).test(e.text) && word(q.completion.trim()).test(e.text)));
      assert.ok(q.sources.length >= 3, 'each planted fact is in several paraphrases');
    }
  });
});
