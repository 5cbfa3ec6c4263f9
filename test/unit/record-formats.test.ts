// Real-world fine-tuning files in formats we do not read the way their trainer did must be
// refused by name with what to do, never scored on other text; the ones TRL reads that we do
// (null-filled columns, conversational prompt/completion, names) must give what TRL trains on.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { renderRecord } from '../../src/common/records/render';
import { RecordShapeError, recordValue } from '../../src/common/records/shape';
import { tokenizeFile } from '../../src/server/cli/tokenize';
import { loadDataset } from '../../src/server/data/dataset';
import { tokenizeRecord } from '../../src/server/data/tokenize';
import { loadTokenizer } from '../../src/server/model/tokenizer';
import { writeJsonl } from './helpers/corpus';
import { lenmlTokenizer, llama3WithTemplate } from './helpers/tokenizers';

const LLAMA3 = lenmlTokenizer('llama3');

function refused(value: unknown, message: RegExp) {
  assert.throws(
    () => recordValue(value),
    (e: Error) => e instanceof RecordShapeError && message.test(e.message),
    JSON.stringify(value),
  );
}

test('other formats are named, with what to write instead', () => {
  refused(
    {
      conversations: [
        { from: 'human', value: 'Hi' },
        { from: 'gpt', value: 'Hello' },
      ],
    },
    /ShareGPT.*"messages"/,
  );
  refused({ instruction: 'Add 2 and 2', input: '', output: '4' }, /Alpaca.*"prompt".*"completion"/);
  refused({ prompt: 'Q?', chosen: 'good', rejected: 'bad' }, /preference pair.*DPO/);
  refused({ chosen: [{ role: 'user', content: 'a' }], rejected: [] }, /preference pair/);
  refused({ prompt: 'Q?', completion: ' bad answer', label: false }, /KTO record/);
  refused({ prompt: 'Q?', completion: ' good answer', label: true }, /KTO record/);
  refused(
    {
      messages: [
        { role: 'user', content: 'Weather?' },
        { role: 'assistant', content: 'Sunny' },
      ],
      tools: [{}],
    },
    /"tools"/,
  );
});

test('another format\'s columns beside an accepted field are extra columns (an Alpaca export with "text")', () => {
  assert.deepEqual(recordValue({ instruction: 'Add 2 and 2', input: '', output: '4', text: '### Add 2 and 2\n4' }), {
    kind: 'text',
    text: '### Add 2 and 2\n4',
  });
  const v = recordValue({
    messages: [
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello', tool_calls: [] },
    ],
  });
  assert.equal(v.kind, 'messages');
});

test('message keys the template would read are refused by name, never dropped', () => {
  const user = { role: 'user', content: 'What is 2+2?' };
  const cases: Array<[Record<string, unknown>, string]> = [
    [{ role: 'assistant', content: '', tool_calls: [{ type: 'function', function: { name: 'add' } }] }, 'tool_calls'],
    [{ role: 'assistant', content: '4', reasoning_content: 'Two plus two is four.' }, 'reasoning_content'],
    [{ role: 'assistant', content: '4', weight: 0 }, 'weight'],
  ];
  for (const [assistant, key] of cases)
    refused({ messages: [user, assistant] }, new RegExp(`messages\\[1\\] has "${key}", which is not read`));
  // null content with tool calls (OpenAI's form) names the tool calls, not only the null
  refused({ messages: [user, { role: 'assistant', content: null, tool_calls: [{}] }] }, /"tool_calls"/);
});

test('an unpaired surrogate is refused in every field, a paired one is text', () => {
  refused({ text: 'a \ud800 b' }, /"text" holds an unpaired surrogate \(\\ud800 at character 2\)/);
  refused({ prompt: 'x', completion: ' \udc00' }, /"completion" holds an unpaired surrogate/);
  refused({ messages: [{ role: 'assistant', content: '\ud83d' }] }, /messages\[0\]\.content holds an unpaired/);
  assert.equal(recordValue({ text: 'emoji \ud83d\ude00' }).kind, 'text');
});

test('null-filled columns (datasets.to_json of a mixed dataset) are absent fields', () => {
  assert.deepEqual(recordValue({ text: null, prompt: 'Q: 2+2?\nA:', completion: ' 4', messages: null }), {
    kind: 'prompt_completion',
    prompt: 'Q: 2+2?\nA:',
    completion: ' 4',
  });
  const v = recordValue({
    text: null,
    messages: [
      { role: 'user', content: 'Hi', tool_calls: null, name: null },
      { role: 'assistant', content: 'Hello', reasoning_content: null },
    ],
  });
  assert.equal(v.kind, 'messages');
});

test('conversational prompt/completion: the same ids as one conversation, only the completion trained (TRL)', () => {
  const tok = loadTokenizer(LLAMA3);
  const prompt = [
    { role: 'system', content: 'Answer briefly.' },
    { role: 'user', content: 'Capital of France?' },
    { role: 'assistant', content: 'Paris.' },
    { role: 'user', content: 'And of Italy?' },
  ];
  const completion = [{ role: 'assistant', content: 'Rome.' }];
  const conv = tokenizeRecord(tok, { prompt, completion }, 'conv', 1 << 20);
  const whole = tokenizeRecord(tok, { messages: [...prompt, ...completion] }, 'whole', 1 << 20);
  assert.equal(conv.rendering, 'chat_template');
  assert.equal(conv.text, whole.text);
  assert.deepEqual(conv.ids, whole.ids);
  // as a messages record both assistant turns are scored; as prompt/completion only the last
  const scored = (w: number[], t: typeof conv) =>
    w.flatMap((x, i) => (x ? [t.text.slice(...t.offsets[i + 1])] : [])).join('');
  assert.equal(scored(whole.weights, whole), 'Paris.<|eot_id|>Rome.<|eot_id|>');
  assert.equal(scored(conv.weights, conv), 'Rome.<|eot_id|>');
  // the scored characters map back to the completion's field
  const r = renderRecord(recordValue({ prompt, completion }), tok.chatTemplate());
  assert.equal(r.last.field, 'completion[0].content');
  assert.ok(r.pieces.some((p) => p.field === 'prompt[2].content'));
  refused({ prompt, completion: 'Rome.' }, /both be strings or both be lists of messages/);
  refused({ prompt, completion: [{ role: 'user', content: 'x' }] }, /"completion" has no "assistant" message/);
});

test('a participant name reaches the chat template', () => {
  const dir = llama3WithTemplate(
    '{% for m in messages %}{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}: {{ m.content }}\n{% endfor %}',
  );
  const t = tokenizeRecord(
    loadTokenizer(dir),
    {
      messages: [
        { role: 'user', content: 'Hi', name: 'Ada' },
        { role: 'assistant', content: 'Hello' },
      ],
    },
    'named',
    1 << 20,
  );
  assert.equal(t.text, 'user (Ada): Hi\nassistant: Hello\n');
});

test('a record the chat template fails on is a bad line: named, or skipped with --skip-malformed', () => {
  // as Llama-2's and Mistral's templates do for conversations that do not alternate
  const dir = llama3WithTemplate(
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
  );
  const good = {
    messages: [
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello' },
    ],
  };
  const bad = { messages: [{ role: 'assistant', content: 'Hello' }] };
  const data = writeJsonl(join(dir, 'data.jsonl'), [good, bad, good]);
  const tok = loadTokenizer(dir);
  assert.throws(
    () => loadDataset(data, { chatTemplate: tok.chatTemplate() }),
    /data\.jsonl:2: .*chat_template failed on this record \(Conversation roles must alternate.*--skip-malformed/,
  );
  const ds = loadDataset(data, { chatTemplate: tok.chatTemplate(), skipMalformed: true });
  assert.deepEqual(
    ds.examples.map((e) => e.line),
    [1, 3],
  );
  assert.match(ds.skipped[0].message, /Conversation roles must alternate/);
  // the tokenize command skips it too, and says so
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ max_position_embeddings: 64 }));
  const { lines, warnings } = tokenizeFile(dir, data, undefined, true);
  assert.deepEqual(
    lines.map((l) => l.line),
    [1, 3],
  );
  assert.match(warnings.join('\n'), /data\.jsonl:2: .*alternate.*\(skipped\)/);
});

test('a completion whose prompt is null says that a null field counts as absent', () => {
  assert.throws(
    () => recordValue({ prompt: null, completion: ' 4' }),
    /"completion" with a null "prompt" \(a null field counts as absent/,
  );
  assert.throws(
    () => recordValue({ completion: ' 4' }),
    /^RecordShapeError: "completion" without "prompt"$|"completion" without "prompt"/,
  );
});
