import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  bytesPerSequence,
  matrixBytes,
  memoryBoundedBatches,
  type RunShape,
  runShape,
} from '../../src/server/attribution/chunking';
import { ATTENTION_CHUNK_BYTES } from '../../src/server/model/architectures/common';
import { EngineError } from '../../src/server/model/engine';
import { headChunkRows } from '../../src/server/model/head';

const shape: RunShape = {
  modules: [{ name: 'mlp', kind: 'mlp', dIn: 4, dOut: 3, hasBias: true, weightName: 'mlp.weight' }],
  vocab: 10,
  perExampleMatrices: true,
  bytesPerFloat: 4,
};
const seq = (n: number) => ({ ids: Array.from({ length: n }, (_, i) => i) });

describe('memoryBoundedBatches', () => {
  test('splits length-sorted batches to fit the budget; every sequence appears once', () => {
    const seqs = [seq(5), seq(2), seq(9), seq(3), seq(9), seq(1)];
    // budget for two sequences of 9 tokens: three of 3 fit, four of up to 5 do not
    const budget = 2 * bytesPerSequence(shape, 9);
    const out = memoryBoundedBatches(seqs, 16, 0, shape, budget);
    for (const { batch, idx } of out) {
      assert.equal(batch.B, idx.length);
      assert.ok(idx.length === 1 || idx.length * bytesPerSequence(shape, batch.T) <= budget);
      assert.equal(batch.T, Math.max(...idx.map((k) => seqs[k].ids.length)));
    }
    assert.deepEqual(out.flatMap((b) => b.idx).sort(), [0, 1, 2, 3, 4, 5]);
    assert.deepEqual(
      out.map((b) => b.idx),
      [[5, 1, 3], [0, 2], [4]],
    );
  });

  test('the batch size still caps a batch; a sequence over the budget runs alone', () => {
    const seqs = [seq(3), seq(3), seq(3), seq(50)];
    const out = memoryBoundedBatches(seqs, 2, 0, shape, bytesPerSequence(shape, 10));
    assert.deepEqual(
      out.map((b) => b.idx),
      [[0, 1], [2], [3]],
    );
    // only the sequence over the budget is marked so: its run maps its large tensors (util/malloc.ts)
    assert.deepEqual(
      out.map((b) => !!b.batch.overBudget),
      [false, false, true],
    );
    // alone because it is long, not because the batch size left it over: its run skips the arena
    assert.deepEqual(
      out.map((b) => !!b.batch.alone),
      [false, false, true],
    );
  });

  test('a sequence needing half the budget or more is alone (no arena) without being over the budget', () => {
    const budget = bytesPerSequence(shape, 50);
    const half = memoryBoundedBatches([seq(40), seq(3)], 4, 0, shape, budget);
    assert.deepEqual(
      half.map((b) => b.idx),
      [[1], [0]],
    );
    assert.ok(2 * bytesPerSequence(shape, 40) > budget && bytesPerSequence(shape, 40) <= budget);
    assert.deepEqual(
      half.map((b) => [!!b.batch.alone, !!b.batch.overBudget]),
      [
        [false, false],
        [true, false],
      ],
    );
  });

  test('matrices reduced inside the graph count the largest module once; returned ones count every module', () => {
    const two: RunShape = {
      ...shape,
      modules: [
        { name: 'a', kind: 'mlp', dIn: 4, dOut: 3, hasBias: true, weightName: 'a.weight' },
        { name: 'b', kind: 'mlp', dIn: 8, dOut: 6, hasBias: false, weightName: 'b.weight' },
      ],
    };
    const io = 4 + 1 + 3 + 8 + 6;
    const perTokens = 5 * (4 * 10 + 2 * io);
    assert.equal(bytesPerSequence({ ...two, perExampleMatrices: false }, 5), 4 * perTokens);
    assert.equal(bytesPerSequence({ ...two, perExampleMatrices: 'transient' }, 5), 4 * (perTokens + 3 * 48));
    const outputs = 4 * (perTokens + 15 + 48 + 3 * 48);
    assert.equal(bytesPerSequence({ ...two, perExampleMatrices: 'outputs' }, 5), outputs);
    assert.equal(bytesPerSequence({ ...two, perExampleMatrices: true }, 5), outputs);
  });

  test('the head counts four chunks of logits: T rows up to a chunk, no more at longer T', () => {
    const V = 50304;
    const big = { ...shape, vocab: V, perExampleMatrices: false as const };
    const rows = headChunkRows(V, 4);
    assert.ok(rows > 1 && rows < 2048);
    const head = (T: number) => bytesPerSequence(big, T) - bytesPerSequence({ ...big, vocab: 0 }, T);
    assert.equal(head(rows - 1), 4 * 4 * (rows - 1) * V);
    assert.equal(head(2048), 4 * 4 * rows * V);
    assert.equal(head(4 * 2048), head(2048));
  });

  test('one chunk of attention scores counts four times: h·T² for short sequences, ATTENTION_CHUNK_BYTES for long ones', () => {
    const base = bytesPerSequence({ ...shape, perExampleMatrices: false }, 7);
    assert.equal(bytesPerSequence({ ...shape, perExampleMatrices: false, heads: 3 }, 7), base + 4 * 4 * 3 * 49);
    // quadratic in T: a sequence twice as long adds four times the attention bytes
    const at = (T: number) =>
      bytesPerSequence({ ...shape, perExampleMatrices: false, heads: 3 }, T) -
      bytesPerSequence({ ...shape, perExampleMatrices: false }, T);
    assert.equal(at(14), 4 * at(7));
    // long sequences: attention takes its queries in chunks of ATTENTION_CHUNK_BYTES of scores, so
    // the count stops growing quadratically (Pythia-70M's 8 heads at 2,048 tokens: 128 MiB, not 537 MB)
    const at8 = (T: number) =>
      bytesPerSequence({ ...shape, perExampleMatrices: false, heads: 8 }, T) -
      bytesPerSequence({ ...shape, perExampleMatrices: false }, T);
    assert.equal(at8(2048), 4 * ATTENTION_CHUNK_BYTES);
    assert.equal(at8(8192), 4 * ATTENTION_CHUNK_BYTES);
    assert.equal(at8(512), 4 * 4 * 8 * 512 * 512);
    // never less than one query row: h·T alone past the chunk's bytes
    const T1 = (2 * ATTENTION_CHUNK_BYTES) / 4 / 8;
    assert.equal(at8(T1), 4 * 4 * 8 * T1);
    // the head count comes from the config as GPT-2 and the others write it
    assert.equal(runShape(shape.modules, { vocab_size: 10, n_head: 12 }, false, false).heads, 12);
    assert.equal(runShape(shape.modules, { vocab_size: 10, num_attention_heads: 9 }, false, true).heads, 9);
    assert.equal(runShape(shape.modules, { text_config: { num_attention_heads: 5 } }, false, false).heads, 5);
  });

  test('a sequence too long for the memory left is refused with its length and the estimate, before any run', () => {
    const long: RunShape = { ...shape, perExampleMatrices: false, heads: 3 };
    const saved = process.env.INFLUENCE_LENS_MEMORY_MB;
    // a machine with 8 MiB beyond this process: 1,000 tokens' attention scores alone are 48 MB
    process.env.INFLUENCE_LENS_MEMORY_MB = String(Math.ceil(process.memoryUsage().rss / 2 ** 20) + 8);
    try {
      assert.throws(
        () => memoryBoundedBatches([seq(5), seq(1000), seq(7)], 4, 0, long, 1e12),
        (e: Error) =>
          e instanceof EngineError &&
          /a sequence of 1000 tokens needs at least 4\d MiB in one run/.test(e.message) &&
          /shorten/.test(e.message),
      );
      // short sequences still batch
      assert.equal(memoryBoundedBatches([seq(5), seq(7)], 4, 0, long, 1e12).length, 1);
    } finally {
      if (saved === undefined) delete process.env.INFLUENCE_LENS_MEMORY_MB;
      else process.env.INFLUENCE_LENS_MEMORY_MB = saved;
    }
    // on this machine's real memory, the same long sequence is far from the limit
    assert.equal(memoryBoundedBatches([seq(1000)], 1, 0, long).length, 1);
  });
});

test('matrixBytes: one d_out × d_A matrix per module, the bias a column of its own', () => {
  // 3 × (4 + 1) floats
  assert.equal(matrixBytes(shape.modules, false), 60);
  assert.equal(matrixBytes(shape.modules, true), 120);
});
