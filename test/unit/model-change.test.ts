// Factors fitted on another model are refused (fingerprint.ts); the refusal says what changed
// since the fit: config.json's and adapter_config.json's keys with both values, and the weight
// files that hold other bytes. A user audit met "fitted on another model" naming the same adapter
// folder it had passed both times, with nothing to tell a new base from an edited lora_alpha.
import assert from 'node:assert/strict';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { loadFactors } from '../../src/server/attribution/ekfac/factors-io';
import { type ModelParts, modelChange, readModelParts } from '../../src/server/attribution/fingerprint';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { openStage } from '../../src/server/attribution/stage';
import { readSafetensorsHeader, readTensorF64, writeSafetensors } from '../../src/server/model/safetensors';
import { writeJsonl } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const FIX = 'test/fixtures/models';

test('modelChange names changed keys with both values, and weight files by their bytes', () => {
  const before: ModelParts = {
    config: { rope_theta: 10000, hidden_size: 64, layer_types: ['a', 'b'] },
    adapter: { r: 4, lora_alpha: 8 },
    files: [
      ['model.safetensors', 'aa'],
      ['adapter_model.safetensors', 'bb'],
    ],
  };
  assert.equal(modelChange(before, before), '');
  const now: ModelParts = {
    config: { rope_theta: 500000, hidden_size: 64, layer_types: ['a', 'c'], sliding_window: null },
    adapter: { r: 4, lora_alpha: 16 },
    files: [
      ['model.safetensors', 'aa'],
      ['adapter_model.safetensors', 'cc'],
    ],
  };
  assert.equal(
    modelChange(before, now),
    'config.json "layer_types" ["a","b"] → ["a","c"]; config.json "rope_theta" 10000 → 500000; config.json "sliding_window" absent → null; adapter_config.json "lora_alpha" 8 → 16; adapter_model.safetensors holds other bytes',
  );
  // files new and gone; past six changes the rest are counted
  const sharded: ModelParts = {
    config: Object.fromEntries(Array.from({ length: 8 }, (_, i) => [`k${i}`, i])),
    files: [['model-00001-of-00002.safetensors', 'dd']],
  };
  const said = modelChange(before, sharded);
  assert.match(said, /^config\.json "hidden_size" 64 → absent; /);
  assert.match(said, /; and \d+ more$/);
  assert.equal(said.split('; ').length, 7);
  assert.ok(
    modelChange(
      { ...before, config: {} },
      { ...before, config: {}, files: [['model-00001-of-00002.safetensors', 'dd']] },
    ).includes('model-00001-of-00002.safetensors is new; model.safetensors is gone; adapter_model.safetensors is gone'),
  );
  // long values are clipped; parts read back from a file are checked for shape
  assert.match(
    modelChange({ config: { t: 'x'.repeat(100) }, files: [] }, { config: {}, files: [] }),
    /"t" "x{38}… → absent/,
  );
  assert.equal(readModelParts({ config: {}, files: [['a', 1]] }), null);
  assert.equal(readModelParts([]), null);
  assert.deepEqual(readModelParts(before), before);
});

test("a LoRA adapter's factors used with another base, other weights or other settings: the refusal says which", async () => {
  const adapter = join(home, 'adapter');
  cpSync(`${FIX}/llama_lora`, adapter, { recursive: true });
  const cfgFile = join(adapter, 'adapter_config.json');
  const cfg = JSON.parse(readFileSync(cfgFile, 'utf8'));
  cfg.base_model_name_or_path = resolve(`${FIX}/llama`);
  writeFileSync(cfgFile, JSON.stringify(cfg));
  const data = writeJsonl(join(home, 'd.jsonl'), [
    { text: 'Paris is the capital of France.' },
    { text: 'Rome is the capital of Italy.' },
  ]);
  const out = join(home, 'factors');
  await runFitJob({ modelDir: adapter, dataPath: data, out, modules: 'all', labels: 'empirical', seed: 0 });
  assert.ok(loadFactors(out).args.modelParts, 'the parts are stored with the factors');
  assert.ok(openStage(adapter, out), 'the same adapter: its factors open');

  // another base (its config and weights)
  const base = join(home, 'other-base');
  cpSync(`${FIX}/llama`, base, { recursive: true });
  const baseCfg = JSON.parse(readFileSync(join(base, 'config.json'), 'utf8'));
  writeFileSync(join(base, 'config.json'), JSON.stringify({ ...baseCfg, rope_theta: 12345 }));
  const w = join(base, 'model.safetensors');
  const h = readSafetensorsHeader(w);
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  for (const [name, t] of h.tensors) {
    const x = Float32Array.from(readTensorF64(h, name));
    if (name === 'model.norm.weight') x[0] += 0.5;
    tensors[name] = { dtype: 'F32', shape: t.shape, data: x };
  }
  writeSafetensors(w, tensors, h.metadata);
  assert.throws(
    () => openStage(adapter, out, { engine: { base } }),
    (e: Error) =>
      /were fitted on another model \(fingerprint \w+; .* is \w+; since the fit: config\.json "rope_theta" \S+ → 12345; model\.safetensors holds other bytes\)/.test(
        e.message,
      ),
  );

  // the adapter's own settings
  writeFileSync(cfgFile, JSON.stringify({ ...cfg, lora_alpha: cfg.lora_alpha * 2 }));
  assert.throws(
    () => openStage(adapter, out),
    new RegExp(`since the fit: adapter_config\\.json "lora_alpha" ${cfg.lora_alpha} → ${cfg.lora_alpha * 2}\\)`),
  );
  // and a fit into the same folder says the same
  await assert.rejects(
    runFitJob({ modelDir: adapter, dataPath: data, out, modules: 'all', labels: 'empirical', seed: 0 }),
    new RegExp(
      `already holds factors fitted on another model \\(.*; since then: adapter_config\\.json "lora_alpha" ${cfg.lora_alpha} → ${cfg.lora_alpha * 2}\\)`,
    ),
  );
});
