// Tokenizer loading and character offsets. Two tokenizer.json files are built here by hand
// (byte-level BPE as GPT-2/Llama 3/Qwen use, and SentencePiece-style BPE with byte
// fallback as Llama 2/Mistral use), and the fixture tokenizer is checked against the
// ids and offsets Python's `tokenizers` gives (golden from test/oracle/make_fixtures.py).
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { tokenizeQuery, tokenizeText } from '../../src/server/data/tokenize';
import { BYTE_LEVEL_CHARS } from '../../src/server/model/byte-level';
import { loadTokenizer, TokenizerError } from '../../src/server/model/tokenizer';

function bpeModel(vocab: Record<string, number>, merges: string[], extra: Record<string, unknown> = {}) {
  return {
    type: 'BPE',
    dropout: null,
    unk_token: null,
    continuing_subword_prefix: null,
    end_of_word_suffix: null,
    fuse_unk: false,
    byte_fallback: false,
    vocab,
    merges,
    ...extra,
  };
}

function writeTokenizer(json: unknown, config: unknown): string {
  const dir = mkdtempSync(join(tmpdir(), 'il-tok-'));
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(json));
  writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify(config));
  return dir;
}

function byteLevelTokenizer(): string {
  const chars = [...BYTE_LEVEL_CHARS];
  const vocab: Record<string, number> = { '<|endoftext|>': 0 };
  chars.forEach((c, i) => {
    vocab[c] = i + 1;
  });
  const merges = ['Ġ t', 'h e', 'Ġt he', 'c a', 'ca f', 'Ã ©'];
  for (const m of merges) vocab[m.replace(' ', '')] = Object.keys(vocab).length;
  const bl = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
  return writeTokenizer(
    {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: [
        {
          id: 0,
          content: '<|endoftext|>',
          single_word: false,
          lstrip: false,
          rstrip: false,
          normalized: false,
          special: true,
        },
      ],
      normalizer: null,
      pre_tokenizer: bl,
      post_processor: bl,
      decoder: bl,
      model: bpeModel(vocab, merges),
    },
    { bos_token: '<|endoftext|>', eos_token: '<|endoftext|>', model_max_length: 1024 },
  );
}

function sentencePieceTokenizer(eos = false): string {
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b;
  for (const c of ['▁', ...'abcdefghijklmnopqrstuvwxyz']) vocab[c] = Object.keys(vocab).length;
  const merges = ['▁ t', 'h e', '▁t he', 'c a', 'ca f'];
  for (const m of merges) vocab[m.replace(' ', '')] = Object.keys(vocab).length;
  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  return writeTokenizer(
    {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>')],
      normalizer: {
        type: 'Sequence',
        normalizers: [
          { type: 'Prepend', prepend: '▁' },
          { type: 'Replace', pattern: { String: ' ' }, content: '▁' },
        ],
      },
      pre_tokenizer: null,
      post_processor: {
        type: 'TemplateProcessing',
        single: [
          { SpecialToken: { id: '<s>', type_id: 0 } },
          { Sequence: { id: 'A', type_id: 0 } },
          ...(eos ? [{ SpecialToken: { id: '</s>', type_id: 0 } }] : []),
        ],
        pair: [
          { SpecialToken: { id: '<s>', type_id: 0 } },
          { Sequence: { id: 'A', type_id: 0 } },
          { Sequence: { id: 'B', type_id: 1 } },
        ],
        special_tokens: {
          '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] },
          ...(eos ? { '</s>': { id: '</s>', ids: [2], tokens: ['</s>'] } } : {}),
        },
      },
      decoder: {
        type: 'Sequence',
        decoders: [
          { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
          { type: 'ByteFallback' },
          { type: 'Fuse' },
          { type: 'Strip', content: ' ', start: 1, stop: 0 },
        ],
      },
      model: bpeModel(vocab, merges, { unk_token: '<unk>', fuse_unk: true, byte_fallback: true }),
    },
    { bos_token: '<s>', eos_token: '</s>', add_bos_token: true, add_eos_token: eos },
  );
}

/** every token's offsets slice the text into pieces that concatenate back to it */
function assertCovers(text: string, offsets: Array<[number, number]>) {
  let pos = 0;
  for (const [s, e] of offsets) {
    assert.ok(s <= e, `bad range [${s}, ${e})`);
    assert.ok(s >= pos - 2 && s <= pos, `token starts at ${s}, previous ended at ${pos}`);
    pos = Math.max(pos, e);
  }
  assert.equal(pos, text.length, 'offsets do not reach the end of the text');
}

test('byte-level BPE: ids decode back, offsets in UTF-16 units, split characters cover the whole character', () => {
  const tok = loadTokenizer(byteLevelTokenizer());
  assert.equal(tok.bosTokenId, 0);
  assert.equal(tok.padTokenId, 0); // no pad token: falls back to EOS
  const text = 'the café 👍 the';
  const enc = tok.encode(text);
  assert.equal(tok.decode(enc.ids), text);
  // this post-processor trims offsets (trim_offsets, as GPT-NeoX's): `sources` keep the spaces
  assertCovers(text, enc.sources);
  const pieces = enc.sources.map(([s, e]) => text.slice(s, e));
  assert.deepEqual(enc.offsets[2], [4, 4], 'a lone-space token is trimmed to an empty range, as in Python');
  assert.deepEqual(pieces.slice(0, 2), ['t', 'he']); // 'the' has no merge of its own
  assert.deepEqual(pieces.slice(2, 5), [' ', 'caf', 'é'], pieces.join('|'));
  assert.ok(pieces.includes('é'), 'é is one merged token'); // Ã© merge
  // the emoji is 4 UTF-8 bytes → 4 byte tokens, each covering the 2 UTF-16 units of 👍
  const thumb = text.indexOf('👍');
  const emojiTokens = enc.sources.filter(([s, e]) => s === thumb && e === thumb + 2);
  assert.equal(emojiTokens.length, 4);
  assert.equal(pieces.at(-1), ' the');
});

test('SentencePiece-style BPE with byte fallback: BOS gets an empty range, the prepended ▁ is not text', () => {
  const tok = loadTokenizer(sentencePieceTokenizer());
  const text = 'the cafe é';
  const enc = tok.encode(text);
  assert.equal(enc.ids[0], 1, 'BOS first');
  assert.deepEqual(enc.offsets[0], [0, 0]);
  assert.equal(tok.decode(enc.ids, { skipSpecialTokens: true }), text);
  const body = enc.offsets.slice(1);
  assertCovers(text, body);
  assert.equal(text.slice(...body[0]), 'the');
  // é = <0xC3><0xA9>: two byte-fallback tokens, both covering the one character
  const e = text.indexOf('é');
  assert.equal(body.filter(([s, t]) => s === e && t === e + 1).length, 2);
  const plain = tok.encode(text, { addSpecialTokens: false });
  assert.equal(plain.ids.length, enc.ids.length - 1);
});

test('a post-processor that appends EOS: training records score it after a scored last token, queries do not', () => {
  const tok = loadTokenizer(sentencePieceTokenizer(true));
  const text = tokenizeText(tok, 'the cafe', [[0, 8]], 1 << 10);
  assert.equal(text.ids.at(0), 1);
  assert.equal(text.ids.at(-1), 2, 'EOS last');
  // every position predicts a content token or the EOS, as labels = input_ids would score them
  assert.deepEqual(text.weights, [...text.ids.slice(0, -1).map(() => 1), 0]);
  // prompt/completion: the completion ends the text, so its EOS is scored too; the prompt is not
  const pc = tokenizeText(tok, 'the cafe', [[4, 8]], 1 << 10);
  assert.equal(pc.weights.at(-2), 1, 'the position before EOS predicts it');
  assert.equal(pc.weights[0], 0);
  // a scored span that does not reach the last token leaves the EOS unscored
  const head = tokenizeText(tok, 'the cafe', [[0, 3]], 1 << 10);
  assert.equal(head.weights.at(-2), 0);
  // cut by the context: the EOS is gone and nothing predicts past the cut
  const cut = tokenizeText(tok, 'the cafe', [[0, 8]], 3);
  assert.equal(cut.ids.length, 3);
  assert.deepEqual(cut.weights, [1, 1, 0]);
  // cut exactly between the content and the EOS: the content is scored as without an EOS
  const atEos = tokenizeText(tok, 'the cafe', [[0, 8]], text.ids.length - 1);
  assert.deepEqual(atEos.ids, text.ids.slice(0, -1));
  assert.deepEqual(atEos.weights, [...atEos.ids.slice(0, -1).map(() => 1), 0]);
  // a query explains the completion's text only
  const q = tokenizeQuery(tok, 'the ', 'cafe', 1 << 10);
  assert.equal(q.ids.at(-1), 2);
  assert.equal(q.weights.at(-2), 0, 'the query does not score the EOS');
  assert.ok(q.weights.some((w) => w > 0));
  // without an appended EOS nothing changes: the last position predicts nothing
  const plain = tokenizeText(loadTokenizer(sentencePieceTokenizer()), 'the cafe', [[0, 8]], 1 << 10);
  assert.equal(plain.weights.at(-1), 0);
  assert.equal(plain.weights.at(-2), 1);
});

test('tokenizer: missing or broken files give clear errors', () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-tok-'));
  assert.throws(
    () => loadTokenizer(dir),
    (e: Error) => e instanceof TokenizerError && /no tokenizer\.json/.test(e.message),
  );
  mkdirSync(join(dir, 'b'));
  writeFileSync(join(dir, 'b', 'tokenizer.json'), '{');
  assert.throws(() => loadTokenizer(join(dir, 'b')), /not valid JSON/);
  // an added token with single_word (as transformers' add_tokens(AddedToken(..., single_word=True))
  // saves it): the tokenizer library would match it inside words, so it is refused by name
  const tj = JSON.parse(readFileSync(join('test/fixtures/models/gpt2', 'tokenizer.json'), 'utf8'));
  const id = Math.max(...Object.values(tj.model.vocab as Record<string, number>)) + 1;
  tj.added_tokens.push({
    id,
    content: 'Qzx',
    single_word: true,
    lstrip: false,
    rstrip: false,
    normalized: true,
    special: false,
  });
  mkdirSync(join(dir, 'c'));
  writeFileSync(join(dir, 'c', 'tokenizer.json'), JSON.stringify(tj));
  assert.throws(
    () => loadTokenizer(join(dir, 'c')),
    (e: Error) => e instanceof TokenizerError && /added token "Qzx" \(id \d+\) has "single_word": true/.test(e.message),
  );
  tj.added_tokens.at(-1).single_word = false;
  writeFileSync(join(dir, 'c', 'tokenizer.json'), JSON.stringify(tj));
  assert.deepEqual(loadTokenizer(join(dir, 'c')).encode('a Qzx', { addSpecialTokens: false }).ids.at(-1), id);
});

test('tokenizer.json ids that are not ids, an unknown model type, post-processor ids that contradict the vocabulary and a chat_template that is not one are refused', () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-tok-ids-'));
  const base = () => JSON.parse(readFileSync(join('test/fixtures/models/gpt2', 'tokenizer.json'), 'utf8'));
  const token = Object.keys(base().model.vocab)[300];
  let n = 0;
  const load = (tj: unknown, tc?: unknown) => {
    const d = join(dir, String(n++));
    mkdirSync(d);
    writeFileSync(join(d, 'tokenizer.json'), JSON.stringify(tj));
    if (tc) writeFileSync(join(d, 'tokenizer_config.json'), JSON.stringify(tc));
    return () => loadTokenizer(d);
  };
  // a vocabulary id of -1 was fed to the model as -1 (read as the last embedding row)
  let tj = base();
  tj.model.vocab[token] = -1;
  assert.throws(load(tj), new RegExp(`gives token ${JSON.stringify(token)} the id -1; ids are integers >= 0`));
  tj = base();
  tj.model.vocab[token] = '7';
  assert.throws(load(tj), /the id "7"; ids are integers >= 0/);
  // no "type" at all (older files): the model is inferred from its fields, as Python's tokenizers does
  tj = base();
  delete tj.model.type;
  assert.deepEqual(
    load(tj)().encode('hello world', { addSpecialTokens: false }).ids,
    load(base())().encode('hello world', { addSpecialTokens: false }).ids,
  );
  tj = base();
  tj.model.type = 'Bogus';
  assert.throws(load(tj), /the tokenizer model type "Bogus" is not one the tokenizers library implements/);
  // a post-processor that writes 7 for <|endoftext|>: Python's tokenizers writes 7, the vocabulary says 50256
  tj = base();
  const eos = '<|endoftext|>';
  const special = { id: eos, ids: [7], tokens: [eos] };
  tj.post_processor = {
    type: 'TemplateProcessing',
    single: [{ SpecialToken: { id: eos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
    pair: [{ Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
    special_tokens: { [eos]: special },
  };
  let own = -1;
  assert.throws(load(tj), (e: Error) => {
    const m =
      /the post_processor writes id 7 for the special token "<\|endoftext\|>", whose id in the vocabulary is (\d+)/.exec(
        e.message,
      );
    own = Number(m?.[1]);
    return m !== null && own !== 7;
  });
  special.ids = [own];
  assert.ok(load(tj)(), 'the same with the right id loads');
  // inside a Sequence, and a token outside the vocabulary
  tj.post_processor = {
    type: 'Sequence',
    processors: [
      { type: 'ByteLevel' },
      { ...tj.post_processor, special_tokens: { '<x>': { id: '<x>', ids: [5000], tokens: ['<x>'] } } },
    ],
  };
  assert.throws(load(tj), /writes id 5000 for the special token "<x>", which is not in the vocabulary/);
  // a chat_template that is not one was read as none (chats rendered with the stand-in format)
  assert.throws(load(base(), { chat_template: 5 }), /"chat_template" is 5; a chat template is a string of Jinja/);
});

const GOLD = 'test/fixtures/golden/tokenizer-encodings.json';
const FIXTURE_MODEL = 'test/fixtures/models/gpt2';

test('fixture tokenizer: ids and offsets equal those of Python tokenizers', () => {
  assert.ok(existsSync(GOLD), `${GOLD} is missing: run test/oracle/make_fixtures.py`);
  const tok = loadTokenizer(FIXTURE_MODEL);
  const gold = JSON.parse(readFileSync(GOLD, 'utf8')) as {
    cases: Array<{ text: string; ids: number[]; offsets: Array<[number, number]> }>;
  };
  assert.ok(gold.cases.length >= 5);
  for (const g of gold.cases) {
    const enc = tok.encode(g.text, { addSpecialTokens: false });
    assert.deepEqual(enc.ids, g.ids, `ids of ${JSON.stringify(g.text)}`);
    // Python offsets count code points; ours count UTF-16 units
    const cps = [...g.text];
    const toUtf16 = (cp: number) => cps.slice(0, cp).join('').length;
    const expected = g.offsets.map(([s, e]) => [toUtf16(s), toUtf16(e)]);
    assert.deepEqual(enc.offsets, expected, `offsets of ${JSON.stringify(g.text)}`);
  }
});

test('a completion that starts the text (empty prompt, no BOS) is refused: its first token has nothing before it to be predicted from', () => {
  const tok = loadTokenizer('test/fixtures/models/llama');
  assert.throws(
    () => tokenizeQuery(tok, '', 'Paris', 64),
    (e: Error) =>
      e.message ===
      'the completion starts the text (the prompt is empty and the tokenizer adds no BOS): its first token "P" has no token before it to be predicted from, so it cannot be explained; give a prompt before the completion',
  );
  // with a prompt, every completion token is scored
  const q = tokenizeQuery(tok, 'Q: x\nA:', ' Paris', 64);
  assert.equal(
    q.weights.reduce((a, w) => a + w, 0),
    tok.encode(' Paris').ids.length,
  );
});
