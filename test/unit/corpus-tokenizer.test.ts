// The word-level tokenizer written for a corpus: loads through @huggingface/tokenizers and
// our tokenizer.ts, covers the whole corpus, decodes back to the exact text, gives UTF-16
// offsets that tile the text, and maps unknown words to <|unk|> with the right offsets.
// (Python's `tokenizers`/`transformers` agree on the ids: test/oracle/check_default.py.)
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Tokenizer } from '@huggingface/tokenizers';
import { buildCorpus } from '../../src/server/embedded/build';
import {
  buildWordTokenizer,
  EOS,
  PAD,
  preTokenize,
  UNK,
  writeWordTokenizer,
} from '../../src/server/embedded/word-tokenizer';
import { corpusTexts } from '../../src/server/embedded/write';
import { loadTokenizer } from '../../src/server/model/tokenizer';

const corpus = buildCorpus({ countries: 20 });
const texts = corpusTexts(corpus);
const files = buildWordTokenizer(texts);
const dir = mkdtempSync(join(tmpdir(), 'il-wordtok-'));
writeWordTokenizer(dir, files);
const tok = loadTokenizer(dir);

test('special tokens have fixed ids; the vocabulary is deterministic', () => {
  assert.equal(tok.tokenToId(EOS), 0);
  assert.equal(tok.tokenToId(PAD), 1);
  assert.equal(tok.tokenToId(UNK), 2);
  assert.equal(tok.eosTokenId, 0);
  assert.equal(tok.padTokenId, 1);
  assert.equal(tok.bosTokenId, undefined);
  assert.equal(tok.vocabSize, files.vocabSize);
  assert.deepEqual(buildWordTokenizer([...texts]).tokenizer, files.tokenizer);
});

test('every corpus text: no <|unk|>, exact decode, offsets tile the text', () => {
  for (const text of texts) {
    const e = tok.encode(text);
    assert.ok(!e.ids.includes(2), `unknown token in ${JSON.stringify(text)}`);
    assert.equal(tok.decode(e.ids), text);
    assert.equal(e.offsets.map(([a, b]) => text.slice(a, b)).join(''), text);
    for (let i = 1; i < e.offsets.length; i++) assert.equal(e.offsets[i][0], e.offsets[i - 1][1]);
  }
});

test('words keep their leading space; punctuation and newlines are tokens of their own', () => {
  const text = 'Q: What is the capital of France?\nA: Paris\n';
  const e = tok.encode(text);
  assert.deepEqual(
    e.ids.map((id) => tok.decode([id])),
    ['Q', ':', ' What', ' is', ' the', ' capital', ' of', ' France', '?', '\n', 'A', ':', ' Paris', '\n'],
  );
  assert.deepEqual(preTokenize(' Paris\n'), ['ĠParis', 'Ċ']);
});

test('unknown words become <|unk|> and keep their place in the text (UTF-16 offsets)', () => {
  const text = 'The capital of Zürich𝔁 is Paris.';
  const e = tok.encode(text);
  const i = e.ids.indexOf(2);
  assert.ok(i >= 0, 'an unknown word maps to <|unk|>');
  assert.equal(text.slice(...e.offsets[i]), ' Zürich𝔁'); // 9 UTF-16 units: 𝔁 is a surrogate pair
  assert.equal(e.offsets.at(-1)![1], text.length);
  assert.equal(text.slice(...e.offsets.at(-2)!), ' Paris');
});

test('@huggingface/tokenizers loads the files directly and agrees', () => {
  const raw = new Tokenizer(files.tokenizer, files.config);
  for (const text of texts.slice(0, 50))
    assert.deepEqual(raw.encode(text, { add_special_tokens: true }).ids, tok.encode(text).ids);
  assert.equal(raw.decode(tok.encode('Q: What is the capital of France?').ids), 'Q: What is the capital of France?');
});
