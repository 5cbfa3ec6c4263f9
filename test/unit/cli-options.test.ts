// Options that were accepted and then silently ignored or read as something else: each is now
// either honoured or refused, in one line naming the flag, before any work starts.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { type JsonSchema, validateSchema } from '../../src/common/json-schema';
import { PARAMS_SCHEMA } from '../../src/protocol/params-schema';
import { loadTokenizer } from '../../src/server/model/tokenizer';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const MODEL = 'assets/default/finetuned';
const PRETRAINED = 'assets/default/pretrained';
const PROMPT = 'Q: What is the capital of France?\nA:';

const cli = cliIn(home, { INFLUENCE_LENS_CACHE: join(home, 'cache') }, 120_000);

/** A refusal: exit 1, one line on stderr matching `re`, nothing on stdout. */
function refused(r: ReturnType<typeof cli>, re: RegExp) {
  assert.equal(r.code, 1, `expected a refusal; stdout: ${r.out} stderr: ${r.err}`);
  assert.match(r.err, re);
  assert.equal(r.err.trim().split('\n').length, 1, r.err);
}

// the first 32 lines of the shipped fine-tuning data: a 646k-parameter model trains on them in a second
const data = join(home, 'small.jsonl');
writeFileSync(
  data,
  `${readFileSync('assets/default/data/finetune.jsonl', 'utf8').split('\n').slice(0, 32).join('\n')}\n`,
);

describe('train and retrain', () => {
  test('--clip 0 (it scaled every gradient to 0: the model came out unchanged) and a negative --warmup are refused', () => {
    const out = join(home, 'clip0');
    const base = ['train', '--model', PRETRAINED, '--data', data, '--out', out, '--epochs', '1'];
    refused(cli(...base, '--clip', '0'), /--clip must be greater than 0/);
    refused(cli(...base, '--warmup=-5'), /--warmup must be at least 0/);
    refused(cli(...base, '--lr', '0'), /--lr must be greater than 0 \(the learning rate/);
    // a negative one with the same words: "non-negative" invited the 0 that is refused next
    refused(
      cli(...base, '--lr=-0.001'),
      /--lr must be greater than 0 \(the learning rate; 0 would train nothing; got "-0.001"\)/,
    );
    refused(cli(...base, '--clip=-1'), /--clip must be greater than 0 \(the largest gradient norm/);
  });

  test("--exclude with flags none of which is in --data (another dataset's) is refused, not trained on everything", () => {
    const other = join(home, 'other.exclude.jsonl');
    writeFileSync(other, `${JSON.stringify({ hash: '0123456789abcdef', line: 3, reason: 'x' })}\n`);
    const out = join(home, 'excluded');
    const base = ['train', '--model', PRETRAINED, '--data', data, '--out', out, '--epochs', '1', '--threads', '1'];
    refused(cli(...base, '--exclude', other), /none of the 1 example\(s\) flagged in .*other\.exclude\.jsonl is in/);
    // a model to retrain: retrain with those flags would have written the same model again
    const trained = cli(...base);
    assert.equal(trained.code, 0, trained.err);
    refused(
      cli(
        'retrain',
        '--model',
        out,
        '--exclude',
        other,
        '--data',
        data,
        '--out',
        join(home, 'retrained'),
        '--from',
        PRETRAINED,
      ),
      /none of the 1 example\(s\) flagged/,
    );
  });

  test('flags that match no line, and identical copies excluded with a flag, are named by train and retrain', async () => {
    const { loadDataset } = await import('../../src/server/data/dataset');
    // line 1 twice: flagging it excludes both copies
    const lines = readFileSync(data, 'utf8').split('\n').filter(Boolean);
    const dup = join(home, 'dup.jsonl');
    writeFileSync(dup, `${[lines[0], ...lines.slice(1, 16), lines[0]].join('\n')}\n`);
    const hash = loadDataset(dup).examples[0].hash;
    const flags = join(home, 'dup.exclude.jsonl');
    writeFileSync(
      flags,
      `${JSON.stringify({ hash, line: 1 })}\n${JSON.stringify({ hash: '0123456789abcdef', line: 9 })}\n`,
    );
    const out = join(home, 'dup-trained');
    const base = ['--data', dup, '--epochs', '1', '--threads', '1', '--exclude', flags];
    const trained = cli('train', '--model', PRETRAINED, '--out', out, ...base);
    assert.equal(trained.code, 0, trained.err);
    assert.match(trained.out, /\(2 excluded\)/);
    const note =
      /note: 1 of the 2 example\(s\) flagged in .*dup\.exclude\.jsonl are not in .*dup\.jsonl \(lines edited since they were flagged\?\) and exclude nothing; 1 identical copy of flagged examples excluded with them/;
    assert.match(trained.err, note);
    const again = cli(
      'retrain',
      '--model',
      out,
      '--data',
      dup,
      '--exclude',
      flags,
      '--out',
      join(home, 'dup-re'),
      '--from',
      PRETRAINED,
    );
    assert.equal(again.code, 0, again.err);
    assert.match(again.err, note);
  });
});

describe('data eval', () => {
  test('on a built corpus, the --queries flags are refused rather than ignored', () => {
    for (const flag of [
      ['--factors', 'f'],
      ['--methods', 'bm25'],
      ['--top-k', '0'],
      ['--max-tokens', '1'],
    ])
      refused(
        cli('data', 'eval', '--model', MODEL, '--data', 'assets/default/data', ...flag),
        new RegExp(`${flag[0]} applies to data eval --queries`),
      );
  });

  test('--queries: --max-tokens 0 (every answer empty, 0%) is refused; the ranking flags need --data', () => {
    const q = join(home, 'q.jsonl');
    writeFileSync(q, `${JSON.stringify({ prompt: PROMPT, expected: ' Paris' })}\n`);
    refused(
      cli('data', 'eval', '--model', MODEL, '--queries', q, '--max-tokens', '0'),
      /--max-tokens must be at least 1/,
    );
    refused(
      cli('data', 'eval', '--model', MODEL, '--queries', q, '--methods', 'gdp', '--top-k', '3'),
      /--methods applies to the sources in --data/,
    );
  });
});

test('explain --modules with only BM25 / RepSim (no gradients, no modules) is refused like --rank', () => {
  const q = ['--prompt', PROMPT, '--completion', ' Paris'];
  for (const m of [['bm25'], ['repsim', '--compare', 'bm25']])
    refused(
      cli('explain', '--model', MODEL, '--data', data, ...q, '--method', ...m, '--modules', 'mlp'),
      /--modules chooses the layers whose gradients are scored; (bm25|repsim, bm25) computes? no gradients/,
    );
});

test('a flag given twice with two values is refused (the last one used to win silently); the same value twice, or a repeatable flag, is not', () => {
  const q = ['--prompt', PROMPT, '--completion', ' Paris'];
  refused(
    cli('explain', '--model', MODEL, '--data', data, ...q, '--method', 'gdp', '--method', 'bm25'),
    /--method is given twice \("gdp" and "bm25"\); give it once/,
  );
  refused(
    cli('generate', '--model', MODEL, '--prompt', PROMPT, '--max-tokens', '1', '--max-tokens=4'),
    /--max-tokens is given twice/,
  );
  const same = cli(
    'explain',
    '--model',
    MODEL,
    '--data',
    data,
    ...q,
    '--method',
    'bm25',
    '--method=bm25',
    '--top-k',
    '1',
  );
  assert.equal(same.code, 0, same.err);
  const stops = cli('generate', '--model', MODEL, '--prompt', PROMPT, '--stop', 'x', '--stop', 'y');
  assert.equal(stops.code, 0, stops.err);
});

test('fit --partition into more partitions than examples is refused (it fitted partitions with nothing in them; 0/1e20 died on a RangeError)', () => {
  for (const p of ['0/40', '0/99999999999999999999'])
    refused(
      cli(
        'fit',
        '--model',
        MODEL,
        '--data',
        data,
        '--out',
        join(home, 'parts'),
        '--checkpoints',
        'off',
        '--partition',
        p,
      ),
      /splits 32 example\(s\) into more partitions than examples .*use at most 32 \(set it with --partition i\/n\)/,
    );
});

test('INFLUENCE_LENS_* variables set to a value they do not take are refused by name, in one line (RUN_MB=1GB ran at 1024 MiB)', () => {
  const fit = ['fit', '--model', MODEL, '--data', data, '--out', join(home, 'env-fit'), '--checkpoints', 'off'];
  const withEnv = (env: Record<string, string>) =>
    spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', ...fit], {
      encoding: 'utf8',
      env: { ...process.env, HOME: home, INFLUENCE_LENS_CACHE: join(home, 'cache'), ...env },
    });
  for (const [name, value, re] of [
    ['INFLUENCE_LENS_RUN_MB', '1GB', /INFLUENCE_LENS_RUN_MB="1GB": use a number above 0 \(MiB\)/],
    ['INFLUENCE_LENS_RUN_MB', '0', /INFLUENCE_LENS_RUN_MB="0"/],
    ['INFLUENCE_LENS_EIGH_PARALLEL', '1.5', /INFLUENCE_LENS_EIGH_PARALLEL="1.5": use a whole number above 0/],
    ['INFLUENCE_LENS_LAPACK', 'disable', /INFLUENCE_LENS_LAPACK="disable": use on or off/],
    ['INFLUENCE_LENS_ORT_ARENA', 'enable', /INFLUENCE_LENS_ORT_ARENA="enable": use scores \(default/],
    ['INFLUENCE_LENS_MALLOC', 'sometimes', /INFLUENCE_LENS_MALLOC="sometimes": use trim/],
    ['INFLUENCE_LENS_FIT_ROWS_MB', '2GB', /INFLUENCE_LENS_FIT_ROWS_MB="2GB": use a number above 0 \(MiB, or 0 to/],
    [
      'INFLUENCE_LENS_FIT_ROWS_DIR',
      '/no/such/folder',
      /INFLUENCE_LENS_FIT_ROWS_DIR="\/no\/such\/folder": use an existing folder/,
    ],
  ] as const) {
    const r = withEnv({ [name]: value });
    refused({ code: r.status, out: r.stdout, err: r.stderr }, re);
  }
  const ok = withEnv({
    INFLUENCE_LENS_RUN_MB: '256',
    INFLUENCE_LENS_EIGH_PARALLEL: '1',
    INFLUENCE_LENS_LAPACK: 'off',
    INFLUENCE_LENS_FIT_ROWS_MB: '0',
    INFLUENCE_LENS_FIT_ROWS_DIR: 'off',
  });
  assert.equal(ok.status, 0, ok.stderr);
});

test('inspect with two model folders is refused (the second was silently left out)', () => {
  refused(cli('inspect', MODEL, PRETRAINED), /inspect takes one model folder \(got 2: /);
});

test('data build / data tokenizer --context below 2 is refused before anything is written (0 became model_max_length 0)', () => {
  const out = join(home, 'ctx');
  refused(cli('data', 'build', '--out', out, '--context', '0'), /--context must be at least 2 tokens/);
  refused(cli('data', 'tokenizer', '--out', out, '--context', '1', data), /--context must be at least 2 tokens/);
  assert.ok(!existsSync(out));
});

test('serve --host "" is refused (Node listened on every interface, behind a ws://:port/ URL)', () => {
  refused(cli('serve', '--host', '', '--no-discovery'), /--host must name an address/);
});

test('an empty number is refused, not read as 0 (serve --port "" picked a random port, --seed "" was seed 0)', () => {
  refused(cli('serve', '--port', '', '--no-discovery'), /--port must be an integer \(got ""\)/);
  refused(
    cli('generate', '--model', MODEL, '--prompt', PROMPT, '--temperature', '1', '--seed', ' '),
    /--seed must be an integer/,
  );
  refused(
    cli('generate', '--model', MODEL, '--prompt', PROMPT, '--temperature', ''),
    /--temperature must be a number >= 0/,
  );
  refused(
    cli('train', '--model', PRETRAINED, '--data', data, '--out', join(home, 'lr'), '--lr', ''),
    /--lr must be greater than 0 \(the learning rate; 0 would train nothing; got ""\)/,
  );
  refused(cli('demo', '--query', ''), /--query must be/);
});

describe('numbers the engine would read as other numbers', () => {
  test('--seed outside 0..2^32-1 is refused (4294967296 sampled as 0 did), everywhere it is read', () => {
    const big = ['--seed', '4294967296'];
    refused(
      cli('generate', '--model', MODEL, '--prompt', PROMPT, '--temperature', '3', ...big),
      /--seed must be an integer from 0 to 4294967295/,
    );
    refused(cli('fit', '--model', MODEL, '--data', data, '--out', join(home, 'f'), ...big), /--seed must be/);
    refused(
      cli('gradients', '--model', MODEL, '--text', 'a b c', '--out', join(home, 'g.safetensors'), ...big),
      /--seed must be/,
    );
    refused(cli('train', '--model', PRETRAINED, '--data', data, '--out', join(home, 't'), ...big), /--seed must be/);
    refused(cli('data', 'build', '--out', join(home, 'b'), '--seed', '1e20'), /--seed must be/);
    const top = cli('generate', '--model', MODEL, '--prompt', PROMPT, '--temperature', '3', '--seed', '4294967295');
    assert.equal(top.code, 0, top.err);
  });

  test('a seed that changes nothing (nothing is drawn at random) is noted, not silently ignored', () => {
    const note = /note: --seed 5 changes nothing here: /;
    const greedy = cli('generate', '--model', MODEL, '--prompt', PROMPT, '--seed', '5');
    assert.equal(greedy.code, 0, greedy.err);
    assert.match(greedy.err, /note: --seed 5 changes nothing here: --temperature 0 decodes greedily/);
    const sampled = cli('generate', '--model', MODEL, '--prompt', PROMPT, '--temperature', '1', '--seed', '5');
    assert.equal(sampled.code, 0, sampled.err);
    assert.doesNotMatch(sampled.err, note);
    const g = (labels: string) =>
      cli(
        'gradients',
        '--model',
        MODEL,
        '--text',
        'a b c',
        '--out',
        join(home, `g-${labels}.safetensors`),
        '--labels',
        labels,
        '--seed',
        '5',
      );
    const data = g('data');
    assert.equal(data.code, 0, data.err);
    assert.match(data.err, /note: --seed 5 changes nothing here: with --labels data the text gives the labels/);
    const drawn = g('sampled');
    assert.equal(drawn.code, 0, drawn.err);
    assert.doesNotMatch(drawn.err, note);
    // fit says so before it opens anything (here its data file is missing)
    const fit = (...extra: string[]) =>
      cli(
        'fit',
        '--model',
        MODEL,
        '--data',
        join(home, 'none.jsonl'),
        '--out',
        join(home, 'fs'),
        '--seed',
        '5',
        ...extra,
      );
    const empirical = fit('--labels', 'empirical');
    assert.equal(empirical.code, 1);
    assert.match(
      empirical.err,
      /note: --seed 5 changes nothing here: with --labels empirical the data gives the labels/,
    );
    const fitSampled = fit();
    assert.doesNotMatch(fitSampled.err, note);
  });

  test('--threads outside 1..1024 is refused (0 meant all cores, a negative count a stack trace, 100000 a hang)', () => {
    for (const t of ['0', '-2', '100000'])
      refused(
        cli('generate', '--model', MODEL, '--prompt', PROMPT, `--threads=${t}`),
        /--threads must be an integer from 1 to 1024/,
      );
    refused(
      cli('data', 'eval', '--model', MODEL, '--data', 'assets/default/data', '--threads', '0'),
      /--threads must be/,
    );
    refused(
      cli('train', '--model', PRETRAINED, '--data', data, '--out', join(home, 't'), '--threads', '5000'),
      /--threads must be/,
    );
  });

  test('demo --top-k is checked before the fits, naming the flag', () => {
    for (const k of ['0', 'abc', '2.5']) {
      const r = cli('demo', '--top-k', k);
      refused(r, /--top-k must be/);
      assert.doesNotMatch(r.out, /fitted/);
    }
  });

  test("the server's generate refuses a seed beyond 32 bits", () => {
    const schema = PARAMS_SCHEMA.generate as unknown as JsonSchema;
    assert.deepEqual(validateSchema({ prompt: 'x', seed: 4294967295 }, schema), []);
    for (const seed of [4294967296, -1])
      assert.ok(validateSchema({ prompt: 'x', seed }, schema).length, `seed ${seed} was accepted`);
    // 1e400 in a request reads as Infinity: the refusal names it so, not as JSON's null
    const issues = validateSchema(JSON.parse('{"prompt": "x", "seed": 1e400}'), schema);
    assert.ok(issues.length && issues.every((i) => /Infinity/.test(JSON.stringify(i))), JSON.stringify(issues));
  });
});

test('serve whose address cannot be bound stops with one line naming the setting (it printed a stack and never exited)', async () => {
  const { createServer } = await import('node:net');
  const busy = createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', r));
  const port = (busy.address() as { port: number }).port;
  try {
    refused(
      cli('serve', '--no-discovery', '--port', String(port)),
      new RegExp(
        `port ${port} on 127\\.0\\.0\\.1 is in use \\(another server\\?\\): choose another with --host/--port`,
      ),
    );
    // a flag wins over the file, and says so
    const cfgPort = join(home, 'port.json');
    writeFileSync(
      cfgPort,
      JSON.stringify({
        port: 45999,
        discoveryFile: join(home, 'd.json'),
        models: { model: `${process.cwd()}/${MODEL}`, checkpoints: 'off' },
        datasets: { d: data },
      }),
    );
    const r = cli('serve', '--no-discovery', '--config', cfgPort, '--port', String(port), '--checkpoints', 'auto');
    assert.equal(r.code, 1, r.err);
    assert.deepEqual(r.err.trim().split('\n'), [
      `note: --port ${port} overrides "port": 45999 in port.json`,
      'note: --checkpoints auto overrides "checkpoints": "off" in port.json',
      `note: --no-discovery overrides "discoveryFile": ${JSON.stringify(join(home, 'd.json'))} in port.json`,
      `influence-lens serve: port ${port} on 127.0.0.1 is in use (another server?): choose another with --host/--port or "host"/"port" in ${cfgPort} (0 picks a free one)`,
    ]);
  } finally {
    busy.close();
  }
  refused(
    cli('serve', '--no-discovery', '--host', 'no-such-host.invalid'),
    /host "no-such-host\.invalid" does not resolve/,
  );
  // the configuration file's "host" refuses blanks, as --host does
  const cfg = join(home, 'blank-host.json');
  writeFileSync(
    cfg,
    JSON.stringify({
      host: ' ',
      models: { model: `${process.cwd()}/${MODEL}` },
      datasets: { d: `${process.cwd()}/${data}` },
    }),
  );
  refused(cli('serve', '--no-discovery', '--config', cfg), /blank-host\.json: host: must match/);
});

test('generate stops at the model context, and says so; a prompt past the context is refused (it slid a window over the prompt)', () => {
  // the embedded model's context is 128 tokens
  const r = cli('generate', '--model', MODEL, '--prompt', PROMPT, '--max-tokens', '500', '--multiline', '--json');
  assert.equal(r.code, 0, r.err);
  const g = JSON.parse(r.out) as { stop: string; tokens: number };
  if (g.stop === 'context') {
    assert.match(
      r.err,
      /^note: the generation stopped at the model's context \(128 tokens with the prompt\) before --max-tokens 500\n$/,
    );
    const promptTokens = loadTokenizer(MODEL).encode(PROMPT).ids.length;
    assert.equal(g.tokens + promptTokens, 128);
  } else assert.equal(g.stop, 'eos', `ended before the context only at end-of-text (${g.stop})`);
  refused(
    cli('generate', '--model', MODEL, '--prompt', 'word '.repeat(300)),
    /the prompt is \d+ tokens and the model's context is 128 \(config\.json\): nothing can be generated after it; shorten the prompt/,
  );
});

test('explain --compare with the method itself says it is left out; an empty --compare is refused', () => {
  const base = [
    'explain',
    '--model',
    MODEL,
    '--data',
    data,
    '--prompt',
    PROMPT,
    '--completion',
    ' Paris',
    '--method',
    'bm25',
  ];
  const r = cli(...base, '--compare', 'bm25,bm25', '--json');
  assert.equal(r.code, 0, r.err);
  assert.match(r.err, /^note: --compare bm25 is the --method itself: left out\n/);
  refused(cli(...base, '--compare', ' '), /--compare must name one or more methods/);
  // factors no chosen method reads were opened and ignored
  refused(cli(...base, '--factors', home), /--factors is read by the gradient methods .*; bm25 computes no gradients/);
});

test('train --save-steps not below the run writes no intermediate checkpoint, and says so', () => {
  const out = join(home, 'save-steps');
  const r = cli('train', '--model', PRETRAINED, '--data', data, '--out', out, '--epochs', '1', '--save-steps', '1000');
  assert.equal(r.code, 0, r.err);
  assert.match(r.err, /note: --save-steps 1000 is not below the run's 2 steps: no intermediate checkpoint is written/);
  assert.ok(!existsSync(join(out, 'checkpoint-1000')));
});
