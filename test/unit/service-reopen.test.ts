// The server keeps models and factors open between requests: a model retrained into its folder or
// factors refitted by the CLI while it runs must be what the next request uses (served-files.ts),
// never the old weights under the new files' fingerprints.
import assert from 'node:assert/strict';
import { cpSync, mkdirSync, readFileSync, renameSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { loadFactors } from '../../src/server/attribution/ekfac/factors-io';
import { modelFingerprint } from '../../src/server/attribution/fingerprint';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { openCheckpoint } from '../../src/server/model/checkpoint';
import { readSafetensorsHeader } from '../../src/server/model/safetensors';
import { readConfigFile } from '../../src/server/service/config';
import { InfluenceService, type ServiceConfig } from '../../src/server/service/influence-service';
import { lightConfig } from '../../src/server/service/worker-service';
import { writeCapitals } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const FIXTURE = 'test/fixtures/models/llama';

/** The fixture's weights, every value changed (same size), written beside and renamed over the file. */
function replaceWeights(dir: string, factor: number) {
  const file = join(dir, 'model.safetensors');
  const bytes = readFileSync(join(FIXTURE, 'model.safetensors'));
  const h = readSafetensorsHeader(file);
  const f = new Float32Array(bytes.buffer, bytes.byteOffset + h.dataStart, (bytes.length - h.dataStart) / 4);
  for (let i = 0; i < f.length; i++) f[i] *= factor;
  writeFileSync(join(dir, 'next.safetensors'), bytes);
  renameSync(join(dir, 'next.safetensors'), file);
}

const scores = (r: ExplainResult) =>
  Object.fromEntries([...r.supporting, ...r.opposing].map((e) => [e.id.line, e.score] as const));

function assertSameScores(a: ExplainResult, b: ExplainResult) {
  const x = scores(a);
  const y = scores(b);
  assert.deepEqual(Object.keys(x).sort(), Object.keys(y).sort());
  for (const k of Object.keys(x)) assert.ok(Math.abs(x[k] - y[k]) <= 1e-5 * Math.abs(y[k]) + 1e-9, `line ${k}`);
}

describe('a model or factors replaced on disk while the server runs', () => {
  const data = writeCapitals(join(home, 'train.jsonl'));
  const model = join(home, 'model');
  cpSync(FIXTURE, model, { recursive: true });
  const factors = join(home, 'factors');
  const config: ServiceConfig = {
    finetuned: { model, factors },
    datasets: { train: data },
    modules: 'mlp',
    cacheDir: join(home, 'cache'),
    // every explain goes through the gradient store, which is cached on disk by fingerprints
    store: { k: 4, minExamples: 0, rerank: 1 },
  };
  const service = new InfluenceService(config);
  service.open();
  const q = { prompt: 'Q: capital of France?\nA:', completion: ' Paris', dataset: 'train', topK: 4 };
  /** what a server started now on the same files answers (its own store from its own cache folder:
   * the examples not rescored exactly keep the store's estimates, so a stale store shows) */
  let n = 0;
  const fresh = async (method: 'gdp' | 'ekfac') => {
    const s = new InfluenceService({ ...config, cacheDir: join(home, `clean-cache-${n++}`) });
    s.open();
    return s.explain({ ...q, method });
  };

  test('retrained weights: the next explain and fit use them; factors of the old weights are refused', async () => {
    await service.fit('finetuned');
    const r0 = await service.explain({ ...q, method: 'ekfac' });
    const g0 = await service.explain({ ...q, method: 'gdp' });
    assert.equal(r0.revision, service.info().revision);

    const opened = service.openedStages().finetuned.model;
    replaceWeights(model, 1.5);
    const g1 = await service.explain({ ...q, method: 'gdp' });
    assert.notEqual(g1.revision, g0.revision);
    assert.notEqual(service.openedStages().finetuned.model, opened);
    assert.equal(service.info().revision, g1.revision);
    // the new weights, as a server started now scores them (and not the old ones)
    assertSameScores(g1, await fresh('gdp'));
    assert.notDeepEqual(scores(g1), scores(g0));
    // the factors are the old model's: EK-FAC says so instead of scoring with them
    assert.ok(!service.info().methods.includes('ekfac'));
    assert.match(service.info().unavailable.ekfac ?? '', /fitted on another model/);
    await assert.rejects(service.explain({ ...q, method: 'ekfac' }), /fitted on another model/);

    // refitted through the server: on the new weights, under their fingerprint
    rmSync(factors, { recursive: true });
    await service.fit('finetuned');
    const args = JSON.parse(readFileSync(join(factors, 'influence_lens_arguments.json'), 'utf8'));
    assert.equal(args.modelFingerprint, modelFingerprint(openCheckpoint(model), config.cacheDir));
    const r1 = await service.explain({ ...q, method: 'ekfac' });
    assertSameScores(r1, await fresh('ekfac'));
  });

  test('factors refitted by another process are read at the next request; the models and tokenized data stay', async () => {
    const before = service.info().revision;
    const opened = service.openedStages().finetuned.model;
    const corpus = service.dataset('train').corpus;
    void corpus.tokens;
    // the CLI fits other labels into the same folder while the server runs
    rmSync(factors, { recursive: true });
    await runFitJob({ modelDir: model, dataPath: data, out: factors, modules: 'mlp', labels: 'empirical', seed: 0 });
    const r = await service.explain({ ...q, method: 'ekfac' });
    assert.notEqual(r.revision, before);
    assertSameScores(r, await fresh('ekfac'));
    // only the factors changed: the same model (its compiled graphs) and the same tokens
    assert.equal(service.openedStages().finetuned.model, opened);
    assert.equal(service.dataset('train').corpus, corpus);
  });

  test('a model that cannot be opened any more fails every request with the reason until it can', async () => {
    const cfg = join(model, 'config.json');
    const good = readFileSync(cfg);
    writeFileSync(cfg, '{ not json');
    for (let i = 0; i < 2; i++)
      await assert.rejects(
        service.explain({ ...q, method: 'gdp' }),
        (e: Error & { code?: string }) =>
          /changed on disk and cannot be opened again/.test(e.message) &&
          /config\.json/.test(e.message) &&
          e.code === 'not_ready',
      );
    writeFileSync(cfg, good);
    const r = await service.explain({ ...q, method: 'gdp' });
    assertSameScores(r, await fresh('gdp'));
  });
});

describe('reopening never happens under a request, and only for a real change', () => {
  const data = writeCapitals(join(home, 'train2.jsonl'));
  const q = { prompt: 'Q: capital of France?\nA:', completion: ' Paris', dataset: 'train', topK: 4 };
  let n = 0;
  const copy = () => {
    const dir = join(home, `m${n++}`);
    cpSync(FIXTURE, dir, { recursive: true });
    return dir;
  };
  const serve = (c: Omit<ServiceConfig, 'cacheDir' | 'datasets'>) => {
    const s = new InfluenceService({ ...c, datasets: { train: data }, cacheDir: join(home, `cache${n++}`) });
    s.open();
    return s;
  };

  test('factors that appear while it runs (modules unset) decide the modules: the fallback of the factor-less start does not stick', async () => {
    const model = copy();
    const factors = join(home, `late-factors${n++}`);
    const s = serve({ finetuned: { model, factors } });
    // no factors yet: the baselines run over the default (MLP) modules
    assert.equal(s.info().modules.length, 6);
    await s.explain({ ...q, method: 'gdp' });
    // the CLI fits over all modules meanwhile
    await runFitJob({ modelDir: model, dataPath: data, out: factors, modules: 'all', labels: 'empirical', seed: 0 });
    const e = await s.explain({ ...q, method: 'ekfac' });
    assert.equal(s.info().modules.length, 14);
    const g = await s.explain({ ...q, method: 'gdp' });
    // what a server started now on the same files answers
    const now = serve({ finetuned: { model, factors } });
    assertSameScores(e, await now.explain({ ...q, method: 'ekfac' }));
    assertSameScores(g, await now.explain({ ...q, method: 'gdp' }));
  });

  test('a factors folder with no factor file yet (empty, or a fit just starting there) is "no factors yet", not factors that cannot be used', async () => {
    // a fault audit: while the CLI ran `rm -rf f && fit --out f`, 560 of ~6,300 answers said the
    // factors "cannot be used (… holds no complete set …)", which could push a user to delete a
    // fit that was running
    const model = copy();
    const factors = join(home, `empty-factors${n++}`);
    mkdirSync(factors);
    const s = serve({ finetuned: { model, factors } });
    assert.equal(s.info().unavailable.ekfac, 'no EK-FAC factors for the model yet: run "fit"');
    assert.throws(
      () => loadFactors(factors),
      /holds no factors yet \(no factor file, no influence_lens_arguments\.json\): fit them there/,
    );
    // one stray factor file is another matter: an incomplete set, which cannot be used
    writeFileSync(join(factors, 'lambda_matrix.safetensors'), '');
    assert.throws(() => loadFactors(factors), /holds no complete set of factor files/);
  });

  test('multistage unavailable: the stage without usable factors is named, with its reason', async () => {
    const model = copy();
    const factors = join(home, `ms-factors${n++}`);
    await runFitJob({ modelDir: model, dataPath: data, out: factors, modules: 'mlp', labels: 'empirical', seed: 0 });
    const s = serve({ finetuned: { model, factors }, pretrained: { model: copy() }, modules: 'mlp' });
    assert.match(s.info().unavailable.multistage ?? '', /^the pre-trained model: no EK-FAC factors for the model yet/);
  });

  test("the server's own graph cache (snapshots of the weights) is not a change", async () => {
    const s = serve({ finetuned: { model: copy() }, modules: 'mlp' });
    const rev = s.info().revision;
    const a = await s.explain({ ...q, method: 'gdp' });
    const b = await s.explain({ ...q, method: 'bm25' });
    const c = await s.explain({ ...q, method: 'gdp', topK: 2 });
    assert.deepEqual([a.revision, b.revision, c.revision], [rev, rev, rev]);
  });

  test('a request in flight keeps the files it started with; one arriving after a swap waits and uses the new ones', async () => {
    const model = copy();
    const s = serve({ finetuned: { model }, modules: 'mlp' });
    const before = await s.explain({ ...q, method: 'gdp' });
    const a = s.explain({ ...q, method: 'gdp' });
    replaceWeights(model, 1.5);
    const b = s.explain({ ...q, method: 'gdp' });
    const [ra, rb] = await Promise.all([a, b]);
    assert.equal(ra.revision, before.revision);
    assertSameScores(ra, before);
    assert.notEqual(rb.revision, before.revision);
    assertSameScores(rb, await serve({ finetuned: { model }, modules: 'mlp' }).explain({ ...q, method: 'gdp' }));
  });

  test('a weight file rewritten in place with its size and mtime kept (cp -p, touch -r) is a change', async () => {
    const model = copy();
    const file = join(model, 'model.safetensors');
    utimesSync(file, 1e9, 1e9);
    const s = serve({ finetuned: { model }, modules: 'mlp' });
    const before = await s.explain({ ...q, method: 'gdp' });
    const bytes = readFileSync(file);
    const h = readSafetensorsHeader(file);
    const f = new Float32Array(bytes.buffer, bytes.byteOffset + h.dataStart, (bytes.length - h.dataStart) / 4);
    for (let i = 0; i < f.length; i++) f[i] *= 1.5;
    writeFileSync(file, bytes); // in place: same inode, same size
    utimesSync(file, 1e9, 1e9);
    const after = await s.explain({ ...q, method: 'gdp' });
    assert.notEqual(after.revision, before.revision);
    assertSameScores(after, await serve({ finetuned: { model }, modules: 'mlp' }).explain({ ...q, method: 'gdp' }));
    assert.notDeepEqual(scores(after), scores(before));
  });

  test('a training checkpoint still being written joins the sum once its trainer_state.json appears', async () => {
    const run = join(home, `run${n++}`);
    cpSync('test/fixtures/trainer_run', run, { recursive: true });
    const state = join(run, 'checkpoint-3', 'trainer_state.json');
    const saved = readFileSync(state);
    rmSync(state);
    const s = new InfluenceService({
      finetuned: { model: run },
      datasets: { train: join(run, 'train.jsonl') },
      modules: 'mlp',
      cacheDir: join(home, `cache${n++}`),
    });
    s.open();
    const ask = {
      prompt: 'Q: capital of France?\nA:',
      completion: ' Paris',
      dataset: 'train',
      topK: 2,
      method: 'gdp' as const,
    };
    const before = await s.explain(ask);
    assert.deepEqual(
      before.attribution?.checkpoints?.map((c) => c.name),
      ['checkpoint-6'],
    );
    assert.match(before.attribution?.note ?? '', /left out checkpoint-3: no trainer_state\.json yet/);
    writeFileSync(state, saved);
    const after = await s.explain(ask);
    assert.deepEqual(
      after.attribution?.checkpoints?.map((c) => c.name),
      ['checkpoint-3', 'checkpoint-6'],
    );
    assert.notEqual(after.revision, before.revision);
  });

  test('a fit opens every stage again: a model replaced while it fitted is not left stale', async () => {
    const ft = copy();
    const pt = copy();
    const config = {
      finetuned: { model: ft, factors: join(home, `f${n++}`) },
      pretrained: { model: pt, factors: join(home, `f${n++}`) },
      modules: 'mlp' as const,
    };
    const s = serve(config);
    await s.explain({ ...q, method: 'gdp' });
    const fit = s.fit('pretrained');
    replaceWeights(ft, 1.5);
    await fit;
    assertSameScores(await s.explain({ ...q, method: 'gdp' }), await serve(config).explain({ ...q, method: 'gdp' }));
  });
});

test('influence-lens.json edited while the server runs: its requests are refused until a restart; saved again with the same settings, nothing changes', async () => {
  const dir = join(home, 'config-edit');
  cpSync(FIXTURE, join(dir, 'model'), { recursive: true });
  writeCapitals(join(dir, 'train.jsonl'));
  const file = join(dir, 'influence-lens.json');
  const settings = { models: { model: 'model' }, datasets: { train: 'train.jsonl' }, damping: 0.001 };
  writeFileSync(file, JSON.stringify(settings));
  const s = new InfluenceService({ ...readConfigFile(file).service, cacheDir: join(dir, 'cache') });
  s.open();
  const q = { prompt: 'Q: capital of France?\nA:', completion: ' Paris', dataset: 'train', topK: 2 };
  await s.explain({ ...q, method: 'gdp' });
  // the same settings, other formatting and key order: not a change
  writeFileSync(
    file,
    `${JSON.stringify({ damping: 0.001, datasets: { train: 'train.jsonl' }, models: { model: 'model' } }, null, 2)}\n`,
  );
  await s.explain({ ...q, method: 'bm25' });
  writeFileSync(file, JSON.stringify({ ...settings, damping: 1000 }));
  const refused = /influence-lens\.json changed since this server read it: restart `influence-lens serve`/;
  await assert.rejects(s.explain({ ...q, method: 'gdp' }), refused);
  await assert.rejects(s.explain({ ...q, method: 'bm25' }), refused);
  assert.throws(() => s.getExample('train', 1), refused);
  // status and initialize say so: no method is available until a restart
  assert.deepEqual(s.info().methods, []);
  assert.match(s.info().unavailable.gdp ?? '', refused);
  // put back as it was: answered again
  writeFileSync(file, JSON.stringify(settings));
  await s.explain({ ...q, method: 'bm25' });
});

test('the revision a result carries also names the settings that decide it: another damping, another revision; the cache folder, threads, the datasets listed and the limits are not such settings', () => {
  const data = writeCapitals(join(home, 'rev-train.jsonl'));
  const base: ServiceConfig = {
    finetuned: { model: FIXTURE },
    datasets: { train: data },
    modules: 'mlp',
    damping: { relative: 0.1 },
    cacheDir: join(home, 'rev-cache'),
  };
  const revision = (c: ServiceConfig) => {
    const s = new InfluenceService(c);
    s.open();
    return s.info().revision;
  };
  const r = revision(base);
  assert.equal(revision({ ...base, cacheDir: join(home, 'rev-cache-2'), threads: 1 }), r);
  assert.notEqual(revision({ ...base, damping: { absolute: 100 } }), r);
  assert.notEqual(revision({ ...base, modules: 'all' }), r);
  // another dataset listed, other limits: the same scores for what a result names
  assert.equal(revision({ ...base, datasets: { ...base.datasets, more: data }, limits: { maxTopK: 5 } }), r);
  // the light lane's settings (worker-service.ts: its factors folder watched, not loaded, one thread)
  const withFactors = { ...base, finetuned: { model: FIXTURE, factors: join(home, 'rev-factors') } };
  assert.equal(revision(lightConfig(withFactors)), revision(withFactors));
});
