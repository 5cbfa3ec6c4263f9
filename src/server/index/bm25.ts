// BM25 over training texts (Grosse et al. retrieve candidates with TF-IDF), scored exactly as
// lunr 2.3.9 scores a one-field index: lunr's tokenizer and pipeline (trimmer, English stop
// words, Porter stemmer) make the terms; each document's term weight is
//   w = round₃(idf · (k1 + 1) · tf / (k1 · (1 − b + b · len / avgLen) + tf)),  k1 = 1.2, b = 0.75,
//   idf = ln(1 + |(N − df + ½) / (df + ½)|),
// and a query q (its terms, each counted once per occurrence) scores a document
// Σ_t q_t w_t / ‖q‖, summed in lunr's term order. The index itself is our own: postings in typed
// arrays, about 12 bytes per (term, document) pair. lunr's index, built per document with
// objects and scored through per-match metadata, took 16 s and 550 MB to build and 1.9 s per
// query at 100k short examples (npm run bench -- corpus); test/unit/bm25.test.ts checks the
// scores equal lunr's.
// Queries are built term by term from lunr's tokenizer, never parsed as lunr query syntax, so
// user text such as "title:x", "foo~2" or "a*b" is matched literally.
import lunr from 'lunr';

const K1 = 1.2;
const B = 0.75;

/** lunr's default indexing pipeline (what lunr() sets up), run on one text. */
const indexPipeline = new lunr.Pipeline();
indexPipeline.add(lunr.trimmer, lunr.stopWordFilter, lunr.stemmer);
/** lunr's default search pipeline. */
const searchPipeline = new lunr.Pipeline();
searchPipeline.add(lunr.stemmer);

export class Bm25Index {
  /** term → its index (numbered in order of first appearance, as lunr numbers them) */
  private readonly termIds = new Map<string, number>();
  /** postings of term t: docs[start[t] .. start[t+1]) with weights in the same positions */
  private readonly start: Int32Array;
  private readonly docs: Int32Array;
  private readonly weights: Float64Array;

  constructor(
    readonly size: number,
    textOf: (i: number) => string,
  ) {
    // pass 1: each document's terms as (term id, tf) pairs, and document frequencies
    const docTerms: Int32Array[] = new Array(size);
    const docTf: Int32Array[] = new Array(size);
    const lengths = new Float64Array(size);
    const df: number[] = [];
    let total = 0;
    // the pipeline's steps each map one token to at most one term, so a word's term is memoized
    const termOf = new Map<string, string | undefined>();
    const terms: string[] = [];
    for (let i = 0; i < size; i++) {
      terms.length = 0;
      for (const token of lunr.tokenizer(textOf(i))) {
        const word = token.toString();
        let term = termOf.get(word);
        if (term === undefined && !termOf.has(word)) {
          const out = indexPipeline.run([token]);
          if (out.length > 1) throw new Error('a lunr pipeline step produced several terms from one token');
          term = out.length ? out[0].toString() : undefined;
          termOf.set(word, term);
        }
        if (term !== undefined) terms.push(term);
      }
      lengths[i] = terms.length;
      total += terms.length;
      const tf = new Map<number, number>();
      for (const term of terms) {
        let id = this.termIds.get(term);
        if (id === undefined) {
          id = this.termIds.size;
          this.termIds.set(term, id);
          df.push(0);
        }
        const c = tf.get(id);
        if (c === undefined) {
          tf.set(id, 1);
          df[id]++;
        } else tf.set(id, c + 1);
      }
      docTerms[i] = Int32Array.from(tf.keys());
      docTf[i] = Int32Array.from(tf.values());
    }
    const nTerms = this.termIds.size;
    this.start = new Int32Array(nTerms + 1);
    for (let t = 0; t < nTerms; t++) this.start[t + 1] = this.start[t] + df[t];
    this.docs = new Int32Array(this.start[nTerms]);
    this.weights = new Float64Array(this.start[nTerms]);
    const fill = this.start.slice(0, nTerms);
    const idf = df.map((n) => Math.log(1 + Math.abs((size - n + 0.5) / (n + 0.5))));
    const avgLength = total / size;
    for (let i = 0; i < size; i++) {
      const ids = docTerms[i];
      for (let j = 0; j < ids.length; j++) {
        const t = ids[j];
        const tf = docTf[i][j];
        // lunr's expression, operation for operation (Builder.createFieldVectors), so the weights are the same doubles
        const score = (idf[t] * ((K1 + 1) * tf)) / (K1 * (1 - B + B * (lengths[i] / avgLength)) + tf);
        const p = fill[t]++;
        this.docs[p] = i;
        this.weights[p] = Math.round(score * 1000) / 1000;
      }
    }
  }

  /** BM25 score of every document for `text` (0 where no term matches). */
  scores(text: string): Float64Array {
    const out = new Float64Array(this.size);
    // lunr trims punctuation only when indexing; do the same to query tokens ("France?" → "france")
    const tokens = lunr
      .tokenizer(text)
      .map((t) => lunr.trimmer(t) as lunr.Token)
      .filter((t) => t.toString().length > 0);
    // the query vector: each occurrence of an indexed term adds 1 to its weight
    const q = new Map<number, number>();
    for (const token of tokens)
      for (const term of searchPipeline.runString(token.toString())) {
        const id = this.termIds.get(term);
        if (id !== undefined) q.set(id, (q.get(id) ?? 0) + 1);
      }
    if (!q.size) return out;
    // lunr sums a dot product in ascending term order, then divides by the query's norm
    const terms = [...q.keys()].sort((a, b) => a - b);
    let sq = 0;
    for (const t of terms) sq += q.get(t)! * q.get(t)!;
    const norm = Math.sqrt(sq);
    for (const t of terms) {
      const w = q.get(t)!;
      for (let p = this.start[t]; p < this.start[t + 1]; p++) out[this.docs[p]] += w * this.weights[p];
    }
    for (let i = 0; i < out.length; i++) if (out[i] !== 0) out[i] = out[i] / norm || 0;
    return out;
  }
}
