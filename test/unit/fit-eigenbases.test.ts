// fitEigenbases decomposes each distinct activation covariance once: modules that read the same
// input (q/k/v, gate/up) share it. The shared result must be exactly what decomposing each
// module's own covariance gives, and modules with different inputs must not share.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { computeEigenbasis } from '../../src/server/attribution/ekfac/eigenbasis';
import { fitCovariances, fitEigenbases } from '../../src/server/attribution/fit';
import { eighBackend, parallelEigh } from '../../src/server/linalg/eigh';
import { nativeLapack } from '../../src/server/linalg/native';
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
  const bases = await fitEigenbases(passed);
  // each accumulator is dropped once its basis exists
  assert.equal(passed.size, 0);
  assert.equal(bases.size, covariances.size);
  const q = [...bases.keys()].find((n) => n.endsWith('layers.0.self_attn.q_proj'))!;
  const k = [...bases.keys()].find((n) => n.endsWith('layers.0.self_attn.k_proj'))!;
  const o = [...bases.keys()].find((n) => n.endsWith('layers.0.self_attn.o_proj'))!;
  // q and k read the same input: equal activation bases; o reads another
  assert.deepEqual(Array.from(bases.get(k)!.qA), Array.from(bases.get(q)!.qA));
  assert.notDeepEqual(Array.from(bases.get(o)!.qA), Array.from(bases.get(q)!.qA));
  // and every module's basis is what decomposing its own covariances gives, one at a time, under
  // the same BLAS setting (one thread per call: OpenBLAS's threads change the last bits)
  for (const [name, acc] of covariances) {
    const blas = parallelEigh(1, Number.POSITIVE_INFINITY);
    let alone: ReturnType<typeof computeEigenbasis>;
    try {
      alone = computeEigenbasis(name, acc.finalize());
    } finally {
      blas.end();
    }
    const got = bases.get(name)!;
    assert.deepEqual(Array.from(got.eigA), Array.from(alone.eigA), name);
    assert.deepEqual(Array.from(got.qA), Array.from(alone.qA), name);
    assert.deepEqual(Array.from(got.qS), Array.from(alone.qS), name);
    // a copy, not the same array: nothing downstream can change two modules at once
    if (name !== q && got.qA.length === bases.get(q)!.qA.length) assert.notEqual(got.qA, bases.get(q)!.qA);
    assert.ok(got.qA instanceof Float64Array && got.qS instanceof Float64Array, `${name}: fp64 by default`);
  }
  // fp32: the same fp64 decomposition, each vector rounded once to float32 (shared A included)
  const bases32 = await fitEigenbases(new Map(covariances), { precision: 'fp32' });
  for (const [name, b] of bases) {
    const got = bases32.get(name)!;
    assert.ok(got.qA instanceof Float32Array && got.qS instanceof Float32Array, `${name}: float32 eigenvectors`);
    assert.ok(got.eigA instanceof Float64Array && got.eigS instanceof Float64Array, `${name}: fp64 eigenvalues`);
    assert.deepEqual(Array.from(got.qA), Array.from(Float32Array.from(b.qA)), name);
    assert.deepEqual(Array.from(got.qS), Array.from(Float32Array.from(b.qS)), name);
    assert.deepEqual(Array.from(got.eigA), Array.from(b.eigA), name);
  }
});

test('fitEigenbases: several decompositions at once give the bits of one at a time; BLAS threads restored, also after a failure', async (t) => {
  if (!nativeLapack()?.threads) return t.skip(`needs OpenBLAS (${eighBackend().kind})`);
  const threads = nativeLapack()!.threads!;
  const before = threads.get();
  const model = Model.open('test/fixtures/models/llama');
  const ids = model.tokenizer.encode('Paris is the capital of France; Rome is the capital of Italy.', {
    addSpecialTokens: false,
  }).ids;
  const examples = [{ ids, weights: ids.map((_, t) => (t < ids.length - 1 ? 1 : 0)) }];
  const { covariances } = await fitCovariances(model, examples, { modules: 'all', labels: 'empirical', seed: 1 });
  const saved = process.env.INFLUENCE_LENS_EIGH_PARALLEL;
  const fit = async (parallel: string) => {
    process.env.INFLUENCE_LENS_EIGH_PARALLEL = parallel;
    try {
      return await fitEigenbases(new Map(covariances));
    } finally {
      if (saved === undefined) delete process.env.INFLUENCE_LENS_EIGH_PARALLEL;
      else process.env.INFLUENCE_LENS_EIGH_PARALLEL = saved;
    }
  };
  // the count the machine allows is at least 1; 4 at once exercises the queue even on 2 cores
  const one = await fit('1');
  const four = await fit('4');
  assert.equal(threads.get(), before, 'BLAS thread count restored');
  assert.deepEqual([...four.keys()], [...one.keys()], 'bases in module order');
  for (const [name, b] of one) {
    const p = four.get(name)!;
    assert.deepEqual(Array.from(p.qA), Array.from(b.qA), name);
    assert.deepEqual(Array.from(p.qS), Array.from(b.qS), name);
    assert.deepEqual(Array.from(p.eigA), Array.from(b.eigA), name);
    assert.deepEqual(Array.from(p.eigS), Array.from(b.eigS), name);
  }
  // a non-finite covariance: refused by name, the rest not waited for forever, threads restored
  const broken = new Map(covariances);
  const victim = [...broken.keys()][2];
  const sum = broken.get(victim)!.gradientSum;
  const kept = sum[0];
  sum[0] = Number.NaN;
  try {
    await assert.rejects(
      fitEigenbases(broken),
      new RegExp(`NaN in gradient covariance of module ${victim.replace(/\./g, '\\.')} at \\[0, 0\\]`),
    );
  } finally {
    sum[0] = kept;
  }
  assert.equal(threads.get(), before, 'BLAS thread count restored after a failure');
});
