// `fit --eigendecomposition-dtype float32` (kronfluence's eigendecomposition_dtype option): the
// covariances are decomposed by LAPACK's ssyevd instead of dsyevd. The choice is part of the fit's
// identity: stored with the factors (ours and kronfluence's arguments), a fit into a folder of the
// other precision is refused naming the flag, a cache of ours is refitted, and factors written
// before the option (float64, no field) keep their identity. Scores agree with the float64 fit's
// to float32 rounding.
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadFactors, readFitSettings } from '../../src/server/attribution/ekfac/factors-io';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryBatchGradients, queryMatrices, scoreCandidates } from '../../src/server/attribution/influence';
import { openStage } from '../../src/server/attribution/stage';
import { nativeLapack } from '../../src/server/linalg/native';
import { Model } from '../../src/server/model/engine';
import { InfluenceService } from '../../src/server/service/influence-service';
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
const noSsyevd = nativeLapack()?.ssyevd ? false : 'no LAPACK ssyevd (float32 runs in float64 without it)';

function dataset(dir: string): string {
  const data = join(dir, 'train.jsonl');
  writeFileSync(data, `${TEXTS.map((text) => JSON.stringify({ text })).join('\n')}\n`);
  return data;
}

test('a float32 fit: stored as such, eigenvectors of its own, scores as the float64 fit to float32 rounding', {
  skip: noSsyevd,
}, async (t) => {
  const dir = mkdtempSync(join(home, 'dtype-'));
  const data = dataset(dir);
  const model = Model.open(MODEL);
  const job = { modelDir: MODEL, dataPath: data, modules: 'all' as const, labels: 'empirical' as const, seed: 0 };
  const run = { ...job, batchSize: 4, model, log: () => {} };
  const f64 = join(dir, 'f64');
  const f32 = join(dir, 'f32');
  assert.equal((await runFitJob({ ...run, out: f64 })).status, 'done');
  assert.equal((await runFitJob({ ...run, out: f32, eigendecompositionDtype: 'float32' })).status, 'done');

  const ours = (d: string) => JSON.parse(readFileSync(join(d, 'influence_lens_arguments.json'), 'utf8'));
  const kron = (d: string) => JSON.parse(readFileSync(join(d, 'factor_arguments.json'), 'utf8'));
  assert.equal(ours(f32).eigendecompositionDtype, 'float32');
  assert.equal(kron(f32).eigendecomposition_dtype, 'torch.float32');
  // a float64 fit writes no field: its identity is that of every fit before the option
  assert.equal(ours(f64).eigendecompositionDtype, undefined);
  assert.equal(kron(f64).eigendecomposition_dtype, 'torch.float64');
  assert.equal(loadFactors(f32).args.eigendecompositionDtype, 'float32');
  assert.equal(loadFactors(f64).args.eigendecompositionDtype, undefined);
  assert.deepEqual(readFitSettings(f32), {
    labels: 'empirical',
    seed: 0,
    maxExamples: null,
    eigendecompositionDtype: 'float32',
    dataFingerprint: loadFactors(f32).args.dataFingerprint,
  });

  // other eigenvectors (decomposed in float32, not float64 narrowed) ...
  const a = loadFactors(f64).modules;
  const b = loadFactors(f32).modules;
  let differ = 0;
  for (const [name, m] of Object.entries(a)) {
    const x = m.eigen!.eigA;
    const y = b[name].eigen!.eigA;
    for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) differ++;
  }
  assert.ok(differ > 0, 'float32 eigenvalues equal the float64 ones bit for bit: not decomposed in float32');

  // ... and the same influence scores, to float32 rounding
  const s64 = openStage(MODEL, f64, { model });
  const s32 = openStage(MODEL, f32, { model });
  const examples = TEXTS.map((t) => {
    const ids = model.tokenizer.encode(t, { addSpecialTokens: false }).ids;
    return { ids, weights: ids.map((_, i) => (i < ids.length - 1 ? 1 : 0)) };
  });
  const queries = examples.slice(0, 3);
  const G = await queryBatchGradients(model, queries, { modules: 'all' });
  const score = async (p: typeof s64.preconditioners) =>
    (await scoreCandidates(model, queryMatrices(G, [p!]), examples, { modules: 'all', batchSize: 4 })).scores;
  const x = await score(s64.preconditioners);
  const y = await score(s32.preconditioners);
  for (let q = 0; q < queries.length; q++) {
    const u = x.map((r) => r[q]);
    const v = y.map((r) => r[q]);
    const scale = Math.max(...u.map(Math.abs));
    const err = Math.max(...u.map((s, i) => Math.abs(s - v[i])));
    t.diagnostic(`query ${q}: max |Δscore| / largest |score| = ${(err / scale).toExponential(1)}`);
    assert.ok(err <= 1e-5 * scale, `query ${q}: max |Δscore| ${err} against the largest score ${scale}`);
    assert.ok(spearman(u, v) >= 0.999, `query ${q}: Spearman ${spearman(u, v)}`);
  }
});

test('the precision is part of the fit: a folder of the other one is refused by name, a cache of ours refitted', async () => {
  const dir = mkdtempSync(join(home, 'dtype-identity-'));
  const data = dataset(dir);
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
  const out = join(dir, 'factors');
  assert.equal((await runFitJob({ ...job, out, eigendecompositionDtype: 'float32' })).status, 'done');
  assert.equal((await runFitJob({ ...job, out, eigendecompositionDtype: 'float32' })).status, 'up-to-date');
  // the user's folder: refused, naming what differs and the flag
  await assert.rejects(
    runFitJob({ ...job, out }),
    /eigendecomposed in float32 \(asked: --eigendecomposition-dtype float64\)/,
  );
  await assert.rejects(
    runFitJob({ ...job, out, eigendecompositionDtype: 'float64' }),
    /--eigendecomposition-dtype float64/,
  );
  // a cache this program owns: fitted again in the asked precision
  const lines: string[] = [];
  const r = await runFitJob({ ...job, out, replaceStale: true, log: (l) => lines.push(l) });
  assert.equal(r.status, 'done');
  assert.ok(
    lines.some((l) => /eigendecomposed in float32/.test(l)),
    lines.join('\n'),
  );
  assert.equal(loadFactors(out).args.eigendecompositionDtype, undefined);
  assert.equal((await runFitJob({ ...job, out })).status, 'up-to-date');

  // an unfinished fit in one precision is not finished in the other
  const part = join(dir, 'partitioned');
  const p0 = { ...job, out: part, partition: { index: 0, count: 2 } };
  assert.equal((await runFitJob({ ...p0, eigendecompositionDtype: 'float32' })).status, 'waiting');
  await assert.rejects(
    runFitJob({ ...job, out: part, partition: { index: 1, count: 2 } }),
    /other settings \(--eigendecomposition-dtype float32 → float64\)/,
  );
});

test('stored precisions are read from both tools’ arguments; one this version does not know is refused', async () => {
  const dir = mkdtempSync(join(home, 'dtype-stored-'));
  const data = dataset(dir);
  const out = join(dir, 'factors');
  const job = { modelDir: MODEL, dataPath: data, modules: 'all' as const, labels: 'empirical' as const, seed: 0 };
  assert.equal((await runFitJob({ ...job, out, batchSize: 4, log: () => {} })).status, 'done');
  // kronfluence's own factors carry only factor_arguments.json
  const foreign = join(dir, 'kronfluence');
  cpSync('test/fixtures/kronfluence/llama/factors_ekfac', foreign, { recursive: true });
  const kronFile = join(foreign, 'factor_arguments.json');
  const kron = JSON.parse(readFileSync(kronFile, 'utf8'));
  writeFileSync(kronFile, JSON.stringify({ ...kron, eigendecomposition_dtype: 'torch.float32' }));
  assert.equal(loadFactors(foreign).args.eigendecompositionDtype, 'float32');
  writeFileSync(kronFile, JSON.stringify({ ...kron, eigendecomposition_dtype: 'torch.bfloat16' }));
  assert.throws(() => loadFactors(foreign), /"eigendecomposition_dtype": "torch.bfloat16".*fit the factors again/);
  // ours, edited by hand
  const oursFile = join(out, 'influence_lens_arguments.json');
  const args = JSON.parse(readFileSync(oursFile, 'utf8'));
  writeFileSync(oursFile, JSON.stringify({ ...args, eigendecompositionDtype: 'float16' }));
  assert.throws(() => loadFactors(out), /"eigendecompositionDtype": "float16", which this version does not know/);
  assert.equal(readFitSettings(out), null);
});

test('the server fits new training checkpoints with the settings of the factors the user fitted', async () => {
  const dir = mkdtempSync(join(home, 'dtype-server-'));
  const model = join(dir, 'run');
  cpSync('test/fixtures/trainer_run', model, { recursive: true });
  const factors = join(dir, 'factors');
  const data = join(model, 'train.jsonl');
  // the user's CLI fit of the final model alone, with settings other than the server's defaults
  const r = await runFitJob({
    modelDir: model,
    dataPath: data,
    out: factors,
    modules: 'all',
    labels: 'empirical',
    seed: 5,
    maxExamples: 5,
    eigendecompositionDtype: 'float32',
    log: () => {},
  });
  assert.equal(r.status, 'done');
  const service = new InfluenceService({
    finetuned: { model, factors },
    datasets: { train: data },
    modules: 'all',
    cacheDir: join(dir, 'cache'),
  });
  service.open();
  // the server's defaults (sampled labels, seed 0, float64) met these factors as another fit
  await service.fit('finetuned');
  const fitted = readdirSync(join(factors, 'checkpoints'));
  assert.equal(fitted.length, 2, fitted.join(', '));
  for (const ck of fitted)
    assert.deepEqual(readFitSettings(join(factors, 'checkpoints', ck)), {
      labels: 'empirical',
      seed: 5,
      maxExamples: 5,
      eigendecompositionDtype: 'float32',
      // the same first 5 examples as the final model's fit
      dataFingerprint: readFitSettings(factors)?.dataFingerprint,
    });
});
