// The commands over a PEFT LoRA adapter as a user runs them: inspect, gradients, fit → explain
// → scan, with the base from base_model_name_or_path or from --base; the tracked modules are
// the adapter's A and B layers.
import assert from 'node:assert/strict';
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { loadFactors } from '../../src/server/attribution/ekfac/factors-io';
import { readSafetensorsHeader, readTensorF32, writeSafetensors } from '../../src/server/model/safetensors';
import { cliIn } from './helpers/cli';
import { writeJsonl, writeTinyCorpus } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const ADAPTER = 'test/fixtures/models/llama_lora';
const BASE = 'test/fixtures/models/llama';
const LORA_NAME = /^base_model\.model\.model\.layers\.\d\.(self_attn\.[qv]_proj|mlp\.down_proj)\.lora_[AB]$/;

const cli = cliIn(home);

describe('influence-lens over a LoRA adapter', () => {
  const data = join(home, 'train.jsonl');
  const factors = join(home, 'factors');
  writeTinyCorpus(data, 6);
  // the same adapter whose base_model_name_or_path names a hub id: the base must come from --base
  const moved = join(home, 'moved-adapter');
  cpSync(ADAPTER, moved, { recursive: true });
  const cfg = JSON.parse(readFileSync(join(moved, 'adapter_config.json'), 'utf8'));
  writeFileSync(
    join(moved, 'adapter_config.json'),
    JSON.stringify({ ...cfg, base_model_name_or_path: 'meta-llama/Llama-3.2-1B' }),
  );

  test('inspect lists the LoRA A/B layers; --base stands in for a base that is not a local folder', () => {
    let r = cli('inspect', ADAPTER, '--json');
    assert.equal(r.code, 0, r.err);
    const info = JSON.parse(r.out) as { modules: Array<{ name: string; dIn: number; dOut: number }> };
    assert.equal(info.modules.length, 12);
    assert.ok(info.modules.every((m) => LORA_NAME.test(m.name)));
    assert.deepEqual(JSON.parse(r.out).adapter, {
      type: 'LoRA',
      r: 4,
      alpha: 8,
      scaling: 2,
      rslora: false,
      base: resolve(BASE),
    });
    r = cli('inspect', moved);
    assert.equal(r.code, 1);
    assert.match(
      r.err,
      /adapter_config\.json: "base_model_name_or_path" is "meta-llama\/Llama-3\.2-1B", not a local folder/,
    );
    r = cli('inspect', moved, '--base', BASE, '--json');
    assert.equal(r.code, 0, r.err);
    assert.deepEqual(JSON.parse(r.out).modules, info.modules);
  });

  test('generate and data eval take --base, as the refusal without it says', () => {
    const prompt = 'Q: capital of country 3?\nA:';
    let r = cli('generate', '--model', moved, '--prompt', prompt, '--max-tokens', '3', '--json');
    assert.equal(r.code, 1);
    assert.match(r.err, /not a local folder; pass the base model folder with --base <dir>/);
    // the same completion as the adapter whose base_model_name_or_path is the local folder
    const expected = cli('generate', '--model', ADAPTER, '--prompt', prompt, '--max-tokens', '3', '--json');
    assert.equal(expected.code, 0, expected.err);
    r = cli('generate', '--model', moved, '--base', BASE, '--prompt', prompt, '--max-tokens', '3', '--json');
    assert.equal(r.code, 0, r.err);
    assert.deepEqual(JSON.parse(r.out), JSON.parse(expected.out));
    const queries = writeJsonl(join(home, 'queries.jsonl'), [{ prompt, expected: ' City3' }]);
    const evalArgs = ['--queries', queries, '--max-tokens', '3', '--json'];
    const plain = cli('data', 'eval', '--model', ADAPTER, ...evalArgs);
    assert.equal(plain.code, 0, plain.err);
    r = cli('data', 'eval', '--model', moved, '--base', BASE, ...evalArgs);
    assert.equal(r.code, 0, r.err);
    assert.deepEqual(JSON.parse(r.out), JSON.parse(plain.out));
    for (const command of [['generate'], ['data', 'eval']]) {
      const help = cli(...command, '--help');
      assert.ok(help.out.includes('--base <dir>'), `${command.join(' ')} --help lacks --base:\n${help.out}`);
    }
  });

  test('an adapter_model.safetensors that is a directory is one line naming it, not a stack', () => {
    const dir = join(home, 'weights-dir');
    cpSync(ADAPTER, dir, { recursive: true });
    writeFileSync(join(dir, 'adapter_config.json'), JSON.stringify({ ...cfg, base_model_name_or_path: resolve(BASE) }));
    rmSync(join(dir, 'adapter_model.safetensors'));
    mkdirSync(join(dir, 'adapter_model.safetensors'));
    const r = cli('inspect', dir);
    assert.equal(r.code, 1);
    assert.equal(
      r.err.trim(),
      `influence-lens inspect: ${join(resolve(dir), 'adapter_model.safetensors')}: not a file (expected the adapter's weights, as save_pretrained writes them)`,
    );
  });

  test('gradients writes <lora module>.a / .g', () => {
    const out = join(home, 'g.safetensors');
    const r = cli('gradients', '--model', moved, '--base', BASE, '--text', 'Country 3 has a capital.', '--out', out);
    assert.equal(r.code, 0, r.err);
    const names = [...readSafetensorsHeader(out).tensors.keys()];
    const q = 'base_model.model.model.layers.0.self_attn.q_proj';
    for (const n of [`${q}.lora_A.a`, `${q}.lora_A.g`, `${q}.lora_B.a`, `${q}.lora_B.g`])
      assert.ok(names.includes(n), n);
    const h = readSafetensorsHeader(out);
    assert.equal(h.tensors.get(`${q}.lora_A.g`)!.shape[1], 4); // r
    assert.equal(h.tensors.get(`${q}.lora_B.a`)!.shape[1], 4);
  });

  test('fit → explain → scan run end to end over the adapter', () => {
    let r = cli('fit', '--model', ADAPTER, '--data', data, '--out', factors, '--modules', 'all');
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /wrote EK-FAC factors for 12 modules/);
    const f = loadFactors(factors);
    assert.ok(Object.keys(f.modules).every((n) => LORA_NAME.test(n)));
    r = cli(
      'explain',
      ...['--model', ADAPTER, '--factors', factors, '--data', data],
      ...['--prompt', 'Q: capital of country 3?\nA:', '--completion', ' City3', '--top-k', '3', '--json'],
    );
    assert.equal(r.code, 0, r.err);
    const res = JSON.parse(r.out) as ExplainResult;
    const shown = [...res.supporting, ...res.opposing];
    assert.ok(shown.length > 0);
    assert.ok(shown.every((e) => Number.isFinite(e.score)));
    // factors fitted over the adapter do not fit the base model
    r = cli('scan', '--model', BASE, '--factors', factors, '--data', data);
    assert.equal(r.code, 1);
    r = cli('scan', '--model', moved, '--base', BASE, '--factors', factors, '--data', data, '--top-k', '2', '--json');
    assert.equal(r.code, 0, r.err);
  });

  test('train refuses an adapter (it writes full checkpoints)', () => {
    const r = cli('train', '--model', ADAPTER, '--data', data, '--out', join(home, 'trained'));
    assert.equal(r.code, 1);
    assert.match(r.err, /is a LoRA adapter \(adapter_config\.json\): train fine-tunes full checkpoints only/);
  });

  test('fit --modules mlp over an adapter on attention layers only is refused, not fitted over nothing', () => {
    const dir = join(home, 'attention-only');
    cpSync(ADAPTER, dir, { recursive: true });
    const h = readSafetensorsHeader(join(ADAPTER, 'adapter_model.safetensors'));
    const keep = [...h.tensors.values()].filter((t) => t.name.includes('self_attn'));
    writeSafetensors(
      join(dir, 'adapter_model.safetensors'),
      Object.fromEntries(keep.map((t) => [t.name, { dtype: 'F32', shape: t.shape, data: readTensorF32(h, t.name) }])),
    );
    writeFileSync(
      join(dir, 'adapter_config.json'),
      JSON.stringify({ ...cfg, base_model_name_or_path: 'org/base', target_modules: ['q_proj', 'v_proj'] }),
    );
    const r = cli('fit', '--model', dir, '--base', BASE, '--data', data, '--out', join(home, 'f2'), '--modules', 'mlp');
    assert.equal(r.code, 1);
    assert.match(r.err, /modules "mlp" selects none of the 8 tracked modules .*its LoRA adapter adapts no MLP layer/);
  });
});
