// fitEigenbases decomposes each distinct activation covariance once: modules that read the same
// input (q/k/v, gate/up) share it. The shared result must be exactly what decomposing each
// module's own covariance gives, and modules with different inputs must not share.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { computeEigenbasis } from '../../src/server/attribution/ekfac/eigenbasis';
import { fitCovariances, fitEigenbases } from '../../src/server/attribution/fit';
import { Model } from '../../src/server/model/engine';

test('fitEigenbases: shared activation covariances decomposed once, identical to decomposing each', async () => {
  const model = Model.open('test/fixtures/models/llama');
  const ids = model.tokenizer.encode('The capital of France is Paris. Country 3 has a capital.', {
    addSpecialTokens: false,
  }).ids;
  const examples = [0, 3].map((s) => {
    const x = ids.slice(s);
    return { ids: x, weights: x.map((_, t) => (t < x.length - 1 ? 1 : 0)) };
  });
  const { covariances } = await fitCovariances(model, examples, { modules: 'all', labels: 'empirical', seed: 0 });
  const passed = new Map(covariances);
  const bases = fitEigenbases(passed);
  // each accumulator is dropped once its basis exists
  assert.equal(passed.size, 0);
  assert.equal(bases.size, covariances.size);
  const q = [...bases.keys()].find((n) => n.endsWith('layers.0.self_attn.q_proj'))!;
  const k = [...bases.keys()].find((n) => n.endsWith('layers.0.self_attn.k_proj'))!;
  const o = [...bases.keys()].find((n) => n.endsWith('layers.0.self_attn.o_proj'))!;
  // q and k read the same input: equal activation bases; o reads another
  assert.deepEqual(Array.from(bases.get(k)!.qA), Array.from(bases.get(q)!.qA));
  assert.notDeepEqual(Array.from(bases.get(o)!.qA), Array.from(bases.get(q)!.qA));
  // and every module's basis is what decomposing its own covariances gives
  for (const [name, acc] of covariances) {
    const alone = computeEigenbasis(name, acc.finalize());
    const got = bases.get(name)!;
    assert.deepEqual(Array.from(got.eigA), Array.from(alone.eigA), name);
    assert.deepEqual(Array.from(got.qA), Array.from(alone.qA), name);
    assert.deepEqual(Array.from(got.qS), Array.from(alone.qS), name);
    // a copy, not the same array: nothing downstream can change two modules at once
    if (name !== q && got.qA.length === bases.get(q)!.qA.length) assert.notEqual(got.qA, bases.get(q)!.qA);
    assert.ok(got.qA instanceof Float64Array && got.qS instanceof Float64Array, `${name}: fp64 by default`);
  }
  // fp32: the same fp64 decomposition, each vector rounded once to float32 (shared A included)
  const bases32 = fitEigenbases(new Map(covariances), { precision: 'fp32' });
  for (const [name, b] of bases) {
    const got = bases32.get(name)!;
    assert.ok(got.qA instanceof Float32Array && got.qS instanceof Float32Array, `${name}: float32 eigenvectors`);
    assert.ok(got.eigA instanceof Float64Array && got.eigS instanceof Float64Array, `${name}: fp64 eigenvalues`);
    assert.deepEqual(Array.from(got.qA), Array.from(Float32Array.from(b.qA)), name);
    assert.deepEqual(Array.from(got.qS), Array.from(Float32Array.from(b.qS)), name);
    assert.deepEqual(Array.from(got.eigA), Array.from(b.eigA), name);
  }
});
