// The LM head and its cross-entropy run in chunks of tokens (model/head.ts): the chunked graph
// must give what the one-chunk graph gives, in fp64 so that only summation order can differ.
// 14 tokens in chunks of 3 (five chunks, one row of padding) and of 5 (three, one row), against
// one chunk of all 14: losses, drawn labels, every module's g_t and every parameter's gradient
// (the head's weight summed over chunks in the second loop).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type GraphRequest, Model, makeBatch, type RunResult } from '../../src/server/model/engine';
import { Rng } from '../../src/server/util/random';
import { useTempHome } from './helpers/env';
import { relErr } from './helpers/golden';

useTempHome();

const TOL = 1e-12;

for (const arch of ['gpt2', 'llama']) {
  for (const labels of ['data', 'sampled'] as const) {
    test(`head in chunks (${arch}, ${labels} labels): the same losses and gradients as one chunk`, async () => {
      const open = (headRows: number) =>
        Model.open(`test/fixtures/models/${arch}`, {
          threads: 1,
          cacheDir: process.env.INFLUENCE_LENS_CACHE,
          precision: 'fp64',
          headRows,
        });
      const rng = new Rng(11);
      const V = Number(open(1).config.vocab_size);
      const seqs = [7, 5].map((n) => ({ ids: Array.from({ length: n }, () => rng.int(V)) }));
      const batch = makeBatch(seqs, 0);
      assert.equal(batch.B * batch.T, 14);
      const uniforms = Float32Array.from({ length: batch.B * batch.T }, () => rng.next());
      const req: GraphRequest = {
        labels,
        sampledIds: labels === 'sampled',
        tokenLoss: true,
        logits: true,
        perToken: true,
        paramGrads: true,
        modules: 'all',
      };
      const run = async (headRows: number): Promise<RunResult> => {
        const graph = await open(headRows).compile(req);
        return graph.run(batch, labels === 'sampled' ? { uniforms } : {});
      };
      const whole = await run(1000);
      const names = Object.keys(whole).filter((n) => n !== 'sampled_ids');
      assert.ok(names.some((n) => n.startsWith('grad.')) && names.some((n) => n.startsWith('g.')));
      for (const rows of [3, 5]) {
        const chunked = await run(rows);
        if (labels === 'sampled')
          assert.deepEqual(chunked.sampled_ids.data, whole.sampled_ids.data, `rows ${rows}: the same labels drawn`);
        for (const n of names) {
          const e = relErr(chunked[n].data as Float64Array, whole[n].data as Float64Array);
          assert.ok(e <= TOL, `rows ${rows}, ${n}: relative difference ${e.toExponential(2)} > ${TOL}`);
        }
      }
    });
  }
}

test('head chunk rows must be a positive integer', async () => {
  for (const headRows of [0, 2.5, -1])
    await assert.rejects(
      () => Model.open('test/fixtures/models/gpt2', { headRows }).compile({ tokenLoss: true }),
      /head chunk rows must be a positive integer/,
    );
});
