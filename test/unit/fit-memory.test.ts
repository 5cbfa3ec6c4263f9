// What the fit job keeps alive between its stages. The covariance sums are done with once the
// eigen stage has decomposed them; a record of them left in the job's async frame kept every one
// alive through the eigen and Λ stages (7.3 GB at the Qwen2.5-0.5B shape, where the CLI fit peaked
// at 24 GB on a 24 GB machine). A one-layer Llama whose MLP is wide (d 64, intermediate 2,048)
// makes the covariances 50 MB, far above everything else the Λ stage holds but its bases: live
// array buffers during the Λ pass must stay under bases + Λ sums + weights + slack.
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { Model } from '../../src/server/model/engine';
import { initLlama, saveCheckpoint } from '../../src/server/train/trainer';
import { collectGarbage } from '../../src/server/util/gc';
import { useTempHome } from './helpers/env';
import { TINY_LLAMA_TOKENIZER } from './helpers/tiny-llama';

const home = useTempHome();

test('the fit job does not hold the covariance sums through the Λ pass', async () => {
  const dir = join(home, 'wide-mlp');
  mkdirSync(dir, { recursive: true });
  const shape = { vocab: 320, d: 64, layers: 1, heads: 2, kvHeads: 1, ffn: 2048, maxPositions: 64 };
  const { config, params, shapes } = initLlama(shape, 3, { bos: 0, eos: 0, pad: 0 });
  saveCheckpoint(dir, config, params, shapes, TINY_LLAMA_TOKENIZER);
  const data = join(dir, 'train.jsonl');
  const texts = ['the cat sat on the mat', 'a dog ran in the park', 'birds sing in the morning', 'rain fell all day'];
  writeFileSync(data, `${texts.map((text) => JSON.stringify({ text })).join('\n')}\n`);
  const model = Model.open(dir, { threads: 2 });
  const mods = model.modules('all');
  const mb = 2 ** 20;
  // what the Λ stage must hold: float32 bases (every module its own Q_A and Q_S), the Λ sums
  // (fp64) and what the pass's runs return; the covariances (the shared A counted once) are what must not be there
  const bases = mods.reduce((s, m) => s + 4 * ((m.dIn + (m.hasBias ? 1 : 0)) ** 2 + m.dOut ** 2), 0);
  const sums = mods.reduce((s, m) => s + 12 * m.dOut * (m.dIn + (m.hasBias ? 1 : 0)), 0);
  const weights = [...params.values()].reduce((s, p) => s + 4 * p.length, 0);
  const covariances = 4 * (64 * 64 * 3 + 2048 * 2048 + 64 * 64 * 2 + 32 * 32 * 2 + 2048 * 2048 * 2);
  assert.ok(covariances > 40 * mb, 'the covariances are large enough to be seen');
  collectGarbage();
  const baseline = process.memoryUsage().arrayBuffers;
  let during = 0;
  const r = await runFitJob({
    modelDir: dir,
    dataPath: data,
    out: join(dir, 'factors'),
    modules: 'all',
    labels: 'empirical',
    seed: 0,
    model,
    onProgress: (stage) => {
      if (stage !== 'lambda') return;
      collectGarbage();
      during = Math.max(during, process.memoryUsage().arrayBuffers - baseline);
    },
  });
  assert.equal(r.status, 'done');
  const allowed = bases + sums + weights + 16 * mb;
  assert.ok(
    during > bases / 2 && during < allowed,
    `live array buffers during the Λ pass: ${(during / mb).toFixed(1)} MB (bases ${(bases / mb).toFixed(1)}, allowed ${(allowed / mb).toFixed(1)}, covariances ${(covariances / mb).toFixed(1)})`,
  );
});
