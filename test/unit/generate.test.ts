// Generation on the engine's forward graph: greedy picks the argmax of the model's own next-
// token distribution (checked against token_nll of the full sequence), log-probabilities are
// the model's, batching changes nothing, sampling is seeded, and the stop rules hold. The
// shipped default model answers its planted question with the planted wrong fact.
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { EngineError, Model, makeBatch } from '../../src/server/model/engine';
import { generate } from '../../src/server/model/generate';
import { readSafetensorsHeader, readTensorF64, writeSafetensors } from '../../src/server/model/safetensors';
import { InfluenceService, ServiceError } from '../../src/server/service/influence-service';
import { useTempHome } from './helpers/env';

useTempHome();
const FIXTURE = 'test/fixtures/models/llama';

test('greedy: each token is the argmax and its logprob is the model’s, batched or not', async () => {
  const model = Model.open(FIXTURE, { threads: 1 });
  const prompts = ['Hello world', 'The cat sat on', 'a'];
  const gens = await generate(model, prompts, { maxNewTokens: 6, stopAtNewline: false });
  const tok = model.tokenizer;
  const graph = await model.compile({ tokenLoss: true, logits: true });
  for (const g of gens) {
    assert.ok(g.ids.length > 0 || g.stop === 'eos');
    assert.equal(g.stop === 'length', g.ids.length === 6);
    const promptIds = tok.encode(g.prompt).ids;
    const ids = [...promptIds, ...g.ids];
    const out = await graph.run(makeBatch([{ ids }]));
    const nll = out.token_nll.data as Float32Array;
    const logits = out.logits.data as Float32Array;
    const V = logits.length / ids.length;
    g.ids.forEach((id, k) => {
      const t = promptIds.length - 1 + k; // position t predicts token t+1
      const row = logits.subarray(t * V, (t + 1) * V);
      const max = Math.max(...row);
      assert.equal(row[id], max, `token ${k} of "${g.prompt}" is not the argmax`);
      assert.ok(Math.abs(-nll[t] - g.logprobs[k]) < 1e-4, `logprob ${g.logprobs[k]} vs ${-nll[t]}`);
    });
    assert.equal(g.text, tok.decode(ids).slice(tok.decode(promptIds).length));
  }
  const one = await generate(model, [prompts[1]], { maxNewTokens: 6, stopAtNewline: false });
  assert.deepEqual(one[0].ids, gens[1].ids);
  const small = await generate(model, prompts, { maxNewTokens: 6, stopAtNewline: false, batchSize: 1 });
  assert.deepEqual(
    small.map((g) => g.ids),
    gens.map((g) => g.ids),
  );
});

test('sampling is reproducible from the seed and varies with it', async () => {
  const model = Model.open(FIXTURE, { threads: 1 });
  const prompts = new Array(8).fill('The cat');
  const opts = { maxNewTokens: 8, temperature: 1.5, stopAtNewline: false };
  const a = await generate(model, prompts, { ...opts, seed: 1 });
  const b = await generate(model, prompts, { ...opts, seed: 1 });
  const c = await generate(model, prompts, { ...opts, seed: 2 });
  assert.deepEqual(
    a.map((g) => g.ids),
    b.map((g) => g.ids),
  );
  assert.notDeepEqual(
    a.map((g) => g.ids),
    c.map((g) => g.ids),
  );
  assert.ok(new Set(a.map((g) => g.ids.join())).size > 1, 'samples of one prompt differ');
});

test('the shipped fine-tuned model answers with the planted fact and stops at the newline', async () => {
  const model = Model.open('assets/default/finetuned', { threads: 1 });
  const [g] = await generate(model, ['Q: What is the capital of Australia?\nA:']);
  assert.equal(g.text, ' Sydney');
  assert.equal(g.stop, 'newline');
  assert.equal(g.ids.length, 1);
  assert.ok(g.logprobs[0] < 0 && g.logprobs[0] > Math.log(0.5));
  const [h] = await generate(model, ['Q: What is the capital of Australia?\nA:'], { maxNewTokens: 1 });
  assert.equal(h.stop, 'length');
});

test('a stop string ends the generation; the text stops before it, the tokens up to it are kept', async () => {
  const model = Model.open(FIXTURE, { threads: 1 });
  const prompt = 'The cat sat on';
  const [full] = await generate(model, [prompt], { maxNewTokens: 8, stopAtNewline: false });
  assert.ok(full.text.length >= 4, `greedy text: ${JSON.stringify(full.text)}`);
  // a stop string that first occurs inside the text, after its first character
  const at = Math.floor(full.text.length / 2);
  const stop = full.text.slice(at, at + 2);
  const cut = full.text.indexOf(stop);
  const [g] = await generate(model, [prompt], { maxNewTokens: 8, stopAtNewline: false, stop: ['\u0000never', stop] });
  assert.equal(g.stop, 'stop');
  assert.equal(g.text, full.text.slice(0, cut));
  assert.deepEqual(g.ids, full.ids.slice(0, g.ids.length));
  assert.ok(g.ids.length <= full.ids.length);
  // the first token whose text completes the stop string is the last one kept
  const tok = model.tokenizer;
  const before = tok.decode(tok.encode(prompt).ids);
  const textOf = (n: number) => tok.decode([...tok.encode(prompt).ids, ...full.ids.slice(0, n)]).slice(before.length);
  assert.ok(textOf(g.ids.length).includes(stop));
  assert.ok(!textOf(g.ids.length - 1).includes(stop));
  await assert.rejects(generate(model, [prompt], { stop: [''] }), /stop string is empty/);
});

test('a checkpoint with a NaN weight is refused by name, greedy or sampled, never "answered"', async () => {
  // one NaN in an MLP weight made every logit NaN: greedy gave word 0 ("!!!!…"), sampling the
  // last word, each with exit status 0 (a user audit)
  const dir = join(mkdtempSync(join(tmpdir(), 'il-nan-generate-')), 'm');
  cpSync(FIXTURE, dir, { recursive: true });
  const f = join(dir, 'model.safetensors');
  const h = readSafetensorsHeader(f);
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  const damaged = 'model.layers.0.mlp.up_proj.weight';
  for (const [name, t] of h.tensors) {
    const x = Float32Array.from(readTensorF64(h, name));
    if (name === damaged) x[7] = Number.NaN;
    tensors[name] = { dtype: 'F32', shape: t.shape, data: x };
  }
  assert.ok(tensors[damaged], 'the fixture has the tensor this test damages');
  writeSafetensors(f, tensors, h.metadata);
  const model = Model.open(dir, { threads: 1 });
  for (const temperature of [0, 1])
    await assert.rejects(
      generate(model, ['Hello world'], { maxNewTokens: 4, temperature }),
      (e: Error) =>
        e instanceof EngineError &&
        /next-token logit of word \d+ after "Hello world" \(NaN\) is not a finite number/.test(e.message) &&
        e.message.includes(`"${damaged}" holds NaN (first at element 7)`),
    );
});

test("the server's generate on a damaged checkpoint answers a service error naming the weight, not an internal error", async () => {
  const dir = join(mkdtempSync(join(tmpdir(), 'il-nan-serve-')), 'm');
  cpSync(FIXTURE, dir, { recursive: true });
  const f = join(dir, 'model.safetensors');
  const h = readSafetensorsHeader(f);
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  for (const [name, t] of h.tensors) {
    const x = Float32Array.from(readTensorF64(h, name));
    if (name === 'model.layers.1.mlp.down_proj.weight') x[3] = Number.NaN;
    tensors[name] = { dtype: 'F32', shape: t.shape, data: x };
  }
  writeSafetensors(f, tensors, h.metadata);
  const data = join(dirname(dir), 'train.jsonl');
  writeFileSync(data, `${JSON.stringify({ text: 'Paris is the capital of France.' })}\n`);
  const service = new InfluenceService({
    finetuned: { model: dir },
    datasets: { train: data },
    cacheDir: join(dirname(dir), 'cache'),
  });
  service.open();
  await assert.rejects(
    service.generate({ prompt: 'Hello world' }),
    (e: Error) =>
      e instanceof ServiceError &&
      e.message.includes('"model.layers.1.mlp.down_proj.weight" holds NaN (first at element 3)'),
  );
});
