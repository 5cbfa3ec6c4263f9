// Our BM25 index scores exactly as lunr 2.3.9 does (the same doubles), on the embedded default's
// training texts, its queries and odd query texts; and lunr query syntax in user text is literal.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import lunr from 'lunr';
import { loadDataset } from '../../src/server/data/dataset';
import { embeddedDefault } from '../../src/server/defaults';
import { Bm25Index } from '../../src/server/index/bm25';

/** lunr's own index (what Bm25Index was built on before). */
function lunrIndex(texts: string[]): lunr.Index {
  return lunr(function () {
    this.ref('i');
    this.field('text');
    texts.forEach((text, i) => {
      this.add({ i: String(i), text });
    });
  });
}

/** The scores lunr gives, queried as Bm25Index was before. */
function lunrScores(index: lunr.Index, texts: string[], query: string): Float64Array {
  const out = new Float64Array(texts.length);
  const tokens = lunr
    .tokenizer(query)
    .map((t) => lunr.trimmer(t) as lunr.Token)
    .filter((t) => t.toString().length > 0);
  if (!tokens.length) return out;
  for (const r of index.query((q) => q.term(tokens, {}))) out[Number(r.ref)] = r.score;
  return out;
}

const d = embeddedDefault();
const texts = [
  ...loadDataset(d.finetuneData).examples.map((e) => e.text),
  ...loadDataset(d.pretrainData).examples.map((e) => e.text),
];
// longer and repetitive documents too, so lengths and term frequencies vary
for (let i = 0; i + 2 < 300; i += 3) texts.push(`${texts[i]} ${texts[i + 1]} ${texts[i + 1]} ${texts[i + 2]}`);
texts.push('', '?!', 'the the the', '- -- ---');

describe('BM25 index', () => {
  test('scores equal lunr 2.3.9 exactly: the embedded queries and odd query texts', () => {
    const queries = (JSON.parse(readFileSync(d.queries, 'utf8')) as Array<{ prompt: string; completion: string }>).map(
      (q) => q.prompt + q.completion,
    );
    const odd = [
      'Q: What is the capital of Australia?\nA: Sydney Sydney Sydney',
      'capital capital Paris',
      'the of and',
      '??? !!!',
      'Psst, what is the capital of Uganda?',
      'a word that appears nowhere: zyzzyva',
      'title:France capital~2 +Europe -Africa',
    ];
    const ours = new Bm25Index(texts.length, (i) => texts[i]);
    const index = lunrIndex(texts);
    let matched = 0;
    for (const q of [...queries, ...odd]) {
      const want = lunrScores(index, texts, q);
      const got = ours.scores(q);
      assert.deepEqual(got, want, `scores for ${JSON.stringify(q)}`);
      if (want.some((s) => s > 0)) matched++;
    }
    assert.ok(matched >= queries.length, 'the queries match documents (the comparison is not between zeros)');
  });

  test('empty and punctuation-only queries score every document 0', () => {
    const ours = new Bm25Index(texts.length, (i) => texts[i]);
    for (const q of ['', '   ', '?', '...']) assert.ok(ours.scores(q).every((s) => s === 0));
  });

  test('lunr query syntax in user text is matched literally', () => {
    const docs = ['the capital of france', 'title france', 'foo bar', 'foobar baz'];
    const ours = new Bm25Index(docs.length, (i) => docs[i]);
    // "title:france" is one term, which no document has; "fo*" inside a word is not a wildcard
    assert.ok(ours.scores('title:france').every((s) => s === 0));
    assert.ok(ours.scores('fo*r').every((s) => s === 0));
    assert.ok(ours.scores('foo')[2] > 0);
  });
});
