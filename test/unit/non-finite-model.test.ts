// A damaged checkpoint (a NaN or huge weight) or a config value that makes the forward pass NaN
// (an epsilon or RoPE base of 0 or below) is refused with the file and tensor or key, never
// turned into an empty or NaN ranking with exit status 0 (found by fuzzing the real CLI).
import assert from 'node:assert/strict';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { readSafetensorsHeader } from '../../src/server/model/safetensors';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const cli = cliIn(home);
const LLAMA = 'test/fixtures/models/llama';
const DATA = join(home, 'train.jsonl');
writeFileSync(
  DATA,
  `${[
    { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
    { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
  ]
    .map((r) => JSON.stringify(r))
    .join('\n')}\n`,
);
const Q = ['--prompt', 'Q: capital of France?\nA:', '--completion', ' Paris'];

/** A copy of the llama fixture with `value` written over one float32 of `tensor`. */
function damaged(name: string, tensor: string, value: number): string {
  const dir = join(home, name);
  cpSync(LLAMA, dir, { recursive: true });
  const file = join(dir, 'model.safetensors');
  const h = readSafetensorsHeader(file);
  const t = h.tensors.get(tensor)!;
  assert.equal(t.dtype, 'F32');
  const b = readFileSync(file);
  b.writeFloatLE(value, t.byteOffset + 4 * 10);
  writeFileSync(file, b);
  return dir;
}

test('one NaN or huge weight: explain and fit name the file and tensor instead of an empty ranking', () => {
  const tensor = 'model.layers.0.mlp.up_proj.weight';
  for (const [name, value, shown] of [
    ['nan', Number.NaN, 'NaN'],
    ['huge', 3e38, '3.00e\\+38'],
  ] as const) {
    const model = damaged(name, tensor, value);
    for (const method of ['gdp', 'repsim']) {
      const r = cli('explain', '--model', model, '--data', DATA, ...Q, '--method', method, '--checkpoints', 'off');
      assert.equal(r.code, 1, `${method}: ${r.out}`);
      assert.match(r.err, /the model's loss on this completion \(−log p = (NaN|Infinity)\) is not a finite number/);
      assert.match(r.err, new RegExp(`model\\.safetensors: "${tensor.replaceAll('.', '\\.')}" holds ${shown}`));
      assert.doesNotMatch(r.err, /\n\s+at /, 'one line, no stack');
    }
    const grads = cli(
      'gradients',
      '--model',
      model,
      '--text',
      'The capital of France is Paris.',
      '--out',
      join(home, `${name}.safetensors`),
    );
    assert.equal(grads.code, 1, grads.out);
    assert.match(grads.err, /the loss of this text \((NaN|Infinity)\) is not a finite number: .*up_proj\.weight/);
    const fit = cli(
      'fit',
      '--model',
      model,
      '--data',
      DATA,
      '--out',
      join(home, `${name}-factors`),
      '--checkpoints',
      'off',
    );
    assert.equal(fit.code, 1);
    assert.match(fit.err, /(NaN|Inf) in .*model\.safetensors: "model\.layers\.0\.mlp\.up_proj\.weight" holds/);
    assert.doesNotMatch(fit.err, /\n\s+at /, 'one line, no stack');
  }
});

test('an epsilon, RoPE base or context length that cannot be is refused when the model opens, naming the key', () => {
  for (const [key, value, re] of [
    ['rms_norm_eps', -1, /rms_norm_eps.*a number above 0/],
    ['rope_theta', 0, /rope_theta.*(a number above 0|rope_type)/],
    ['max_position_embeddings', 0, /"max_position_embeddings" is 0; it must be a positive integer/],
  ] as const) {
    const dir = join(home, `cfg-${key}`);
    cpSync(LLAMA, dir, { recursive: true });
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
    cfg[key] = value;
    writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg, null, 2));
    const r = cli('explain', '--model', dir, '--data', DATA, ...Q, '--method', 'gdp', '--checkpoints', 'off');
    assert.equal(r.code, 1, `${key}: ${r.out}`);
    assert.match(r.err, re, key);
  }
});

test('weights of a layer the config does not have are refused, not left unused', () => {
  const dir = join(home, 'fewer-layers');
  cpSync(LLAMA, dir, { recursive: true });
  const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  cfg.num_hidden_layers = 1;
  writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg, null, 2));
  const r = cli('explain', '--model', dir, '--data', DATA, ...Q, '--method', 'gdp', '--checkpoints', 'off');
  assert.equal(r.code, 1, r.out);
  assert.match(
    r.err,
    /model\.safetensors holds "model\.layers\.1\.[^"]+", a weight of layer 1, but .*config\.json says the model has 1 layer \(0–0\): the config and the weights disagree/,
  );
});

test('messages that say what is wrong: a weight stored as integers, a damping of text in the factors, a BOM in a JSON file', () => {
  // a weight relabelled I32 (the same 4 bytes a value)
  const dir = join(home, 'int-weight');
  cpSync(LLAMA, dir, { recursive: true });
  const file = join(dir, 'model.safetensors');
  const b = readFileSync(file);
  const n = Number(b.readBigUInt64LE(0));
  const h = JSON.parse(b.subarray(8, 8 + n).toString('utf8'));
  h['model.layers.0.mlp.up_proj.weight'].dtype = 'I32';
  const json = Buffer.from(JSON.stringify(h));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, b.subarray(8 + n)]));
  let r = cli('explain', '--model', dir, '--data', DATA, ...Q, '--method', 'gdp', '--checkpoints', 'off');
  assert.equal(r.code, 1);
  assert.match(
    r.err,
    /tensor "model\.layers\.0\.mlp\.up_proj\.weight" is stored as I32, an integer type; llama needs it as floats/,
  );

  // a damping written as text in the factors' arguments
  const factors = join(home, 'damping-factors');
  assert.equal(cli('fit', '--model', LLAMA, '--data', DATA, '--out', factors, '--modules', 'mlp').code, 0);
  const args = join(factors, 'influence_lens_arguments.json');
  writeFileSync(args, readFileSync(args, 'utf8').replace(/"damping": \{[^}]*\}/, '"damping": "0.1"'));
  r = cli('explain', '--model', LLAMA, '--factors', factors, '--data', DATA, ...Q, '--checkpoints', 'off');
  assert.equal(r.code, 1);
  assert.match(r.err, /holds "damping": "0\.1"; it must be \{"relative": x\} or \{"absolute": x\}/);

  // a byte order mark before config.json's or tokenizer.json's JSON
  for (const name of ['config.json', 'tokenizer.json']) {
    const m = join(home, `bom-${name}`);
    cpSync(LLAMA, m, { recursive: true });
    writeFileSync(join(m, name), Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), readFileSync(join(LLAMA, name))]));
    r = cli('explain', '--model', m, '--data', DATA, ...Q, '--method', 'gdp', '--checkpoints', 'off');
    assert.equal(r.code, 1, name);
    assert.match(r.err, new RegExp(`${name.replace('.', '\\.')} starts with a byte order mark \\(BOM\\)`), name);
  }
});

test('buffers transformers loads without a word (attention masks, rotary inv_freq) and a tied head stored twice are not called unread', async () => {
  const {
    readSafetensorsHeader: header,
    readTensorF64,
    writeSafetensors,
  } = await import('../../src/server/model/safetensors');
  // a copy of `from` with `more(tensors)` added to its model.safetensors
  const withTensors = (
    from: string,
    name: string,
    more: (t: Record<string, { dtype: string; shape: number[]; data: ArrayLike<number> }>) => void,
  ) => {
    const dir = join(home, name);
    cpSync(from, dir, { recursive: true });
    const file = join(dir, 'model.safetensors');
    const h = header(file);
    const tensors: Parameters<typeof writeSafetensors>[1] = {};
    for (const [n, t] of h.tensors) tensors[n] = { dtype: t.dtype, shape: t.shape, data: readTensorF64(h, n) };
    more(tensors as never);
    writeSafetensors(file, tensors, h.metadata);
    return dir;
  };
  const prefixOf = (tensors: Record<string, unknown>, re: RegExp) =>
    Object.keys(tensors)
      .find((n) => re.test(n))!
      .replace(re, '');
  // GPT-2 fine-tunes saved by transformers before 4.31: float attn.bias (the causal mask) and attn.masked_bias
  const gpt2 = withTensors('test/fixtures/models/gpt2', 'gpt2-buffers', (t) => {
    const p = prefixOf(t, /h\.0\.attn\.c_attn\.weight$/);
    t[`${p}h.0.attn.bias`] = { dtype: 'F32', shape: [1, 1, 2, 2], data: [1, 0, 1, 1] };
    t[`${p}h.0.attn.masked_bias`] = { dtype: 'F32', shape: [], data: [-1e4] };
  });
  // Pythia's files: attention.masked_bias and rotary_emb.inv_freq
  const neox = withTensors('test/fixtures/models/gpt_neox', 'neox-buffers', (t) => {
    const p = prefixOf(t, /layers\.0\.attention\.query_key_value\.weight$/);
    t[`${p}layers.0.attention.masked_bias`] = { dtype: 'F32', shape: [], data: [-1e9] };
    t[`${p}layers.0.attention.rotary_emb.inv_freq`] = { dtype: 'F32', shape: [2], data: [1, 0.5] };
  });
  // a tied Llama that also stores its head (the same bytes as the embedding)
  const tied = withTensors(LLAMA, 'llama-tied-head', (t) => {
    t['lm_head.weight'] = {
      ...(t['model.embed_tokens.weight'] as { dtype: string; shape: number[]; data: ArrayLike<number> }),
    };
  });
  for (const dir of [gpt2, neox, tied]) {
    const r = cli('inspect', dir, '--json');
    assert.equal(r.code, 0, r.err);
    assert.equal(JSON.parse(r.out).unreadTensors, undefined, `${dir}: ${JSON.parse(r.out).unreadTensors}`);
  }
});

test('inspect lists float tensors the model never reads (what transformers warns of as unused weights)', async () => {
  const {
    readSafetensorsHeader: header,
    readTensorF64,
    writeSafetensors,
  } = await import('../../src/server/model/safetensors');
  const dir = join(home, 'extra-tensor');
  cpSync(LLAMA, dir, { recursive: true });
  const file = join(dir, 'model.safetensors');
  const h = header(file);
  const tensors: Parameters<typeof writeSafetensors>[1] = {};
  for (const [name, t] of h.tensors) tensors[name] = { dtype: t.dtype, shape: t.shape, data: readTensorF64(h, name) };
  tensors['score.weight'] = { dtype: 'F32', shape: [2, 2], data: [1, 2, 3, 4] };
  writeSafetensors(file, tensors, h.metadata);
  const r = cli('inspect', dir);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /unused: +1 float tensor\(s\) the model does not read, e\.g\. score\.weight/);
  assert.doesNotMatch(cli('inspect', LLAMA).out, /unused:/);
  assert.deepEqual(JSON.parse(cli('inspect', dir, '--json').out).unreadTensors, ['score.weight']);
  // the commands that compute with the model say so too (they ran without a word)
  const data = join(home, 'extra-tensor.jsonl');
  writeFileSync(data, `${JSON.stringify({ prompt: 'Q: capital of France?\nA:', completion: ' Paris' })}\n`);
  const unused = /warning: .*extra-tensor holds 1 float tensor\(s\) the model does not read \(e\.g\. score\.weight\)/;
  const fit = cli('fit', '--model', dir, '--data', data, '--out', join(home, 'extra-tensor-factors'));
  assert.equal(fit.code, 0, fit.err);
  assert.match(fit.err, unused);
  const ex = cli('explain', '--model', dir, '--data', data, '--prompt', 'Q: x?\nA:', '--completion', ' Paris');
  assert.equal(ex.code, 0, ex.err);
  assert.match(ex.err, unused);
  assert.doesNotMatch(
    cli('explain', '--model', LLAMA, '--data', data, '--prompt', 'Q: x?\nA:', '--completion', ' Paris').err,
    /does not read/,
  );
});
