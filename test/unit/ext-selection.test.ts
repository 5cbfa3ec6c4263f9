// The editor side's prompt/completion split and its offset mapping back to the document (UTF-16
// code units, JSON escapes), and agreement with the server's record rendering.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decodedRange, JsonSourceError, parseJsonWithSource } from '../../src/extension/jsonl/json-source';
import { documentRange, parseRecordLine } from '../../src/extension/jsonl/record';
import { completionDocumentRange, type QuerySplit, splitSelection } from '../../src/extension/selection';
import { formatRecord } from '../../src/server/data/format';

/** The split of `doc` with the selection between the two '|' marks (removed). */
function splitMarked(marked: string, opts = {}) {
  const start = marked.indexOf('|');
  const end = marked.indexOf('|', start + 1) - 1;
  const doc = marked.slice(0, start) + marked.slice(start + 1, end + 1) + marked.slice(end + 2);
  return { doc, r: splitSelection(doc, start, end, opts) };
}

function ok(r: ReturnType<typeof splitSelection>): QuerySplit {
  if (!r.ok) assert.fail(r.message);
  return r.split;
}

/** The document text under each completion unit, joined (escapes appear as written). */
function docUnder(doc: string, s: QuerySplit): string[] {
  return s.completionStarts.map((a, i) => doc.slice(a, s.completionEnds[i]));
}

test('json-source: decoded values equal JSON.parse, for every escape', () => {
  const cases = [
    '"plain"',
    '"a\\nb\\t\\"c\\"\\\\d\\/e\\b\\f\\r"',
    '"caf\\u00e9 \\u00E9"',
    '"emoji 🌍 and \\ud83c\\udf0d"',
    '{"a":[1,-2.5e3,true,false,null,{"b":"x"}],"c":""}',
    ' \t\n{"k" : "v" }\r\n',
  ];
  for (const c of cases) {
    const v = parseJsonWithSource(c);
    const plain = JSON.parse(c);
    if (v.kind === 'string') assert.equal(v.value, plain);
  }
  const s = parseJsonWithSource('"caf\\u00e9\\n🌍"');
  assert.equal(s.kind, 'string');
  if (s.kind !== 'string') return;
  assert.equal(s.value, 'café\n🌍');
  // map: c a f (é from 6 units) (\n from 2) (🌍: 2 units, each its own source unit) closing quote
  assert.deepEqual(s.map, [1, 2, 3, 4, 10, 12, 13, 14]);
});

test('json-source: rejects what JSON.parse rejects, with the offset', () => {
  for (const bad of ['"abc', '"a\\x"', '"\\u12"', '{"a" 1}', '[1,]', '{"a":1,}', '"tab\there"', '01', 'tru', '{} {}']) {
    assert.throws(() => JSON.parse(bad));
    assert.throws(
      () => parseJsonWithSource(bad, 100),
      (e: unknown) => e instanceof JsonSourceError && e.offset >= 100,
      bad,
    );
  }
});

test('json-source: a boundary inside an escape widens to the whole escape', () => {
  const s = parseJsonWithSource('"x\\u00e9y"', 10);
  if (s.kind !== 'string') return assert.fail();
  // source: 10 " ; 11 x ; 12..17 \u00e9 ; 18 y ; 19 "
  assert.deepEqual(decodedRange(s, 14, 19), [1, 3]); // starts mid-escape: é y
  assert.deepEqual(decodedRange(s, 11, 13), [0, 2]); // ends mid-escape: x é
  assert.deepEqual(decodedRange(s, 18, 19), [2, 3]);
});

test('record: rendering agrees with the server, field offsets map back', () => {
  const lines = [
    '{"prompt": "Q: Caf\\u00e9?\\nA:", "completion": " Oui \\"yes\\" 🌍\\n", "meta": 1}',
    '{"text": "Hello\\tworld 🌍"}',
    '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4\\n(four)"}]}',
  ];
  for (const line of lines) {
    const r = parseRecordLine(line, 0);
    if (typeof r === 'string') return assert.fail(r);
    const server = formatRecord(JSON.parse(line), 'x:1');
    assert.equal(r.kind, server.kind);
    assert.equal(r.text, server.text);
    if (r.split) assert.deepEqual([[r.split.promptEnd, r.split.completionEnd]], server.spans.slice(-1));
    // every unit of a field maps to source text that decodes to it
    for (const f of r.fields)
      for (let i = 0; i < f.source.value.length; i++) {
        const [a, b] = documentRange(r, f.offset + i, f.offset + i + 1);
        const src = line.slice(a, b);
        const decoded = src.startsWith('\\') ? JSON.parse(`"${src}"`) : src;
        assert.equal(decoded, f.source.value[i]);
      }
  }
});

test('selection: a whole prompt/completion record splits by its fields', () => {
  const line = '{"prompt": "Q: What is the capital of Australia?\\nA:", "completion": " Sydney\\n"}';
  const { doc, r } = splitMarked(`{"text": "before"}\n|${line}|\n{"text": "after"}\n`);
  const s = ok(r);
  assert.equal(s.how, 'record');
  assert.equal(s.prompt, 'Q: What is the capital of Australia?\nA:');
  assert.equal(s.completion, ' Sydney\n');
  assert.match(s.description, /line 2/);
  assert.deepEqual(docUnder(doc, s), [' ', 'S', 'y', 'd', 'n', 'e', 'y', '\\n']);
  const [a, b] = completionDocumentRange(s, 0, s.completion.length);
  assert.equal(doc.slice(a, b), ' Sydney\\n');
});

test('selection: surrounding whitespace and a trailing newline around a record are fine', () => {
  const { r } = splitMarked('|  {"prompt":"P","completion":"C"}\n|');
  const s = ok(r);
  assert.equal(s.prompt, 'P');
  assert.equal(s.completion, 'C');
});

test('selection: a chat record is split before the last assistant turn', () => {
  const rec =
    '{"messages":[{"role":"user","content":"Hi \\u00e9"},{"role":"assistant","content":"Hello"},{"role":"user","content":"Capital of France?"},{"role":"assistant","content":"Paris \\"city\\""}]}';
  const { doc, r } = splitMarked(`|${rec}|`);
  const s = ok(r);
  assert.equal(s.prompt, '<|user|>\nHi é\n<|assistant|>\nHello\n<|user|>\nCapital of France?\n<|assistant|>\n');
  assert.equal(s.completion, 'Paris "city"\n');
  // the template's newline after the content is an empty range at the closing quote
  const last = s.completion.length - 1;
  assert.equal(s.completionStarts[last], s.completionEnds[last]);
  assert.equal(doc[s.completionStarts[last]], '"');
  const [a, b] = completionDocumentRange(s, 0, s.completion.length);
  assert.equal(doc.slice(a, b), 'Paris \\"city\\"');
});

test('selection: inside a field, a selection that cuts an emoji written as two \\u escapes takes the whole emoji', () => {
  // the emoji 😀 as \ud83d\ude00: the selection starts at its second escape, or ends after its first
  const line = '{"prompt": "Q: x?", "completion": "ok \\ud83d\\ude00 sure"}';
  const low = line.indexOf('\\ude00');
  const s = ok(splitSelection(line, low, line.indexOf(' sure') + 5));
  assert.equal(s.completion, '😀 sure');
  const high = line.indexOf('\\ud83d');
  const t = ok(splitSelection(line, line.indexOf('ok'), high + 6));
  assert.equal(t.completion, 'ok 😀');
});

test('selection: text inside a record the server refuses (a message with a "weight") is refused with the reason, not read as plain text', () => {
  const rec =
    '{"messages":[{"role":"user","content":"Hi?"},{"role":"assistant","content":"ok","weight":0},{"role":"assistant","content":"|A2|"}]}';
  const r = splitMarked(rec).r;
  assert.equal(r.ok, false);
  assert.match(!r.ok ? r.message : '', /The record on line 1 is not usable: .*weight/);
  // a JSON object that is no training record at all (a .json file's line) is still plain text
  assert.equal(ok(splitMarked('{"name": "|Bob|"}').r).how, 'text');
});

test('selection: a whole chat record that ends with a user turn is explained up to its last reply', () => {
  const rec =
    '{"messages":[{"role":"user","content":"Hi?"},{"role":"assistant","content":"Hello"},{"role":"user","content":"Bye?"}]}';
  const s = ok(splitMarked(`|${rec}|`).r);
  assert.deepEqual(s.messages, [
    { role: 'user', content: 'Hi?' },
    { role: 'assistant', content: 'Hello' },
  ]);
  assert.equal(s.completion, 'Hello\n');
});

test('selection: inside an assistant reply of a chat, that whole reply is explained as a chat (the conversation up to it, sent as messages)', () => {
  const rec =
    '{"messages":[{"role":"user","content":"One?"},{"role":"assistant","content":"One."},{"role":"user","content":"Two?"},{"role":"assistant","content":"It is |Two|."},{"role":"user","content":"Three?"},{"role":"assistant","content":"Three."}]}';
  const { doc, r } = splitMarked(rec);
  const s = ok(r);
  // the server renders these with the model's chat template and explains the last: the middle reply
  assert.deepEqual(s.messages, [
    { role: 'user', content: 'One?' },
    { role: 'assistant', content: 'One.' },
    { role: 'user', content: 'Two?' },
    { role: 'assistant', content: 'It is Two.' },
  ]);
  assert.match(s.description, /the assistant reply messages\[3\] of line 1, with the conversation before it/);
  assert.match(s.note ?? '', /A chat reply is explained whole/);
  // the heatmap's units are on that reply's characters in the line
  const [a, b] = completionDocumentRange(s, 0, s.completion.length);
  assert.equal(doc.slice(a, b), 'It is Two.');
  // the whole reply selected: no note
  const whole = ok(splitMarked(rec.replace('It is |Two|.', '|It is Two.|')).r);
  assert.equal(whole.note, undefined);
  assert.equal(whole.messages?.length, 4);
  // a user's message is not trained on: refused, saying what to select
  const user = splitMarked(rec.replace('It is |Two|.', 'It is Two.').replace('"Two?"', '"|Two?|"'));
  assert.equal(user.r.ok, false);
  assert.match(
    !user.r.ok ? user.r.message : '',
    /messages\[2\] is the user's message, which the model is not trained on: select text in an assistant reply/,
  );
  // TRL's conversational prompt/completion: a reply of the completion is a chat turn; a prompt message is context
  const conv = '{"prompt":[{"role":"user","content":"Hi?"}],"completion":[{"role":"assistant","content":"|Hello|"}]}';
  const c = ok(splitMarked(conv).r);
  assert.deepEqual(c.messages, [
    { role: 'user', content: 'Hi?' },
    { role: 'assistant', content: 'Hello' },
  ]);
  const ctx = splitMarked(conv.replace('"|Hello|"', '"Hello"').replace('"Hi?"', '"|Hi?|"'));
  assert.equal(ctx.r.ok, false);
});

test('selection: text inside the completion field → prompt is the record text before it', () => {
  const { doc, r } = splitMarked('{"prompt": "Q: Caf\\u00e9?\\nA:", "completion": "| Syd🌍ney|\\n"}\n');
  const s = ok(r);
  assert.equal(s.how, 'field');
  assert.equal(s.prompt, 'Q: Café?\nA:');
  assert.equal(s.completion, ' Syd🌍ney');
  assert.match(s.description, /completion field of line 1/);
  // the emoji's two UTF-16 units map to its two source units
  const i = s.completion.indexOf('🌍');
  assert.equal(doc.slice(s.completionStarts[i], s.completionEnds[i + 1]), '🌍');
});

test('selection: inside a field, escapes decode and a selection cutting an escape widens', () => {
  // select from inside \u00e9 up to the end of the text field's content
  const line = '{"text": "Bonjour caf\\u00e9 \\"ami\\""}';
  const start = line.indexOf('u00e9');
  const end = line.lastIndexOf('"');
  const s = ok(splitSelection(line, start, end));
  assert.equal(s.prompt, 'Bonjour caf');
  assert.equal(s.completion, 'é "ami"');
});

test('selection: a text record as a whole, several records, or across fields are refused with advice', () => {
  const t = splitMarked('|{"text": "just text"}|');
  assert.equal(t.r.ok, false);
  assert.match((t.r as { message: string }).message, /select the part of its text/);
  const two = splitMarked('|{"prompt":"a","completion":"b"}\n{"prompt":"c","completion":"d"}|');
  assert.equal(two.r.ok, false);
  assert.match((two.r as { message: string }).message, /more than one JSONL record/);
  const across = splitMarked('{"prompt": "a|bc", "completion": "de|f"}');
  assert.equal(across.r.ok, false);
  assert.match((across.r as { message: string }).message, /inside one of its fields/);
  const bad = splitMarked('|{"prompt": 3, "completion": "x"}|');
  assert.equal(bad.r.ok, false);
  assert.match((bad.r as { message: string }).message, /not usable/);
  assert.equal(splitSelection('abc', 1, 1).ok, false);
});

test('selection in a JSONL dataset: a line that is no record, or a selection across records, is refused, never read as plain text', () => {
  const rec = '{"prompt":"Q: Which continent is Norway?\\nA:","completion":" Europe\\n"}';
  const lines = [rec, '{"prompt":"Q: broken?\\nA:","completion":" oops\\n"', '["Q: array?\\nA:"," arr\\n"]', '', rec];
  const doc = lines.join('\n');
  const at = (line: number) => lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
  const message = (start: number, end: number, jsonl = true) => {
    const r = splitSelection(doc, start, end, { jsonl });
    assert.equal(r.ok, false, JSON.stringify(r));
    return (r as { message: string }).message;
  };
  // invalid JSON (line 2) and an array (line 3), selected whole or in part: the server skips them
  assert.match(message(at(2), at(2) + lines[1].length), /^Line 2 is not a JSONL record \(not valid JSON/);
  assert.match(message(at(2) + 30, at(2) + 35), /^Line 2 is not a JSONL record/);
  assert.match(message(at(3), at(3) + lines[2].length), /^Line 3 is not a JSONL record \(not a JSON object\)/);
  assert.match(message(at(4), at(4) + 1), /^The selection spans lines 4–5|^Line 4 is empty/);
  // from inside one record into the next: never a 'completion' of JSON with the file above as prompt
  assert.match(message(at(1) + 30, at(5) + 20), /^The selection spans lines 1–5 of a JSONL file/);
  assert.match(message(at(1) + 30, at(5) + 20), /Explain with a custom prompt\/completion split/);
  // a whole line with its line break is one line
  assert.equal(ok(splitSelection(doc, at(1), at(2), { jsonl: true })).how, 'record');
  // text inside a field still works; the same selections in a text file are plain text
  assert.equal(
    ok(splitSelection(doc, at(1) + lines[0].indexOf('Europe'), at(1) + lines[0].indexOf('Europe') + 6, { jsonl: true }))
      .how,
    'field',
  );
  assert.equal(ok(splitSelection(doc, at(2), at(2) + lines[1].length)).how, 'text');
});

test('selection: plain text → completion is the selection, prompt the text before it', () => {
  const { doc, r } = splitMarked('Q: What is the capital of Australia?\nA:| Sydney|\nmore');
  const s = ok(r);
  assert.equal(s.how, 'text');
  assert.equal(s.prompt, 'Q: What is the capital of Australia?\nA:');
  assert.equal(s.completion, ' Sydney');
  assert.equal(s.promptTruncated, false);
  const [a, b] = completionDocumentRange(s, 1, 7);
  assert.equal(doc.slice(a, b), 'Sydney');
  // a backwards selection is the same
  const back = ok(splitSelection(doc, doc.indexOf('\nmore'), doc.indexOf(' Sydney')));
  assert.equal(back.completion, ' Sydney');
  // JSON-looking text that is not a record is plain text
  const code = ok(splitMarked('const x = |{ a: 1 }|;').r);
  assert.equal(code.how, 'text');
  assert.equal(code.completion, '{ a: 1 }');
});

test('selection: the prompt is capped, cut at a line start when one is near, never inside a surrogate pair', () => {
  const long = `${'x'.repeat(50)}\n${'y'.repeat(200)}`;
  const doc = `${long}COMPLETION`;
  const s = ok(splitSelection(doc, long.length, doc.length, { maxPromptChars: 240 }));
  assert.equal(s.promptTruncated, true);
  assert.equal(s.prompt, 'y'.repeat(200));
  const emoji = '🌍'.repeat(10);
  const d2 = `${emoji}END`;
  // a cap of 5 units would start on the second half of a pair
  const s2 = ok(splitSelection(d2, emoji.length, d2.length, { maxPromptChars: 5 }));
  assert.equal(s2.prompt, '🌍🌍');
  assert.ok(!/[\uDC00-\uDFFF]/.test(s2.prompt[0]));
});

test('selection: completion ranges clamp and empty ranges sit at the boundary', () => {
  const s = ok(splitSelection('abcdef', 2, 5));
  assert.deepEqual(completionDocumentRange(s, 0, 99), [2, 5]);
  assert.deepEqual(completionDocumentRange(s, 3, 3), [5, 5]);
  assert.deepEqual(completionDocumentRange(s, -4, 1), [2, 3]);
});

test('split: a CRLF file gives the same prompt and completion as the LF file, and the units still cover the document', () => {
  const lf = 'Q: What is the capital of Australia?\nA: Sydney\nand more\n';
  const crlf = lf.replace(/\n/g, '\r\n');
  const at = (doc: string) => [doc.indexOf(' Sydney'), doc.indexOf('more') + 4] as const;
  const a = ok(splitSelection(lf, ...at(lf)));
  const b = ok(splitSelection(crlf, ...at(crlf)));
  assert.equal(b.prompt, a.prompt);
  assert.equal(b.completion, a.completion);
  assert.equal(b.completion, ' Sydney\nand more');
  // one unit per completion character, the \n unit spanning the document's \r\n
  assert.equal(b.completionStarts.length, b.completion.length);
  assert.deepEqual(docUnder(crlf, b).join(''), crlf.slice(...at(crlf)));
  assert.equal(docUnder(crlf, b)[' Sydney'.length], '\r\n');
  // a selection that starts between \r and \n leaves no \r at the prompt's end
  const mid = crlf.indexOf('\r\nA:') + 1;
  const c = ok(splitSelection(crlf, mid, crlf.indexOf('A:') + 2));
  assert.equal(c.prompt, 'Q: What is the capital of Australia?');
  assert.equal(c.completion, '\nA:');
  // one that ends between \r and \n leaves the \r out, as the LF file has none
  const d = ok(splitSelection(crlf, crlf.indexOf(' Sydney'), crlf.indexOf('\r\nand') + 1));
  assert.equal(d.completion, ' Sydney');
});
