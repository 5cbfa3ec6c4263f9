// The service over a LoRA adapter named in influence-lens.json, its base in the model entry's
// "base" field (the adapter's base_model_name_or_path names a hub id, not a folder).
import assert from 'node:assert/strict';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { checkConfigFiles, parseConfig } from '../../src/server/service/config';
import { InfluenceService } from '../../src/server/service/influence-service';
import { writeTinyCorpus } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();

test('influence-lens.json: a LoRA adapter with "base" is served; fit makes ekfac available over its A/B layers', async () => {
  const adapter = join(home, 'adapter');
  cpSync('test/fixtures/models/llama_lora', adapter, { recursive: true });
  const c = JSON.parse(readFileSync(join(adapter, 'adapter_config.json'), 'utf8'));
  writeFileSync(join(adapter, 'adapter_config.json'), JSON.stringify({ ...c, base_model_name_or_path: 'org/base' }));
  writeTinyCorpus(join(home, 'train.jsonl'), 6);
  const raw = {
    models: { model: 'adapter', base: resolve('test/fixtures/models/llama'), factors: 'factors' },
    datasets: { train: 'train.jsonl' },
    modules: 'all',
  };
  const cfg = parseConfig(raw, { baseDir: home });
  assert.equal(cfg.service.finetuned.base, resolve('test/fixtures/models/llama'));
  checkConfigFiles(cfg);
  assert.throws(
    () => checkConfigFiles(parseConfig({ ...raw, models: { ...raw.models, base: 'nowhere' } }, { baseDir: home })),
    /models\.base: .*nowhere has no config\.json/,
  );
  const service = new InfluenceService(cfg.service);
  service.open();
  await service.fit('finetuned');
  assert.ok(service.info().methods.includes('ekfac'));
  const r = await service.explain({
    prompt: 'Q: capital of country 3?\nA:',
    completion: ' City3',
    dataset: 'train',
    topK: 3,
    method: 'ekfac',
  });
  assert.equal(r.scored, 6);
  assert.ok([...r.supporting, ...r.opposing].every((e) => Number.isFinite(e.score)));
});
