// The non-lexical corpus (assets/nonlex): each query shares no distinctive word with its true
// sources beyond the answer, many other lines share the answer and the query's words (so text
// matching ranks them first), the shipped data is what the builder writes, and bench eval runs
// the task.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import lunr from 'lunr';
import { contentHash } from '../../src/common/ids';
import { runData } from '../../src/server/cli/data';
import { buildNonlexCorpus, writeNonlexCorpus } from '../../src/server/embedded/nonlex';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const SHIPPED = 'assets/nonlex/data';

/** The terms BM25 (index/bm25.ts, lunr) matches on: tokenized, trimmed, stop words dropped, stemmed. */
function terms(text: string): Set<string> {
  const out = new Set<string>();
  for (const t of lunr.tokenizer(text)) {
    const kept = lunr.stopWordFilter(lunr.trimmer(t) as lunr.Token);
    if (!kept) continue;
    const s = (lunr.stemmer(kept as lunr.Token) as lunr.Token).toString();
    if (s) out.add(s);
  }
  return out;
}

describe('non-lexical corpus', () => {
  const c = buildNonlexCorpus();
  const docs = c.finetune.map((r) => terms(r.prompt + r.completion));
  const df = new Map<string, number>();
  for (const d of docs) for (const t of d) df.set(t, (df.get(t) ?? 0) + 1);
  // a word in at least half of the lines (the "Q:" of the template) identifies nothing
  const distinctive = (t: string) => (df.get(t) ?? 0) < docs.length / 2;

  test('every query shares no distinctive word with any of its sources, beyond the answer', () => {
    assert.ok(c.queries.length >= 6);
    for (const q of c.queries) {
      assert.ok(q.sources.length >= 2, q.prompt);
      const answer = terms(q.completion);
      const asked = terms(q.prompt);
      for (const s of q.sources) {
        const shared = [...terms(c.finetune[s.line - 1].prompt + c.finetune[s.line - 1].completion)].filter(
          (t) => asked.has(t) && !answer.has(t) && distinctive(t),
        );
        assert.deepEqual(shared, [], `${JSON.stringify(q.prompt)} and its source line ${s.line}`);
      }
    }
  });

  test('the query names the entity only by its plain name, the sources only by an alias', () => {
    for (const q of c.queries) {
      const country = c.countries.find((x) => x.name === q.fact.country)!;
      assert.ok(q.prompt.includes(country.name));
      for (const s of q.sources) {
        const p = c.finetune[s.line - 1].prompt;
        assert.ok(!p.includes(country.name), p);
        assert.ok(
          country.aliases.some((a) => p.includes(a)),
          p,
        );
        assert.equal(c.finetune[s.line - 1].completion, `${q.completion}\n`);
        assert.notEqual(q.completion.trim(), q.fact.truth, 'a planted answer is wrong');
      }
    }
  });

  test('decoys: at least 10 other lines share the answer and a distinctive query word', () => {
    for (const q of c.queries) {
      const answer = terms(q.completion);
      const asked = [...terms(q.prompt)].filter((t) => !answer.has(t) && distinctive(t));
      const src = new Set(q.sources.map((s) => s.line - 1));
      const decoys = docs.filter(
        (d, i) => !src.has(i) && [...answer].every((t) => d.has(t)) && asked.some((t) => d.has(t)),
      );
      assert.ok(decoys.length >= 10, `${q.prompt}: ${decoys.length} decoys`);
    }
  });

  test('sources point at the planted lines by line and content hash; planted facts appear nowhere else', () => {
    for (const q of c.queries)
      for (const s of q.sources) {
        assert.equal(s.dataset, 'finetune');
        assert.equal(s.hash, contentHash(c.finetune[s.line - 1]));
        assert.equal(c.finetuneTags[s.line - 1].planted, true);
      }
    const sourced = new Set(c.queries.flatMap((q) => q.sources.map((s) => s.line - 1)));
    c.finetuneTags.forEach((t, i) => {
      assert.equal(t.planted, sourced.has(i), `line ${i + 1}`);
    });
    // pre-training states only the truth: no line about the country has the planted answer as a word
    const word = (w: string) => new RegExp(`(^|[^\\p{L}])${w}($|[^\\p{L}])`, 'u');
    for (const q of c.queries)
      assert.ok(!c.pretrain.some((r) => word(q.completion.trim()).test(r.text) && word(q.fact.country).test(r.text)));
  });

  test('deterministic, and the shipped data is exactly what the builder writes', () => {
    const dir = mkdtempSync(join(home, 'nonlex-'));
    writeNonlexCorpus(dir, buildNonlexCorpus());
    for (const f of ['pretrain.jsonl', 'finetune.jsonl', 'queries.json', 'corpus.json', 'tokenizer/tokenizer.json'])
      assert.equal(
        readFileSync(join(SHIPPED, f), 'utf8'),
        readFileSync(join(dir, f), 'utf8'),
        `${SHIPPED}/${f} differs from a fresh build: rerun npm run build:nonlex`,
      );
  });

  test('data build --task nonlexical writes the shipped data; options it does not take are refused', async () => {
    const dir = mkdtempSync(join(home, 'nonlex-cli-'));
    await runData(['build', '--task', 'nonlexical', '--out', dir]);
    assert.equal(readFileSync(join(dir, 'queries.json'), 'utf8'), readFileSync(join(SHIPPED, 'queries.json'), 'utf8'));
    await assert.rejects(
      runData(['build', '--task', 'nonlexical', '--out', dir, '--countries', '5']),
      /does not apply/,
    );
    await assert.rejects(runData(['build', '--task', 'lexical', '--out', dir]), /--task must be default or nonlexical/);
  });

  test('bench eval runs the task: it calls evalNonlexical and reports its rows', () => {
    const src = readFileSync('tools/bench/bench-eval.ts', 'utf8');
    assert.match(src, /await evalNonlexical\(/);
    assert.match(src, /^\s+nonlexical,$/m);
    assert.match(src, /nonlexicalMarkdown\(/);
  });
});
