// Explaining a chat record: the query is rendered like the training data (the model's chat
// template), the result says how, and the completion heatmap's offsets land in the JSONL line's
// assistant content string.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { Corpus, explain } from '../../src/server/attribution/explain';
import { loadDataset } from '../../src/server/data/dataset';
import { Model } from '../../src/server/model/engine';
import { InfluenceService } from '../../src/server/service/influence-service';
import { initLlama, saveCheckpoint } from '../../src/server/train/trainer';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const TOKENIZER = 'test/fixtures/models/llama';
// a template that trims contents and ends turns with the tokenizer's special token
const TEMPLATE =
  "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] | trim }}<|endoftext|>{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}";
const MESSAGES = [
  { role: 'user', content: 'capital of France?' },
  { role: 'assistant', content: '  Paris is.' },
];

function model(dir: string, template?: string): Model {
  const { config, params, shapes } = initLlama(
    { vocab: 320, d: 8, layers: 1, heads: 2, kvHeads: 1, ffn: 12, maxPositions: 128 },
    1,
    { bos: 0, eos: 0, pad: 0 },
  );
  saveCheckpoint(dir, config, params, shapes, TOKENIZER);
  if (template) {
    const p = join(dir, 'tokenizer_config.json');
    writeFileSync(p, JSON.stringify({ ...JSON.parse(readFileSync(p, 'utf8')), chat_template: template }));
  }
  return Model.open(dir);
}

/** An opened service over the model in `dir`, with `data` as dataset "d". */
function serviceOver(dir: string, data: string): InfluenceService {
  const service = new InfluenceService({
    finetuned: { model: dir },
    datasets: { d: data },
    modules: 'all',
    cacheDir: join(home, 'c'),
  });
  service.open();
  return service;
}

test('a chat query is rendered with the chat template; completion offsets index the assistant content', async () => {
  const m = model(join(home, 'chat'), TEMPLATE);
  const data = join(home, 'chat.jsonl');
  writeFileSync(data, `${JSON.stringify({ messages: MESSAGES })}\n${JSON.stringify({ text: 'Paris is big.' })}\n`);
  const corpus = new Corpus('d', loadDataset(data), m);
  const r = await explain({ model: { model: m }, modules: 'all' }, corpus, {
    prompt: 'ignored',
    completion: 'ignored',
    messages: MESSAGES,
    method: 'bm25',
    topK: 2,
  });
  assert.equal(r.query.rendering, 'chat_template');
  assert.equal(r.query.prompt, '<user>capital of France?<|endoftext|><assistant>');
  const content = MESSAGES[1].content;
  assert.equal(r.query.completion, content);
  const { offsets } = r.query.completionTokens;
  // the content tokens tile the trimmed content; the end-of-turn token sits empty at its end
  assert.equal(offsets.map(([s, e]) => content.slice(s, e)).join(''), 'Paris is.');
  assert.deepEqual(offsets.at(-1), [content.length, content.length]);
  // training examples are shown as the model saw them
  const chat = [...r.supporting, ...r.opposing].find((e) => e.kind === 'messages')!;
  assert.equal(chat.text, '<user>capital of France?<|endoftext|><assistant>Paris is.<|endoftext|>');
});

test('without a chat template the result says the stand-in was used', async () => {
  const m = model(join(home, 'plain'));
  const data = join(home, 'plain.jsonl');
  writeFileSync(data, `${JSON.stringify({ messages: MESSAGES })}\n`);
  const corpus = new Corpus('d', loadDataset(data), m);
  const r = await explain({ model: { model: m }, modules: 'all' }, corpus, {
    prompt: '',
    completion: '',
    messages: MESSAGES,
    method: 'bm25',
    topK: 1,
  });
  assert.equal(r.query.rendering, 'stand-in');
  assert.equal(r.query.completion, MESSAGES[1].content);
  const { offsets } = r.query.completionTokens;
  assert.ok(offsets.every(([s, e]) => s >= 0 && e <= MESSAGES[1].content.length));
});

test("a chat query in a --queries file and in the server's explainMany is rendered with the chat template too", async () => {
  const dir = join(home, 'chat-many');
  const m = model(dir, TEMPLATE);
  const data = join(home, 'chat-many.jsonl');
  writeFileSync(data, `${JSON.stringify({ messages: MESSAGES })}\n${JSON.stringify({ text: 'Paris is big.' })}\n`);
  const corpus = new Corpus('d', loadDataset(data), m);
  const alone = await explain({ model: { model: m }, modules: 'all' }, corpus, {
    prompt: '',
    completion: '',
    messages: MESSAGES,
    method: 'gdp',
    topK: 2,
  });
  assert.equal(alone.query.rendering, 'chat_template');
  const same = (r: ExplainResult) => {
    assert.equal(r.query.rendering, 'chat_template');
    assert.equal(r.query.prompt, alone.query.prompt);
    assert.equal(r.query.loss, alone.query.loss);
    assert.deepEqual(
      r.supporting.map((e) => [e.id.line, e.score]),
      alone.supporting.map((e) => [e.id.line, e.score]),
    );
  };
  // the CLI
  const queries = join(home, 'chat-queries.jsonl');
  writeFileSync(queries, `${JSON.stringify({ messages: MESSAGES })}\n`);
  const r = spawnSync(
    process.execPath,
    ['--import', 'tsx', 'src/server/cli.ts', 'explain', '--model', dir, '--data', data, '--method', 'gdp'],
    { encoding: 'utf8', env: { ...process.env, HOME: home } },
  );
  assert.match(r.stderr, /--prompt and --completion are required/);
  const cli = spawnSync(
    process.execPath,
    [
      '--import',
      'tsx',
      'src/server/cli.ts',
      'explain',
      '--model',
      dir,
      '--data',
      data,
      '--method',
      'gdp',
      '--top-k',
      '2',
      '--queries',
      queries,
      '--json',
    ],
    { encoding: 'utf8', env: { ...process.env, HOME: home } },
  );
  assert.equal(cli.status, 0, cli.stderr);
  same(JSON.parse(cli.stdout) as ExplainResult);
  // the server
  const service = serviceOver(dir, data);
  const many = await service.explainMany({
    dataset: 'd',
    method: 'gdp',
    topK: 2,
    queries: [{ prompt: '', completion: '', messages: MESSAGES }],
  });
  same(many.results[0]);
  // getExample (and scanDataset's rows) show the example as the model saw it: its token offsets index that text
  const ex = await service.getExample('d', 1);
  assert.equal(ex.text, '<user>capital of France?<|endoftext|><assistant>Paris is.<|endoftext|>');
  assert.equal(ex.tokens.offsets.at(-1)?.[1], ex.text.length);
});

test('a chat whose last message is not a non-empty assistant reply is refused by explain and explainMany, not cut to an earlier turn', async () => {
  const data = join(home, 'refuse.jsonl');
  writeFileSync(data, `${JSON.stringify({ messages: MESSAGES })}\n`);
  for (const template of [TEMPLATE, undefined]) {
    const dir = join(home, template ? 'refuse-chat' : 'refuse-plain');
    model(dir, template);
    const service = serviceOver(dir, data);
    const cases: Array<[Array<{ role: string; content: string }>, RegExp]> = [
      [
        [...MESSAGES, { role: 'user', content: 'now answer' }],
        /the last message must be the assistant's .* it is "user"'s/,
      ],
      [
        [MESSAGES[0], { role: 'assistant', content: '' }],
        /the last assistant message is empty: there is nothing to explain/,
      ],
    ];
    // a query's own settings (refused by the RPC schema) do not stand in for the request's in the checks
    const q = { prompt: 'capital?', completion: ' Paris' };
    await assert.rejects(
      service.explainMany({ dataset: 'd', method: 'bm25', topK: 100000, queries: [{ ...q, topK: 1 } as typeof q] }),
      /topK must be an integer from 1 to/,
    );
    await assert.rejects(
      service.explainMany({ dataset: 'd', method: 'ekfac', topK: 1, queries: [{ ...q, method: 'bm25' } as typeof q] }),
      /ekfac is unavailable/,
    );
    for (const [messages, why] of cases) {
      const q = { prompt: '', completion: '', messages };
      await assert.rejects(service.explain({ dataset: 'd', method: 'bm25', topK: 1, ...q }), why);
      await assert.rejects(
        service.explainMany({
          dataset: 'd',
          method: 'bm25',
          topK: 1,
          queries: [{ prompt: '', completion: '', messages: MESSAGES }, q],
        }),
        why,
      );
    }
  }
});
