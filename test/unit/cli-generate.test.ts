// `influence-lens generate` on the shipped fine-tuned model: greedy answers (as the model's own
// generate() gives them), prompts from a JSONL file as JSON lines, seeded sampling, stop
// strings, and clear refusals of bad input.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const MODEL = 'assets/default/finetuned';
const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', 'generate', '--model', MODEL, ...args], {
    encoding: 'utf8',
    env: { ...process.env, HOME: home },
  });

test('generate: greedy, a prompts file as JSON lines, sampling with a seed, stop strings', () => {
  const one = cli('--prompt', 'Q: What is the capital of Australia?\nA:');
  assert.equal(one.status, 0, one.stderr);
  assert.equal(one.stdout, ' Sydney\n');

  const file = join(home, 'prompts.jsonl');
  writeFileSync(
    file,
    `${JSON.stringify({ prompt: 'Q: What is the capital of Australia?\nA:' })}\n\n${JSON.stringify({ prompt: 'Q: What is the capital of Canada?\nA:' })}\n`,
  );
  const many = cli('--prompts', file, '--json');
  assert.equal(many.status, 0, many.stderr);
  const rows = many.stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  assert.deepEqual(
    rows.map((r) => [r.completion, r.stop, r.tokens]),
    [
      [' Sydney', 'newline', 1],
      [' Toronto', 'newline', 1],
    ],
  );
  assert.ok(rows[0].logprob < 0 && rows[0].logprob > Math.log(0.5));

  // sampling: the same seed gives the same text, and a high temperature over many tokens varies with the seed
  const sample = (seed: string) =>
    cli('--prompt', 'Q:', '--temperature', '2', '--seed', seed, '--max-tokens', '12', '--multiline', '--json');
  const a = sample('1');
  const b = sample('1');
  const c = sample('2');
  assert.equal(a.status, 0, a.stderr);
  assert.equal(a.stdout, b.stdout);
  assert.notEqual(a.stdout, c.stdout);
  assert.equal(JSON.parse(a.stdout).tokens, 12);

  const stopped = cli('--prompt', 'Q: What is the capital of Australia?\nA:', '--stop', 'dney', '--json');
  assert.equal(stopped.status, 0, stopped.stderr);
  assert.deepEqual([JSON.parse(stopped.stdout).completion, JSON.parse(stopped.stdout).stop], [' Sy', 'stop']);
});

test('generate refuses unclear input with one line naming it', () => {
  const bad = join(home, 'bad.jsonl');
  writeFileSync(bad, '{"prompt": "ok"}\n{"text": "no prompt"}\n');
  for (const [args, msg] of [
    [['--prompts', bad], /bad\.jsonl:2: expected \{"prompt": "<text>"\}/],
    [['--prompt', 'x', '--temperature=-1'], /--temperature must be a number >= 0/],
    [['--prompt', 'x', '--max-tokens', '0'], /--max-tokens must be at least 1/],
    [[], /exactly one of --prompt <text> or --prompts <file.jsonl>/],
  ] as const) {
    const r = cli(...args);
    assert.equal(r.status, 1, r.stdout);
    assert.match(r.stderr, msg);
  }
});

test('generate --seed outside 32 bits is refused before the model is opened (its first use reads every weight file)', () => {
  // no model at this path: a refusal naming --seed shows the flag was read first
  const r = spawnSync(
    process.execPath,
    [
      '--import',
      'tsx',
      'src/server/cli.ts',
      'generate',
      '--model',
      join(home, 'no-model-here'),
      '--prompt',
      'x',
    ].concat(['--temperature', '1', '--seed', '4294967296']),
    { encoding: 'utf8', env: { ...process.env, HOME: home } },
  );
  assert.equal(r.status, 1, r.stdout);
  assert.match(r.stderr, /--seed must be an integer from 0 to 4294967295/);
});
