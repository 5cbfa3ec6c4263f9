// The LM head and its cross-entropy run in chunks of tokens (model/head.ts): the chunked graph
// must give what the one-chunk graph gives, in fp64 so that only summation order can differ.
// 14 tokens in chunks of 3 (five chunks, one row of padding) and of 5 (three, one row), against
// one chunk of all 14: losses, drawn labels, every module's g_t and every parameter's gradient
// (the head's weight summed over chunks in the second loop). The vocabulary also goes a block at a
// time (the log-sum-exp and the gradient carried online; sampled labels drawn from the blocks'
// shares): blocks of 7 words (the last of 320 shorter), 64 (five equal ones) and 319 (a last block
// of one word).
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { type GraphRequest, Model, makeBatch, type RunResult } from '../../src/server/model/engine';
import { HEAD_BLOCK_BYTES, HEAD_BLOCK_ROWS, headChunkRows, headPlan } from '../../src/server/model/head';
import { readSafetensorsHeader, readTensorF64, writeSafetensors } from '../../src/server/model/safetensors';
import { Rng } from '../../src/server/util/random';
import { useTempHome } from './helpers/env';
import { relErr } from './helpers/golden';

useTempHome();

const TOL = 1e-12;

for (const arch of ['gpt2', 'llama']) {
  for (const labels of ['data', 'sampled'] as const) {
    test(`head in chunks (${arch}, ${labels} labels): the same losses and gradients as one chunk`, async () => {
      const open = (headRows: number, headVocab?: number) =>
        Model.open(`test/fixtures/models/${arch}`, {
          threads: 1,
          cacheDir: process.env.INFLUENCE_LENS_CACHE,
          precision: 'fp64',
          headRows,
          headVocab,
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
      const run = async (headRows: number, headVocab?: number): Promise<RunResult> => {
        const graph = await open(headRows, headVocab).compile(req);
        return graph.run(batch, labels === 'sampled' ? { uniforms } : {});
      };
      const whole = await run(1000);
      const names = Object.keys(whole).filter((n) => n !== 'sampled_ids');
      assert.ok(names.some((n) => n.startsWith('grad.')) && names.some((n) => n.startsWith('g.')));
      const cuts: Array<[number, number | undefined]> = [
        [3, undefined],
        [5, undefined],
        [3, 7],
        [5, 64],
        [14, 319],
      ];
      for (const [rows, words] of cuts) {
        const chunked = await run(rows, words);
        const what = `rows ${rows}${words ? `, ${words} words a block` : ''}`;
        if (labels === 'sampled')
          assert.deepEqual(chunked.sampled_ids.data, whole.sampled_ids.data, `${what}: the same labels drawn`);
        for (const n of names) {
          const e = relErr(chunked[n].data as Float64Array, whole[n].data as Float64Array);
          assert.ok(e <= TOL, `${what}, ${n}: relative difference ${e.toExponential(2)} > ${TOL}`);
        }
      }
    });
  }
}

test('head chunk rows and vocabulary blocks must be positive integers', async () => {
  for (const headRows of [0, 2.5, -1])
    await assert.rejects(
      () => Model.open('test/fixtures/models/gpt2', { headRows }).compile({ tokenLoss: true }),
      /head chunk rows must be a positive integer/,
    );
  for (const headVocab of [0, 2.5, -1])
    await assert.rejects(
      () => Model.open('test/fixtures/models/gpt2', { headVocab }).compile({ tokenLoss: true }),
      /head vocabulary block must be a positive integer/,
    );
});

test('a target outside the vocabulary fails or gives a NaN loss, never a finite wrong one (one block of the vocabulary, and several)', async () => {
  const V = 320;
  for (const headVocab of [undefined, 7])
    for (const grad of [false, true]) {
      const model = Model.open('test/fixtures/models/llama', {
        threads: 1,
        cacheDir: process.env.INFLUENCE_LENS_CACHE,
        headVocab,
      });
      assert.equal(Number(model.config.vocab_size), V);
      const graph = await model.compile({ labels: 'data', tokenLoss: true, perToken: grad, modules: 'all' });
      for (const bad of [V, V + 100, -1]) {
        const batch = makeBatch([{ ids: [5, 6, 7, 8] }], 0);
        batch.targetIds[1] = BigInt(bad);
        const what = `target ${bad}, ${headVocab ? `blocks of ${headVocab}` : 'one block'}, ${grad ? 'with' : 'without'} gradients`;
        let out: RunResult;
        try {
          out = await graph.run(batch);
        } catch (e) {
          // ONNX Runtime's bounds check (the gradient's Gather of the target's row) refused it
          assert.match((e as Error).message, /out of data bounds|out of bounds/, what);
          continue;
        }
        const nll = out.token_nll.data as Float32Array;
        assert.ok(Number.isNaN(nll[1]), `${what}: loss ${nll[1]} at the bad target`);
        assert.ok(Number.isFinite(nll[0]) && Number.isFinite(nll[2]), `${what}: the other tokens keep their loss`);
      }
    }
});

test('the vocabulary-blocked plan: a block within HEAD_BLOCK_BYTES, rows and blocks overridable', () => {
  const p = headPlan(262144, 640, 4);
  assert.equal(p.rows, HEAD_BLOCK_ROWS);
  assert.ok(p.rows * p.vocabBlock * 4 <= HEAD_BLOCK_BYTES && p.vocabBlock * 640 * 4 <= HEAD_BLOCK_BYTES);
  assert.ok(p.vocabBlock >= 256, `a block of ${p.vocabBlock} words`);
  assert.equal(p.logitRows, headChunkRows(262144, 4));
  // a wide model: the weight's slice bounds the block
  const wide = headPlan(128256, 4096, 4);
  assert.ok(wide.vocabBlock * 4096 * 4 <= HEAD_BLOCK_BYTES, `${wide.vocabBlock} words of 4,096`);
  // a small vocabulary is one block
  assert.equal(headPlan(320, 64, 8).vocabBlock, 320);
  assert.deepEqual(headPlan(320, 64, 8, { rows: 3, vocabBlock: 7 }), { rows: 3, vocabBlock: 7, logitRows: 3 });
  assert.equal(headPlan(320, 64, 8, { vocabBlock: 1000 }).vocabBlock, 320);
});

test('a memorised token: the float32 gradient matches fp64 (softmax − e_target without p_t − 1 cancelling)', async () => {
  // the fixture with its final norm scaled ×60: greedy continuations get −log p of 1e-3 … 1e-16,
  // where p_t rounds to 1 in float32 (p_t − 1 was 10–80% off before the target entry became −Σ_{j≠t} p_j)
  const dir = join(mkdtempSync(join(tmpdir(), 'il-memorised-')), 'm');
  cpSync('test/fixtures/models/llama', dir, { recursive: true });
  const f = join(dir, 'model.safetensors');
  const h = readSafetensorsHeader(f);
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  for (const [name, t] of h.tensors) {
    const x = Float32Array.from(readTensorF64(h, name));
    if (name === 'model.norm.weight') for (let i = 0; i < x.length; i++) x[i] *= 60;
    tensors[name] = { dtype: 'F32', shape: t.shape, data: x };
  }
  writeSafetensors(f, tensors, h.metadata);
  const m64 = Model.open(dir, { threads: 1, precision: 'fp64', cacheDir: process.env.INFLUENCE_LENS_CACHE });
  // with the vocabulary in one block, and in blocks of 7 and 64 words (the maximum and the target's
  // logit found in different blocks, the running sums rescaled as the maximum grows)
  const blocks = [undefined, 7, 64];
  const V = Number(m64.config.vocab_size);
  const ids = [5];
  const lg = await m64.compile({ labels: 'data', logits: true, modules: 'all' });
  for (let s = 0; s < 10; s++) {
    const L = (await lg.run(makeBatch([{ ids }], 0))).logits.data as Float64Array;
    const row = L.subarray((ids.length - 1) * V, ids.length * V);
    let best = 0;
    for (let j = 1; j < V; j++) if (row[j] > row[best]) best = j;
    ids.push(best);
  }
  const req: GraphRequest = { labels: 'data', tokenLoss: true, perToken: true, modules: 'all' };
  const a = await (await m64.compile(req)).run(makeBatch([{ ids }], 0));
  const nll = a.token_nll.data as Float64Array;
  assert.ok(
    Array.from(nll).filter((x) => x > 0 && x < 1e-6).length >= 3,
    `memorised tokens: ${Array.from(nll, (x) => x.toExponential(1))}`,
  );
  for (const headVocab of blocks) {
    const m32 = Model.open(dir, { threads: 1, cacheDir: process.env.INFLUENCE_LENS_CACHE, headVocab });
    const b = await (await m32.compile(req)).run(makeBatch([{ ids }], 0));
    const what = headVocab ? `blocks of ${headVocab} words` : 'one block';
    const n32 = b.token_nll.data as Float32Array;
    for (let t = 0; t < ids.length; t++)
      assert.ok(
        Math.abs(n32[t] - nll[t]) <= 1e-5 * Math.max(1, nll[t]),
        `${what}, token ${t}: −log p ${n32[t]} against ${nll[t]}`,
      );
    checkGradients(a, b, ids.length, nll, what);
  }
  // sampled labels: a memorised token is drawn as itself, the row's maximum, which the running sums
  // leave out (sampledVocabularyBlocks); the same uniforms in both precisions
  const uniforms = Float32Array.from(ids, (_, i) => (i * 0.37 + 0.11) % 1);
  const sampled: GraphRequest = { ...req, labels: 'sampled', sampledIds: true };
  const s64 = await (await m64.compile(sampled)).run(makeBatch([{ ids }], 0), { uniforms });
  const n64 = s64.token_nll.data as Float64Array;
  assert.ok(
    Array.from(n64).filter((x) => x > 0 && x < 1e-6).length >= 3,
    `memorised draws: ${Array.from(n64, (x) => x.toExponential(1))}`,
  );
  for (const headVocab of blocks) {
    const m32 = Model.open(dir, { threads: 1, cacheDir: process.env.INFLUENCE_LENS_CACHE, headVocab });
    const s32 = await (await m32.compile(sampled)).run(makeBatch([{ ids }], 0), { uniforms });
    const what = `sampled, ${headVocab ? `blocks of ${headVocab} words` : 'one block'}`;
    assert.deepEqual(s32.sampled_ids.data, s64.sampled_ids.data, `${what}: the same labels drawn`);
    checkGradients(s64, s32, ids.length, n64, what);
  }
});

/** every module's g_t of each token: float32 (`b`) within 1e-3 relative of fp64 (`a`) */
function checkGradients(a: RunResult, b: RunResult, tokens: number, nll: Float64Array, what: string): void {
  for (const n of Object.keys(a).filter((k) => k.startsWith('g.'))) {
    const x = a[n].data as Float64Array;
    const y = b[n].data as Float32Array;
    const d = x.length / tokens;
    for (let t = 0; t < tokens; t++) {
      let num = 0;
      let den = 0;
      for (let i = t * d; i < (t + 1) * d; i++) {
        num += (x[i] - y[i]) ** 2;
        den += x[i] ** 2;
      }
      const e = Math.sqrt(num / Math.max(den, 1e-300));
      assert.ok(
        e < 1e-3,
        `${what}, ${n}, token ${t} (−log p ${nll[t].toExponential(1)}): float32 off by ${e.toExponential(1)}`,
      );
    }
  }
}
