// BM25 over training texts with lunr (Grosse et al. retrieve candidates with TF-IDF; lunr's
// scoring is BM25 with k1 = 1.2, b = 0.75, after its English stemmer and stop-word filter).
// Queries are built term by term from lunr's own tokenizer, never parsed as lunr query syntax,
// so user text such as "title:x" or "foo~2" is matched literally.
import lunr from 'lunr';

export class Bm25Index {
  private readonly index: lunr.Index;

  constructor(
    readonly size: number,
    textOf: (i: number) => string,
  ) {
    this.index = lunr(function () {
      this.ref('i');
      this.field('text');
      for (let i = 0; i < size; i++) this.add({ i: String(i), text: textOf(i) });
    });
  }

  /** BM25 score of every document for `text` (0 where no term matches). */
  scores(text: string): Float64Array {
    const out = new Float64Array(this.size);
    // lunr trims punctuation only when indexing; do the same to query tokens ("France?" → "france")
    const tokens = lunr
      .tokenizer(text)
      .map((t) => lunr.trimmer(t) as lunr.Token)
      .filter((t) => t.toString().length > 0);
    if (!tokens.length) return out;
    const results = this.index.query((q) => {
      q.term(tokens, {});
    });
    for (const r of results) out[Number(r.ref)] = r.score;
    return out;
  }
}
