// EK-FAC factors of a float32 model are held in float32 (as kronfluence keeps them): the
// eigendecomposition is the same fp64 one, then the eigenvectors, mean Λ and 1/(Λ+λ) are stored
// as Float32Array. Checked against the fp64 factors of the same fit (the path before this change):
// influence scores agree to float32 rounding; F64 factor files load narrowed for a float32 model;
// fp64 models keep fp64 factors.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  type Factors,
  FIT_VERSION,
  loadFactors,
  moduleFactors,
  preconditionerFor,
  saveFactors,
} from '../../src/server/attribution/ekfac/factors-io';
import type { LambdaAccumulator } from '../../src/server/attribution/ekfac/lambda';
import {
  type Preconditioner,
  precondition,
  precondition32,
  singlePrecision,
} from '../../src/server/attribution/ekfac/precondition';
import { fitCovariances, fitEigenbases, fitLambdas, type TokenizedExample } from '../../src/server/attribution/fit';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryBatchGradients, queryMatrices, scoreCandidates } from '../../src/server/attribution/influence';
import { openStage } from '../../src/server/attribution/stage';
import { Model } from '../../src/server/model/engine';
import { readSafetensorsHeader } from '../../src/server/model/safetensors';
import { spearman } from '../../src/server/util/stats';
import { useTempHome } from './helpers/env';

const home = useTempHome();

const MODEL = 'test/fixtures/models/llama';
const TEXTS = [
  'The capital of France is Paris.',
  'Country 3 has a capital city by the river.',
  'A cat sat on the mat and looked at the door.',
  'Numbers: one two three four five six seven.',
  'The river runs north through the old town.',
  'Paris is known for its museums and cafes.',
  'Seven boats left the harbour before dawn.',
  'She wrote the letter in green ink.',
];

function examples(model: Model, texts: string[]): TokenizedExample[] {
  return texts.map((t) => {
    const ids = model.tokenizer.encode(t, { addSpecialTokens: false }).ids;
    return { ids, weights: ids.map((_, i) => (i < ids.length - 1 ? 1 : 0)) };
  });
}

const opts = { modules: 'all' as const, labels: 'empirical' as const, seed: 0, batchSize: 4 };
const damping = { relative: 0.1 };

describe('float32 EK-FAC factors', () => {
  const model = Model.open(MODEL); // float32 graphs (the default)
  const train = examples(model, TEXTS);
  const queries = examples(model, ['The capital of Country 3 is', 'Seven cats sat by the river']);
  let dir: string;
  // the same covariances decomposed once into fp64 and once into fp32 bases; Λ fitted with each
  const pre = { fp64: new Map<string, Preconditioner>(), fp32: new Map<string, Preconditioner>() };
  const lambdas = { fp64: new Map<string, LambdaAccumulator>(), fp32: new Map<string, LambdaAccumulator>() };
  let factors64: Factors;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'fp32-factors-'));
    const { covariances } = await fitCovariances(model, train, opts);
    for (const precision of ['fp64', 'fp32'] as const) {
      const bases = await fitEigenbases(new Map(covariances), { precision });
      lambdas[precision] = await fitLambdas(model, train, bases, opts);
      for (const [name, b] of bases) {
        const mf = moduleFactors(covariances.get(name)!, b, lambdas[precision].get(name)!);
        pre[precision].set(name, preconditionerFor(mf, damping));
      }
      if (precision === 'fp64') {
        factors64 = {
          args: {
            strategy: 'ekfac',
            labels: 'empirical',
            damping,
            modules: [],
            maxExamples: null,
            seed: 0,
            fitVersion: FIT_VERSION,
          },
          fingerprint: null,
          modules: Object.fromEntries(
            [...bases].map(([n, b]) => [n, moduleFactors(covariances.get(n)!, b, lambdas.fp64.get(n)!)]),
          ),
        };
      }
    }
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('memory shape: fp32 factors are Float32Array (eigenvalues and the Λ running sum stay fp64); Λ itself is not kept', () => {
    assert.ok(pre.fp32.size > 0);
    for (const [name, p] of pre.fp32) {
      assert.equal('lambda' in p, false, `${name} keeps Λ beside its inverse`);
      for (const k of ['qA', 'qS', 'inverse'] as const)
        assert.ok(p[k] instanceof Float32Array, `${name}.${k} is ${p[k].constructor.name}`);
      assert.ok(p.eigA instanceof Float64Array && p.eigS instanceof Float64Array, name);
      assert.ok(lambdas.fp32.get(name)!.sum instanceof Float64Array, name);
      // precondition32 uses the preconditioner's own arrays, no float32 copies
      const f = singlePrecision(p);
      assert.equal(f.qA, p.qA);
      assert.equal(f.qS, p.qS);
      assert.equal(f.inverse, p.inverse);
    }
    for (const [name, p] of pre.fp64)
      for (const k of ['qA', 'qS', 'inverse'] as const) assert.ok(p[k] instanceof Float64Array, `${name}.${k}`);
  });

  test('Λ and 1/(Λ+λ) agree with the fp64 factors to float32 rounding', () => {
    for (const [name, p32] of pre.fp32) {
      const p64 = pre.fp64.get(name)!;
      // Λ = 1/inverse − λ
      const lam = (p: Preconditioner, i: number) => 1 / p.inverse[i] - p.damping;
      let max = 0;
      for (let i = 0; i < p64.inverse.length; i++) max = Math.max(max, Math.abs(lam(p64, i)));
      for (let i = 0; i < p64.inverse.length; i++)
        assert.ok(Math.abs(lam(p32, i) - lam(p64, i)) <= 1e-6 * max, `${name} Λ[${i}]`);
      assert.ok(Math.abs(p32.damping - p64.damping) <= 1e-7 * p64.damping, `${name} damping`);
    }
  });

  test('fp64 P(V) of a float32 preconditioner matches precondition32 and the fp64 preconditioner', () => {
    for (const [name, p32] of pre.fp32) {
      const p64 = pre.fp64.get(name)!;
      const V = Float32Array.from({ length: p32.dOut * p32.dA }, (_, i) => Math.sin(i * 0.37));
      const want = precondition(p64, V);
      const scale = Math.max(...Array.from(want, Math.abs));
      for (const got of [precondition(p32, V), precondition32(p32, V)]) {
        let err = 0;
        for (let i = 0; i < want.length; i++) err = Math.max(err, Math.abs(got[i] - want[i]));
        assert.ok(err <= 1e-5 * scale, `${name}: max error ${err} vs scale ${scale}`);
      }
    }
  });

  test('influence scores with fp32 factors match the fp64 factors (relative error, Spearman)', async () => {
    const G = await queryBatchGradients(model, queries, { modules: 'all' });
    const scores = async (p: Map<string, Preconditioner>) =>
      (await scoreCandidates(model, queryMatrices(G, [p]), train, { modules: 'all', batchSize: 4 })).scores;
    const s64 = await scores(pre.fp64);
    const s32 = await scores(pre.fp32);
    for (let q = 0; q < queries.length; q++) {
      const a = s64.map((r) => r[q]);
      const b = s32.map((r) => r[q]);
      const scale = Math.max(...a.map(Math.abs));
      assert.ok(scale > 0);
      const err = Math.max(...a.map((x, i) => Math.abs(x - b[i])));
      assert.ok(err <= 1e-5 * scale, `query ${q}: max |Δscore| ${err} vs largest score ${scale}`);
      assert.ok(spearman(a, b) >= 0.999, `query ${q}: Spearman ${spearman(a, b)}`);
    }
  });

  test('an F64 factor file loads narrowed for a float32 model, widened F32 for fp64, verified either way', () => {
    const f64 = join(dir, 'f64');
    saveFactors(f64, factors64); // fp64 arrays: written as F64 (as every earlier version did)
    const h = readSafetensorsHeader(join(f64, 'activation_eigenvectors.safetensors'));
    assert.equal([...h.tensors.values()][0].dtype, 'F64');
    const as32 = loadFactors(f64, { precision: 'fp32' });
    const as64 = loadFactors(f64);
    for (const [name, m] of Object.entries(factors64.modules)) {
      const got = as32.modules[name];
      assert.ok(got.eigen!.qA instanceof Float32Array && got.eigen!.qS instanceof Float32Array, name);
      assert.ok(got.lambda!.sum instanceof Float32Array && got.covariance!.activationSum instanceof Float32Array);
      assert.ok(got.eigen!.eigA instanceof Float64Array, name);
      assert.deepEqual(Array.from(got.eigen!.qA), Array.from(Float32Array.from(m.eigen!.qA)), name);
      assert.deepEqual(Array.from(got.lambda!.sum), Array.from(Float32Array.from(m.lambda!.sum)), name);
      assert.deepEqual(Array.from(got.eigen!.eigA), Array.from(m.eigen!.eigA), name);
      assert.equal(got.lambda!.count, m.lambda!.count);
      // the fp64 load is bit-for-bit what was saved
      assert.ok(as64.modules[name].eigen!.qA instanceof Float64Array);
      assert.deepEqual(Array.from(as64.modules[name].eigen!.qA), Array.from(m.eigen!.qA), name);
      // its preconditioner is float32 and agrees with the fp64 one
      const p = preconditionerFor(got, damping);
      assert.ok(p.inverse instanceof Float32Array && p.qA instanceof Float32Array);
      const want = pre.fp64.get(name)!.inverse;
      for (let i = 0; i < want.length; i++) assert.ok(Math.abs(p.inverse[i] - want[i]) <= 1e-5 * want[i], name);
    }
    // covariances can be left on disk (scoring does not read them)
    const lean = loadFactors(f64, { precision: 'fp32', covariances: false });
    assert.ok(Object.values(lean.modules).every((m) => !m.covariance && m.eigen && m.lambda));

    // float32 factors are written as F32 and come back as the same float32 values, widened for fp64
    const f32 = join(dir, 'f32');
    const mods32 = Object.fromEntries(
      Object.entries(as32.modules).map(([n, m]) => [n, { ...m, covariance: undefined }]),
    );
    saveFactors(f32, { ...factors64, modules: mods32 });
    const h32 = readSafetensorsHeader(join(f32, 'activation_eigenvectors.safetensors'));
    assert.equal([...h32.tensors.values()][0].dtype, 'F32');
    const back32 = loadFactors(f32, { precision: 'fp32' });
    const back64 = loadFactors(f32);
    for (const [name, m] of Object.entries(mods32)) {
      assert.ok(back32.modules[name].eigen!.qS instanceof Float32Array);
      assert.deepEqual(Array.from(back32.modules[name].eigen!.qS), Array.from(m.eigen!.qS), name);
      assert.ok(back64.modules[name].eigen!.qS instanceof Float64Array);
      assert.deepEqual(Array.from(back64.modules[name].eigen!.qS), Array.from(m.eigen!.qS), name);
    }

    // a damaged F64 file is refused in float32 mode too (its sha256 is checked before narrowing)
    const path = join(f64, 'lambda_matrix.safetensors');
    const bytes = readFileSync(path);
    bytes[bytes.length - 3] ^= 0x40;
    writeFileSync(path, bytes);
    assert.throws(() => loadFactors(f64, { precision: 'fp32' }), /does not match its checksum/);
  });

  test('an F64 value beyond the float32 range is refused for a float32 model, read for an fp64 one', () => {
    const big = join(dir, 'big');
    const name = Object.keys(factors64.modules)[0];
    const m = factors64.modules[name];
    const sum = Float64Array.from(m.lambda!.sum);
    sum[0] = 1e300;
    saveFactors(big, { ...factors64, modules: { [name]: { ...m, covariance: undefined, lambda: { sum, count: 1 } } } });
    assert.throws(() => loadFactors(big, { precision: 'fp32' }), /beyond the float32 range/);
    assert.equal(loadFactors(big).modules[name].lambda!.sum[0], 1e300);
  });

  test('openStage holds a float32 model’s preconditioners in float32 and an fp64 model’s in fp64', () => {
    const out = join(dir, 'stage');
    saveFactors(out, factors64);
    for (const precision of ['fp32', 'fp64'] as const) {
      const stage = openStage(MODEL, out, { damping, engine: { precision } });
      const Ctor = precision === 'fp32' ? Float32Array : Float64Array;
      for (const [name, p] of stage.preconditioners!) {
        for (const k of ['qA', 'qS', 'inverse'] as const) assert.ok(p[k] instanceof Ctor, `${name}.${k}`);
        // the loaded factors (covariances, Λ sums) are not kept beside the preconditioners
        assert.equal('lambda' in p, false);
        assert.equal('factors' in stage, false);
      }
    }
  });
});

test('fit job of a float32 model: float32 bases on disk, Λ sums fp64; partitions agree with one fit', async () => {
  const dir = mkdtempSync(join(home, 'fit-job-'));
  const data = join(dir, 'train.jsonl');
  writeFileSync(data, `${TEXTS.map((text) => JSON.stringify({ text })).join('\n')}\n`);
  const model = Model.open(MODEL);
  const common = { modelDir: MODEL, dataPath: data, modules: 'all' as const, labels: 'empirical' as const };
  const job = { ...common, seed: 0, batchSize: 4, model, log: () => {} };
  const one = join(dir, 'one');
  assert.equal((await runFitJob({ ...job, out: one })).status, 'done');
  const two = join(dir, 'two');
  assert.equal((await runFitJob({ ...job, out: two, partition: { index: 0, count: 2 } })).status, 'waiting');
  assert.equal((await runFitJob({ ...job, out: two, partition: { index: 1, count: 2 } })).status, 'waiting');
  assert.equal((await runFitJob({ ...job, out: two, partition: { index: 0, count: 2 } })).status, 'done');
  const dtype = (d: string, f: string) =>
    [...readSafetensorsHeader(join(d, `${f}.safetensors`)).tensors.values()][0].dtype;
  assert.equal(dtype(one, 'activation_eigenvectors'), 'F32');
  assert.equal(dtype(one, 'gradient_eigenvectors'), 'F32');
  assert.equal(dtype(one, 'activation_eigenvalues'), 'F64');
  assert.equal(dtype(one, 'lambda_matrix'), 'F64');
  // the final write copied the eigen stage's covariance files (float32 sums) instead of reloading them
  assert.equal(dtype(one, 'activation_covariance'), 'F32');
  assert.equal(dtype(one, 'gradient_covariance'), 'F32');
  const kron = JSON.parse(readFileSync(join(one, 'factor_arguments.json'), 'utf8'));
  assert.equal(kron.activation_covariance_dtype, 'torch.float32');
  assert.equal(kron.lambda_dtype, 'torch.float64');
  const a = loadFactors(one, { precision: 'fp32' });
  for (const m of Object.values(a.modules))
    assert.ok(m.covariance!.activationCount > 0 && m.covariance!.activationSum instanceof Float32Array, m.name);
  const b = loadFactors(two, { precision: 'fp32' });
  for (const [name, m] of Object.entries(a.modules)) {
    const p = preconditionerFor(m, damping);
    assert.ok(p.qA instanceof Float32Array && p.inverse instanceof Float32Array, name);
    // two partitions: the same sums added in another order, so Λ agrees to rounding
    const x = m.lambda!.sum;
    const y = b.modules[name].lambda!.sum;
    const max = Math.max(...Array.from(x, Math.abs));
    for (let i = 0; i < x.length; i++) assert.ok(Math.abs(x[i] - y[i]) <= 1e-5 * max, `${name} Λ sum [${i}]`);
  }
  // the same factors open for an fp64 model, widened
  const stage = openStage(MODEL, one, { engine: { precision: 'fp64' } });
  for (const p of stage.preconditioners!.values())
    assert.ok(p.qS instanceof Float64Array && p.inverse instanceof Float64Array);
});

test('fit job: a covariance file of the eigen stage damaged before the final write is refused, not copied', async () => {
  const dir = mkdtempSync(join(home, 'fit-job-damaged-'));
  const data = join(dir, 'train.jsonl');
  writeFileSync(data, `${TEXTS.map((text) => JSON.stringify({ text })).join('\n')}\n`);
  const model = Model.open(MODEL);
  const job = {
    modelDir: MODEL,
    dataPath: data,
    modules: 'all' as const,
    labels: 'empirical' as const,
    seed: 0,
    batchSize: 4,
    model,
    log: () => {},
  };
  const out = join(dir, 'out');
  assert.equal((await runFitJob({ ...job, out, partition: { index: 0, count: 2 } })).status, 'waiting');
  assert.equal((await runFitJob({ ...job, out, partition: { index: 1, count: 2 } })).status, 'waiting');
  // flip one byte in the last tensor's data of the merged covariances
  const file = join(out, 'partials', 'eigen', 'gradient_covariance.safetensors');
  const bytes = readFileSync(file);
  bytes[bytes.length - 3] ^= 0x40;
  writeFileSync(file, bytes);
  await assert.rejects(
    runFitJob({ ...job, out, partition: { index: 0, count: 2 } }),
    /gradient_covariance\.safetensors: data does not match its checksum/,
  );
  assert.ok(!existsSync(join(out, 'factor_arguments.json')), 'no final factors were written');
});

test('an absolute damping tiny next to the eigenvalues, or a relative one of 0, is named in the stage warnings; the heuristic one is not', () => {
  const factors = 'test/fixtures/kronfluence/llama/factors_ekfac';
  const tiny = openStage(MODEL, factors, { damping: { absolute: 1e-12 } });
  assert.ok(
    tiny.warnings.some((w) =>
      /^damping λ = 1e-12 is below 1e-5 of the largest eigenvalue of \d+ modules, e\.g\. .* float32 scores there are rounding noise/.test(
        w,
      ),
    ),
    tiny.warnings.join('\n'),
  );
  // a relative damping of 0 ("0x") is no damping at all: warned about as an absolute 0
  const none = openStage(MODEL, factors, { damping: { relative: 0 } });
  assert.ok(
    none.warnings.some((w) => /^damping λ = 0 is below 1e-5 of the largest eigenvalue/.test(w)),
    none.warnings.join('\n'),
  );
  for (const damping of [undefined, { absolute: 1e3 }, { relative: 1e-6 }])
    assert.ok(!openStage(MODEL, factors, { damping }).warnings.some((w) => w.startsWith('damping')));
});
