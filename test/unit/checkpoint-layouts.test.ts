// Checkpoints as transformers 5 reads them, from an audit that built them with save_pretrained:
// a config or a folder that transformers reads one way must never be scored another way (refused
// by name instead when we cannot follow it), and a layout it loads must load here.
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openCheckpoint } from '../../src/server/model/checkpoint';
import { Model, makeBatch } from '../../src/server/model/engine';
import { readSafetensorsHeader, readTensor, writeSafetensors } from '../../src/server/model/safetensors';
import { loadParams } from '../../src/server/train/trainer';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const FIX = 'test/fixtures/models';

/** A copy of a fixture with its config.json changed by `edit`. */
function variant(fixture: string, edit: (c: Record<string, unknown>) => void): string {
  const dir = mkdtempSync(join(home, `${fixture}-`));
  cpSync(join(FIX, fixture), dir, { recursive: true });
  const path = join(dir, 'config.json');
  const config = JSON.parse(readFileSync(path, 'utf8'));
  edit(config);
  writeFileSync(path, JSON.stringify(config, null, 2));
  return dir;
}

const IDS = [1, 5, 9, 2, 7, 3, 11, 4, 6, 8, 10, 12, 14, 13, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24];

async function tokenLoss(dir: string): Promise<Float32Array> {
  const model = Model.open(dir, { threads: 1 });
  const graph = await model.compile({ tokenLoss: true });
  const out = await graph.run(makeBatch([{ ids: IDS }]));
  return out.token_nll.data as Float32Array;
}

const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) =>
  Math.max(...Array.from(a, (x, i) => Math.abs(x - b[i])));

test('an empty rope_scaling beside rope_parameters leaves rope_parameters in force (Python truthiness)', async () => {
  // the llama fixture's rope_parameters: llama3 scaling with a short original context, which moves
  // every position past it
  const plain = await tokenLoss(join(FIX, 'llama'));
  const empty = variant('llama', (c) => {
    c.rope_scaling = {};
  });
  assert.ok(maxDiff(await tokenLoss(empty), plain) <= 1e-6, 'rope_scaling {} changed the rotary embedding');
  // and the scaling does matter here: without it the losses differ
  const unscaled = variant('llama', (c) => {
    c.rope_parameters = { rope_type: 'default', rope_theta: 100 };
  });
  assert.ok(maxDiff(await tokenLoss(unscaled), plain) > 1e-3, 'the fixture does not exercise the scaling');
  // GPT-NeoX: its partial rotary factor and base come from rope_parameters too
  const neox = join(FIX, 'gpt_neox');
  const neoxConfig = JSON.parse(readFileSync(join(neox, 'config.json'), 'utf8'));
  const withParams = variant('gpt_neox', (c) => {
    c.rope_parameters = { rope_type: 'default', rope_theta: 50, partial_rotary_factor: 0.5 };
    delete c.rotary_pct;
    delete c.rotary_emb_base;
  });
  const withEmpty = variant('gpt_neox', (c) => {
    c.rope_parameters = { rope_type: 'default', rope_theta: 50, partial_rotary_factor: 0.5 };
    c.rope_scaling = {};
    delete c.rotary_pct;
    delete c.rotary_emb_base;
  });
  assert.ok(maxDiff(await tokenLoss(withEmpty), await tokenLoss(withParams)) <= 1e-6);
  assert.ok(neoxConfig, 'fixture config read');
});

test('llama3 RoPE without any original context length is refused naming the keys (it gave NaN losses)', async () => {
  const dir = variant('llama', (c) => {
    const p = { ...(c.rope_parameters as Record<string, unknown>) };
    delete p.original_max_position_embeddings;
    c.rope_parameters = p;
    delete c.max_position_embeddings;
  });
  assert.rejects(
    tokenLoss(dir),
    /rope type "llama3" needs "original_max_position_embeddings".*"max_position_embeddings"/,
  );
});

test('GPT-NeoX with an odd number of rotary features is refused naming partial_rotary_factor', async () => {
  const head = (() => {
    const c = JSON.parse(readFileSync(join(FIX, 'gpt_neox', 'config.json'), 'utf8'));
    return c.hidden_size / c.num_attention_heads;
  })();
  const dir = variant('gpt_neox', (c) => {
    delete c.rotary_pct;
    c.rope_parameters = { rope_type: 'default', rope_theta: 10000, partial_rotary_factor: 5 / head };
  });
  await assert.rejects(tokenLoss(dir), /rotates 5 of each head's \d+ features; an even number/);
});

test('config sizes that contradict the weights are refused as transformers refuses them', async () => {
  const vocab = variant('llama', (c) => {
    c.vocab_size = 300;
  });
  await assert.rejects(
    tokenLoss(vocab),
    /model\.embed_tokens\.weight has shape \[320, 32\], but config.json says \[300, 32\] \(vocab_size 300/,
  );
  const inter = variant('llama', (c) => {
    c.intermediate_size = 48;
  });
  await assert.rejects(
    tokenLoss(inter),
    /gate_proj\.weight has 64 outputs, but config.json says 48 \(intermediate_size 48\)/,
  );
  // num_key_value_heads absent: transformers' LlamaConfig takes num_attention_heads (4 here), the
  // weights have 2 KV heads: refused naming the key instead of an ONNX Runtime reshape error
  const kv = variant('llama', (c) => {
    delete c.num_key_value_heads;
  });
  await assert.rejects(
    tokenLoss(kv),
    /k_proj\.weight has 16 outputs, but config.json says 32 \(num_key_value_heads absent/,
  );
  const gpt2 = variant('gpt2', (c) => {
    c.n_inner = 7;
  });
  await assert.rejects(tokenLoss(gpt2), /c_fc\.weight has \d+ outputs, but config.json says 7 \(n_inner 7\)/);
});

test('model.safetensors beside a sharded index is refused: transformers would load the single file', async () => {
  const dir = mkdtempSync(join(home, 'both-'));
  cpSync(join(FIX, 'llama'), dir, { recursive: true });
  // the same weights again as one shard with an index, the old single file left behind
  const h = readSafetensorsHeader(join(dir, 'model.safetensors'));
  const tensors: Parameters<typeof writeSafetensors>[1] = {};
  const weightMap: Record<string, string> = {};
  for (const [name, t] of h.tensors) {
    const { dtype, data } = readTensor(h, name);
    tensors[name] = { dtype: dtype as 'F32', shape: t.shape, data: data as Float32Array };
    weightMap[name] = 'model-00001-of-00001.safetensors';
  }
  writeSafetensors(join(dir, 'model-00001-of-00001.safetensors'), tensors);
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
  assert.throws(
    () => openCheckpoint(dir),
    /holds both model\.safetensors and model\.safetensors\.index\.json.*transformers loads model\.safetensors.*delete the stale one/,
  );
  // an index that names the single file itself is one layout, not two
  const self = Object.fromEntries(Object.keys(weightMap).map((n) => [n, 'model.safetensors']));
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: self }));
  assert.equal(openCheckpoint(dir).files.length, 1);
});

test('a file saved from the base model (no "transformer." prefix, as the hub’s gpt2) loads as transformers loads it', async () => {
  const dir = mkdtempSync(join(home, 'gpt2-base-'));
  cpSync(join(FIX, 'gpt2'), dir, { recursive: true });
  const file = join(dir, 'model.safetensors');
  const h = readSafetensorsHeader(file);
  const tensors: Parameters<typeof writeSafetensors>[1] = {};
  for (const [name, t] of h.tensors) {
    const { dtype, data } = readTensor(h, name);
    tensors[name.replace(/^transformer\./, '')] = { dtype: dtype as 'F32', shape: t.shape, data: data as Float32Array };
  }
  assert.ok(!Object.keys(tensors).some((n) => n.startsWith('transformer.')));
  writeSafetensors(file, tensors);
  const ck = openCheckpoint(dir);
  assert.ok(ck.has('transformer.wte.weight') && ck.has('transformer.h.0.attn.c_attn.weight'));
  assert.deepEqual(
    [...ck.readF32('transformer.wpe.weight')],
    [...openCheckpoint(join(FIX, 'gpt2')).readF32('transformer.wpe.weight')],
  );
  assert.ok(maxDiff(await tokenLoss(dir), await tokenLoss(join(FIX, 'gpt2'))) <= 1e-6);
  // the model's names everywhere, so train/retrain read the same parameters as from the full file
  const params = loadParams(Model.open(dir));
  assert.deepEqual([...params.keys()].sort(), [...loadParams(Model.open(join(FIX, 'gpt2'))).keys()].sort());
});
