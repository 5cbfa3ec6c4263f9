// The influence commands as a user runs them: fit → explain (text and --json) → scan, and the
// one-line errors for the mistakes users make.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import type { ExplainResult } from '../../src/protocol/types';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const MODEL = 'test/fixtures/models/llama';
const OTHER = 'test/fixtures/models/mistral';

const cli = cliIn(home);

describe('influence-lens fit / explain / scan', () => {
  const data = join(home, 'train.jsonl');
  const factors = join(home, 'factors');
  writeFileSync(
    data,
    [
      { text: 'The capital of France is Paris.' },
      { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
      { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
      {
        messages: [
          { role: 'user', content: 'hi' },
          { role: 'assistant', content: 'hello' },
        ],
      },
    ]
      .map((r) => JSON.stringify(r))
      .join('\n'),
  );

  test('fit writes factors; a second run is a no-op', () => {
    let r = cli('fit', '--model', MODEL, '--data', data, '--out', factors, '--modules', 'mlp');
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /wrote EK-FAC factors for 6 modules/);
    r = cli('fit', '--model', MODEL, '--data', data, '--out', factors, '--modules', 'mlp');
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /already holds factors for this model and data/);
  });

  test('explain prints both lists with signs in words, and --json is the documented ExplainResult', () => {
    const args = ['explain', '--model', MODEL, '--factors', factors, '--data', data];
    const q = ['--prompt', 'Q: capital of France?\nA:', '--completion', ' Paris'];
    let r = cli(...args, ...q, '--top-k', '2');
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /Supporting \(made this completion more likely\):/);
    assert.match(r.out, /Opposing \(made this completion less likely\):/);
    assert.match(r.out, /train\.jsonl:\d+ {2}[0-9a-f]{16}/);
    r = cli(...args, ...q, '--json', '--compare', 'bm25');
    assert.equal(r.code, 0, r.err);
    const res = JSON.parse(r.out) as ExplainResult;
    assert.equal(res.method, 'ekfac');
    assert.equal(res.scored, 4);
    assert.equal(res.supporting.length + res.opposing.length, 4);
    const e = res.supporting[0];
    assert.ok(e.tokenScores && e.perModule && e.completionTokenScores && e.otherRanks?.bm25);
    assert.equal(Object.keys(e.perModule).length, 6);
  });

  test('explain --json carries the warnings it prints (factors fitted on other data), for one query and for --queries', () => {
    const query = { prompt: 'Q: capital of France?\nA:', completion: ' Paris' };
    const explainJson = (over: string, ...extra: string[]) =>
      cli('explain', '--model', MODEL, '--factors', factors, '--data', over, '--json', ...extra);
    const one = (over: string, ...extra: string[]) =>
      explainJson(over, '--prompt', query.prompt, '--completion', query.completion, ...extra);
    const other = join(home, 'other.jsonl');
    writeFileSync(other, `${JSON.stringify({ prompt: 'Q: capital of Spain?\nA:', completion: ' Madrid' })}\n`);
    const r = one(other);
    assert.equal(r.code, 0, r.err);
    assert.match(r.err, /warning: the EK-FAC factors in .* were fitted on other data than .*other\.jsonl/);
    const res = JSON.parse(r.out) as ExplainResult;
    assert.equal(res.warnings?.length, 1);
    assert.match(res.warnings![0], /fitted on other data than .*other\.jsonl/);
    const qfile = join(home, 'q-warn.jsonl');
    writeFileSync(qfile, `${JSON.stringify(query)}\n`);
    const many = explainJson(other, '--queries', qfile);
    assert.equal(many.code, 0, many.err);
    assert.deepEqual((JSON.parse(many.out.trim()) as ExplainResult).warnings, res.warnings);
    // lines skipped as malformed are said in the JSON too
    const messy = join(home, 'messy.jsonl');
    writeFileSync(messy, `${readFileSync(data, 'utf8').trimEnd()}\n{not json\n`);
    const skipped = one(messy, '--skip-malformed');
    assert.equal(skipped.code, 0, skipped.err);
    const said = (JSON.parse(skipped.out) as ExplainResult).warnings ?? [];
    assert.ok(
      said.some((w) => /skipped 1 malformed line\(s\) of .*messy\.jsonl/.test(w)),
      said.join('\n'),
    );
    // over the data they were fitted on: no warnings field
    assert.equal((JSON.parse(one(data).out) as ExplainResult).warnings, undefined);
  });

  test('explain --queries: one ExplainResult per line, equal to single-query calls; messages queries', () => {
    const args = ['explain', '--model', MODEL, '--factors', factors, '--data', data, '--json'];
    const qfile = join(home, 'queries.jsonl');
    const queries = [
      { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
      {
        messages: [
          { role: 'user', content: 'hi' },
          { role: 'assistant', content: 'hello' },
        ],
      },
    ];
    // a blank line between them: the second result answers line 3, and says so
    writeFileSync(qfile, queries.map((q) => JSON.stringify(q)).join('\n\n'));
    const r = cli(...args, '--queries', qfile);
    assert.equal(r.code, 0, r.err);
    const lines = r.out
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as ExplainResult);
    assert.equal(lines.length, 2);
    assert.deepEqual(
      lines.map((l) => l.query.where),
      [`${qfile}:1`, `${qfile}:3`],
    );
    // the messages query is rendered as the training data's messages records are (this model has no
    // chat template: the stand-in, and the result says so); its completion is the assistant's content
    assert.equal(lines[1].query.rendering, 'stand-in');
    assert.equal(lines[1].query.prompt, '<|user|>\nhi\n<|assistant|>\n');
    assert.equal(lines[1].query.completion, 'hello');
    const one = JSON.parse(
      cli(...args, '--prompt', lines[0].query.prompt, '--completion', lines[0].query.completion).out,
    ) as ExplainResult;
    assert.deepEqual(
      { ...lines[0], timings: {}, query: { ...lines[0].query, where: undefined } },
      { ...one, timings: {}, query: { ...one.query, where: undefined } },
    );
    // the same scores as the stand-in text explained as prompt + completion
    const text = JSON.parse(
      cli(...args, '--prompt', '<|user|>\nhi\n<|assistant|>\n', '--completion', 'hello\n').out,
    ) as ExplainResult;
    assert.deepEqual(
      lines[1].supporting.map((e) => e.score),
      text.supporting.map((e) => e.score),
    );
    writeFileSync(
      qfile,
      JSON.stringify({
        messages: [
          { role: 'assistant', content: 'x' },
          { role: 'user', content: 'y' },
        ],
      }),
    );
    const bad = cli(...args, '--queries', qfile);
    assert.equal(bad.code, 1);
    assert.match(bad.err, /queries\.jsonl:1: the last message must be the assistant's/);
  });

  test('explain --queries: a refused query is named by its line; a bad line does not suggest --skip-malformed', () => {
    const args = ['explain', '--model', MODEL, '--factors', factors, '--data', data, '--top-k', '1'];
    const qfile = join(home, 'hostile-queries.jsonl');
    const ok = JSON.stringify({ prompt: 'Q: capital of France?\nA:', completion: ' Paris' });
    // a blank line, then a query longer than the model's context on line 4
    const long = JSON.stringify({ prompt: `Q: ${'x '.repeat(200)}?\nA:`, completion: ' Paris' });
    writeFileSync(qfile, [ok, '', ok, long, ok].join('\n'));
    let r = cli(...args, '--queries', qfile);
    assert.equal(r.code, 1);
    assert.match(r.err, /hostile-queries\.jsonl:4: prompt \+ completion is \d+ tokens; the model takes \d+/);
    // a line that is not JSON: its line, and no advice that would not help (queries are never skipped)
    writeFileSync(qfile, [ok, '', '{"prompt": "Q: x', ok].join('\n'));
    for (const extra of [[], ['--skip-malformed']]) {
      r = cli(...args, ...extra, '--queries', qfile);
      assert.equal(r.code, 1);
      assert.match(r.err, /hostile-queries\.jsonl:3: invalid JSON/);
      assert.doesNotMatch(r.err, /--skip-malformed/);
    }
  });

  test('explain --queries: an option on a query line ("method", "topK") is refused, not dropped; metadata is named in one note', () => {
    const args = ['explain', '--model', MODEL, '--factors', factors, '--data', data, '--top-k', '1'];
    const qfile = join(home, 'option-queries.jsonl');
    const q = { prompt: 'Q: capital of France?\nA:', completion: ' Paris' };
    for (const [key, flag] of [
      ['method', '--method'],
      ['topK', '--top-k'],
      ['top_k', '--top-k'],
      ['damping', '--damping'],
    ]) {
      writeFileSync(
        qfile,
        [JSON.stringify(q), JSON.stringify({ ...q, [key]: key === 'method' ? 'bm25' : 1 })].join('\n'),
      );
      const r = cli(...args, '--queries', qfile);
      assert.equal(r.code, 1, `${key}: ${r.err}`);
      assert.match(
        r.err,
        new RegExp(`option-queries\\.jsonl:2: "${key}" in a query line: explain's settings .*\\(${flag}\\)`),
      );
    }
    // an id, a category, a model name are metadata: the queries run, and one note names the keys left aside
    writeFileSync(
      qfile,
      [
        { ...q, id: 'a' },
        // LMSYS-Chat's "model", OpenAssistant's "rank": metadata, not explain's --model or --rank
        { ...q, id: 'b', category: 'capitals', model: 'gpt-4', rank: 0 },
        { ...q, source: null },
      ]
        .map((x) => JSON.stringify(x))
        .join('\n'),
    );
    const r = cli(...args, '--queries', qfile, '--json');
    assert.equal(r.code, 0, r.err);
    assert.equal(r.out.trim().split('\n').length, 3);
    assert.equal(r.err.match(/left aside/g)?.length, 1, r.err);
    assert.match(r.err, /"id" \(2 lines\), "category" \(1 line\), "model" \(1 line\), "rank" \(1 line\) left aside/);
    assert.doesNotMatch(r.err, /"source"/);
  });

  test('scan ranks by self-influence', () => {
    const r = cli('scan', '--model', MODEL, '--factors', factors, '--data', data, '--json');
    assert.equal(r.code, 0, r.err);
    const s = JSON.parse(r.out);
    assert.equal(s.examples.length, 4);
    assert.ok(s.examples[0].selfInfluence >= s.examples[3].selfInfluence);
  });

  test('mistakes get one clear line and exit code 1', () => {
    const cases: Array<[string[], RegExp]> = [
      [
        ['explain', '--model', OTHER, '--factors', factors, '--data', data, '--prompt', 'a', '--completion', 'b'],
        /fitted on another model/,
      ],
      [
        ['explain', '--model', MODEL, '--data', data, '--prompt', 'a', '--completion', 'b', '--method', 'ekfac'],
        /needs --factors/,
      ],
      [
        ['explain', '--model', MODEL, '--data', data, '--prompt', 'a', '--completion', 'b', '--method', 'magic'],
        /--method must be one of/,
      ],
      [
        ['explain', '--model', MODEL, '--factors', factors, '--data', data, '--prompt', 'a', '--completion', ''],
        /completion is empty/,
      ],
      [['fit', '--model', OTHER, '--data', data, '--out', factors], /already holds factors fitted on another model/],
      [
        ['fit', '--model', MODEL, '--data', data, '--out', join(home, 'f2'), '--partition', '3'],
        /--partition must look like i\/n/,
      ],
      [
        ['fit', '--model', MODEL, '--data', data, '--out', join(home, 'f2'), '--partition', '3/2'],
        /the partition must be i\/n with 0 <= i < n \(got 3\/2; set it with --partition i\/n\)$/m,
      ],
      [['fit', '--model', MODEL, '--data', join(home, 'missing.jsonl'), '--out', join(home, 'f3')], /missing\.jsonl/],
      [
        [
          'explain',
          '--model',
          MODEL,
          '--factors',
          join(home, 'nowhere'),
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
        ],
        /no factors folder at .*nowhere: fit them there first/,
      ],
      // longer than the model's context (GPT-2's learned positions have no row for it)
      [
        [
          'gradients',
          '--model',
          'test/fixtures/models/gpt2',
          '--text',
          'word '.repeat(200),
          '--out',
          join(home, 'g.safetensors'),
        ],
        /the text is \d+ tokens; the model takes 64 \(its config\.json\)/,
      ],
      [
        [
          'explain',
          '--model',
          MODEL,
          '--factors',
          factors,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--damping',
          'lots',
        ],
        // the engine names the setting, the CLI adds the flag
        /: damping must be .*; set it with --damping\)$/m,
      ],
      // a damping that would flush every float32 1/(Λ+λ) to zero (all scores 0) is refused
      [
        [
          'explain',
          '--model',
          MODEL,
          '--factors',
          factors,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--damping',
          '1e400x',
        ],
        /damping must be a non-negative number up to 1e\+30/,
      ],
      [
        [
          'explain',
          '--model',
          MODEL,
          '--factors',
          factors,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--damping',
          '1e300',
        ],
        /damping must be a non-negative number up to 1e\+30/,
      ],
      // factors over the mlp modules never stand in for the --modules asked for
      [
        [
          'explain',
          '--model',
          MODEL,
          '--factors',
          factors,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--modules',
          'all',
        ],
        /fitted over the MLP modules, but --modules asks for all/,
      ],
      // flags that no chosen method reads are refused, not ignored
      [
        [
          'explain',
          '--model',
          MODEL,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--method',
          'gdp',
          '--damping',
          '0.1x',
        ],
        /--damping sets EK-FAC's damping; gdp uses no factors/,
      ],
      [
        [
          'explain',
          '--model',
          MODEL,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--method',
          'bm25',
          '--rank',
          '2',
        ],
        /--rank is a low-rank query gradient; bm25 computes no gradients/,
      ],
      [
        [
          'explain',
          '--model',
          MODEL,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--method',
          'gdp',
          '--pretrained-model',
          MODEL,
        ],
        /--pretrained-model is read by --method multistage only/,
      ],
      [
        [
          'explain',
          '--model',
          MODEL,
          '--data',
          data,
          '--prompt',
          'a',
          '--completion',
          'b',
          '--method',
          'gdp',
          '--batch-size',
          '0',
        ],
        /--batch-size must be at least 1/,
      ],
      [
        ['scan', '--model', MODEL, '--factors', factors, '--data', data, '--batch-size=-3'],
        /--batch-size must be at least 1/,
      ],
      // sampled labels depend on the seed: factors of seed 0 are not "up to date" for --seed 1
      [
        ['fit', '--model', MODEL, '--data', data, '--out', factors, '--modules', 'mlp', '--seed', '1'],
        /already holds factors fitted on labels sampled with seed 0 \(asked: --seed 1\)/,
      ],
    ];
    for (const [args, want] of cases) {
      const r = cli(...args);
      assert.equal(r.code, 1, `${args.join(' ')}\n${r.err}`);
      assert.match(r.err, want);
      // the error is one line (warnings about the data, e.g. a chat record without a template, may precede it)
      const lines = r.err
        .trim()
        .split('\n')
        .filter((l) => !l.startsWith('warning:'));
      assert.equal(lines.length, 1, `one line: ${r.err}`);
    }
    // a malformed line is named, and skipped only on request
    const bad = join(home, 'bad.jsonl');
    writeFileSync(bad, '{"text": "ok line"}\n{not json\n');
    let r = cli('fit', '--model', MODEL, '--data', bad, '--out', join(home, 'f4'));
    assert.equal(r.code, 1);
    assert.match(r.err, /bad\.jsonl:2/);
    r = cli('fit', '--model', MODEL, '--data', bad, '--out', join(home, 'f4'), '--skip-malformed');
    assert.equal(r.code, 0, r.err);
    assert.match(r.err, /skipped 1 malformed line/);
  });
});

test("a query file's line that is no query names a query's shapes (a text record has no completion)", async () => {
  const { readQueries } = await import('../../src/server/cli/explain');
  const file = join(home, 'shapeless.jsonl');
  writeFileSync(file, `${JSON.stringify({ prompt: 'Q?', completion: ' A' })}\n${JSON.stringify({ foo: 1 })}\n`);
  assert.throws(
    () => readQueries(file),
    (e: Error) =>
      /shapeless\.jsonl:2: no "text", "prompt" or "messages" field; a query is \{"prompt": string, "completion": string\}/.test(
        e.message,
      ) && !e.message.includes('{"text": string}'),
  );
});

test('explain says which examples have no trained token (they score 0 in gradient methods), on stderr and in --json', () => {
  // a user audit: "6 training examples scored" with 3 of them at 0 and never mentioned
  const data = join(home, 'untrained.jsonl');
  writeFileSync(
    data,
    [
      { text: 'The capital of France is Paris.' },
      { text: 'a' },
      { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
    ]
      .map((r) => JSON.stringify(r))
      .join('\n'),
  );
  const r = cli(
    ...['explain', '--model', MODEL, '--data', data, '--method', 'gdp'],
    ...['--prompt', 'Q: capital of France?\nA:', '--completion', ' Paris', '--json'],
  );
  assert.equal(r.code, 0, r.err);
  const note = `1 example(s) have no trained token (1 of a single token, with no next token to predict): their gradient is zero, so gradient methods score them 0, neither supporting nor opposing (line 2 of ${data})`;
  assert.ok(r.err.includes(note), r.err);
  const out = JSON.parse(r.out) as ExplainResult & { warnings?: string[] };
  assert.ok(out.warnings?.includes(note), JSON.stringify(out.warnings));
  assert.equal(out.scored, 3);
});

test('explain warns when the query holds words outside the vocabulary (read as the unknown token), on stderr and in --json', () => {
  // an editor audit: " Cairo" under the embedded word-level tokenizer was <|unk|>, explained as if it were the word
  const data = join(home, 'unk.jsonl');
  writeFileSync(
    data,
    [
      { prompt: 'Q: What is the capital of France?\nA:', completion: ' Paris' },
      { prompt: 'Q: What is the capital of Italy?\nA:', completion: ' Rome' },
    ]
      .map((r) => JSON.stringify(r))
      .join('\n'),
  );
  const run = (prompt: string, completion: string) =>
    cli(
      ...['explain', '--model', 'assets/default/finetuned', '--data', data, '--method', 'gdp', '--checkpoints', 'off'],
      ...['--prompt', prompt, '--completion', completion, '--json'],
    );
  let r = run('Q: What is the capital of Egypt?\nA:', ' Cairo');
  assert.equal(r.code, 0, r.err);
  const warning = `the completion's "Cairo" and the prompt's "Egypt" are not in the tokenizer's vocabulary: the model reads each as its unknown token <|unk|> (id 2), so the scores explain <|unk|> there, not those words`;
  assert.ok(r.err.includes(`warning: ${warning}`), r.err);
  assert.equal((JSON.parse(r.out) as ExplainResult).warnings?.[0], warning);
  // words the vocabulary has: no such warning
  r = run('Q: What is the capital of France?\nA:', ' Paris');
  assert.equal(r.code, 0, r.err);
  assert.ok(!r.err.includes('vocabulary'), r.err);
  assert.ok(!(JSON.parse(r.out) as ExplainResult).warnings?.some((w) => w.includes('vocabulary')));
});

test("the unknown-word warning names the person's words only: not a chat stand-in's markup, not <unk> written as itself", async () => {
  const { loadTokenizer } = await import('../../src/server/model/tokenizer');
  const { tokenizeQuery, unknownWordsWarning } = await import('../../src/server/data/tokenize');
  const tok = loadTokenizer('assets/default/finetuned');
  const warn = (prompt: string, completion: string, messages?: unknown) =>
    unknownWordsWarning(tok, tokenizeQuery(tok, prompt, completion, 128, messages));
  // the embedded tokenizer has no chat template: the stand-in's "<|user|>" is no word of the person's
  const chat = [
    { role: 'user', content: 'What is the capital of France?' },
    { role: 'assistant', content: ' Paris' },
  ];
  assert.equal(warn('', '', chat), undefined);
  assert.match(
    warn('', '', [chat[0], { role: 'assistant', content: ' Cairo' }]) ?? '',
    /^the completion's "Cairo" is not in the tokenizer's vocabulary/,
  );
  assert.equal(warn('Q: What is the capital of France?\nA:', ' <|unk|>'), undefined);
  assert.match(
    warn('Q: What is Zorblax?\nA:', ' Paris') ?? '',
    /^the prompt's "Zorblax\?" is not|^the prompt's "Zorblax" is not/,
  );
});
