// influence-lens.json settings the server must honour as documented, called on the service
// directly (the JSON-RPC layer only adds transport and security).
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { InfluenceService } from '../../src/server/service/influence-service';
import { useTempHome } from './helpers/env';

const home = useTempHome();

/** The first `n` lines of one of the embedded default's datasets, as a file of their own. */
function head(name: string, n: number): string {
  const out = join(home, `${name}.jsonl`);
  const lines = readFileSync(`assets/default/data/${name}.jsonl`, 'utf8').split('\n').slice(0, n);
  writeFileSync(out, `${lines.join('\n')}\n`);
  return out;
}

test('without fitDataset, each model is fitted on its own stage\'s data ("datasetStage"), not on the first dataset', async () => {
  // the pre-training data listed first: it used to be what the fine-tuned model was fitted on
  const service = new InfluenceService({
    finetuned: { model: 'assets/default/finetuned', factors: join(home, 'ft-factors'), checkpoints: 'off' },
    pretrained: { model: 'assets/default/pretrained', factors: join(home, 'pt-factors') },
    datasets: { web: head('pretrain', 12), sft: head('finetune', 7) },
    datasetStage: { web: 'pretrained' },
    modules: 'mlp',
    damping: { relative: 0.1 },
    cacheDir: join(home, 'cache'),
  });
  service.open();
  assert.equal((await service.fit('finetuned')).examples, 7);
  assert.equal((await service.fit('pretrained')).examples, 12);
  // no dataset of its stage: the first one, as before
  const single = new InfluenceService({
    finetuned: { model: 'assets/default/finetuned', factors: join(home, 'ft-factors-2'), checkpoints: 'off' },
    pretrained: { model: 'assets/default/pretrained', factors: join(home, 'pt-factors-2') },
    datasets: { sft: head('finetune', 7) },
    modules: 'mlp',
    damping: { relative: 0.1 },
    cacheDir: join(home, 'cache'),
  });
  single.open();
  // the documented fallback, said in status: the pre-trained model has no data of its own
  const [fallback, ...more] = single.info().warnings;
  assert.equal(more.length, 0, more.join('\n'));
  assert.match(
    fallback,
    /the pretrained model has no dataset of its own .* its EK-FAC factors are fitted on "sft", the finetuned model's training data\. .*"fitDataset": "sft" on models\.pretrained/,
  );
  assert.equal((await single.fit('pretrained')).examples, 7);
  // named on purpose: nothing to say
  const chosen = new InfluenceService({
    ...single.config,
    pretrained: { ...single.config.pretrained!, fitDataset: 'sft' },
  });
  chosen.open();
  assert.deepEqual(chosen.info().warnings, []);
});

test('without "store", index is refused (explain never reads a store then) instead of building one for nothing', async () => {
  const service = new InfluenceService({
    finetuned: { model: 'assets/default/finetuned', checkpoints: 'off' },
    datasets: { sft: head('finetune', 7) },
    modules: 'mlp',
    damping: { relative: 0.1 },
    cacheDir: join(home, 'cache'),
  });
  service.open();
  await assert.rejects(service.index('sft'), /no gradient store is configured: add "store": \{\}/);
  const r = await service.explain({
    prompt: 'Q: x?\nA:',
    completion: ' Paris',
    dataset: 'sft',
    method: 'gdp',
    topK: 1,
  });
  assert.equal(r.attribution?.preranked, undefined);
});

test('a request over the configured "limits" is refused naming them (the editor allows topK up to 1,000)', async () => {
  const service = new InfluenceService({
    finetuned: { model: 'assets/default/finetuned', checkpoints: 'off' },
    datasets: { sft: head('finetune', 7) },
    damping: { relative: 0.1 },
    cacheDir: join(home, 'cache'),
    limits: { maxTopK: 5, maxTextChars: 30 },
  });
  service.open();
  const q = { prompt: 'Q: x?\nA:', completion: ' Paris', dataset: 'sft', method: 'bm25' as const };
  await assert.rejects(
    service.explain({ ...q, topK: 6 }),
    /from 1 to 5 \(this server's "limits.maxTopK" in influence-lens.json\)/,
  );
  await assert.rejects(
    service.explain({ ...q, prompt: 'x'.repeat(40), topK: 1 }),
    /longer than 30 characters \(this server's "limits.maxTextChars"/,
  );
  assert.equal((await service.explain({ ...q, topK: 5 })).supporting.length, 5);
});

test('factors fitted on other data than the fit dataset are named in status once that dataset is loaded (fitDataset changed, or the old default)', async () => {
  const a = head('finetune', 7);
  const b = join(home, 'other.jsonl');
  writeFileSync(b, readFileSync(a, 'utf8').split('\n').slice(2).join('\n'));
  const factors = join(home, 'shared-factors');
  const config = (fitDataset: string) => ({
    finetuned: { model: 'assets/default/finetuned', factors, fitDataset, checkpoints: 'off' as const },
    datasets: { a, b },
    modules: 'mlp' as const,
    damping: { relative: 0.1 },
    cacheDir: join(home, 'cache'),
  });
  // words of the embedded vocabulary (an unknown one would add a warning of its own)
  const q = {
    prompt: 'Q: What is the capital of France?\nA:',
    completion: ' Paris',
    method: 'ekfac' as const,
    topK: 1,
  };
  const fitted = new InfluenceService(config('a'));
  fitted.open();
  await fitted.fit('finetuned');
  await fitted.explain({ ...q, dataset: 'a' });
  assert.deepEqual(fitted.info().warnings, []);
  // the same folder, now configured to be fitted on b: explain still uses it, status says so
  const moved = new InfluenceService(config('b'));
  moved.open();
  assert.deepEqual(moved.info().warnings, [], 'status loads no dataset to find out');
  const scored = await moved.explain({ ...q, dataset: 'b' });
  // the result says so too (the panel shows it with the scores), for a method that uses those factors only
  assert.equal(scored.warnings?.length, 1);
  assert.match(scored.warnings![0], /were fitted on other data than its fit dataset "b"/);
  assert.equal((await moved.explain({ ...q, dataset: 'b', method: 'gdp' })).warnings, undefined);
  const [w, ...rest] = moved.info().warnings;
  assert.equal(rest.length, 0);
  assert.match(
    w,
    /the finetuned model's EK-FAC factors \(.*shared-factors\) were fitted on other data than its fit dataset "b"/,
  );
  assert.match(w, /move the folder aside and run "fit"; or set "fitDataset"/);
  // factors fitted on the first 3 examples of a (--max-examples): compared with those 3
  const capped = join(home, 'capped-factors');
  await runFitJob({
    modelDir: 'assets/default/finetuned',
    dataPath: a,
    out: capped,
    modules: 'mlp',
    labels: 'sampled',
    seed: 0,
    maxExamples: 3,
  });
  const cappedService = new InfluenceService({
    ...config('a'),
    finetuned: { ...config('a').finetuned, factors: capped },
  });
  cappedService.open();
  await cappedService.explain({ ...q, dataset: 'a' });
  assert.deepEqual(cappedService.info().warnings, []);
});

test("factors fitted on other data are named too when fitDataset is the other stage's dataset", async () => {
  const web = head('pretrain', 12);
  const sft = head('finetune', 7);
  const ptFactors = join(home, 'pt-on-web');
  const base = {
    finetuned: { model: 'assets/default/finetuned', factors: join(home, 'ft-on-sft'), checkpoints: 'off' as const },
    datasets: { web, sft },
    datasetStage: { web: 'pretrained' as const },
    modules: 'mlp' as const,
    damping: { relative: 0.1 },
    cacheDir: join(home, 'cache'),
  };
  const first = new InfluenceService({
    ...base,
    pretrained: { model: 'assets/default/pretrained', factors: ptFactors },
  });
  first.open();
  assert.equal((await first.fit('pretrained')).examples, 12);
  await first.fit('finetuned');
  // the pre-trained model now to be fitted on the fine-tuning data, its folder still of web's
  const moved = new InfluenceService({
    ...base,
    pretrained: { model: 'assets/default/pretrained', factors: ptFactors, fitDataset: 'sft' },
  });
  moved.open();
  await moved.explain({ prompt: 'Q: x?\nA:', completion: ' Paris', method: 'multistage', dataset: 'sft', topK: 1 });
  const warnings = moved.info().warnings;
  assert.equal(warnings.length, 1, warnings.join('\n'));
  assert.match(
    warnings[0],
    /the pretrained model's EK-FAC factors \(.*pt-on-web\) were fitted on other data than its fit dataset "sft"/,
  );
});
