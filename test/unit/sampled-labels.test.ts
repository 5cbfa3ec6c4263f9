// Labels sampled from the model's own distribution (the true Fisher's labels): the graph draws
// each token's label by inverse CDF from a uniform fed from JS. Checked here against the same
// draw done in JS from the graph's own logits, and the loss gradient against the data-label
// graph fed those labels (the two graphs must agree on what was drawn and on its gradient).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Model, makeBatch } from '../../src/server/model/engine';
import { Rng } from '../../src/server/util/random';
import { useTempHome } from './helpers/env';

useTempHome();

// The vocabulary in one block, and in blocks of 7 and 64 words (model/head.ts draws the block from
// the blocks' shares, then the word inside it; most blocks then hold no row's draw).
for (const [arch, headVocab] of [
  ['gpt2', undefined],
  ['llama', undefined],
  ['gpt2', 7],
  ['llama', 64],
] as const) {
  const blocks = headVocab ? `, blocks of ${headVocab} words` : '';
  test(`sampled labels (${arch}${blocks}): the inverse-CDF draw of the logits, and the gradient of the data-label loss on them`, async () => {
    const model = Model.open(`test/fixtures/models/${arch}`, {
      threads: 1,
      cacheDir: process.env.INFLUENCE_LENS_CACHE,
      headVocab,
    });
    const rng = new Rng(3);
    const V = Number(model.config.vocab_size);
    const seqs = [7, 4].map((n) => ({ ids: Array.from({ length: n }, () => rng.int(V)) }));
    const batch = makeBatch(seqs, 0);
    const uniforms = Float32Array.from({ length: batch.B * batch.T }, () => rng.next());
    uniforms[0] = 0.999999; // near the top of the CDF, where rounding can leave cdf[V−1] < u
    const sampled = await model.compile({
      labels: 'sampled',
      sampledIds: true,
      logits: true,
      perToken: true,
      modules: 'all',
    });
    const out = await sampled.run(batch, { uniforms });
    const logits = out.logits.data as Float32Array;
    const ids = out.sampled_ids.data as BigInt64Array;
    for (let r = 0; r < batch.B * batch.T; r++) {
      const row = logits.subarray(r * V, (r + 1) * V);
      const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
      const p = Array.from(row, (x) => Math.exp(x - max));
      const z = p.reduce((a, b) => a + b, 0);
      // count of CDF entries below u, clamped to the last id (as the graph does)
      let cdf = 0;
      let k = 0;
      while (k < V && cdf + p[k] / z < uniforms[r]) cdf += p[k++] / z;
      const want = Math.min(k, V - 1);
      const got = Number(ids[r]);
      // float32 vs fp64 CDF sums may disagree at a boundary: then the neighbour is the only other answer
      assert.ok(Math.abs(got - want) <= 1, `row ${r}: drew ${got}, the JS inverse CDF ${want}`);
      if (got !== want) {
        const edge = p.slice(0, Math.min(got, want) + 1).reduce((a, b) => a + b, 0) / z;
        assert.ok(Math.abs(edge - uniforms[r]) < 1e-5, `row ${r}: ${got} vs ${want} away from a CDF boundary`);
      }
    }
    // the data-label graph on the drawn labels: same module gradients (shifted targets aside,
    // sampled labels replace every position's target, so feed them as the targets)
    const data = await model.compile({ labels: 'data', perToken: true, modules: 'all' });
    const withDrawn = { ...batch, targetIds: ids.slice() };
    const ref = await data.run(withDrawn);
    for (const m of sampled.modules) {
      const a = out[`g.${m.name}`].data as Float32Array;
      const b = ref[`g.${m.name}`].data as Float32Array;
      let num = 0;
      let den = 0;
      for (let i = 0; i < a.length; i++) {
        num += (a[i] - b[i]) ** 2;
        den += b[i] ** 2;
      }
      assert.ok(den > 0 && Math.sqrt(num / den) < 1e-5, `${m.name}: relative difference ${Math.sqrt(num / den)}`);
    }
  });
}
