// A named pipe where a file is expected (--data, a factor file, config.json, tokenizer.json) is
// refused at once: opened for reading in the usual way, a pipe waits for a writer, and the command
// hung forever (found by fuzzing the real CLI).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const LLAMA = 'test/fixtures/models/llama';
const cli = cliIn(home, {}, 60_000);
const fifo = (path: string) => {
  rmSync(path, { force: true });
  execFileSync('mkfifo', [path]);
};

test('a pipe given as data, factor file, config.json or tokenizer.json is refused, not waited on', {
  skip: process.platform === 'win32' ? 'no mkfifo' : false,
}, () => {
  const data = join(home, 'train.jsonl');
  writeFileSync(data, `${JSON.stringify({ prompt: 'Q: capital of France?\nA:', completion: ' Paris' })}\n`);
  const q = ['--prompt', 'Q: capital of France?\nA:', '--completion', ' Paris', '--checkpoints', 'off'];
  const pipe = join(home, 'pipe.jsonl');
  fifo(pipe);
  let r = cli('explain', '--model', LLAMA, '--data', pipe, ...q, '--method', 'bm25');
  assert.equal(r.code, 1, r.err);
  assert.match(r.err, /pipe\.jsonl: is not a regular file \(a pipe, a socket or a device\), expected a \.jsonl file/);

  const factors = join(home, 'factors');
  assert.equal(cli('fit', '--model', LLAMA, '--data', data, '--out', factors, '--modules', 'mlp').code, 0);
  const args = join(home, 'factors-args');
  cpSync(factors, args, { recursive: true });
  fifo(join(factors, 'lambda_matrix.safetensors'));
  r = cli('explain', '--model', LLAMA, '--factors', factors, '--data', data, ...q);
  assert.equal(r.code, 1, r.err);
  assert.match(r.err, /lambda_matrix\.safetensors: not a safetensors file \(not a regular file\)/);
  fifo(join(args, 'influence_lens_arguments.json'));
  r = cli('explain', '--model', LLAMA, '--factors', args, '--data', data, ...q);
  assert.equal(r.code, 1, r.err);
  assert.match(r.err, /influence_lens_arguments\.json is not a regular file/);

  // files read on other paths: a chat template beside the tokenizer, an adapter's config
  const jinja = join(home, 'model-jinja');
  cpSync(LLAMA, jinja, { recursive: true });
  fifo(join(jinja, 'chat_template.jinja'));
  r = cli('tokenize', '--model', jinja, '--data', data);
  assert.equal(r.code, 1, r.err);
  assert.match(r.err, /chat_template\.jinja is not a regular file/);
  const adapter = join(home, 'adapter');
  cpSync('test/fixtures/models/llama_lora', adapter, { recursive: true });
  fifo(join(adapter, 'adapter_config.json'));
  r = cli('tokenize', '--model', adapter, '--base', LLAMA, '--data', data);
  assert.equal(r.code, 1, r.err);
  assert.match(r.err, /adapter_config\.json.*is not a regular file/);

  for (const file of ['config.json', 'tokenizer.json']) {
    const model = join(home, `model-${file}`);
    cpSync(LLAMA, model, { recursive: true });
    fifo(join(model, file));
    r = cli('explain', '--model', model, '--data', data, ...q, '--method', 'gdp');
    assert.equal(r.code, 1, `${file}: ${r.err}`);
    assert.match(r.err, new RegExp(`${file.replace('.', '\\.')} is not a regular file`), file);
  }
});
