// Record shapes, their rendering to model text, and which characters/tokens the loss scores.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DataError } from '../../src/server/data/errors';
import {
  formatRecord,
  promptCompletionSpans,
  renderMessages,
  type Span,
  targetWeightsFromOffsets,
} from '../../src/server/data/format';

const spanTexts = (text: string, spans: Span[]) => spans.map(([s, e]) => text.slice(s, e));

test('format: text record scores the whole text', () => {
  const r = formatRecord({ text: 'Hello 🌍 wörld', id: 7 }, 'f:1');
  assert.equal(r.kind, 'text');
  assert.equal(r.text, 'Hello 🌍 wörld');
  assert.deepEqual(r.spans, [[0, r.text.length]]);
});

test('format: prompt/completion concatenates without separator and scores the completion', () => {
  const prompt = 'Q: Capital of 日本? 🤔\nA:';
  const completion = ' 東京 🗼';
  const r = formatRecord({ prompt, completion, meta: { x: 1 } }, 'f:2');
  assert.equal(r.kind, 'prompt_completion');
  assert.equal(r.text, prompt + completion);
  assert.deepEqual(spanTexts(r.text, r.spans), [completion]);
  // UTF-16 units: the emoji counts as 2, so the span starts after prompt.length code units.
  assert.equal(r.spans[0][0], prompt.length);
  assert.deepEqual(promptCompletionSpans(prompt, completion), r.spans);
});

test('format: messages use the documented template and score assistant turns with their newline', () => {
  const r = formatRecord(
    {
      messages: [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'What is the capital of France?' },
        { role: 'assistant', content: 'Paris 🇫🇷' },
        { role: 'user', content: 'And Japan?' },
        { role: 'assistant', content: 'Tokyo' },
      ],
    },
    'f:3',
  );
  assert.equal(r.kind, 'messages');
  assert.equal(
    r.text,
    '<|system|>\nBe brief.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis 🇫🇷\n' +
      '<|user|>\nAnd Japan?\n<|assistant|>\nTokyo\n',
  );
  assert.equal(r.spans.length, 2);
  assert.deepEqual(spanTexts(r.text, r.spans), ['Paris 🇫🇷\n', 'Tokyo\n']);
  assert.deepEqual(renderMessages([{ role: 'user', content: 'hi' }]), { text: '<|user|>\nhi\n', spans: [] });
});

test('format: invalid shapes are DataErrors naming where and the accepted shapes', () => {
  const bad: unknown[] = [
    null,
    'just a string',
    [1, 2],
    {},
    { text: 5 },
    { text: '' },
    { text: 'a', prompt: 'b', completion: 'c' },
    { prompt: 'p' },
    { prompt: 'p', completion: 3 },
    { prompt: 'p', completion: '' },
    { completion: 'c' },
    { messages: [] },
    { messages: 'hi' },
    { messages: [{ role: 'user', content: 'hi' }] },
    { messages: [{ role: 'assistant' }] },
    { messages: [{ role: 'assi|>stant', content: 'x' }] },
    { messages: [null] },
  ];
  for (const value of bad) {
    assert.throws(
      () => formatRecord(value, 'data.jsonl:42'),
      (e: unknown) => {
        assert.ok(e instanceof DataError, `${JSON.stringify(value)} should be a DataError`);
        assert.ok(e.message.startsWith('data.jsonl:42: '), e.message);
        assert.match(e.message, /accepted shapes/);
        return true;
      },
      JSON.stringify(value),
    );
  }
});

test('targetWeightsFromOffsets: position t is weighted when token t+1 overlaps a span', () => {
  // text "ab cd ef", span covers "cd ef" = [3, 8)
  const offsets: Span[] = [
    [0, 0], // BOS
    [0, 2], // "ab"
    [2, 3], // " "
    [3, 5], // "cd"
    [5, 8], // " ef"
  ];
  assert.deepEqual(targetWeightsFromOffsets(offsets, [[3, 8]]), [0, 0, 1, 1, 0]);
});

test('targetWeightsFromOffsets: straddling tokens count, [0,0] special tokens never do, last is 0', () => {
  const offsets: Span[] = [
    [0, 0], // BOS
    [0, 4], // straddles the span start at 3
    [4, 6],
    [6, 9], // straddles the span end at 7
    [9, 10], // after the span
    [0, 0], // EOS-like special token
  ];
  assert.deepEqual(targetWeightsFromOffsets(offsets, [[3, 7]]), [1, 1, 1, 0, 0, 0]);
  // A span touching a token only at its edge does not overlap it.
  assert.deepEqual(targetWeightsFromOffsets(offsets, [[4, 6]]), [0, 1, 0, 0, 0, 0]);
  // A special token with [0,0] does not overlap a span starting at 0.
  assert.deepEqual(
    targetWeightsFromOffsets(
      [
        [0, 0],
        [0, 0],
      ],
      [[0, 5]],
    ),
    [0, 0],
  );
  // Last position is 0 even when the last token itself lies inside the span.
  assert.deepEqual(
    targetWeightsFromOffsets(
      [
        [0, 1],
        [1, 2],
      ],
      [[0, 2]],
    ),
    [1, 0],
  );
  assert.deepEqual(targetWeightsFromOffsets([], [[0, 1]]), []);
});

test('targetWeightsFromOffsets: two spans from a chat record', () => {
  const { text, spans } = renderMessages([
    { role: 'user', content: 'a' },
    { role: 'assistant', content: 'b' },
    { role: 'user', content: 'c' },
    { role: 'assistant', content: 'd' },
  ]);
  // One token per character: position t is weighted iff character t+1 is in a span.
  const offsets = Array.from({ length: text.length }, (_, i): Span => [i, i + 1]);
  const expected = offsets.map((_, t): number => (spans.some(([s, e]) => t + 1 >= s && t + 1 < e) ? 1 : 0));
  assert.deepEqual(targetWeightsFromOffsets(offsets, spans), expected);
  assert.equal(
    expected.reduce((a, b) => a + b, 0),
    4,
  );
});
